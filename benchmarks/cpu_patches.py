"""What each of tfl's CPU changes to a keras-hub fine-tune step is worth, on real Rotten Tomatoes batches.

    .venv/bin/python benchmarks/cpu_patches.py [--batches=64] [--rounds=3] [--out=docs/cpu_patches.md]

Five MiniLM classifiers in one process, each adding one change to the one before: Keras and keras-hub as shipped;
+ half-word dropout (tfl/dropout.py); + AdamW through TensorFlow's fused Adam kernel (tfl/fused_adam.py); + the
feed-forward GELU computed in float32 (tfl/gelu.py); + the layer norms' gradient in closed form (tfl/layer_norm.py),
which is tfl's default. Two other changes were measured here on 2026-11-28 and dropped: keras-hub's attention
projections as one 2-D matmul (1.006x), and the attention softmax computed in float32 with its gradient in closed
form (0.97x against the layer-norm row in a separate run of this script with a sixth row: best rounds 16.6 s against
16.1 s). Each trains on the same
``--batches`` batches drawn at random from one epoch of configs/minilm_rotten_tomatoes.flags' length buckets
(batch 32, sequence length 64, mixed_bfloat16), every bucket shape traced first; the variants take turns within
each round, in a rotated order, so a host that slows down mid-run slows them all. The host's matmul peak is
measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
from tfl import data as data_lib  # noqa: E402
from tfl import dropout, gelu, layer_norm, storage, train  # noqa: E402
from tfl.backbones import build_backbone  # noqa: E402
from tfl.runner import build_model  # noqa: E402

VARIANTS = ["Keras and keras-hub as shipped", "+ half-word dropout", "+ fused AdamW", "+ GELU in float32",
            "+ layer-norm gradient in closed form (tfl's default)"]
PATCHES = [(dropout, "use_half_word_dropout"), (train, "use_fused_adam"), (gelu, "use_float32_gelu"),
           (layer_norm, "use_closed_form_layer_norm")]
SEQUENCE_LENGTH = 64


def build(changes: int, preset: str = "asset:minilm", sequence_length: int = SEQUENCE_LENGTH) -> tuple:
    """(the tfl default classifier with only the first ``changes`` of PATCHES applied, its preprocess)."""
    saved = [getattr(module, name) for module, name in PATCHES]
    try:
        for module, name in PATCHES[changes:]:  # skipped: the optimizer as it is, no layer patched
            setattr(module, name, (lambda optimizer: optimizer) if name == "use_fused_adam" else (lambda model: 0))
        keras.utils.set_random_seed(0)
        backbone = build_backbone(preset, sequence_length=sequence_length, dtype="mixed_bfloat16")
        model = build_model(backbone, ["rotten", "fresh"])
        train.compile_model(model, train.make_optimizer(5e-5, 1000), task="classification", num_labels=2,
                            jit_compile=False)
    finally:
        for (module, name), original in zip(PATCHES, saved):
            setattr(module, name, original)
    return model, backbone.preprocess


def epoch_batches(preprocess) -> tuple:
    """One epoch of the recipe's bucketed training batches (token ids, labels, sample weights) and the buckets."""
    from benchmarks.gpu import bucket_batches

    splits = data_lib.load_data("asset:rotten_tomatoes", seed=0)
    ids, labels = [], []
    for texts, y in splits.train.batch(512):
        ids.append(preprocess(texts)["token_ids"].numpy())
        labels.append(y.numpy())
    ids, labels = np.concatenate(ids), np.concatenate(labels).astype(np.int32)
    bounds = data_lib.choose_boundaries(list((ids != 0).sum(axis=1)), 8)
    bounds[-1] = SEQUENCE_LENGTH
    return bucket_batches(ids, labels, bounds, 32), bounds


def measure(batches: int, rounds: int) -> dict:
    built = [build(changes) for changes in range(len(VARIANTS))]
    models = [model for model, _ in built]
    every, bounds = epoch_batches(built[0][1])
    sample = [every[i] for i in np.random.RandomState(1).choice(len(every), batches, replace=False)]
    shapes = {x["token_ids"].shape: (x, y, w) for x, y, w in every}
    for model in models:
        for x, y, w in shapes.values():  # trace every bucket shape before timing
            model.train_on_batch(x, y, sample_weight=w)
    seconds = [[] for _ in models]
    for round_number in range(rounds):
        order = list(range(len(models)))
        order = order[round_number % len(order):] + order[:round_number % len(order)]
        for index in order:
            started = time.perf_counter()
            for x, y, w in sample:
                models[index].train_on_batch(x, y, sample_weight=w)
            seconds[index].append(time.perf_counter() - started)
        print(f"round {round_number + 1}: " + ", ".join(f"{s[-1]:.1f} s" for s in seconds), flush=True)
    mean_length = float(np.mean([x["token_ids"].shape[1] for x, _, _ in sample]))
    return {"seconds": seconds, "boundaries": [int(b) for b in bounds], "batches": batches, "rounds": rounds,
            "epoch_batches": len(every), "mean_length": mean_length}


def document(results: dict, peaks: dict, command: str, took: float) -> str:
    best = [min(s) for s in results["seconds"]]
    lines = ["# What tfl's CPU changes to the fine-tune step are worth", "",
             f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, in {took / 60:.1f} "
             f"min. Do not edit: rerun the command. Host: {platform.machine()}, {os.cpu_count()} CPUs; 2048² matmul "
             f"peak measured at the start of this run: float32 {peaks['float32']:.0f} GFLOP/s, bfloat16 "
             f"{peaks['bfloat16']:.0f} GFLOP/s.", "",
             f"Each row: the MiniLM classifier of `configs/minilm_rotten_tomatoes.flags` (mixed_bfloat16, batch 32) "
             f"training on the same {results['batches']} batches, drawn at random from one epoch's "
             f"{results['epoch_batches']} bucketed batches (buckets {results['boundaries']}; mean padded length "
             f"{results['mean_length']:.1f} tokens), after every bucket shape was traced. Each row adds one change "
             f"to the row above; the rows take turns in each of {results['rounds']} rounds (rotated order).", "",
             "| step | seconds per round | best | speed-up over the row above | over Keras as shipped |",
             "|---|---|---|---|---|"]
    for index, (name, seconds) in enumerate(zip(VARIANTS, results["seconds"])):
        above = f"{best[index - 1] / best[index]:.3f}x" if index else ""
        lines.append(f"| {name} | {', '.join(f'{s:.1f}' for s in seconds)} | {best[index]:.1f} | {above} | "
                     f"{best[0] / best[index]:.3f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="docs/cpu_patches.md")
    args = parser.parse_args()
    from benchmarks.run import matmul_gflops

    started = time.perf_counter()
    peaks = {"float32": matmul_gflops(tf.float32), "bfloat16": matmul_gflops(tf.bfloat16)}
    results = measure(args.batches, args.rounds)
    command = " ".join([".venv/bin/python benchmarks/cpu_patches.py"] + sys.argv[1:])
    text = document(results, peaks, command, time.perf_counter() - started)
    storage.write_text_atomically(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
