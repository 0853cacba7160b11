"""tfl's performance benchmark: side-by-side ratios measured in one process, one sitting; writes the whole of
docs/benchmarks.md (nothing in it is typed by hand).

    .venv/bin/python benchmarks/run.py [--steps=30] [--out=docs/benchmarks.md]

Needs the offline assets (make assets). Sections:
  1. the machine's matmul peak (float32, bfloat16);
  2. MiniLM fine-tune step throughput at batch 32, sequence 128: plain Keras (keras-hub
     BertTextClassifier) in float32, float32 + XLA, mixed_bfloat16, against tfl's default path,
     and the share of the peak of the dtype each computes in;
  3. a Rotten Tomatoes fine-tune epoch with length bucketing vs. padding every batch to 128: one
     epoch's batches are built, --steps of them drawn at random (so in the epoch's own proportions of
     bucket shapes) are timed, and the mean time per batch is scaled to the epoch's batch count;
  4. a linear-probe epoch after the first: head on cached features vs. recomputing the backbone;
  5. input pipeline overhead: the real tf.data pipeline vs. the same batches as tensors already in memory;
  6. where the default step's time goes: the step's matmul shapes alone (benchmarks/matmul_shapes.py),
     forward / backward / whole-step times (benchmarks/step_breakdown.py) and an op-by-op profile
     (benchmarks/profile_step.py), with what follows from them;
  7. the torch peer (benchmarks/peer_torch.py, in .venv-peer: make bench-peer) on the same weights, batches
     and training sentences, run as a subprocess before TensorFlow starts its work; tfl / torch ratios for the
     fixed-shape step and the Rotten Tomatoes epoch. Without .venv-peer the rows say so.
Throughputs exclude the first steps (tracing). The machine is noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfl import assets, devices, heads, storage, train  # noqa: E402
from tfl import data as data_lib  # noqa: E402
from tfl.backbones import build_backbone  # noqa: E402
from tfl.runner import build_model, cache_features  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matmul_shapes  # noqa: E402
import profile_step  # noqa: E402
import step_breakdown  # noqa: E402

BATCH, SEQ = 32, 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PYTHON = os.path.join(ROOT, ".venv-peer", "bin", "python")


def run_peer(model_dir: str, texts, labels, precision: str, steps: int) -> dict:
    """The torch peer's measurements (benchmarks/peer_torch.py) on the same training sentences, or
    {"missing": why} when its environment is not built."""
    if not os.path.exists(PEER_PYTHON):
        return {"missing": "not run: `make bench-peer` builds its environment"}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as data:
        json.dump({"texts": [str(t) for t in texts], "labels": [int(y) for y in labels]}, data)
        data.flush()
        done = subprocess.run([PEER_PYTHON, os.path.join(ROOT, "benchmarks", "peer_torch.py"), f"--model={model_dir}",
                               f"--data={data.name}", f"--precision={precision}", f"--batch={BATCH}", f"--seq={SEQ}",
                               f"--steps={steps}"], capture_output=True, text=True)
    if done.returncode != 0:  # the rows say so; tfl's own measurements still count
        print(done.stderr[-2000:], file=sys.stderr)
        return {"missing": "not run: benchmarks/peer_torch.py failed (its error is in the benchmark's stderr)"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio_vs_peer(ratio_of, peer: dict, goal: float) -> tuple:
    """(measured text, met) for ``ratio_of(peer)`` against ``goal``; not met when the peer did not run."""
    if "missing" in peer:
        return "not measured: the torch peer did not run (make bench-peer)", False
    ratio = ratio_of(peer)
    return f"{ratio:.2f}x", ratio >= goal


def target_rows(targets: list) -> str:
    """The issue's targets against this run: [(target, measured, met)] as a table."""
    lines = ["| target | measured in this run | met |", "|---|---|---|"]
    lines += [f"| {target} | {measured} | {'yes' if met else '**no**'} |" for target, measured, met in targets]
    return "\n".join(lines) + "\n"


def matmul_gflops(dtype, n=2048) -> float:
    return matmul_shapes.gflops((n, n), (n, n), dtype)[0]


def timed_fit(model, dataset, steps: int, warmup: int = 3) -> float:
    """Examples per second over ``steps`` training steps after ``warmup`` steps."""
    batches = iter(dataset.repeat())
    for _ in range(warmup):
        model.train_on_batch(*next(batches))
    started = time.perf_counter()
    count = 0
    for _ in range(steps):
        x, y = next(batches)
        model.train_on_batch(x, y)
        count += int(y.shape[0])
    return count / (time.perf_counter() - started)


def minilm_flops_per_example(backbone, seq: int) -> float:
    """Forward + backward FLOPs of one example: 6 x non-embedding params x tokens + attention."""
    hub = backbone.keras_hub_backbone
    embedding = sum(int(np.prod(w.shape)) for w in hub.weights if "embedding" in w.path)
    dense = hub.count_params() - embedding
    attention = 4 * hub.num_layers * seq * seq * hub.hidden_dim  # scores and weighted sum, forward
    return 3 * (2 * dense * seq + attention)


def plain_keras_classifier(preset: str, dtype: str, jit: bool):
    import keras_hub

    model = keras_hub.models.BertTextClassifier.from_preset(preset, num_classes=2, preprocessor=None, dtype=dtype)
    model.compile(optimizer=keras.optimizers.AdamW(5e-5), jit_compile=jit,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def epoch_seconds(model, batches, steps: int, seed: int = 0) -> tuple:
    """(seconds for one epoch of ``batches``, its batch count): ``steps`` batches drawn at random from one
    epoch (so bucket shapes in the epoch's proportions), each shape traced once first, mean time x count."""
    epoch = list(batches)
    picks = np.random.RandomState(seed).choice(len(epoch), min(steps, len(epoch)), replace=False)
    for shape in {tuple(epoch[i][0]["token_ids"].shape) for i in picks}:  # trace every shape before timing
        model.train_on_batch(*next(b for b in epoch if tuple(b[0]["token_ids"].shape) == shape))
    started = time.perf_counter()
    for i in picks:
        model.train_on_batch(*epoch[i])
    return (time.perf_counter() - started) / len(picks) * len(epoch), len(epoch)


def bucket_shaped(batch: tuple, length: int) -> tuple:
    """``batch`` cut or zero-padded to ``length`` tokens: a batch of one bucket's shape, for tracing it."""
    x, y = batch
    fit = lambda v: v[:, :length] if v.shape[1] >= length else tf.pad(v, [[0, 0], [0, length - v.shape[1]]])  # noqa
    return {key: fit(value) for key, value in x.items()}, y


def in_memory(batches: list) -> tf.data.Dataset:
    """The same batches as a dataset of tensors already in memory (no Python generator in between)."""
    dataset = tf.data.Dataset.from_tensors(batches[0])
    for batch in batches[1:]:
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(batch))
    return dataset


def step_analysis(shapes: dict, parts: dict, flops_per_example: float) -> str:
    """What the matmul speeds and the step breakdown, measured above, say; every number computed here."""
    forward = parts["forward (training mode)"]
    forward_gflop = flops_per_example / 3 * BATCH / 1e9  # forward is a third of forward + backward
    matmul_share = forward_gflop / shapes["mix"] / forward
    step = parts["whole train step (Keras)"]
    rest = step - parts["forward + backward"]
    return (f"- The forward pass does about {forward_gflop:.0f} GFLOP of matmuls per batch in {forward * 1000:.0f} ms, "
            f"{forward_gflop / forward:.0f} GFLOP/s. The same matmuls alone run at {shapes['mix']:.0f} GFLOP/s "
            f"(FLOP-weighted mix above), so they account for about {matmul_share:.0%} of the forward time; the "
            "rest is the work between them (softmax, GELU, layer norm, dropout, masks, dtype casts). That share is "
            "a remainder, not measured op by op.\n"
            f"- Forward + backward is {parts['forward + backward'] / forward:.1f}x the forward pass; the optimizer "
            f"update and Keras's own overhead are the rest of the step: {rest * 1000:.0f} ms of {step * 1000:.0f} ms "
            f"({rest / step:.0%}; a negative value means it is within the timing noise).\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()
    rows = []
    preset = assets.asset_path("minilm")
    splits = data_lib.load_data("asset:rotten_tomatoes", seed=0)
    texts = np.array([x.decode() for x, _ in splits.train.as_numpy_iterator()], dtype=object)
    labels = np.array([y for _, y in splits.train.as_numpy_iterator()])

    precision = devices.resolve_precision("auto")
    peer_precision = "bfloat16" if "bfloat16" in precision else "float32"  # the peer computes in tfl's precision
    peer = run_peer(preset, texts, labels, peer_precision, args.steps)
    peaks = {"float32": matmul_gflops(tf.float32), "bfloat16": matmul_gflops(tf.bfloat16)}
    rows.append(("matmul 2048² peak", f"float32 {peaks['float32']:.0f} GFLOP/s, bfloat16 {peaks['bfloat16']:.0f} "
                 "GFLOP/s", ""))

    # 2. fine-tune throughput, batch 32, sequence 128, the same real sentences for every configuration.
    tokenizer_backbone = build_backbone("asset:minilm", sequence_length=SEQ)
    inputs = tokenizer_backbone.preprocess(tf.constant(texts[: BATCH * 8].astype(str)))
    fixed = tf.data.Dataset.from_tensor_slices((inputs, labels[: BATCH * 8])).batch(BATCH, drop_remainder=True).cache()
    throughput, computes_in = {}, {}
    plain = [("plain Keras float32", "float32", False), ("plain Keras float32 + XLA", "float32", True)]
    if devices.cpu_has_native_bf16() or tf.config.list_physical_devices("GPU"):  # emulated bf16 is not a contender
        plain.append(("plain Keras mixed_bfloat16", "mixed_bfloat16", False))
    for name, dtype, jit in plain:
        throughput[name] = timed_fit(plain_keras_classifier(preset, dtype, jit), fixed, args.steps)
        computes_in[name] = "bfloat16" if "bfloat16" in dtype else "float32"
    # Record what XLA buys on this CPU, so --jit_compile=auto can decide from a measurement.
    speedup = throughput["plain Keras float32 + XLA"] / throughput["plain Keras float32"]
    devices.record_xla_speedup(speedup, "plain Keras MiniLM fine-tune step, batch 32, seq 128, float32")
    jit = devices.resolve_jit_compile("auto")  # after the XLA measurement above
    backbone = build_backbone("asset:minilm", sequence_length=SEQ, dtype=precision)
    model = build_model(backbone, ["rotten", "fresh"])
    train.compile_model(model, train.make_optimizer(5e-5, 1000), task="classification", num_labels=2, jit_compile=jit)
    default = f"tfl default ({precision}, jit={jit})"
    throughput[default] = timed_fit(model, fixed, args.steps)
    computes_in[default] = "bfloat16" if "bfloat16" in precision else "float32"
    best_plain = max(v for k, v in throughput.items() if k.startswith("plain"))
    flops = minilm_flops_per_example(backbone, SEQ)
    for name, value in throughput.items():
        peak = computes_in[name]
        rows.append((f"MiniLM fine-tune, {name}", f"{value:.1f} ex/s", f"{value / best_plain:.2f}x best plain; "
                     f"{value * flops / 1e9 / peaks[peak]:.0%} of the {peak} peak"))
    peer_name = f"torch {peer.get('torch', '')} + transformers {peer.get('transformers', '')}, {peer_precision}"
    if "missing" in peer:
        rows.append(("MiniLM fine-tune, torch peer", peer["missing"], ""))
    else:
        rows.append((f"MiniLM fine-tune, {peer_name}", f"{peer['fixed_step_ex_s']:.1f} ex/s",
                     f"tfl default / torch: {throughput[default] / peer['fixed_step_ex_s']:.2f}x"))

    # 3. bucketing vs. padding to 128, on the tfl default model, over batches drawn in the epoch's proportions.
    lengths = data_lib.token_lengths(splits.train.batch(256).map(lambda x, y: backbone.preprocess(x)))
    bounds = data_lib.choose_boundaries(lengths, 8)
    bounds[-1] = SEQ
    timings = {}
    for name, boundaries in [("pad to 128", None), ("8 length buckets", bounds)]:
        batches = data_lib.make_batches(splits.train, batch_size=BATCH, preprocess=backbone.preprocess, training=True,
                                        bucket_boundaries=boundaries)
        timings[name], epoch_batches = epoch_seconds(model, batches, args.steps)
        rows.append((f"RT fine-tune epoch, {name}", f"{timings[name]:.0f} s/epoch ({epoch_batches} batches)",
                     f"padding {data_lib.padding_fraction(lengths, boundaries or [SEQ]):.1%}"))
    rows.append(("bucketing speed-up per epoch", f"{timings['pad to 128'] / timings['8 length buckets']:.2f}x", ""))
    if "missing" not in peer:
        rows.append((f"RT fine-tune epoch, {peer_name}, per-batch dynamic padding",
                     f"{peer['epoch_seconds']:.0f} s/epoch ({peer['epoch_batches']} batches)",
                     f"padding {peer['padding']:.1%}; tfl buckets {peer['epoch_seconds'] / timings['8 length buckets']:.2f}x "
                     "faster"))
    print("\n".join(f"{a}: {b} ({c})" for a, b, c in rows), flush=True)  # in the log even if a later part fails
    # 4. linear probe, an epoch after the first: cached features vs. recomputing the frozen backbone.
    probe_backbone = build_backbone("asset:minilm", sequence_length=64, dtype=precision)
    probe = build_model(probe_backbone, ["rotten", "fresh"], frozen_backbone=True)
    probe_backbone.model.trainable = False
    subset = splits.train.take(2048)
    batches = data_lib.make_batches(subset, batch_size=BATCH, preprocess=probe_backbone.preprocess, training=True)
    train.compile_model(probe, train.make_optimizer(1e-3, 1000), task="classification", num_labels=2, jit_compile=False)
    probe.fit(batches, epochs=1, verbose=0)
    started = time.perf_counter()
    probe.fit(batches, epochs=1, verbose=0)
    recompute = time.perf_counter() - started
    features, feature_labels, _ = cache_features(probe_backbone, batches)
    head = heads.head_only_model(probe, features.shape[1])
    train.compile_model(head, train.make_optimizer(1e-3, 1000), task="classification", num_labels=2, jit_compile=False)
    cached = tf.data.Dataset.from_tensor_slices((features, feature_labels)).shuffle(4096).batch(BATCH)
    head.fit(cached, epochs=1, verbose=0)
    started = time.perf_counter()
    head.fit(cached, epochs=1, verbose=0)
    cached_seconds = time.perf_counter() - started
    rows.append(("linear probe epoch 2+ (2,048 sentences)", f"recompute {recompute:.1f} s, cached {cached_seconds:.2f} s",
                 f"{recompute / cached_seconds:.0f}x"))

    # 5. input pipeline overhead: the real pipeline vs. the same batches as tensors already in memory.
    real = data_lib.make_batches(splits.train, batch_size=BATCH, preprocess=backbone.preprocess, training=True,
                                 bucket_boundaries=bounds)
    materialised = in_memory(list(real.take(args.steps + 3)))
    first = next(iter(materialised))
    for length in bounds:  # trace every bucket shape first: under XLA a new shape costs a compile, not input time
        model.train_on_batch(*bucket_shaped(first, length))
    rate_real, rate_memory = timed_fit(model, real, args.steps), timed_fit(model, materialised, args.steps)
    rows.append(("input pipeline", f"real {rate_real:.1f} ex/s, in memory {rate_memory:.1f} ex/s",
                 f"overhead {1 - rate_real / rate_memory:.1%} (negative: within the noise)"))

    # 6. where the default step's time goes.
    compute_dtype = tf.bfloat16 if "bfloat16" in precision else tf.float32
    shapes = matmul_shapes.shape_speeds(BATCH, SEQ, compute_dtype)
    parts = step_breakdown.breakdown(list(texts[:BATCH].astype(str)), precision)
    fixed_batch = next(iter(fixed))
    if jit:  # an XLA step is one compiled cluster: the profiler sees its ops only when each runs on its own
        train.compile_model(model, train.make_optimizer(5e-5, 1000), task="classification", num_labels=2,
                            jit_compile=False)
    ops = profile_step.profile_ops(lambda: model.train_on_batch(*fixed_batch), steps=3)
    analysis = (f"\n## Where the default step's time goes\n\nBatch {BATCH}, sequence {SEQ}, {precision}, measured "
                "in this run: the step's matmul shapes alone (`benchmarks/matmul_shapes.py`), then forward, "
                "forward + backward and the whole Keras step on one batch (`benchmarks/step_breakdown.py`).\n\n"
                + matmul_shapes.markdown(shapes) + "\n" + step_breakdown.markdown(parts) + "\n"
                + step_analysis(shapes, parts, flops)
                + "\nOp by op (`benchmarks/profile_step.py`: the TensorFlow profiler over 3 steps of the tfl default "
                "model on the fixed batch, each op's self time summed by op type over both executor threads"
                + ("; the default step runs under XLA on this machine, which compiles it into one cluster, so this "
                   "profile is of the same step without XLA: it shows the work XLA fuses" if jit else "") + "):\n\n"
                + profile_step.markdown(ops) + "\n" + profile_step.findings(ops))
    tfl_epoch = timings["8 length buckets"]
    targets = [("fixed-shape step ≥ 1.0x the torch peer",
                *_ratio_vs_peer(lambda p: throughput[default] / p["fixed_step_ex_s"], peer, 1.0)),
               ("real RT epoch ≥ 1.5x faster than the torch peer",
                *_ratio_vs_peer(lambda p: p["epoch_seconds"] / tfl_epoch, peer, 1.5))]
    analysis += "\n## Targets (issue #17) against this run\n\n" + target_rows(targets)
    cpu = platform.processor() or platform.machine()
    table = ["| measurement | result | ratio |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = (f"# tfl benchmarks\n\nMachine: {os.cpu_count()} cores ({cpu}), bf16-native CPU: "
            f"{devices.cpu_has_native_bf16()}; TF {tf.__version__}, Keras {keras.__version__}. "
            f"Command: `.venv/bin/python benchmarks/run.py --steps={args.steps}` "
            f"({time.strftime('%Y-%m-%d')}). Every number below comes from this run; rerun the command to "
            "refresh it.\n\n" + "\n".join(table) + "\n" + analysis)
    print(text)
    storage.write_text_atomically(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
