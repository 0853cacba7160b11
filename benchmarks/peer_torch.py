"""The torch peer, measured the way a Hugging Face user would train: the same MiniLM weights (the asset's
Hugging Face folder), AdamW, batch 32. Runs in its own environment, never tfl's (make bench-peer creates it):

    .venv-peer/bin/python benchmarks/peer_torch.py --model=DIR --data=FILE.json [--precision=float32]

FILE.json: {"texts": [...], "labels": [...], "matmul_shapes": {name: [a shape, b shape]}}, the training
sentences and matmul shapes benchmarks/run.py uses, so both sides see the same data. Prints one JSON object:
  fixed_step_ex_s   examples/s of a training step at batch x --seq (every sentence padded to --seq);
  epoch_seconds     one epoch of the texts with per-batch dynamic padding (the usual practice: pad to the
                    longest sentence of each shuffled batch): --steps batches drawn at random from the epoch
                    are timed and the mean time per batch is scaled to the epoch's batch count, exactly as
                    benchmarks/run.py times tfl's epoch;
  first_epoch_extra_seconds  what the first step of each of the epoch's epoch_shapes distinct shapes costs
                    beyond a second step of it, summed: the first epoch's extra time;
  matmul_gflops     torch.matmul's speed on each of the given shapes;
  epoch_batches, padding (share of pad tokens over the epoch), torch, transformers (versions).
benchmarks/run.py runs this script and prints tfl / torch ratios beside its own numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import numpy as np
import torch
import transformers


def train_step(model, optimizer, batch: dict, labels, precision: str) -> None:
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16"
                else contextlib.nullcontext())
    with autocast:
        loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def first_call_extra(model, optimizer, batches: list, precision: str) -> float:
    """Seconds the first step of each distinct shape in ``batches`` costs beyond a second step of the same
    batch (what a first epoch pays once: allocations, kernel choices), summed over the shapes."""
    extra = 0.0
    for shape in {tuple(b[0]["input_ids"].shape) for b in batches}:
        batch, labels = next(b for b in batches if tuple(b[0]["input_ids"].shape) == shape)
        times = []
        for _ in range(2):
            started = time.perf_counter()
            train_step(model, optimizer, batch, labels, precision)
            times.append(time.perf_counter() - started)
        extra += times[0] - times[1]
    return extra


def matmul_speeds(shapes: dict, precision: str, repeats: int = 10, rounds: int = 3) -> dict:
    """{name: GFLOP/s} of torch.matmul on each [a shape, b shape], the best of ``rounds`` timings, as
    benchmarks/matmul_shapes.py times TensorFlow's on the same shapes."""
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    speeds = {}
    for name, (a_shape, b_shape) in shapes.items():
        a, b = torch.randn(a_shape, dtype=dtype), torch.randn(b_shape, dtype=dtype)
        flops = 2 * a_shape[-2] * a_shape[-1] * b_shape[-1] * (a_shape[0] if len(a_shape) == 3 else 1)
        torch.matmul(a, b)
        best = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(repeats):
                torch.matmul(a, b)
            best = max(best, flops * repeats / (time.perf_counter() - started) / 1e9)
        speeds[name] = best
    return speeds


def timed_steps(model, optimizer, batches: list, precision: str) -> float:
    """Seconds for ``batches`` after one untimed step per distinct shape."""
    for shape in {tuple(b[0]["input_ids"].shape) for b in batches}:
        batch, labels = next(b for b in batches if tuple(b[0]["input_ids"].shape) == shape)
        train_step(model, optimizer, batch, labels, precision)
    started = time.perf_counter()
    for batch, labels in batches:
        train_step(model, optimizer, batch, labels, precision)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.data) as handle:
        data = json.load(handle)
    texts, labels = data["texts"], torch.tensor(data["labels"])
    torch.manual_seed(args.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)

    # Fixed shape: the first batches of sentences, every one padded to --seq.
    fixed = []
    for start in range(0, args.batch * 8, args.batch):
        encoded = tokenizer(texts[start:start + args.batch], padding="max_length", truncation=True,
                            max_length=args.seq, return_tensors="pt")
        fixed.append((dict(encoded), labels[start:start + args.batch]))
    picks = [fixed[i % len(fixed)] for i in range(args.steps)]
    fixed_rate = args.batch * len(picks) / timed_steps(model, optimizer, picks, args.precision)

    # One epoch, shuffled, each batch padded to its own longest sentence.
    order = np.random.RandomState(args.seed).permutation(len(texts))
    epoch, real_tokens, padded_tokens = [], 0, 0
    for start in range(0, len(order), args.batch):
        rows = order[start:start + args.batch]
        encoded = tokenizer([texts[i] for i in rows], padding="longest", truncation=True, max_length=args.seq,
                            return_tensors="pt")
        real_tokens += int(encoded["attention_mask"].sum())
        padded_tokens += int(encoded["attention_mask"].numel())
        epoch.append((dict(encoded), labels[rows]))
    # A fresh model and optimizer, as tfl's side uses, so the first epoch's extra is all a first epoch pays.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    first_extra = first_call_extra(model, optimizer, epoch, args.precision)
    drawn = np.random.RandomState(args.seed).choice(len(epoch), min(args.steps, len(epoch)), replace=False)
    seconds = timed_steps(model, optimizer, [epoch[i] for i in drawn], args.precision)
    print(json.dumps({"fixed_step_ex_s": fixed_rate, "epoch_seconds": seconds / len(drawn) * len(epoch),
                      "first_epoch_extra_seconds": first_extra,
                      "epoch_shapes": len({tuple(b[0]["input_ids"].shape) for b in epoch}),
                      "matmul_gflops": matmul_speeds(data.get("matmul_shapes", {}), args.precision),
                      "epoch_batches": len(epoch), "padding": 1 - real_tokens / padded_tokens,
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
