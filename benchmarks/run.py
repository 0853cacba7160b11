"""tfl's performance benchmark: side-by-side ratios measured in one process, one sitting.

    .venv/bin/python benchmarks/run.py [--steps=30] [--out=docs/benchmarks.md]

Needs the offline assets (make assets). Sections:
  1. the machine's matmul peak (float32, bfloat16);
  2. MiniLM fine-tune step throughput at batch 32, sequence 128: plain Keras (keras-hub
     BertTextClassifier) in float32, float32 + XLA, mixed_bfloat16, against tfl's default path,
     and the share of the bf16 peak it reaches;
  3. a Rotten Tomatoes fine-tune epoch with length bucketing vs. padding every batch to 128
     (timed over --steps batches of each and scaled to the epoch's batch count);
  4. a linear-probe epoch after the first: head on cached features vs. recomputing the backbone;
  5. input pipeline overhead: the real tf.data pipeline vs. the same batches already in memory.
Throughputs exclude the first steps (tracing). The machine is noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
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

BATCH, SEQ = 32, 128


def matmul_gflops(dtype, n=2048, repeats=20) -> float:
    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    step = tf.function(lambda x: tf.matmul(x, x))
    step(a).numpy()
    started = time.perf_counter()
    for _ in range(repeats):
        result = step(a)
    result.numpy()
    return 2 * n ** 3 * repeats / (time.perf_counter() - started) / 1e9


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

    peak32, peak16 = matmul_gflops(tf.float32), matmul_gflops(tf.bfloat16)
    rows.append(("matmul 2048² peak", f"float32 {peak32:.0f} GFLOP/s, bfloat16 {peak16:.0f} GFLOP/s", ""))

    # 2. fine-tune throughput, batch 32, sequence 128, the same real sentences for every configuration.
    tokenizer_backbone = build_backbone("asset:minilm", sequence_length=SEQ)
    inputs = tokenizer_backbone.preprocess(tf.constant(texts[: BATCH * 8].astype(str)))
    fixed = tf.data.Dataset.from_tensor_slices((inputs, labels[: BATCH * 8])).batch(BATCH, drop_remainder=True).cache()
    throughput = {}
    for name, dtype, jit in [("plain Keras float32", "float32", False), ("plain Keras float32 + XLA", "float32", True),
                             ("plain Keras mixed_bfloat16", "mixed_bfloat16", False)]:
        throughput[name] = timed_fit(plain_keras_classifier(preset, dtype, jit), fixed, args.steps)
    # Record what XLA buys on this CPU, so --jit_compile=auto can decide from a measurement.
    speedup = throughput["plain Keras float32 + XLA"] / throughput["plain Keras float32"]
    devices.record_xla_speedup(speedup, "plain Keras MiniLM fine-tune step, batch 32, seq 128, float32")
    precision, jit = devices.resolve_precision("auto"), devices.resolve_jit_compile("auto")
    backbone = build_backbone("asset:minilm", sequence_length=SEQ, dtype=precision)
    model = build_model(backbone, ["rotten", "fresh"])
    train.compile_model(model, train.make_optimizer(5e-5, 1000), task="classification", num_labels=2, jit_compile=jit)
    throughput[f"tfl default ({precision}, jit={jit})"] = timed_fit(model, fixed, args.steps)
    best_plain = max(v for k, v in throughput.items() if k.startswith("plain"))
    flops = minilm_flops_per_example(backbone, SEQ)
    for name, value in throughput.items():
        rows.append((f"MiniLM fine-tune, {name}", f"{value:.1f} ex/s",
                     f"{value / best_plain:.2f}x best plain; {value * flops / 1e9 / peak16:.0%} of bf16 peak"))

    # 3. bucketing vs. padding to 128, on the tfl default model.
    lengths = data_lib.token_lengths(splits.train.batch(256).map(lambda x, y: backbone.preprocess(x)))
    bounds = data_lib.choose_boundaries(lengths, 8)
    bounds[-1] = SEQ
    timings = {}
    for name, boundaries in [("pad to 128", None), ("8 length buckets", bounds)]:
        batches = data_lib.make_batches(splits.train, batch_size=BATCH, preprocess=backbone.preprocess, training=True,
                                        bucket_boundaries=boundaries)
        epoch_batches = sum(1 for _ in batches)
        rate = timed_fit(model, batches, args.steps)
        timings[name] = len(texts) / rate
        rows.append((f"RT fine-tune epoch, {name}", f"{timings[name]:.0f} s/epoch ({epoch_batches} batches)",
                     f"padding {data_lib.padding_fraction(lengths, boundaries or [SEQ]):.1%}"))
    rows.append(("bucketing speed-up per epoch", f"{timings['pad to 128'] / timings['8 length buckets']:.2f}x", ""))

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

    # 5. input pipeline overhead: the real pipeline vs. the same batches pre-materialised in memory.
    real = data_lib.make_batches(splits.train, batch_size=BATCH, preprocess=backbone.preprocess, training=True,
                                 bucket_boundaries=bounds)
    in_memory = list(real.take(args.steps + 3))
    materialised = tf.data.Dataset.from_generator(lambda: iter(in_memory), output_signature=real.element_spec)
    rate_real, rate_memory = timed_fit(model, real, args.steps), timed_fit(model, materialised, args.steps)
    rows.append(("input pipeline", f"real {rate_real:.1f} ex/s, in memory {rate_memory:.1f} ex/s",
                 f"overhead {max(0.0, 1 - rate_real / rate_memory):.1%}"))

    cpu = platform.processor() or platform.machine()
    table = ["| measurement | result | ratio |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = (f"# tfl benchmarks\n\nMachine: {os.cpu_count()} cores ({cpu}), bf16-native CPU: "
            f"{devices.cpu_has_native_bf16()}; TF {tf.__version__}, Keras {keras.__version__}. "
            f"Command: `.venv/bin/python benchmarks/run.py --steps={args.steps}` "
            f"({time.strftime('%Y-%m-%d')}).\n\n" + "\n".join(table) + "\n")
    print(text)
    storage.write_text_atomically(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
