"""Op-by-op profile of one fine-tune step: traces a few training steps with the TensorFlow profiler and sums
each op's self time from the trace (the XPlane file the profiler writes), so the largest non-matmul costs can
be named from a measurement rather than guessed.

    .venv/bin/python benchmarks/profile_step.py [--precision=auto] [--steps=3]

benchmarks/run.py calls ``profile_ops`` and writes its table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

# A TensorFlow op's trace event is named "op name:OpType"; runtime bookkeeping ("KernelAndDeviceFunc::Run",
# "ThreadpoolListener::Record", ...) uses "::" and the Python thread only holds wrappers around whole functions.
_OP_EVENT = re.compile(r"^([^:]+):([A-Za-z0-9_]+)$")


def _op_events(space: xplane_pb2.XSpace):
    """(op name, op type, begin ps, end ps, thread) for every TensorFlow op event the host traced."""
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                match = _OP_EVENT.match(plane.event_metadata[event.metadata_id].name)
                if not match:
                    continue
                op_name, op_type = match.groups()
                begin = line.timestamp_ns * 1000 + event.offset_ps
                yield op_name, op_type, begin, begin + event.duration_ps, line.id


def self_times(events) -> dict:
    """Self seconds per (op type, op name): an op's duration less the ops nested inside it on the same thread."""
    by_thread = collections.defaultdict(list)
    for op_name, op_type, begin, end, thread in events:
        by_thread[thread].append((begin, -end, op_name, op_type))
    totals = collections.Counter()
    for spans in by_thread.values():
        spans.sort()
        stack = []  # [end, key, child picoseconds]
        for begin, negative_end, op_name, op_type in spans:
            end = -negative_end
            while stack and stack[-1][0] <= begin:
                done = stack.pop()
                totals[done[1]] += done[3] - done[2]
            if stack:
                stack[-1][2] += end - begin
            stack.append([end, (op_type, op_name), 0, end - begin])
        for done in stack:
            totals[done[1]] += done[3] - done[2]
    return {key: ps / 1e12 for key, ps in totals.items()}


def profile_ops(step, steps: int = 3) -> dict:
    """Runs ``step()`` once untraced (tracing, warm-up), then ``steps`` times under the profiler; returns
    {(op type, op name): self seconds per step}."""
    step()
    with tempfile.TemporaryDirectory() as log_dir:
        tf.profiler.experimental.start(log_dir)
        for _ in range(steps):
            step()
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as handle:
            space.ParseFromString(handle.read())
    return {key: seconds / steps for key, seconds in self_times(_op_events(space)).items()}


def by_type(ops: dict) -> list:
    """[(op type, seconds per step, share of all op time)], largest first."""
    totals = collections.Counter()
    for (op_type, _), seconds in ops.items():
        totals[op_type] += seconds
    whole = sum(totals.values())
    return [(op_type, seconds, seconds / whole) for op_type, seconds in totals.most_common()]


MATMUL_TYPES = ("MatMul", "BatchMatMulV2", "Einsum", "_FusedMatMul", "_MklMatMul", "_MklBatchMatMulV2")
# What an op is part of, read from its name (keras-hub's layer names, Keras's optimizer scope); first match wins.
_PARTS = [("dropout (random numbers, masks)", ("dropout",)), ("GELU", ("gelu",)), ("softmax and its mask", ("softmax",)),
          ("layer norm", ("layer_norm", "layernorm")), ("optimizer update", ("adam",)),
          ("embedding lookups and their gradient", ("embedding",))]


def part_of(op_type: str, op_name: str) -> str:
    if op_type in MATMUL_TYPES:
        return "matmuls"
    lowered = op_name.lower()
    for part, keys in _PARTS:
        if any(key in lowered for key in keys):
            return part
    return "transposes" if op_type == "Transpose" else "everything else"


def by_part(ops: dict) -> list:
    """[(part of the model, seconds per step, share of all op time)], largest first."""
    totals = collections.Counter()
    for (op_type, op_name), seconds in ops.items():
        totals[part_of(op_type, op_name)] += seconds
    whole = sum(totals.values())
    return [(part, seconds, seconds / whole) for part, seconds in totals.most_common()]


def findings(ops: dict) -> str:
    """The same op times summed by what they are part of, as a table and the largest non-matmul cost."""
    rows = by_part(ops)
    lines = ["| part of the step | self time per step | share of all op time |", "|---|---|---|"]
    lines += [f"| {part} | {seconds * 1000:.1f} ms | {share:.1%} |" for part, seconds, share in rows]
    named = [row for row in rows if row[0] not in ("matmuls", "everything else")]
    if not named:
        return "\n".join(lines) + "\n\nNo op outside the matmuls carries a name this table knows.\n"
    return ("\n".join(lines) + f"\n\nThe largest named non-matmul cost is {named[0][0]}: {named[0][2]:.1%} of all "
            "op time in this profile.\n")


def markdown(ops: dict, top: int = 15) -> str:
    rows = by_type(ops)
    lines = ["| op type | self time per step | share of all op time |", "|---|---|---|"]
    lines += [f"| {op_type} | {seconds * 1000:.1f} ms | {share:.1%} |" for op_type, seconds, share in rows[:top]]
    rest = rows[top:]
    if rest:
        lines.append(f"| {len(rest)} other op types | {sum(r[1] for r in rest) * 1000:.1f} ms | "
                     f"{sum(r[2] for r in rest):.1%} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    import numpy as np

    from tfl import assets, devices, train
    from tfl.backbones import build_backbone
    from tfl.runner import build_model

    precision = devices.resolve_precision(args.precision)
    backbone = build_backbone("asset:minilm", sequence_length=args.seq, dtype=precision)
    model = build_model(backbone, ["a", "b"])
    train.compile_model(model, train.make_optimizer(5e-5, 1000), task="classification", num_labels=2,
                        jit_compile=False)
    rng = np.random.RandomState(0)
    x = {"token_ids": rng.randint(1000, 20000, (args.batch, args.seq)),
         "padding_mask": np.ones((args.batch, args.seq), bool), "segment_ids": np.zeros((args.batch, args.seq), int)}
    y = rng.randint(0, 2, args.batch)
    assets.asset_path("minilm")
    print(f"precision {precision}, batch {args.batch} x seq {args.seq}")
    print(markdown(profile_ops(lambda: model.train_on_batch(x, y), args.steps), top=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
