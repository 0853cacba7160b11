"""Batches of a fixed number of examples against batches built to a token budget (--tokens_per_batch), on a
real fine-tune: one epoch of `main.py --flagfile=configs/minilm_rotten_tomatoes.flags` per seed and setting, each
in a fresh process, side by side in one run; writes docs/token_budget.md.

    .venv/bin/python benchmarks/token_budget.py [--budgets=1024,2048] [--seeds=3] [--out=docs/token_budget.md]

Per setting: the epoch's optimizer steps, its time (the run's own timings: the epoch, first-step tracing
included), examples per second over it, and the validation and test accuracy (mean ± std over the seeds; the
seed draws the split, the head and the shuffling, so settings with the same seed see the same data). The host's
matmul peak is measured in the same run, before the fine-tunes.
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

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one_epoch(flagfile: str, seed: int, tokens_per_batch: int) -> dict:
    """metrics.json of one fresh one-epoch run (no export)."""
    with tempfile.TemporaryDirectory() as model_dir:
        command = [sys.executable, os.path.join(ROOT, "main.py"), f"--flagfile={flagfile}", "--epochs=1",
                   f"--seed={seed}", f"--tokens_per_batch={tokens_per_batch}", "--noexport",
                   f"--model_dir={model_dir}"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"error: the run failed (exit {done.returncode}): {' '.join(command)}\n"
                             f"{done.stderr[-3000:]}")
        with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as f:
            return json.load(f)


def summary(runs: list) -> dict:
    epoch = [float(r["timings"]["epochs"][0]) for r in runs]
    return {"steps": [r["steps_per_epoch"] for r in runs], "epoch_seconds": epoch,
            "examples_per_second": [r["data"]["sizes"]["train"] / s for r, s in zip(runs, epoch)],
            "validation": [r["validation"]["accuracy"] for r in runs], "test": [r["test"]["accuracy"] for r in runs],
            "batch_sizes": runs[0]["bucketing"].get("batch_sizes"), "boundaries": runs[0]["bucketing"]["boundaries"],
            "batch_size": runs[0]["config"]["data"]["batch_size"]}


def _ms(values, digits=1, scale=1.0) -> str:
    return f"{scale * np.mean(values):.{digits}f} ± {scale * np.std(values):.{digits}f}"


def document(results: dict, args, peaks: dict, seconds: float) -> str:
    base = results[0]
    lines = ["# Batches built to a token budget", "",
             f"Written by `.venv/bin/python benchmarks/token_budget.py --budgets={args.budgets} --seeds={args.seeds}` "
             f"on {time.strftime('%Y-%m-%d %H:%M %Z')}, in {seconds / 60:.1f} min. Do not edit: rerun the command.", "",
             f"Host: {platform.node()}, {os.cpu_count()} CPUs; 2048² matmul peak measured at the start of this run: "
             f"float32 {peaks['float32']:.0f} GFLOP/s, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s.", "",
             f"Each row: one epoch of `{args.flagfile}` per seed (seeds 0..{args.seeds - 1}), each in a fresh "
             f"process, `--epochs=1`; the length buckets are the recipe's ({base['boundaries']}). Mean ± std over the "
             "seeds.", "",
             "| batches | batch size per bucket | optimizer steps | epoch s | examples/s | vs fixed | validation acc | "
             "test acc |", "|---|---|---|---|---|---|---|---|"]
    fixed_rate = np.mean(base["examples_per_second"])
    for budget, r in results.items():
        name = f"{r['batch_size']} examples (fixed)" if not budget else f"`--tokens_per_batch={budget}`"
        sizes = ", ".join(map(str, r["batch_sizes"])) if r["batch_sizes"] else str(r["batch_size"])  # seed 0's
        lines.append(f"| {name} | {sizes} | {np.mean(r['steps']):.0f} | {_ms(r['epoch_seconds'])} | "
                     f"{_ms(r['examples_per_second'])} | {np.mean(r['examples_per_second']) / fixed_rate:.2f}x | "
                     f"{_ms(r['validation'], 1, 100)}% | {_ms(r['test'], 1, 100)}% |")
    lines += ["", "The learning-rate schedule (warm-up, then linear decay) is sized from each setting's exact step "
              "count, so fewer, larger steps also mean a different schedule at the same learning rate."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flagfile", default="configs/minilm_rotten_tomatoes.flags")
    parser.add_argument("--budgets", default="1024,2048", help="--tokens_per_batch values beside the fixed batch")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="docs/token_budget.md")
    args = parser.parse_args()
    import tensorflow as tf

    from benchmarks.run import matmul_gflops
    from tfl.storage import write_text_atomically

    started = time.time()
    peaks = {"float32": matmul_gflops(tf.float32), "bfloat16": matmul_gflops(tf.bfloat16)}
    budgets = [0] + [int(b) for b in args.budgets.split(",") if b.strip()]
    runs = {budget: [] for budget in budgets}
    for seed in range(args.seeds):  # settings interleaved per seed: the host's drift spreads over all of them
        for budget in budgets:
            runs[budget].append(one_epoch(args.flagfile, seed, budget))
            last = runs[budget][-1]
            print(f"token_budget: seed {seed} tokens_per_batch={budget}: test {last['test']['accuracy']:.4f}, "
                  f"epoch {last['timings']['epochs'][0]:.1f} s", flush=True)
    text = document({budget: summary(r) for budget, r in runs.items()}, args, peaks, time.time() - started)
    write_text_atomically(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
