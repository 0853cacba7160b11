"""The measuring helpers of benchmarks/run.py (the benchmark itself runs by hand: it writes docs/benchmarks.md)."""

import importlib.util
import os
import sys

import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "benchmarks", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(length, label):
    return {"token_ids": tf.zeros((2, length), tf.int32)}, tf.constant([label, label])


class _Recorder:
    def __init__(self):
        self.shapes = []

    def train_on_batch(self, x, y):
        self.shapes.append(int(x["token_ids"].shape[1]))


def test_in_memory_holds_the_same_batches_whatever_their_shapes(bench):
    batches = [_batch(3, 0), _batch(5, 1), _batch(3, 1)]
    got = list(bench.in_memory(batches))
    assert [int(x["token_ids"].shape[1]) for x, _ in got] == [3, 5, 3]
    assert [int(y[0]) for _, y in got] == [0, 1, 1]


def test_an_epoch_is_timed_on_batches_drawn_from_all_of_it(bench):
    # group_by_window emits the common shape first: the first batches alone would all be length 3.
    epoch = [_batch(3, 0)] * 8 + [_batch(9, 0)] * 2
    model = _Recorder()
    seconds, count = bench.epoch_seconds(model, epoch, steps=10)
    assert count == 10 and seconds >= 0
    traced, timed = model.shapes[:2], model.shapes[2:]
    assert sorted(traced) == [3, 9]  # each shape traced once before the clock starts
    assert sorted(timed) == [3] * 8 + [9] * 2  # every batch of the epoch, in its proportions


def test_step_analysis_computes_its_numbers_from_the_measurements(bench):
    shapes = {"mix": 100.0}
    parts = {"forward (training mode)": 1.0, "forward + backward": 2.5, "whole train step (Keras)": 3.0}
    # 3 x 50 GFLOP per batch of 32 for forward + backward: 50 GFLOP forward at 100 GFLOP/s = half of its second.
    text = bench.step_analysis(shapes, parts, flops_per_example=3 * 50e9 / bench.BATCH)
    assert "about 50 GFLOP of matmuls per batch in 1000 ms, 50 GFLOP/s" in text
    assert "about 50% of the forward time" in text and "2.5x the forward pass" in text
    assert "500 ms of 3000 ms (17%" in text
