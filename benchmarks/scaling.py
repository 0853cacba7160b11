"""Scaling efficiency of tf.distribute data parallelism on tfl's default fine-tune step.

    .venv/bin/python benchmarks/scaling.py [--steps=20] [--out=docs/scaling.md]

Trains the MiniLM classifier (asset:minilm, tfl's default precision) on the same global batch
(32 real Rotten Tomatoes sentences, sequence 64) under:
  1. one device (the default strategy);
  2. MirroredStrategy over 2 devices: the CPU split into 2 logical devices, or 2 GPUs where present;
  3. MultiWorkerMirroredStrategy with 2 local worker processes (TF_CONFIG on 127.0.0.1).
Each setup runs in its own process (devices are fixed when TensorFlow starts), side by side in one
sitting. Efficiency = throughput with 2 replicas / (2 x throughput with one). On a CPU the two
logical devices share the same cores, so the second replica adds no compute: the ratio there
measures only what the replication costs (all-reduce, per-replica splitting), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GLOBAL_BATCH, SEQ = 32, 64

WORKER = r"""
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
setup, steps = sys.argv[1], int(sys.argv[2])
if setup == "mirrored" and not tf.config.list_physical_devices("GPU"):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tfl import devices, keras_workarounds, train
strategy = devices.make_strategy({"single": "default", "mirrored": "mirrored", "multi_worker": "multi_worker"}[setup])
import keras, numpy as np
from tfl import data as data_lib
from tfl.backbones import build_backbone
from tfl.runner import build_model
precision = devices.resolve_precision("auto")
splits = data_lib.load_data("asset:rotten_tomatoes", seed=0)
texts = np.array([x.decode() for x, _ in splits.train.take(32 * 8).as_numpy_iterator()])
labels = np.array([y for _, y in splits.train.take(32 * 8).as_numpy_iterator()])
keras.utils.set_random_seed(0)
keras.config.set_dtype_policy(precision)
with strategy.scope():
    backbone = build_backbone("asset:minilm", sequence_length=%(seq)d, dtype=precision)
    model = build_model(backbone, ["rotten", "fresh"])
    train.compile_model(model, train.make_optimizer(5e-5, 1000), task="classification", num_labels=2,
                        jit_compile=devices.resolve_jit_compile("auto"))
if strategy.num_replicas_in_sync > 1:
    keras_workarounds.patch_keras_for_distribution(model, strategy)  # what tfl.train.fit does
inputs = backbone.preprocess(tf.constant(texts))
dataset = devices.shard_by_data(tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(%(batch)d, drop_remainder=True).cache().repeat())

class Clock(keras.callbacks.Callback):
    marks = []
    def on_train_batch_end(self, batch, logs=None):
        self.marks.append(time.perf_counter())

warmup = 3
model.fit(dataset, steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[Clock()])
seconds = Clock.marks[-1] - Clock.marks[warmup - 1]
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "precision": precision,
                  "examples_per_second": steps * %(batch)d / seconds}))
""" % {"seq": SEQ, "batch": GLOBAL_BATCH}


def run_setup(setup: str, steps: int) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    if setup != "multi_worker":
        result = subprocess.run([sys.executable, "-c", WORKER, setup, str(steps)], capture_output=True, text=True,
                                env=env, cwd=ROOT, timeout=1800)
        if result.returncode:
            raise SystemExit(f"{setup} failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, setup, str(steps)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=dict(env, TF_CONFIG=json.dumps({"cluster": cluster,
                                                                    "task": {"type": "worker", "index": i}})))
               for i in range(2)]
    outputs = [w.communicate(timeout=1800) for w in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        if worker.returncode:
            raise SystemExit(f"multi_worker failed:\n{stderr[-3000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])  # the chief's clock: steps are in lockstep


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="docs/scaling.md")
    args = parser.parse_args()
    import tensorflow as tf

    from tfl import storage

    gpus = len(tf.config.list_physical_devices("GPU"))
    two = "2 GPUs" if gpus >= 2 else "2 logical CPU devices"
    results = {setup: run_setup(setup, args.steps) for setup in ("single", "mirrored", "multi_worker")}
    single = results["single"]["examples_per_second"]
    names = {"single": "1 device, default strategy", "mirrored": f"MirroredStrategy, {two}",
             "multi_worker": "MultiWorkerMirroredStrategy, 2 local worker processes"}
    rows = []
    for setup, result in results.items():
        rate = result["examples_per_second"]
        efficiency = "" if setup == "single" else f"{rate / (2 * single):.0%} (throughput {rate / single:.2f}x)"
        rows.append(f"| {names[setup]} | {result['replicas']} | {rate:.1f} | {efficiency} |")
    cpu = platform.processor() or platform.machine()
    text = (f"# tfl scaling benchmark\n\nMachine: {os.cpu_count()} cores ({cpu}), {gpus} GPU(s); precision "
            f"{results['single']['precision']}. MiniLM fine-tune, global batch {GLOBAL_BATCH}, sequence {SEQ}, "
            f"{args.steps} timed steps after 3 warm-up steps. Command: `.venv/bin/python benchmarks/scaling.py "
            f"--steps={args.steps}` ({time.strftime('%Y-%m-%d')}).\n\n"
            "| setup | replicas | examples/s | scaling efficiency vs 1 device |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    if not gpus:
        text += ("\nOn a CPU the replicas share the same cores: no speed-up is possible, and the efficiency "
                 "shows what replication costs (all-reduce, splitting each batch) on top of a single device's "
                 "work. The real scaling number needs 2+ GPUs or a TPU.\n")
    print(text)
    storage.write_text_atomically(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
