"""A whole run through the CLI and through tfl.run on small data: outputs under --model_dir."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfl
from tfl.config import Config, DataConfig, FreezeConfig, ModelConfig, TrainConfig

from test_cli import run_main


def test_cli_run_writes_metrics_model_and_export(text_csv, tmp_path):
    model_dir = tmp_path / "run"
    result = run_main(f"--source=csv:{text_csv}", "--backbone=lstm", "--maxlen=8", "--num_words=50",
                      "--epochs=2", "--batch_size=8", "--learning_rate=1e-2", f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert set(metrics["test"]) == {"accuracy", "macro_f1", "auc"}
    assert metrics["config"]["model"]["backbone"] == "lstm"
    assert metrics["precision"] in ("float32", "mixed_bfloat16") and metrics["train_examples_per_second"] > 0
    assert len(metrics["history"]["loss"]) == 2
    assert [r["block"] for r in metrics["freeze_table"]] == ["embedding", "lstm"]
    assert json.loads((model_dir / "config.json").read_text()) == metrics["config"]
    timings = metrics["timings"]  # seconds per stage; "imports" only from the command line
    assert set(timings) == {"imports", "devices", "data_load", "build", "transfer", "batches", "bucket_choice",
                            "feature_cache", "fit", "epochs", "evaluation", "saving", "export", "total"}
    assert len(timings["epochs"]) == metrics["epochs_run"] == 2
    assert all(v >= 0 for v in timings["epochs"]) and all(v >= 0 for k, v in timings.items() if k != "epochs")
    assert timings["imports"] > 0.2 and timings["export"] > 0 and timings["saving"] > 0  # TensorFlow loads, files written
    assert sum(timings["epochs"]) <= timings["fit"] <= metrics["train_seconds"] + 0.01
    stages = sum(v for k, v in timings.items() if k not in ("epochs", "bucket_choice", "total"))  # disjoint
    assert stages <= timings["total"] + 0.01 and timings["total"] >= timings["imports"] + timings["fit"]
    assert 100 < metrics["peak_rss_mb"] < 1024 * 1024  # MiB: TensorFlow alone holds more than 100
    assert os.listdir(model_dir / "export") == ["1"]
    for name in ("model.keras", "training_log.csv", "best.weights.h5", "logs"):
        assert (model_dir / name).exists(), name
    import tfl.train  # noqa: F401  (registers the schedule and layers that model.keras refers to)
    reloaded = keras.saving.load_model(model_dir / "model.keras", safe_mode=True)
    assert reloaded.count_params() == metrics["total_params"]
    # The same command again is refused only if the config changed.
    changed = run_main(f"--source=csv:{text_csv}", "--backbone=lstm", "--epochs=3", f"--model_dir={model_dir}")
    assert changed.returncode == 2 and "different config" in changed.stderr


def test_library_run_on_an_image_folder_with_a_frozen_block(tmp_path):
    rng = np.random.RandomState(0)
    for cls, value in [("dark", 30), ("light", 220)]:
        os.makedirs(tmp_path / "img" / cls)
        for i in range(12):
            image = np.clip(rng.normal(value, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
            tf.io.write_file(str(tmp_path / "img" / cls / f"{i}.png"), tf.io.encode_png(image))
    config = Config(data=DataConfig(source=f"images:{tmp_path / 'img'}", batch_size=4, validation_fraction=0.2,
                                    test_fraction=0.2),
                    model=ModelConfig(backbone="small_cnn", image_size=16, head_dropout=0.0),
                    freeze=FreezeConfig(freeze_blocks=1),
                    train=TrainConfig(epochs=10, learning_rate=3e-3, precision="float32"),
                    model_dir=str(tmp_path / "run"))
    metrics = tfl.run(config, verbose=0)
    assert [r["status"] for r in metrics["freeze_table"]] == ["frozen", "trainable", "trainable"]
    assert "imports" not in metrics["timings"] and len(metrics["timings"]["epochs"]) == 10  # a library run
    assert metrics["timings"]["total"] >= metrics["timings"]["fit"] and metrics["peak_rss_mb"] > 0
    assert metrics["test"]["accuracy"] >= 0.75  # dark vs light is easy
    assert os.path.isdir(tmp_path / "run" / "export" / "1")


def test_cached_linear_probe_matches_the_uncached_path(tiny_bert_preset, tmp_path):
    rows = [("the great film", 1), ("an awful plot", 0), ("great movie", 1), ("awful film", 0),
            ("a great plot", 1), ("the awful movie", 0)] * 6
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))

    def probe(cache):
        config = Config(data=DataConfig(source=f"csv:{path}", batch_size=4, bucket_shapes=0),
                        model=ModelConfig(backbone=tiny_bert_preset, sequence_length=8, head_dropout=0.1),
                        freeze=FreezeConfig(freeze_all=True),
                        train=TrainConfig(epochs=3, learning_rate=1e-2, precision="float32",
                                          cache_frozen_features=cache))
        return tfl.run(config, verbose=0)

    cached, uncached = probe(True), probe(False)
    assert cached["feature_cache"]["examples"] == cached["data"]["sizes"]["train"]
    assert uncached["feature_cache"] is None
    assert cached["timings"]["feature_cache"] >= cached["feature_cache"]["seconds"] - 0.01  # timed as its own stage
    for key in ("loss", "val_loss"):
        assert np.allclose(cached["history"][key], uncached["history"][key], atol=1e-5), key
    assert cached["test"] == pytest.approx(uncached["test"], abs=1e-6)


def test_nan_loss_fails_with_one_line_naming_the_step(tmp_path):
    from test_cli import run_main

    path = tmp_path / "r.csv"
    path.write_text("text,label\n" + "".join(f"w{i % 5} x,{'nan' if i % 4 == 3 else i / 10}\n" for i in range(40)))
    result = run_main(f"--source=csv:{path}", "--task=regression", "--backbone=lstm", "--maxlen=4",
                      "--num_words=20", "--epochs=1", "--batch_size=4", "--precision=float32",
                      f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    line = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "loss became nan at epoch 1, step" in line[0] and "learning rate" in line[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()  # no result that looks complete


def test_deterministic_runs_give_identical_metrics(text_csv, tmp_path):
    from test_cli import run_main

    results = []
    for name in ("a", "b"):
        result = run_main(f"--source=csv:{text_csv}", "--backbone=lstm", "--maxlen=8", "--num_words=50",
                          "--epochs=2", "--batch_size=8", "--deterministic", "--noexport",
                          f"--model_dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-2000:]
        results.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert results[0]["history"] == results[1]["history"] and results[0]["test"] == results[1]["test"]


# Runs main.py as given, noting in <out>/losses.json the validation loss of the model before the backup's
# restore (fresh), of <saved weights> loaded here (saved) and after the restore (start), and saving the
# weights and optimizer state the run starts training from in <out>/start.weights.h5.
RESTORE_SPY = """
import json, runpy, sys
from tfl import train

main, saved_weights, out = sys.argv.pop(1), sys.argv.pop(1), sys.argv.pop(1)
validation, real_fit, real_begin = {}, train.fit, train.Backup.on_train_begin

def fit(model, train_data, validation_data, **kwargs):
    validation["data"] = validation_data
    return real_fit(model, train_data, validation_data, **kwargs)

def on_train_begin(self, logs=None):
    def val_loss():
        return float(self.model.evaluate(validation["data"], verbose=0, return_dict=True)["loss"])
    fresh, weights = val_loss(), self.model.get_weights()
    self.model.load_weights(saved_weights, objects_to_skip=[self.model.optimizer])
    saved = val_loss()
    self.model.set_weights(weights)
    real_begin(self, logs)
    self.model.save_weights(out + "/start.weights.h5")
    with open(out + "/losses.json", "w") as f:
        json.dump({"fresh": fresh, "saved": saved, "start": val_loss()}, f)

train.fit, train.Backup.on_train_begin = fit, on_train_begin
sys.argv[0] = main
runpy.run_path(main, run_name="__main__")
"""


def h5_arrays(path) -> dict:
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return arrays


def test_kill_minus_9_then_the_same_command_resumes(tmp_path):
    """Start a run, kill -9 it once it has saved after a finished epoch, rerun the same command: it starts
    from the backup's weights and optimizer state. Epochs of 25 steps keep the rerun's first validation
    close to the saved state: a fresh model is still near chance after one, the saved one is well past it."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from test_cli import ROOT

    from conftest import write_sentiment_csv

    path = write_sentiment_csv(tmp_path / "d.csv")
    model_dir = tmp_path / "run"
    main = os.path.join(ROOT, "main.py")
    flags = [f"--source=csv:{path}", "--backbone=lstm", "--maxlen=8", "--num_words=20", "--lstm_units=16",
             "--epochs=5", "--batch_size=4", "--max_steps_per_epoch=25", "--save_every_steps=10",
             "--precision=float32", "--noexport", "--learning_rate=3e-3"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.Popen([sys.executable, main, *flags, f"--model_dir={model_dir}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metadata = model_dir / "backup" / "training_metadata.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        try:
            if json.loads(metadata.read_text()).get("epoch", 0) >= 2:
                break
        except (OSError, ValueError):  # not written yet, or half-written
            pass
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed; make it longer"
    process.send_signal(signal.SIGSTOP)  # nothing more is written: the next save is 10 steps away
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (model_dir / "metrics.json").exists()
    saved_epoch = json.loads(metadata.read_text())["epoch"]
    saved = tmp_path / "saved_backup"
    shutil.copytree(model_dir / "backup", saved)  # the rerun removes the backup when it is done

    spy = tmp_path / "spy.py"
    spy.write_text(RESTORE_SPY)
    resumed = subprocess.run([sys.executable, str(spy), main, str(saved / "latest.weights.h5"), str(tmp_path),
                              *flags, f"--model_dir={model_dir}"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from the backup in {model_dir / 'backup'} (epoch {saved_epoch}" in resumed.stdout
    metrics = json.loads((model_dir / "metrics.json").read_text())
    # Only the epochs after the saved one ran again (step count, not wall time).
    assert len(metrics["history"]["loss"]) == 5 - saved_epoch
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses["fresh"] > 0.6 and losses["saved"] < 0.3  # chance is ln 2 = 0.69; 2 epochs reach ~0.1
    # One more epoch from the saved state, not from a fresh model.
    first = metrics["history"]["val_loss"][0]
    assert first < losses["saved"] + 0.05 and first < losses["fresh"] - 0.4, (first, losses)
    # The rerun starts from exactly the backup: weights, optimizer moments and step.
    start, backup = h5_arrays(tmp_path / "start.weights.h5"), h5_arrays(saved / "latest.weights.h5")
    assert start.keys() == backup.keys() and any(k.startswith("optimizer") for k in backup)
    for key in backup:
        assert np.array_equal(start[key], backup[key]), key
    assert losses["start"] == pytest.approx(losses["saved"], abs=1e-6)
    assert not (model_dir / "backup").exists()
    assert metrics["test"]["accuracy"] >= 0.9


def tiny_regression(seed=0):
    """Dense blocks "low" and "high" under a head, and 64 examples of a learnable target (8 batches)."""
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 1.5], "float32"))[:, None]
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="tanh", name="low")(inputs)
    hidden = keras.layers.Dense(8, activation="tanh", name="high")(hidden)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden)), data


def test_backup_is_saved_at_every_epoch_end_also_with_save_every_steps(tmp_path):
    """Keras' integer save_freq alone saves only every N batches: a finished epoch could be lost."""
    from tfl.train import Backup

    model, data = tiny_regression()
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    backup = Backup(str(tmp_path / "backup"), save_freq=3)  # 8 batches an epoch: saves mid-epoch too
    metadata, seen = tmp_path / "backup" / "training_metadata.json", []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(("batch", batch, json.loads(metadata.read_text()) if metadata.exists() else None))

        def on_epoch_end(self, epoch, logs=None):
            seen.append(("epoch end", epoch, json.loads(metadata.read_text())))
            saved, _ = tiny_regression()
            saved.load_weights(tmp_path / "backup" / "latest.weights.h5")
            assert all(np.array_equal(a, b) for a, b in zip(saved.get_weights(), model.get_weights()))

    model.fit(data, epochs=2, callbacks=[backup, Record()], verbose=0, shuffle=False)
    ends = [meta for kind, _, meta in seen if kind == "epoch end"]
    assert ends == [{"epoch": 1, "batch": 0}, {"epoch": 2, "batch": 0}]
    # Every 3 batches within an epoch (counted from the epoch-end save), as before.
    assert [(e, meta) for kind, e, meta in seen if kind == "batch" and e == 2] == [(2, {"epoch": 0, "batch": 2}),
                                                                               (2, {"epoch": 1, "batch": 2})]
    assert metadata.exists()  # fit() removes it once every stage is done, not each model.fit


@pytest.mark.parametrize("save_every_steps", [0, 3])
def test_a_run_backs_up_every_epoch_but_its_last_which_fit_would_remove_unread(text_csv, tmp_path, monkeypatch,
                                                                              save_every_steps):
    """The backup at the run's last epoch end would be removed right after, unread: it is not written (also
    with mid-epoch saves, which record the epoch in progress: 0, 1, 2)."""
    from tfl import train

    saved_at, removed = [], []
    real_save, real_remove = train.Backup._save_model, train.Backup.remove
    monkeypatch.setattr(train.Backup, "_save_model",
                        lambda self: saved_at.append(self._current_epoch) or real_save(self))
    monkeypatch.setattr(train.Backup, "remove", lambda self: removed.append(saved_at[:]) or real_remove(self))
    config = Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=4, maxlen=8, num_words=50),
                    model=ModelConfig(backbone="lstm"), model_dir=str(tmp_path / "run"), export=False,
                    train=TrainConfig(epochs=3, learning_rate=1e-2, precision="float32",
                                      save_every_steps=save_every_steps))
    tfl.run(config, verbose=0)
    epoch_ends = [1, 2]  # the ends of the first and second epochs (the epoch to resume at); none after the third
    if save_every_steps:
        assert 3 not in saved_at and 0 in saved_at and set(epoch_ends) <= set(saved_at)
    else:
        assert saved_at == epoch_ends
    assert removed == [saved_at]
    assert not (tmp_path / "run" / "backup").exists()


def test_a_resumed_run_records_the_epoch_it_is_in(tmp_path):
    """Kill, resume, kill again: the mid-epoch save after a resume must say the resumed epoch, not 0."""
    from tfl.train import Backup

    model, data = tiny_regression()
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    metadata = tmp_path / "backup" / "training_metadata.json"
    model.fit(data, epochs=2, callbacks=[Backup(str(tmp_path / "backup"), save_freq=3)], verbose=0, shuffle=False)
    assert json.loads(metadata.read_text())["epoch"] == 2

    class StopMidEpoch(keras.callbacks.Callback):  # the second kill, after the first mid-epoch save
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                raise KeyboardInterrupt

    resumed, _ = tiny_regression()
    resumed.compile(keras.optimizers.SGD(0.01), loss="mse")
    with pytest.raises(KeyboardInterrupt):
        resumed.fit(data, epochs=4, callbacks=[Backup(str(tmp_path / "backup"), save_freq=3), StopMidEpoch()],
                    verbose=0, shuffle=False)
    assert json.loads(metadata.read_text()) == {"epoch": 2, "batch": 2}


@pytest.mark.parametrize("stop_at", [3, 4])  # within the second stage; at the third stage's first epoch
def test_gradual_unfreezing_resumes_as_if_never_stopped(tmp_path, monkeypatch, recwarn, stop_at):
    """Stages: head only (epochs 0-1), + "high" (2-3), + "low" (4-5). A run stopped before epoch
    ``stop_at`` and rerun ends with the weights of a run never stopped: each stage's trainable set,
    weights, optimizer moments and step come back, and a stage boundary starts a fresh optimizer."""
    from tfl import train

    def stages(model):
        def trainable(*names):
            return lambda: [setattr(model.get_layer(n), "trainable", n in names) for n in ("low", "high")]
        return [(0, trainable()), (2, trainable("high")), (4, trainable("high", "low"))]

    def run(model, data, model_dir):
        return train.fit(model, data, data, task="regression", num_labels=1, epochs=6, learning_rate=0.02,
                         steps_per_epoch=8, model_dir=str(model_dir), unfreeze_stages=stages(model), verbose=0)

    reference, data = tiny_regression()
    start = reference.get_weights()
    run(reference, data, tmp_path / "straight")

    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == stop_at:
                raise KeyboardInterrupt  # as a kill: no on_train_end, the backup stays

    real_callbacks = train.make_callbacks
    monkeypatch.setattr(train, "make_callbacks", lambda *a, **k: real_callbacks(*a, **k) + [Stop()])
    stopped, _ = tiny_regression()
    stopped.set_weights(start)
    with pytest.raises(KeyboardInterrupt):
        run(stopped, data, tmp_path / "run")
    backup = tmp_path / "run" / "backup"
    assert json.loads((backup / "training_metadata.json").read_text()) == {"epoch": stop_at, "batch": 0}

    restored = {}

    class Record(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if not restored:  # after Backup's on_train_begin, in the first stage the rerun trains
                restored.update(weights=self.model.get_weights(), step=int(self.model.optimizer.iterations.numpy()),
                                trainable=[self.model.get_layer(n).trainable for n in ("low", "high")])

    monkeypatch.setattr(train, "make_callbacks", lambda *a, **k: real_callbacks(*a, **k) + [Record()])
    saved, _ = tiny_regression()
    saved.load_weights(backup / "latest.weights.h5")
    rerun, _ = tiny_regression(seed=1)  # other initial weights: only the backup can make it match
    history = run(rerun, data, tmp_path / "run")
    assert len(history["loss"]) == 6 - stop_at
    assert restored["trainable"] == [stop_at >= 4, True]
    assert restored["step"] == stop_at * 8
    assert all(np.array_equal(a, b) for a, b in zip(restored["weights"], saved.get_weights()))
    for a, b in zip(rerun.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not backup.exists()
    assert not [w for w in recwarn if "Skipping variable loading" in str(w.message)]


def test_step_cap_and_early_stopping(text_csv):
    config = Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=4, maxlen=8, num_words=50),
                    model=ModelConfig(backbone="lstm"),
                    train=TrainConfig(epochs=6, learning_rate=1e-9, precision="float32", max_steps_per_epoch=2,
                                      early_stopping_patience=1, warmup_fraction=0.0),
                    export=False)
    metrics = tfl.run(config, verbose=0)
    # A learning rate of 1e-9 never improves the validation loss: patience 1 stops after epoch 2.
    assert len(metrics["history"]["loss"]) == 2
    assert metrics["train_examples_per_second"] > 0


def test_public_names_are_the_functions_not_modules():
    """`tfl.run`, `tfl.freeze`, ... stay callables even after every tfl module has been imported."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(tfl.__path__, "tfl."):
        if module.name not in ("tfl.demo",):
            importlib.import_module(module.name)
    for name in tfl.__all__:
        value = getattr(tfl, name)
        assert callable(value) and not isinstance(value, type(tfl)), name


def test_gradient_accumulation_equals_the_larger_batch_and_survives_unfreezing_stages(tmp_path):
    """Two batches of 4 accumulated make the update one batch of 8 makes (constant learning rate, no dropout),
    epoch after epoch; the update count is the batches over 2; a later unfreezing stage restarts from the
    right batch count."""
    from tfl import train

    accumulated, data = tiny_regression()
    reference, _ = tiny_regression()
    start = accumulated.get_weights()
    reference.set_weights(start)
    x, y = (np.concatenate(part) for part in zip(*data.as_numpy_iterator()))
    common = dict(task="regression", num_labels=1, epochs=3, learning_rate=0.02, warmup_fraction=0.0,
                  schedule="constant", verbose=0)
    small = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    train.fit(accumulated, small, small, steps_per_epoch=16, gradient_accumulation_steps=2, **common)
    train.fit(reference, data, data, steps_per_epoch=8, **common)
    assert int(accumulated.optimizer.iterations.numpy()) == 24 == int(reference.optimizer.iterations.numpy())
    for a, b in zip(accumulated.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(accumulated.get_weights()[0], start[0])  # it trained

    staged, _ = tiny_regression()
    stages = [(0, None), (2, lambda: None)]  # a second stage compiles a fresh optimizer at epoch 2
    train.fit(staged, small, small, steps_per_epoch=16, gradient_accumulation_steps=2, unfreeze_stages=stages,
              model_dir=str(tmp_path / "staged"), **common)
    assert int(train.batch_counter(staged.optimizer).numpy()) == 48
    assert int(staged.optimizer.iterations.numpy()) == 24


def test_gradient_accumulation_is_refused_with_several_replicas_and_counts_batches_under_loss_scaling():
    from tfl import train
    from tfl.config import Config, ConfigError, TrainConfig

    for strategy in ("mirrored", "multi_worker"):
        with pytest.raises(ConfigError, match="one device only"):
            Config(train=TrainConfig(gradient_accumulation_steps=2, strategy=strategy)).validate()
    Config(train=TrainConfig(gradient_accumulation_steps=2)).validate()
    inner = train.make_optimizer(1e-3, 10, gradient_accumulation_steps=2)
    wrapped = keras.optimizers.LossScaleOptimizer(inner)  # what mixed_float16 compiles
    assert train.batch_counter(wrapped) is inner._iterations  # a variable to assign, not the update count


def test_accumulation_is_refused_when_auto_picks_several_replicas_at_run_time():
    """`validate` refuses it for an explicit multi-device strategy; --strategy=auto only knows at run time."""
    from types import SimpleNamespace

    from tfl import runner
    from tfl.config import ConfigError

    config = Config(data=DataConfig(source="asset:rotten_tomatoes"), train=TrainConfig(gradient_accumulation_steps=2))
    two_replicas = SimpleNamespace(strategy=SimpleNamespace(num_replicas_in_sync=2))
    with pytest.raises(ConfigError, match="one device only"):
        runner.fit_model(config, None, None, None, (), two_replicas, verbose=0)
    one_replica = SimpleNamespace(strategy=SimpleNamespace(num_replicas_in_sync=1))
    with pytest.raises(ValueError):  # past the check: it goes on to unpack the (here empty) batches
        runner.fit_model(config, None, None, None, (), one_replica, verbose=0)


def test_token_budget_batches_size_the_schedule_and_the_cached_probe(tiny_bert_preset, tmp_path):
    """--tokens_per_batch: the epoch's exact step count sizes the schedule, every example is seen once per epoch,
    and a probe on cached features gets the same batches as the uncached pipeline (so with buckets at a fixed
    batch size)."""
    rows = [("the great film", 1), ("an awful plot", 0), ("great movie", 1), ("awful film", 0),
            ("a great plot that the film had", 1), ("the awful movie", 0)] * 6
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))

    def run(cache, tokens_per_batch=48):
        config = Config(data=DataConfig(source=f"csv:{path}", batch_size=4, bucket_shapes=2,
                                        tokens_per_batch=tokens_per_batch),
                        model=ModelConfig(backbone=tiny_bert_preset, sequence_length=12, head_dropout=0.1),
                        freeze=FreezeConfig(freeze_all=True),
                        train=TrainConfig(epochs=2, learning_rate=1e-2, precision="float32",
                                          cache_frozen_features=cache))
        return tfl.run(config, verbose=0)

    cached, uncached, fixed = run(True), run(False), run(False, tokens_per_batch=0)
    fixed_cached = run(True, tokens_per_batch=0)
    boundaries, sizes = cached["bucketing"]["boundaries"], cached["bucketing"]["batch_sizes"]
    assert sizes == [48 // b for b in boundaries] and "batch_sizes" not in fixed["bucketing"]
    assert cached["steps_per_epoch"] < fixed["steps_per_epoch"]  # short texts: more of them per step
    assert cached["optimizer_steps"] == 2 * cached["steps_per_epoch"]
    assert cached["train_examples_seen"] == 2 * cached["data"]["sizes"]["train"]
    for key in ("loss", "val_loss"):
        assert np.allclose(cached["history"][key], uncached["history"][key], atol=1e-5), key
    # With buckets and a fixed batch size too (the bucket count once took the shuffle's first order, so the
    # uncached pipeline trained on its second: the cached probe saw other batches).
    assert np.allclose(fixed_cached["history"]["loss"], fixed["history"]["loss"], atol=1e-5)
