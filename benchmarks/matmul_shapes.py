"""What limits the MiniLM fine-tune step on this CPU: the speed of the step's own matmul shapes.

    .venv/bin/python benchmarks/matmul_shapes.py [--batch=32] [--seq=128] [--dtype=bfloat16]

A 2048x2048 matmul sets the "peak"; a fine-tune step is made of much smaller products: per encoder
layer, tokens x 384 by 384 x 384 (Q, K, V, output), 384 x 1536 and 1536 x 384 (feed-forward), and
per-head attention (32 sequences x 12 heads of seq x 32 by 32 x seq). This times each shape alone
(forward only, as in the step, where the backward pass repeats them transposed) and weighs them by
their FLOPs in one step, giving the throughput the step could reach if nothing else cost time.
benchmarks/run.py calls ``shape_speeds`` and writes its table into docs/benchmarks.md.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402


def gflops(a_shape, b_shape, dtype=tf.bfloat16, repeats=10, rounds=3):
    """(GFLOP/s, FLOPs of one product): the best of ``rounds`` timings of ``repeats`` products each (a shared
    host's neighbours only ever slow a round down, so the best round is the closest to the machine's speed)."""
    a = tf.cast(tf.random.normal(a_shape), dtype)
    b = tf.cast(tf.random.normal(b_shape), dtype)
    step = tf.function(lambda x, y: tf.matmul(x, y))
    step(a, b).numpy()
    flops = 2 * a_shape[-2] * a_shape[-1] * b_shape[-1] * (a_shape[0] if len(a_shape) == 3 else 1)
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            out = step(a, b)
        out.numpy()
        best = max(best, flops * repeats / (time.perf_counter() - started) / 1e9)
    return best, flops


def shape_speeds(batch: int = 32, seq: int = 128, dtype=tf.bfloat16) -> dict:
    """{"peak": GFLOP/s of 2048², "rows": [(name, a, b, GFLOP/s)], "mix": the FLOP-weighted speed of one
    MiniLM step's matmuls}."""
    tokens, hidden, inner, heads = batch * seq, 384, 1536, 12
    head_dim = hidden // heads
    shapes = {  # name: (a, b, how many per layer)
        "QKV and output projections": ((tokens, hidden), (hidden, hidden), 4),
        "feed-forward up": ((tokens, hidden), (hidden, inner), 1),
        "feed-forward down": ((tokens, inner), (inner, hidden), 1),
        "attention scores": ((batch * heads, seq, head_dim), (batch * heads, head_dim, seq), 1),
        "attention x values": ((batch * heads, seq, seq), (batch * heads, seq, head_dim), 1),
    }
    peak, _ = gflops((2048, 2048), (2048, 2048), dtype)
    total_flops, total_seconds, rows = 0.0, 0.0, []
    for name, (a, b, count) in shapes.items():
        rate, flops = gflops(a, b, dtype)
        total_flops += flops * count
        total_seconds += flops * count / (rate * 1e9)
        rows.append((name, a, b, rate))
    return {"peak": peak, "rows": rows, "mix": total_flops / total_seconds / 1e9, "dtype": dtype.name}


def markdown(result: dict) -> str:
    peak = result["peak"]
    rows = [f"| 2048 x 2048 (peak) | {peak:.0f} GFLOP/s | 100% |"]
    rows += [f"| {name}: {a} x {b} | {rate:.0f} GFLOP/s | {rate / peak:.0%} |" for name, a, b, rate in result["rows"]]
    rows.append(f"| the step's matmul mix, FLOP-weighted | {result['mix']:.0f} GFLOP/s | {result['mix'] / peak:.0%} |")
    return (f"| matmul ({result['dtype']}) | speed | of the 2048² peak |\n|---|---|---|\n" + "\n".join(rows) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    print(markdown(shape_speeds(args.batch, args.seq, tf.as_dtype(args.dtype))))


if __name__ == "__main__":
    main()
