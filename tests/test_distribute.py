"""MirroredStrategy over two logical CPU devices: the model, optimizer and data run on 2 replicas."""

import json
import os
import subprocess
import sys

import pytest

from test_cli import ROOT

TWO_CPUS = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""

SCRIPT = TWO_CPUS + """
import keras
source, backbone, strategies, epochs, shuffle_buffer, lstm_dropout = sys.argv[1:]
if lstm_dropout == "off":
    init = keras.layers.LSTM.__init__
    keras.layers.LSTM.__init__ = lambda self, *a, **k: init(self, *a, **dict(k, dropout=0.0, recurrent_dropout=0.0))
import tfl
from tfl.config import Config, DataConfig, ModelConfig, TrainConfig
runs = []
for strategy in strategies.split(","):
    config = Config(data=DataConfig(source=source, batch_size=8, max_examples=64, maxlen=8, num_words=50,
                                    shuffle_buffer=int(shuffle_buffer)),
                    model=ModelConfig(backbone=backbone, image_size=16, sequence_length=8, head_dropout=0.0),
                    train=TrainConfig(epochs=int(epochs), learning_rate=1e-2, precision="float32", strategy=strategy))
    metrics = tfl.run(config, verbose=0)
    runs.append({"replicas": metrics["replicas"], "history": metrics["history"], "test": metrics["test"]})
print(json.dumps(runs))
"""


def run_replicas(source, backbone, strategies=("mirrored",), epochs=2, shuffle_buffer=10000, lstm_dropout=True):
    """Trains in a fresh process whose CPU is split into 2 logical devices, once per strategy in turn
    (mirrored: 2 replicas; default: 1); returns each run's replicas, history and test metrics."""
    args = [source, backbone, ",".join(strategies), str(epochs), str(shuffle_buffer), "on" if lstm_dropout else "off"]
    return run_on_two_cpus(SCRIPT, args)


def run_on_two_cpus(script: str, args: list):
    """``script`` (TWO_CPUS + its own lines) run with ``args`` in a fresh process; the JSON of its last line."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                            env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_it_learned(run, validation=True):
    """The loss fell, in training (and on validation): the replicas trained the model."""
    history = run["history"]
    assert history["loss"][-1] < history["loss"][0] - 0.05, history
    if validation:
        assert history["val_loss"][-1] < history["val_loss"][0], history


def test_text_and_image_models_train_on_two_cpu_replicas(text_csv, tmp_path, tiny_bert_preset):
    import numpy as np
    import tensorflow as tf

    # Two replicas against one on the same global batch of 8. Dropout off: each replica draws its masks
    # for its half of the batch from the same seed state, so they differ from a one-replica run's masks.
    # No shuffling: under a strategy Keras draws one batch to build the model first, which uses up one
    # of the seeded reshuffles, so the epochs would come in another order than in the one-replica run.
    two, one = run_replicas(f"csv:{text_csv}", "lstm", ("mirrored", "default"), epochs=3, shuffle_buffer=1,
                            lstm_dropout=False)
    assert (two["replicas"], one["replicas"]) == (2, 1)
    assert_it_learned(two)
    # Measured: equal to the last digit (up to float32 summation order, 1e-7 or so).
    for key in ("loss", "val_loss"):
        assert np.allclose(two["history"][key], one["history"][key], rtol=0, atol=1e-5), (key, two, one)
    # keras-hub text models feed a boolean padding_mask, which plain Keras 3.15 cannot average across
    # replicas. Only a learning check here: tfl's global_clipnorm=1.0 is applied by Keras to each replica's
    # gradient before the all-reduce, so whenever the norm exceeds 1 the two runs differ (measured up to
    # 4e-3 in epoch losses on this model; 6e-8 with clipping off).
    # Training loss only: the 4 validation sentences of text_csv and the tiny BERT's random (unseeded) weights
    # made its validation loss rise between two epochs in one CI run, with the training loss falling.
    bert, = run_replicas(f"csv:{text_csv}", tiny_bert_preset)
    assert bert["replicas"] == 2
    assert_it_learned(bert, validation=False)

    for cls, value in [("a", 20), ("b", 230)]:
        os.makedirs(tmp_path / "img" / cls)
        for i in range(16):
            tf.io.write_file(str(tmp_path / "img" / cls / f"{i}.png"),
                             tf.io.encode_png(np.full((16, 16, 3), value, np.uint8)))
    image, = run_replicas(f"images:{tmp_path / 'img'}", "small_cnn", epochs=3)
    assert image["replicas"] == 2
    assert_it_learned(image)


def test_tpu_shaped_check_on_the_real_model_and_input_paths(tiny_bert_preset, text_csv, monkeypatch):
    """TPU-breaking changes fail here without a TPU: strings must stay in tf.data, batches full."""
    import tensorflow as tf

    from tfl import devices
    from tfl.backbones import build_backbone
    from tfl.data import load_data, make_batches
    from tfl.runner import build_model

    splits = load_data(f"csv:{text_csv}")
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    model = build_model(backbone, splits.label_names)
    full = make_batches(splits.train, batch_size=4, preprocess=backbone.preprocess, training=True,
                        drop_remainder=True)
    assert devices.tpu_compatibility_problems(model, full) == []
    ragged = make_batches(splits.train, batch_size=4, preprocess=backbone.preprocess, training=True)
    assert devices.tpu_compatibility_problems(model, ragged) == [
        "the batch dimension is not static (batch with drop_remainder=True)"]
    # Raw strings reaching the model (tokenization moved out of tf.data) is what TPUs cannot run.
    raw = make_batches(splits.train, batch_size=4, training=True, drop_remainder=True)
    assert any("string input" in p for p in devices.tpu_compatibility_problems(model, raw))
    lstm = build_backbone("lstm", num_words=30, maxlen=6, train_texts=["good film", "bad film"])
    lstm_model = build_model(lstm, splits.label_names)
    lstm_batches = make_batches(splits.train, batch_size=4, preprocess=lstm.preprocess, training=True,
                                drop_remainder=True)
    assert devices.tpu_compatibility_problems(lstm_model, lstm_batches) == []
    assert tf.executing_eagerly()

    # The run's own input pipeline in TPU mode (length buckets included): what fit() sees is TPU-shaped.
    from types import SimpleNamespace

    from tfl.config import Config, DataConfig, ModelConfig
    from tfl.batches import batches_for

    monkeypatch.setattr(devices, "device_kind", lambda strategy=None: "tpu")
    config = Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=4, bucket_shapes=2),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=8))
    train_ds, fit_val_ds, val_ds, _, bucketing = batches_for(config, splits, backbone,
                                                             SimpleNamespace(num_replicas_in_sync=1))
    assert bucketing is not None  # the bucketed pipeline, as on real text
    assert devices.tpu_compatibility_problems(model, train_ds) == []
    assert devices.tpu_compatibility_problems(model, fit_val_ds) == []
    # The final metrics still see every validation example, from batches fit() never gets.
    assert devices.tpu_compatibility_problems(model, val_ds) != []
    assert sum(int(y.shape[0]) for _, y in val_ds) == splits.sizes["validation"]


def _free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# python -c WITHOUT_LSTM_DROPOUT main.py --flags: main.py with the LSTM's dropout (fixed at 0.2 in
# tfl.backbones) turned off.
WITHOUT_LSTM_DROPOUT = """
import runpy, sys
import keras
init = keras.layers.LSTM.__init__
keras.layers.LSTM.__init__ = lambda self, *a, **k: init(self, *a, **dict(k, dropout=0.0, recurrent_dropout=0.0))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _main_command(text_csv, model_dir, *extra, lstm_dropout=True):
    python = [sys.executable] if lstm_dropout else [sys.executable, "-c", WITHOUT_LSTM_DROPOUT]
    return [*python, os.path.join(ROOT, "main.py"), f"--source=csv:{text_csv}", "--backbone=lstm",
            "--batch_size=8", "--maxlen=8", "--num_words=50", "--shuffle_buffer=1", "--epochs=3",
            "--learning_rate=1e-2", "--precision=float32", "--deterministic", "--head_dropout=0",
            f"--model_dir={model_dir}", *extra]


def test_two_worker_job_on_localhost_matches_one_worker(text_csv, tmp_path):
    """Two processes on 127.0.0.1 with TF_CONFIG, sharing one --model_dir as a real job shares gs://."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    workers = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        workers.append(subprocess.Popen(_main_command(text_csv, tmp_path / "job", "--strategy=multi_worker",
                                                      lstm_dropout=False),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    outputs = [worker.communicate(timeout=400) for worker in workers]
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    assert "not the chief" in outputs[1][0] and "not the chief" not in outputs[0][0]
    job = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert job["replicas"] == 2
    # One export, one saved model: had worker 1 written too, there would be a second export version.
    assert sorted(os.listdir(tmp_path / "job" / "export")) == ["1"]
    assert (tmp_path / "job" / "model.keras").exists() and (tmp_path / "job" / "training_log.csv").exists()

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    single = subprocess.run(_main_command(text_csv, tmp_path / "single", "--strategy=default", lstm_dropout=False),
                            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-3000:]
    reference = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert reference["replicas"] == 1
    # Same global batch of 8 (4 per worker), same seed and initial weights: the same training up to the
    # float32 summation order of the all-reduce. Measured: epoch losses equal to 3e-8. Dropout is off (see
    # _main_command): each replica draws its masks for its own 4 examples from the same seed state, so the
    # second worker's examples get other masks than in the one-worker run; with the LSTM's dropout on, the
    # losses drifted apart by 1e-3 to 5e-2 in 3 epochs in our runs. (The gradient norm here stays under
    # tfl's global_clipnorm of 1, which Keras applies to each replica's gradient before the all-reduce.)
    assert len(job["history"]["loss"]) == len(reference["history"]["loss"]) == 3
    for key in ("loss", "val_loss"):
        assert max(abs(a - b) for a, b in zip(job["history"][key], reference["history"][key])) <= 1e-5, key
    assert job["history"]["loss"][-1] < job["history"]["loss"][0] - 0.05  # and it trained
    assert job["test"].keys() == reference["test"].keys()
    assert all(abs(job["test"][k] - reference["test"][k]) <= 1e-6 for k in job["test"]), job["test"]
    # Only the chief appended to the shared training log: a header and one row per epoch.
    assert len((tmp_path / "job" / "training_log.csv").read_text().strip().splitlines()) == 1 + 3


def test_a_restarted_worker_resumes_from_the_chiefs_backup(tmp_path, monkeypatch):
    from tfl import devices, train

    (tmp_path / "run" / "backup").mkdir(parents=True)
    (tmp_path / "run" / "backup" / "training_metadata.json").write_text('{"epoch": 2, "batch": 0}')
    (tmp_path / "run" / "backup" / "latest.weights.h5").write_bytes(b"weights")
    scratch = devices.worker_scratch_dir(str(tmp_path / "run"))
    try:
        assert train.describe_backup(scratch) == "epoch 2, after batch 0"
        assert open(os.path.join(scratch, "backup", "latest.weights.h5"), "rb").read() == b"weights"
    finally:
        import shutil

        shutil.rmtree(scratch)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert not devices.is_chief()  # with a chief task in the cluster, worker 0 is not the chief
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert devices.is_chief()
    monkeypatch.delenv("TF_CONFIG")
    assert devices.is_chief() and devices.cluster_from_tf_config() == {}


def test_a_killed_two_worker_job_resumes_on_both_workers(tmp_path):
    """kill -9 both workers after the chief saved an epoch; the same two commands resume at that epoch."""
    import signal
    import time

    from conftest import write_sentiment_csv

    data = write_sentiment_csv(tmp_path / "d.csv")
    job = tmp_path / "job"

    def start_workers():
        cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
        return [subprocess.Popen(_main_command(data, job, "--strategy=multi_worker", "--epochs=4", "--noexport",
                                               "--shuffle_buffer=500"),
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=json.dumps(
                                     {"cluster": cluster, "task": {"type": "worker", "index": i}})))
                for i in range(2)]

    workers = start_workers()
    metadata = job / "backup" / "training_metadata.json"
    deadline = time.time() + 300
    while time.time() < deadline and all(w.poll() is None for w in workers):
        if metadata.exists() and json.loads(metadata.read_text() or "{}").get("epoch", 0) >= 1:
            break
        time.sleep(0.1)
    assert all(w.poll() is None for w in workers), "the job finished before it could be killed; make it longer"
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    saved_epoch = json.loads(metadata.read_text())["epoch"]

    workers = start_workers()
    outputs = [w.communicate(timeout=400)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0]
    for output in outputs:  # the non-chief resumes from its scratch copy of the chief's backup
        assert f"(epoch {saved_epoch}, after batch 0)" in output and "tfl: resuming from the backup" in output
    metrics = json.loads((job / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == 4 - saved_epoch and metrics["replicas"] == 2


EXPORT_SCRIPT = TWO_CPUS + """
import tfl
from tfl.config import Config, DataConfig, ModelConfig, TrainConfig
source, backbone, model_dir, precision = sys.argv[1:]
config = Config(data=DataConfig(source=source, batch_size=8, max_examples=32),
                model=ModelConfig(backbone=backbone, sequence_length=8, head_dropout=0.0),
                train=TrainConfig(epochs=1, precision=precision, strategy="mirrored"), model_dir=model_dir)
metrics = tfl.run(config, verbose=0)
print(json.dumps({"replicas": metrics["replicas"], "export_path": metrics["export_path"]}))
"""


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])  # bfloat16: tfl's CPU patches run per replica
def test_a_model_trained_on_two_replicas_exports_each_weight_once_and_serves(text_csv, tmp_path, tiny_bert_preset,
                                                                             precision):
    """A mirrored variable is one weight per replica in memory; the export must store (and serve) it once."""
    import keras
    import numpy as np
    import tensorflow as tf
    from test_export import _stored_values, reload_in_fresh_process

    from tfl.backbones import build_backbone
    from tfl.runner import build_model

    run = run_on_two_cpus(EXPORT_SCRIPT, [f"csv:{text_csv}", tiny_bert_preset, str(tmp_path / "run"), precision])
    assert run["replicas"] == 2
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    assert _stored_values(run["export_path"]) == build_model(backbone, ["neg", "pos"], head_dropout=0.0).count_params()
    texts = ["a fine film", "a dull plot"]
    served = reload_in_fresh_process(run["export_path"], "text", texts)
    # the run's own model.keras (Keras's layers, as stored) gives the same probabilities, up to bfloat16 roundings
    trained = keras.models.load_model(str(tmp_path / "run" / "model.keras"), compile=False)
    expected = trained.predict(backbone.preprocess(tf.constant(texts)), verbose=0)
    # (its one sigmoid unit is the served second class)
    np.testing.assert_allclose(np.array(served["probabilities"])[:, 1], expected[:, 0],
                               atol=1e-5 if precision == "float32" else 2 ** -7)

