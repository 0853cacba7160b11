"""Each Keras workaround in tfl/keras_workarounds.py, checked both ways: plain Keras still has the bug
(so the day an upgrade fixes it, the test says to drop the workaround), and the workaround fixes it."""

import json
import os
import subprocess
import sys
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf

from test_cli import ROOT
from tfl import keras_workarounds

# The two distribution bugs need a fresh process: two logical CPUs and a multi-worker strategy can only
# be set up before TensorFlow runs its first op.
DISTRIBUTED = """
import json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
workers = tf.distribute.MultiWorkerMirroredStrategy()  # before any op runs
import keras
import numpy as np
from keras.src.backend.tensorflow import trainer as keras_tf_trainer
from tfl import keras_workarounds

def outcome(step):
    try:
        step()
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

def fit_with_a_bool_input(workaround):
    with mirrored.scope():
        ids, mask = keras.Input((4,), dtype="int32", name="ids"), keras.Input((4,), dtype="bool", name="mask")
        x = keras.layers.Embedding(10, 2)(ids) * keras.ops.expand_dims(keras.ops.cast(mask, "float32"), -1)
        model = keras.Model({"ids": ids, "mask": mask}, keras.layers.Dense(1)(keras.layers.Flatten()(x)))
        model.compile("sgd", "mse")
    data = tf.data.Dataset.from_tensor_slices(
        ({"ids": np.ones((8, 4), "int32"), "mask": np.ones((8, 4), bool)}, np.ones((8, 1), "float32"))).batch(4)
    if workaround:
        keras_workarounds.build_from_local_batch(model, mirrored)
    model.fit(data, epochs=1, verbose=0)

def reduce_scalar_logs(workaround):
    workers.extended._in_multi_worker_mode = lambda: True  # stands in for a second worker
    if workaround:
        keras_workarounds.average_scalar_logs_across_workers(workers)
    out = keras_tf_trainer.reduce_per_replica({"loss": tf.constant(0.5)}, workers, "auto")
    assert float(out["loss"]) == 0.5, out

print(json.dumps({"bool_plain": outcome(lambda: fit_with_a_bool_input(False)),
                  "bool_fixed": outcome(lambda: fit_with_a_bool_input(True)),
                  "scalar_plain": outcome(lambda: reduce_scalar_logs(False)),
                  "scalar_fixed": outcome(lambda: reduce_scalar_logs(True))}))
"""


@pytest.fixture(scope="module")
def distributed():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    result = subprocess.run([sys.executable, "-c", DISTRIBUTED], capture_output=True, text=True, env=env,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_mirrored_fit_builds_from_the_local_batch(distributed):
    assert "AddN" in distributed["bool_plain"], (
        f"Keras fixed building from a boolean first batch under MirroredStrategy ({distributed['bool_plain']}): "
        "drop the workaround build_from_local_batch")
    assert distributed["bool_fixed"] == "ok"


def test_multi_worker_logs_average_scalars(distributed):
    assert "Invalid reduction dimension 0" in distributed["scalar_plain"], (
        f"Keras fixed averaging scalar logs across workers ({distributed['scalar_plain']}): "
        "drop the workaround average_scalar_logs_across_workers")
    assert distributed["scalar_fixed"] == "ok"


def fit_one_epoch(callback):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(np.ones((4, 2), "float32"), np.ones((4, 1), "float32"), epochs=1, verbose=0, callbacks=[callback])


def test_csv_logger_closes_a_gfile():
    """ram:// stands in for gs://: Keras opens both through tf.io.gfile."""
    path = f"ram://csv-{uuid.uuid4().hex[:8]}/training_log.csv"
    try:
        fit_one_epoch(keras.callbacks.CSVLogger(path))
        raise AssertionError("Keras fixed CSVLogger on tf.io.gfile paths: drop the workaround CSVLogger")
    except AttributeError as e:
        assert "closed" in str(e), e
    logger = keras_workarounds.CSVLogger(path)
    fit_one_epoch(logger)
    assert logger.csv_file is None
    assert tf.io.gfile.GFile(path).read().splitlines()[0].startswith("epoch")


def test_loss_scaling_for_a_float16_body_under_a_float32_model():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, dtype="mixed_float16")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, dtype="float32")(hidden))
    model.compile(keras.optimizers.SGD(), "mse")
    assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer), (
        "Keras fixed loss scaling for float16 layers inside a float32 model: drop the workaround with_loss_scaling")
    assert isinstance(keras_workarounds.with_loss_scaling(model, keras.optimizers.SGD()),
                      keras.optimizers.LossScaleOptimizer)
    float32 = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    assert isinstance(keras_workarounds.with_loss_scaling(float32, keras.optimizers.SGD()), keras.optimizers.SGD)
