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
    flops = flops_of(a_shape, b_shape)
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            out = step(a, b)
        out.numpy()
        best = max(best, flops * repeats / (time.perf_counter() - started) / 1e9)
    return best, flops


def step_shapes(batch: int = 32, seq: int = 128) -> dict:
    """{name: (a shape, b shape, products per encoder layer)} of one MiniLM forward pass; plain data, so the
    torch peer (benchmarks/peer_torch.py, which has no TensorFlow) times the very same shapes."""
    tokens, hidden, inner, heads = batch * seq, 384, 1536, 12
    head_dim = hidden // heads
    return {
        "QKV and output projections": ((tokens, hidden), (hidden, hidden), 4),
        "feed-forward up": ((tokens, hidden), (hidden, inner), 1),
        "feed-forward down": ((tokens, inner), (inner, hidden), 1),
        "attention scores": ((batch * heads, seq, head_dim), (batch * heads, head_dim, seq), 1),
        "attention x values": ((batch * heads, seq, seq), (batch * heads, seq, head_dim), 1),
    }


def flops_of(a_shape, b_shape) -> int:
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1] * (a_shape[0] if len(a_shape) == 3 else 1)


def shape_speeds(batch: int = 32, seq: int = 128, dtype=tf.bfloat16, peak: float = 0.0) -> dict:
    """{"peak": GFLOP/s of 2048² (``peak`` when the caller measured it already, so one run states one peak),
    "rows": [(name, a, b, GFLOP/s)], "mix": the FLOP-weighted speed of one MiniLM step's matmuls}."""
    peak = peak or gflops((2048, 2048), (2048, 2048), dtype)[0]
    rows = [(name, a, b, gflops(a, b, dtype)[0]) for name, (a, b, _) in step_shapes(batch, seq).items()]
    return {"peak": peak, "rows": rows, "mix": mix_speed(rows, step_shapes(batch, seq)), "dtype": dtype.name}


def mix_speed(rows: list, shapes: dict) -> float:
    """The FLOP-weighted speed of the step's matmuls from per-shape speeds [(name, a, b, GFLOP/s)]."""
    total_flops = sum(flops_of(a, b) * shapes[name][2] for name, a, b, _ in rows)
    total_seconds = sum(flops_of(a, b) * shapes[name][2] / (rate * 1e9) for name, a, b, rate in rows)
    return total_flops / total_seconds / 1e9


def markdown(result: dict, peer: dict = None) -> str:
    """The speeds as a table; ``peer`` ({"peak": .., "rows": {name: GFLOP/s}, "name": ..}) adds its column."""
    peak = result["peak"]
    other = (lambda name: f" {peer['rows'][name]:.0f} GFLOP/s |") if peer else (lambda name: "")
    rows = [f"| 2048 x 2048 (peak) | {peak:.0f} GFLOP/s | 100% |" + (f" {peer['peak']:.0f} GFLOP/s |" if peer else "")]
    rows += [f"| {name}: {a} x {b} | {rate:.0f} GFLOP/s | {rate / peak:.0%} |" + other(name)
             for name, a, b, rate in result["rows"]]
    mix = f"| the step's matmul mix, FLOP-weighted | {result['mix']:.0f} GFLOP/s | {result['mix'] / peak:.0%} |"
    rows.append(mix + (f" {peer['mix']:.0f} GFLOP/s |" if peer else ""))
    header = f"| matmul ({result['dtype']}) | speed | of the 2048² peak |" + (f" {peer['name']} |" if peer else "")
    return header + "\n|---|---|---|" + ("---|" if peer else "") + "\n" + "\n".join(rows) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    print(markdown(shape_speeds(args.batch, args.seq, tf.as_dtype(args.dtype))))


if __name__ == "__main__":
    main()
