"""Quiet by default (tfl/quiet.py): a run prints tfl's lines and one line per epoch, no TensorFlow log lines
or warnings; user mistakes still print their error line; --verbosity brings TensorFlow's logs back."""

import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import write_sentiment_csv
from test_cli import ROOT
from tfl import quiet, train

# TF's C++ log lines ("I0000 00:00:1795692162.279034   21232 cudart_stub.cc:31] ...", "2026-11-26 11:22:41.1: I
# ..."), absl's Python log lines ("I1126 11:23:17.809583 140486547168128 builder_impl.py:838] ...") and the rest
# of the noise the issue names.
NOISE = re.compile(r"^[IWEF]\d{4} |^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |cudart_stub|absl::InitializeLog|"
                   r"retracing|ran out of data|Warning", re.IGNORECASE | re.MULTILINE)


def run_main_without_tf_env(*args, cwd=ROOT):
    """main.py as a user runs it: no TF_CPP_MIN_LOG_LEVEL set (the test process sets one)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def tiny_run_flags(tmp_path):
    path = write_sentiment_csv(tmp_path / "d.csv", rows=200)
    return [f"--source=csv:{path}", "--backbone=lstm", "--maxlen=8", "--num_words=20", "--lstm_units=8",
            "--embedding_dim=8", "--epochs=2", "--batch_size=8", "--precision=float32", "--learning_rate=3e-3"]


def test_a_run_with_export_prints_no_log_lines_and_one_line_per_epoch(tmp_path):
    result = run_main_without_tf_env(*tiny_run_flags(tmp_path), f"--model_dir={tmp_path / 'run'}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert not NOISE.search(output), output[-3000:]
    assert result.stderr == "", result.stderr[-3000:]
    assert len([line for line in result.stdout.splitlines() if " - loss: " in line]) == 2  # Keras verbose=2
    assert "\r" not in output and "\x1b[" not in output  # no progress bar redraws in a log
    assert (tmp_path / "run" / "export" / "1" / "saved_model.pb").exists()  # the SavedModel writer ran


def test_verbosity_brings_tensorflows_logs_back(tmp_path):
    result = run_main_without_tf_env(*tiny_run_flags(tmp_path), "--epochs=1", "--verbosity=0",
                                     f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Writing fingerprint" in result.stderr  # the SavedModel writer's INFO line
    # The C++ start-up lines depend on the machine (no CUDA driver here: cudart_stub); any one of them will do.
    assert re.search(r"^[IWE]\d{4} \S+ +\d+ \w+\.cc:\d+\]", result.stderr, re.MULTILINE), \
        result.stderr[-3000:]


@pytest.mark.parametrize("args,needle", [
    (["--batch_size=0"], "--batch_size must be a positive number"),  # found after TensorFlow is imported
    (["--source=csv:/nonexistent/x.csv", "--backbone=lstm"], "does not exist"),  # found while loading data
])
def test_a_user_mistake_still_prints_its_error_line(args, needle, tmp_path):
    result = run_main_without_tf_env(*args, f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == \
        [line for line in result.stderr.splitlines() if needle in line], result.stderr[-3000:]
    assert len(result.stderr.splitlines()) == 1 and not NOISE.search(result.stdout + result.stderr)


def test_a_failing_start_shows_what_it_captured(capfd):
    """An import that fails inside the quiet start writes what it printed back, before the exception."""
    with pytest.raises(ImportError):
        with quiet._stderr_captured():
            os.write(2, b"a C++ line explaining the failure\n")
            raise ImportError("no such module")
    assert "a C++ line explaining the failure" in capfd.readouterr().err
    os.write(2, b"stderr is back\n")
    assert "stderr is back" in capfd.readouterr().err


def _retracing_warnings(caplog):
    return [r for r in caplog.records if "retracing" in r.getMessage()]


def test_predicting_many_shapes_with_many_models_does_not_warn_of_retracing(caplog):
    """Each pass builds its tf.function once, traced for every batch shape at once and keyed per call object:
    the val/test passes of every run of a compare (a new model each time) and their odd last batches stay under TF's threshold."""
    caplog.set_level(logging.WARNING, logger="tensorflow")
    for seed in range(4):
        model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
        for size in (7, 5, 3, 2):
            x = np.random.RandomState(seed).rand(size * 3 - 1, 3).astype("float32")
            dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x)))).batch(size)
            outputs, _ = train.predict_with_labels(model, dataset)
            assert outputs.shape == (len(x), 2)
    assert not _retracing_warnings(caplog)


def test_the_keras_retracing_filter_drops_only_keras_own_functions():
    keras_record = logging.LogRecord("tensorflow", logging.WARNING, "", 0, "5 out of the last 5 calls to <function "
                                     "TensorFlowTrainer._make_function.<locals>.multi_step_on_iterator at 0x1> "
                                     "triggered tf.function retracing.", None, None)
    own_record = logging.LogRecord("tensorflow", logging.WARNING, "", 0, "5 out of the last 5 calls to <function "
                                   "encode at 0x1> triggered tf.function retracing.", None, None)
    assert not quiet._KerasRetracingFilter().filter(keras_record)
    assert quiet._KerasRetracingFilter().filter(own_record)


def test_many_prefix_preprocessors_called_eagerly_do_not_warn_of_retracing(caplog, tiny_bert_preset):
    """Ranking many backbones tokenizes eagerly through one PrefixPreprocessor each: their traced tokenizers
    must not share TensorFlow's retracing count (a lambda or bound method would)."""
    import keras_hub

    from tfl.text_prefix import PrefixPreprocessor

    caplog.set_level(logging.WARNING, logger="tensorflow")
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(tiny_bert_preset, sequence_length=8)
    for _ in range(6):
        tokens = PrefixPreprocessor(preprocessor, 8)(tf.constant(["the great film", "a film"]))
        assert tokens["token_ids"].shape == (2, 8)
    assert not _retracing_warnings(caplog)
