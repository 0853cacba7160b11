"""How much of a one-epoch command is training: runs `python main.py --flagfile=... --epochs=1` once, as a
user would, and writes docs/command.md.

    .venv/bin/python benchmarks/command.py [--flagfile=configs/minilm_rotten_tomatoes.flags] \
        [--out=docs/command.md] [-- <more main.py flags>]

The command runs in a fresh process into a temporary --model_dir (removed afterwards). Its wall time is taken
from before the process starts to its exit; the stages inside come from the run's own metrics.json
(``timings``: imports, devices, data load, batches, model build, fit with its epoch, evaluation, saving,
export; ``peak_rss_mb``). The interpreter's start before main.py's first line, and what the process does
after writing metrics.json (the run folder's bookkeeping, interpreter exit), make the row "outside main.py".
The target of the speed issue: the whole command within 1.15x its training time, where training time is the
epoch (its steps with the first step's tracing and the input pipeline's first pass, its validation and
checkpoint). The host's matmul peak is measured in the same
run, before the command (benchmarks/run.py's matmul_gflops).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 1.15  # whole command / training time
# metrics.json's stages in the order a run takes them (tfl/runner.py, tfl/outputs.py); "epochs" is a list.
STAGES = ("imports", "devices", "data_load", "batches", "build", "transfer", "feature_cache", "fit", "evaluation",
          "saving", "export")


def run_command(flagfile: str, extra: list, model_dir: str) -> tuple:
    """(wall seconds, metrics.json) of one run of main.py with --epochs=1 into ``model_dir``."""
    command = [sys.executable, os.path.join(ROOT, "main.py"), f"--flagfile={flagfile}", "--epochs=1",
               f"--model_dir={model_dir}", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"error: the command failed (exit {done.returncode}): {' '.join(command)}\n"
                         f"{done.stderr[-3000:]}")
    with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as f:
        return wall, json.load(f)


def stage_rows(timings: dict, wall: float) -> list:
    """[(stage, seconds, share of the wall)]: the run's stages, then what the process spent outside them."""
    rows = [(stage, float(timings[stage])) for stage in STAGES if timings.get(stage)]
    rows.append(("outside main.py (interpreter start and exit) and after metrics.json", wall - float(timings["total"])))
    outside = float(timings["total"]) - sum(seconds for _, seconds in rows[:-1])
    rows.insert(-1, ("between the stages (config, run folder, metrics)", outside))
    return [(stage, seconds, seconds / wall) for stage, seconds in rows]


def report(wall: float, metrics: dict, command: str, peaks: dict, host: str) -> str:
    timings = metrics["timings"]
    epoch = float(timings["epochs"][0])
    fit = float(timings["fit"])
    ratio = wall / epoch
    lines = [
        "# The whole command around one epoch",
        "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; rerun it to refresh. "
        f"Host: {host}; 2048² matmul peak measured in the same run, before the command: float32 "
        f"{peaks['float32']:.0f} GFLOP/s, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s.",
        "",
        f"The command: `{metrics['command']}`, in a fresh process. Its wall time is measured from before the "
        "process starts to its exit; the stages come from the run's own `metrics.json` (`timings`).",
        "",
        "| | seconds | ratio |",
        "|---|---|---|",
        f"| whole command (wall) | {wall:.1f} | {ratio:.3f}x the epoch "
        f"({'meets' if ratio <= TARGET else 'misses'} the target of {TARGET:.2f}x) |",
        f"| the epoch (training steps with the first step's tracing and the input pipeline's first pass, "
        f"validation, checkpoint) | {epoch:.1f} | 1.00x |",
        f"| fit (compile, the epoch) | {fit:.1f} | {fit / epoch:.2f}x the epoch |",
        f"| everything but the epoch | {wall - epoch:.1f} | {(wall - epoch) / wall:.0%} of the wall |",
        "",
        f"Training: {metrics['train_examples_seen']:,d} examples in {metrics['steps_per_epoch']} steps, "
        f"{metrics['train_examples_per_second']:.1f} examples/s over the fit; precision {metrics['precision']}, "
        f"jit_compile {metrics['jit_compile']}; test accuracy {metrics['test'].get('accuracy', float('nan')):.3f}; "
        f"peak resident memory {metrics.get('peak_rss_mb') or float('nan'):,.0f} MiB.",
        "",
        "| stage | seconds | of the wall |",
        "|---|---|---|",
    ]
    lines += [f"| {stage} | {seconds:.1f} | {share:.1%} |" for stage, seconds, share in stage_rows(timings, wall)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flagfile", default="configs/minilm_rotten_tomatoes.flags")
    parser.add_argument("--out", default="docs/command.md")
    parser.add_argument("extra", nargs="*", help="more main.py flags, after --")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import run as bench_run  # benchmarks/run.py: imports TensorFlow, in this process only

    peaks = {dtype: bench_run.matmul_gflops(dtype) for dtype in ("float32", "bfloat16")}
    work = tempfile.mkdtemp(prefix="tfl-command-")
    try:
        wall, metrics = run_command(args.flagfile, args.extra, os.path.join(work, "run"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics["command"] = " ".join(["python main.py", f"--flagfile={args.flagfile}", "--epochs=1",
                                   "--model_dir=<temporary>", *args.extra])
    command = " ".join([".venv/bin/python benchmarks/command.py", *(argv if argv is not None else sys.argv[1:])])
    host = f"{platform.machine()}, {os.cpu_count()} CPUs"
    text = report(wall, metrics, command, peaks, host)
    from tfl.storage import write_text_atomically

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text_atomically(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
