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


def test_kill_minus_9_then_the_same_command_resumes(tmp_path):
    """Start a run, kill -9 it once it has saved after a finished epoch, rerun the same command."""
    import signal
    import subprocess
    import sys
    import time

    from test_cli import ROOT

    from conftest import write_sentiment_csv

    path = write_sentiment_csv(tmp_path / "d.csv")
    model_dir = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "main.py"), f"--source=csv:{path}", "--backbone=lstm", "--maxlen=8",
               "--num_words=20", "--lstm_units=16", "--epochs=5", "--batch_size=4", "--save_every_steps=10",
               "--precision=float32", "--noexport", "--learning_rate=3e-3", f"--model_dir={model_dir}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metadata = model_dir / "backup" / "training_metadata.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metadata.exists() and json.loads(metadata.read_text() or "{}").get("epoch", 0) >= 2:
            break
        time.sleep(0.1)
    assert process.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (model_dir / "metrics.json").exists()
    saved_epoch = json.loads(metadata.read_text())["epoch"]

    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from the backup in {model_dir / 'backup'} (epoch {saved_epoch}" in resumed.stdout
    metrics = json.loads((model_dir / "metrics.json").read_text())
    # Only the epochs after the saved one ran again (step count, not wall time).
    assert len(metrics["history"]["loss"]) == 5 - saved_epoch
    # The same command, never interrupted, ends close to the resumed run.
    straight_dir = tmp_path / "straight"
    straight = subprocess.run([*command[:-1], f"--model_dir={straight_dir}"], capture_output=True, text=True,
                              env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    reference = json.loads((straight_dir / "metrics.json").read_text())
    assert len(reference["history"]["loss"]) == 5
    assert abs(metrics["test"]["accuracy"] - reference["test"]["accuracy"]) <= 0.05
    assert metrics["test"]["accuracy"] >= 0.9


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
