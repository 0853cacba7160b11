"""Where one MiniLM fine-tune's resident memory goes, stage by stage: writes docs/memory.md.

    .venv/bin/python benchmarks/memory.py [--out=docs/memory.md]

Measures twice, each in a fresh process (as tfl runs, with glibc's default allocator; then with freed memory
returned to the system at once, a measurement setting that shows the activations' true size and what it costs
in step time), with Linux's VmRSS and VmHWM (the peak reset before each stage): the TensorFlow runtime after import, the
packaged all-MiniLM-L6-v2 classifier built from its preset, AdamW's slots, the first train step (tracing) on a
one-sentence batch, then train steps on batches of 8 and 32 real Rotten Tomatoes sentences at each length
of two of its length buckets' widths, LENGTHS (each shape run once untimed first, so that its trace is not counted as activations). The
transient above the resident memory before a step is what that step holds while it runs (activations kept for
the backward pass, gradients); its growth with the batch is the memory per example. Compare with the run's own
figure, ``peak_rss_mb`` in a run's metrics.json. Last, the whole one-epoch command of
configs/minilm_rotten_tomatoes.flags in a fresh process, and what is resident at its peak by kind of mapping
(/proc/<pid>/smaps: files, glibc's heap, large and small anonymous mappings). Imported as main.py imports them:
TensorFlow Text's op libraries load as they are used (tfl.text_ops).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def resident_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


STARTED_MB = resident_mb()

from tfl import text_ops  # noqa: E402

if __name__ == "__main__":  # as main.py does (never on import: a test process keeps the whole package)
    text_ops.load_on_demand()  # TensorFlow Text's op libraries load as keras-hub uses them

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402  (its import is part of the runtime every text run pays)

from tfl import assets, costs, devices, storage, train  # noqa: E402
from tfl import data as data_lib  # noqa: E402
from tfl.backbones import build_backbone  # noqa: E402
from tfl.runner import build_model  # noqa: E402

BATCHES = (8, 32)
LENGTHS = (24, 64)  # a middle bucket of the minilm_rotten_tomatoes config and its widest (its sequence_length)
TIMED_ROUNDS = 3  # after the stages: each of the 4 batches again, timed
ACCUMULATION = (1, 2, 4)  # --gradient_accumulation_steps: the widest bucket's batch of 32, whole or in N parts


class Stages:
    """Rows of (stage, resident after, peak during, added, held while it ran above the start) in MiB."""

    def __init__(self):
        self.rows = []
        self.before = resident_mb()
        costs.reset_peak_rss()

    def mark(self, stage: str) -> None:
        after, peak = resident_mb(), costs.peak_rss_mb()
        self.rows.append((stage, after, peak, after - self.before, peak - self.before))
        self.before = resident_mb()
        costs.reset_peak_rss()


def batch_of(backbone, texts, size: int, length: int) -> tuple:
    """``size`` sentences tokenized and padded (or cut) to exactly ``length`` tokens, as one bucket's batch."""
    features = backbone.preprocess(tf.constant(list(texts[:size])))
    features = {k: v[:, :length] for k, v in features.items()}
    return features, tf.constant(np.arange(size) % 2)


def classifier(preset: str, precision: str) -> tuple:
    """(backbone, the two-class classifier built on it)."""
    backbone = build_backbone(preset, sequence_length=max(LENGTHS), dtype=precision)
    return backbone, build_model(backbone, ["rotten", "fresh"])


def compile_as_tfl_trains(model, accumulation: int = 1) -> None:
    train.compile_model(model, train.make_optimizer(5e-5, 1000, gradient_accumulation_steps=accumulation),
                        task="classification", num_labels=2, jit_compile=False)


def measure(stages: Stages, texts, preset: str, precision: str) -> tuple:
    """Stage rows, the transient of each train step by (batch size, length), and the mean seconds per step."""
    backbone, model = classifier(preset, precision)
    stages.mark(f"classifier built from the MiniLM preset ({model.count_params() / 1e6:.1f}M parameters)")
    compile_as_tfl_trains(model)
    model.optimizer.build(model.trainable_variables)
    stages.mark("compiled; AdamW's two slots per trainable weight built")
    model.train_on_batch(*batch_of(backbone, texts, 1, max(LENGTHS)))
    stages.mark(f"first train step: tracing, on 1 sentence x {max(LENGTHS)} tokens")
    transient, batches = {}, []
    for length in LENGTHS:
        for size in BATCHES:
            batches.append(batch_of(backbone, texts, size, length))
            model.train_on_batch(*batches[-1])  # any new trace for this shape happens here, outside the measurement
            stages.mark(f"(shape {size} x {length}, first call)")
            model.train_on_batch(*batches[-1])
            stages.mark(f"train step, {size} sentences x {length} tokens")
            transient[(size, length)] = stages.rows[-1][4]
    costs.reset_peak_rss()
    started = time.perf_counter()
    for _ in range(TIMED_ROUNDS):
        for batch in batches:
            model.train_on_batch(*batch)
    step_seconds = (time.perf_counter() - started) / (TIMED_ROUNDS * len(batches))
    stages.mark("(timed rounds)")
    return stages.rows, transient, step_seconds


def return_freed_memory_at_once() -> None:
    """glibc's mmap threshold fixed at its starting 128 KiB (mallopt M_MMAP_THRESHOLD): a measurement setting,
    not tfl's (it slows steps), under which a step's activations are given back when the step frees them."""
    import ctypes

    if ctypes.CDLL(None).mallopt(-3, 128 * 1024) != 1:  # -3: M_MMAP_THRESHOLD in glibc's malloc.h
        raise SystemExit("benchmarks/memory.py: mallopt failed (glibc only)")


def per_example(transient: dict, length: int) -> float:
    small, large = BATCHES
    return (transient[(large, length)] - transient[(small, length)]) / (large - small)


def measure_in_this_process(returned: bool, precision: str = "auto") -> dict:
    """The stage rows and per-sentence memory, in a fresh process (this one): JSON for the parent."""
    if returned:
        return_freed_memory_at_once()
    assets.asset_path("minilm")  # the packaged encoder; a clear error if it is not fetched
    stages = Stages()
    stages.rows.append(("Python + TensorFlow, Keras, keras-hub imported (TensorFlow Text's op libraries as used)",
                        resident_mb(), costs.peak_rss_mb(), resident_mb() - STARTED_MB, None))
    texts, total = longest_texts_first()
    stages.mark(f"Rotten Tomatoes loaded ({total:,d} sentences)")
    precision = devices.resolve_precision(precision)
    rows, transient, step_seconds = measure(stages, texts, "asset:minilm", precision)
    return {"rows": [r for r in rows if not r[0].startswith("(")],  # the untimed first calls only keep traces out
            "peak": max(r[2] for r in rows),  # over every stage, those rows too
            "per_sentence": {str(length): per_example(transient, length) for length in LENGTHS},
            "step_seconds": step_seconds, "precision": precision}


def longest_texts_first() -> tuple:
    """(training sentences, longest first, so that every batch is real tokens at its full width; total count)."""
    splits = data_lib.load_data("asset:rotten_tomatoes", seed=0)
    texts = sorted((x.decode() for x, _ in splits.train.as_numpy_iterator()), key=len, reverse=True)
    return texts, sum(splits.sizes.values())


def measure_accumulation(steps: int, preset: str = "asset:minilm", texts: Optional[list] = None,
                         precision: str = "auto") -> dict:
    """In a fresh process (this one), as tfl runs: the peak resident memory of building the classifier and
    training it on the widest bucket's batch of 32 sentences, whole or accumulated from ``steps`` batches of
    32 / steps (``--gradient_accumulation_steps``), and the seconds per 32 sentences."""
    texts = texts or longest_texts_first()[0]
    backbone, model = classifier(preset, devices.resolve_precision(precision))
    compile_as_tfl_trains(model, accumulation=steps)
    batch = batch_of(backbone, texts, BATCHES[-1] // steps, max(LENGTHS))
    for _ in range(steps):  # tracing and the first update, untimed
        model.train_on_batch(*batch)
    started = time.perf_counter()
    for _ in range(TIMED_ROUNDS * steps):
        model.train_on_batch(*batch)
    return {"peak": costs.peak_rss_mb(), "seconds": (time.perf_counter() - started) / TIMED_ROUNDS,
            "updates": int(model.optimizer.iterations.numpy()), "micro_batch": BATCHES[-1] // steps,
            "weights_mb": sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                              for v in model.trainable_variables) / 2**20}


def in_subprocess(measure: str, precision: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--measure=" + measure, "--precision=" + precision]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks/memory.py: the measuring process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cell(value) -> str:
    return "" if value is None else f"{value:,.0f}"


def accumulation_table(accumulated: dict) -> list:
    """``accumulated``: {precision: {N: run}}, N = 1 the whole batch."""
    rows = ["| precision | batch of 32 x 64 tokens | peak resident (MiB) | vs whole | seconds per 32 sentences "
            "| vs whole |", "|---|---|---|---|---|---|"]
    for precision, runs in accumulated.items():
        whole = runs[1]
        for steps, run in runs.items():
            how = "whole" if steps == 1 else f"{steps} x {run['micro_batch']}, `--gradient_accumulation_steps={steps}`"
            rows.append(f"| {precision} | {how} | {run['peak']:,.0f} | {run['peak'] - whole['peak']:+,.0f} "
                        f"| {run['seconds']:.2f} | {run['seconds'] / whole['seconds']:.2f}x |")
    return rows


def accumulation_summary(accumulated: dict) -> str:
    """The table's verdict per precision: the largest cut of the peak, or none."""
    parts = []
    for precision, runs in accumulated.items():
        steps = min(runs, key=lambda n: runs[n]["peak"])
        cut = runs[1]["peak"] - runs[steps]["peak"]
        parts.append(f"{precision}: the peak falls by {cut:,.0f} MiB at N={steps}, at "
                     f"{runs[steps]['seconds'] / runs[1]['seconds']:.2f}x the time" if steps != 1 and cut > 0
                     else f"{precision}: no cut of the peak (accumulation does not pay here)")
    weights = next(iter(accumulated.values()))[1]["weights_mb"]
    return (f"Here, {'; '.join(parts)}. The accumulated gradients are one more copy of the trainable weights "
            f"({weights:,.0f} MiB for this model), which the smaller activations must outweigh.")


def activations_text(default: dict, returned: dict) -> list:
    """What the step rows say about activations, when they show as a transient (they do not on every host)."""
    top, batch = str(max(LENGTHS)), BATCHES[-1]

    def slopes(run):
        return ", ".join(f"{run['per_sentence'][str(n)]:.1f} MiB at {n} tokens" for n in LENGTHS)

    measured = (f"Per sentence in a batch, from the difference between batches of {BATCHES[0]} and {BATCHES[1]}: "
                f"{slopes(returned)} with freed memory returned ({slopes(default)} as tfl runs).")
    floor = returned["rows"][-1][1] + batch * returned["per_sentence"][top]
    # A floor above the measured peak, or a slope below 1 MiB at any length, is noise (one step's transient), not
    # activations per sentence.
    if min(returned["per_sentence"].values()) < 1.0 or floor > returned["peak"]:
        return [f"{measured} That is no measurable transient: on this host a step's activations do not show "
                "above the resident memory before it, even with freed memory returned, while *resident after* "
                "grows from one batch shape to the next and stays; so neither the activations per sentence nor a "
                "floor can be read from these stages here. The gradient-accumulation table below measures each "
                "setting's peak directly."]
    return [
        f"{measured[:-2]}, where a step partly reuses what earlier steps freed): with freed memory returned, "
        f"the activations' true size. A batch of {batch} at the widest "
        f"bucket ({top} tokens) holds about {batch * returned['per_sentence'][top]:,.0f} MiB of activations "
        "while its step runs.",
        "",
        "What sets a run's peak, read from these tables: the TensorFlow runtime, the weights with AdamW's slots "
        "and the traced step stay resident for the whole run; the widest bucket's batch adds its activations "
        "for the length of one step; glibc keeps what steps of other shapes freed. Returning freed memory at "
        "once removes the last part but makes every step pay page faults for its activations again, so tfl "
        "keeps glibc's default and only gives the heap's free memory back between runs "
        "(`tfl.costs.release_memory`, which compare and tune call; the demo runs each job in a process of its own).",
        "Within a run, tfl frees what training alone used once its last step is done (its traced functions, "
        "`tfl.costs.release_traced_functions`; before the export also the input pipelines), so that the final "
        "validation's and the export's traces reuse that memory; and the command loads TensorFlow Text's op "
        "libraries as keras-hub uses them (`tfl.text_ops`), not all ~22 of them at import.",
        "",
        f"So one fine-tune at batch {batch} and {top} tokens needs at least {floor:,.0f} MiB here (what stays "
        f"resident after the steps with freed memory returned, {returned['rows'][-1][1]:,.0f} MiB, plus that "
        "batch's activations), whatever the allocator does. Going lower needs fewer activations per step: a "
        "smaller batch or `--sequence_length`, gradient accumulation (below), or recomputing activations in the "
        "backward pass, which tfl does not do."]


RUN_FLAGS = ("--flagfile=configs/minilm_rotten_tomatoes.flags", "--epochs=1")  # the whole one-epoch command
LARGE_MAPPING_MB = 64
COMPOSITION = {  # kind of mapping in /proc/<pid>/smaps: what it holds
    "large": f"anonymous mappings of {LARGE_MAPPING_MB} MiB or more (with oneDNN, TensorFlow's CPU allocator "
             "grows its tensor pool in regions this large: weights, AdamW's slots, gradients, activations)",
    "files": "shared libraries and other mapped files (TensorFlow's libraries among them)",
    "heap": "glibc's main heap (the main thread's malloc: traced graphs, protos, Python objects)",
    "small": "smaller anonymous mappings (Python's object arenas, malloc arenas of other threads, smaller "
             "allocator regions)",
    "other": "the kernel's named mappings ([stack], [vdso], ...)",
}


def smaps_composition(smaps: str) -> dict:
    """Resident MiB by kind of mapping (COMPOSITION) from the text of one /proc/<pid>/smaps; the kinds sum to
    every mapping's Rss."""
    resident = dict.fromkeys(COMPOSITION, 0.0)
    kind = None
    for line in smaps.splitlines():
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            name = " ".join(fields[5:])
            anonymous = not name or name.startswith("[anon")  # [anon:...]: a named anonymous mapping
            kind = ("files" if name.startswith("/") else "heap" if name == "[heap]" else "other" if not anonymous
                    else "large" if end - start >= LARGE_MAPPING_MB << 20 else "small")
        elif fields and fields[0] == "Rss:" and kind:
            resident[kind] += int(fields[1]) / 1024
    return resident


def run_composition(poll_seconds: float = 0.25) -> dict:
    """The one-epoch command (RUN_FLAGS) in a fresh process, its resident memory polled; at each new high, its
    composition by kind of mapping. Returns the composition at the highest sample, that sample, and the run's
    own peak (metrics.json's peak_rss_mb, the kernel's exact high-water mark) and trainable parameters."""
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = os.path.join(scratch, "run")  # a new folder: tfl refuses one that holds other files
        command = [sys.executable, os.path.join(ROOT, "main.py"), *RUN_FLAGS, f"--model_dir={model_dir}"]
        with open(os.path.join(scratch, "stderr.log"), "w+", encoding="utf-8") as log:  # a pipe could fill up
            child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
            highest, composition = 0.0, {}
            while child.poll() is None:
                try:
                    with open(f"/proc/{child.pid}/smaps", encoding="ascii", errors="replace") as smaps:
                        sample = smaps_composition(smaps.read())
                except OSError:  # the process ended between the poll and the read
                    break
                if sum(sample.values()) > highest:
                    highest, composition = sum(sample.values()), sample
                time.sleep(poll_seconds)
            child.wait()
            log.seek(0)
            if child.returncode != 0:
                raise SystemExit(f"benchmarks/memory.py: {' '.join(command)} failed:\n{log.read()[-2000:]}")
        with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as f:
            metrics = json.load(f)
    return {"composition": composition, "sampled_peak": highest, "peak": metrics["peak_rss_mb"], "poll": poll_seconds,
            "trainable_params": metrics["trainable_params"], "precision": metrics["precision"]}


def composition_lines(run: dict, target_mb: float = 1536.0) -> list:
    """The composition table of a real run at its peak, and what it leaves for tensors under issue #17's target."""
    parts = run["composition"]
    rows = ["| kind of memory | resident at the sampled peak (MiB) | of it |", "|---|---|---|"]
    rows += [f"| {COMPOSITION[kind]} | {parts[kind]:,.0f} | {parts[kind] / run['sampled_peak']:.0%} |"
             for kind in sorted(parts, key=parts.get, reverse=True)]
    rows.append(f"| all | {run['sampled_peak']:,.0f} | 100% |")
    outside = run["sampled_peak"] - parts["large"]
    dense = run["trainable_params"] * 4 * 4 / 2**20  # float32 weights, AdamW's two slots and dense gradients
    return [
        "## What is resident at a real run's peak",
        "",
        f"The whole command `python main.py {' '.join(RUN_FLAGS)}` in a fresh process (precision "
        f"{run['precision']}), its `/proc/<pid>/smaps` read every {run['poll']:g} s; at the highest sample, the "
        f"resident memory by kind of mapping. The run's own peak (metrics.json's `peak_rss_mb`, the kernel's "
        f"high-water mark) was {run['peak']:,.0f} MiB; the highest sample {run['sampled_peak']:,.0f} MiB.",
        "",
        *rows,
        "",
        "The large mappings are the tensor pool's regions: TensorFlow built with oneDNN allocates tensors through "
        "MklCPUAllocator, a BFC pool that grows by regions of doubling size and keeps them (a native-allocation "
        "trace of this command with memray, not part of this script, showed them as the large blocks).",
        "",
        f"Outside the large mappings the run holds {outside:,.0f} MiB. Under issue #17's target for one "
        f"fine-tune, {target_mb:,.0f} MiB, that leaves {target_mb - outside:,.0f} MiB, while the "
        f"{run['trainable_params'] / 1e6:.1f}M trainable weights, AdamW's two slots and the gradients take up to "
        f"{dense:,.0f} MiB in float32 (less where a gradient is sparse, as an embedding's can be), before any "
        "activation.",
    ]


def matmul_peaks() -> dict:
    """{dtype: GFLOP/s} of a 2048² matmul on this host now (hosts here differ by 2x from day to day, and the
    accumulation table's times are only comparable on one host)."""
    from benchmarks.run import matmul_gflops  # here, not at the top: the measuring children never need it

    return {dtype.name: matmul_gflops(dtype) for dtype in (tf.float32, tf.bfloat16)}


def report(default: dict, returned: dict, accumulated: dict, seconds: float, command: str,
           matmul: Optional[dict] = None, real_run: Optional[dict] = None) -> str:
    table = ["| stage | resident after | resident after, freed memory returned | held while running "
             "| held while running, freed memory returned |", "|---|---|---|---|---|"]
    for a, b in zip(default["rows"], returned["rows"]):
        table.append(f"| {a[0]} | {cell(a[1])} | {cell(b[1])} | {cell(a[4])} | {cell(b[4])} |")
    peaks = [run["peak"] for run in (default, returned)]
    steps = [run["step_seconds"] for run in (default, returned)]

    lines = [
        "# Memory of one fine-tune",
        "",
        f"Machine: {os.cpu_count()} cores, TF {tf.__version__}, Keras {keras.__version__}, keras-hub {keras_hub.__version__}, precision "
        f"{default['precision']}. Command: `{command}` ({time.strftime('%Y-%m-%d')}, "
        f"{seconds:.0f} s)" + (", matmul 2048² peak measured in the same run: " + ", ".join(
            f"{name} {rate:.0f} GFLOP/s" for name, rate in matmul.items()) if matmul else "")
        + ". Every number below comes from this run; rerun the command to refresh it.",
        "",
        "The packaged all-MiniLM-L6-v2 classifier (the model of `configs/minilm_rotten_tomatoes.flags`), built "
        "and trained stage by stage, twice, each in a fresh process: as tfl runs (glibc's default allocator), "
        "and with freed memory returned at once (glibc's mmap threshold fixed at its starting 128 KiB; by "
        "default glibc raises it to the size of each large block freed, so a step's activations move onto the "
        "heap and stay resident after the step, for reuse). In MiB. *Held while running* is the stage's peak "
        "above the resident memory before it: for a train step, the activations kept for the backward pass and "
        "the gradients, which the step frees when it ends.",
        "",
        *table,
        "",
        "| | as tfl runs | freed memory returned |",
        "|---|---|---|",
        f"| peak over all stages, the untimed first calls and timed rounds too (MiB) | {peaks[0]:,.0f} | {peaks[1]:,.0f} |",
        f"| train step, mean over the {len(BATCHES) * len(LENGTHS)} shapes above, {TIMED_ROUNDS} rounds (s) "
        f"| {steps[0]:.2f} | {steps[1]:.2f} ({steps[1] / steps[0]:.2f}x) |",
        "",
        *activations_text(default, returned),
        "",
        "## A smaller batch, the same update: gradient accumulation",
        "",
        "`--gradient_accumulation_steps=N` with `--batch_size` cut N-fold (Keras's own accumulation: one update "
        "every N batches, from their mean gradient) keeps the update of the whole batch and computes 1/N of it "
        "per step, so a step's activations are 1/N as large; whether the peak falls with them depends on what "
        "sets it. Each row is its own fresh process, as tfl runs: the classifier built and trained on the "
        f"widest bucket's batch, whole or in N parts; peak over the whole process (the preset's load included), "
        f"seconds over {TIMED_ROUNDS} updates after an untimed first one.",
        "",
        *accumulation_table(accumulated),
        "",
        accumulation_summary(accumulated),
    ]
    if real_run:
        lines += ["", *composition_lines(real_run)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/memory.md")
    parser.add_argument("--precision", default="auto", help="as --precision: auto (tfl's choice here), float32, ...")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: default, returned or accumulate:N
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        print("benchmarks/memory.py reads /proc/self/status: run it on Linux", file=sys.stderr)
        return 1
    if args.measure:
        kind, _, steps = args.measure.partition(":")
        print(json.dumps(measure_accumulation(int(steps), precision=args.precision) if kind == "accumulate"
                         else measure_in_this_process(kind == "returned", args.precision)))
        return 0
    started = time.perf_counter()
    default, returned = (in_subprocess(kind, args.precision) for kind in ("default", "returned"))
    # tfl's precision here, and float32 too where that differs (the activations' size differs)
    precisions = dict.fromkeys([default["precision"], "float32"])
    accumulated = {precision: {steps: in_subprocess(f"accumulate:{steps}", precision) for steps in ACCUMULATION}
                   for precision in precisions}
    command = " ".join([".venv/bin/python benchmarks/memory.py"] + sys.argv[1:])
    real_run = run_composition()
    text = report(default, returned, accumulated, time.perf_counter() - started, command, matmul_peaks(), real_run)
    print(text)
    storage.write_text_atomically(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
