"""Where a MiniLM fine-tune step's time goes on this CPU: forward, backward, optimizer update.

    .venv/bin/python benchmarks/step_breakdown.py [--steps=10] [--precision=mixed_bfloat16]

Times, on one fixed batch (32 real Rotten Tomatoes sentences padded to 128, in --precision),
a forward pass in training mode, forward + backward (gradients, no update), and the whole Keras train
step; the optimizer's share is the difference. Compare with benchmarks/matmul_shapes.py, which shows
how fast the step's matmuls run alone. benchmarks/run.py calls ``breakdown`` for docs/benchmarks.md.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfl import data as data_lib  # noqa: E402
from tfl import train  # noqa: E402
from tfl.backbones import build_backbone  # noqa: E402
from tfl.runner import build_model  # noqa: E402


def seconds_per_call(fn, steps):
    fn()
    fn()
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - started) / steps


def breakdown(texts: list, precision: str, steps: int = 10) -> dict:
    """Seconds per batch of {"forward (training mode)", "forward + backward", "whole train step (Keras)"}."""
    backbone = build_backbone("asset:minilm", sequence_length=128, dtype=precision)
    model = build_model(backbone, ["rotten", "fresh"])
    train.compile_model(model, train.make_optimizer(5e-5, 1000), task="classification", num_labels=2,
                        jit_compile=False)
    x = backbone.preprocess(tf.constant(texts))
    y = tf.constant(np.arange(len(texts)) % 2)
    loss_fn = model.loss

    forward = tf.function(lambda: model(x, training=True))

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        # One scalar that depends on every gradient, so nothing is skipped (the embedding's is sparse).
        return tf.add_n([tf.reduce_sum(tf.cast(g.values if isinstance(g, tf.IndexedSlices) else g, tf.float32))
                         for g in grads if g is not None])

    return {"forward (training mode)": seconds_per_call(lambda: forward().numpy(), steps),
            "forward + backward": seconds_per_call(lambda: forward_backward().numpy(), steps),
            "whole train step (Keras)": seconds_per_call(lambda: model.train_on_batch(x, y), steps)}


def markdown(results: dict) -> str:
    step = results["whole train step (Keras)"]
    rows = [f"| {k} | {v * 1000:.0f} ms | {v / step:.0%} |" for k, v in results.items()]
    rows.append(f"| optimizer update and Keras overhead (difference) | "
                f"{(step - results['forward + backward']) * 1000:.0f} ms | {1 - results['forward + backward'] / step:.0%} |")
    return "| part | time per batch | of the step |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="mixed_bfloat16")
    args = parser.parse_args()
    splits = data_lib.load_data("asset:rotten_tomatoes", seed=0)
    texts = [x.decode() for x, _ in splits.train.take(32).as_numpy_iterator()]
    print(markdown(breakdown(texts, args.precision, args.steps)))


if __name__ == "__main__":
    main()
