"""SavedModel export: raw inputs in, same probabilities as the Keras model, reloaded without tfl."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tfl import export as export_lib
from tfl.backbones import build_backbone
from tfl.runner import build_model

RELOAD = """
import json, sys
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_text  # registers the tokenizer ops; tfl is not imported
assert "tfl" not in sys.modules
path, kind, inputs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
serve = tf.saved_model.load(path).signatures["serving_default"]
if kind == "image":
    inputs = [bytes.fromhex(x) for x in inputs]
out = serve(inputs=tf.constant(inputs))
print(json.dumps({"probabilities": out["probabilities"].numpy().tolist(),
                  "label": [x.decode() for x in out["label"].numpy()],
                  "label_names": [x.decode() for x in out["label_names"].numpy()[0]]}))
"""


def reload_in_fresh_process(path, kind, inputs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", RELOAD, path, kind, json.dumps(inputs)], capture_output=True,
                            text=True, env=env, cwd="/", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_text_export_round_trip_in_a_fresh_process(tiny_bert_preset, tmp_path):
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    model = build_model(backbone, ["neg", "pos", "mixed"], head_dropout=0.0)
    texts = ["the great film", "an awful plot", "movie"]
    expected = model.predict(backbone.preprocess(tf.constant(texts)), verbose=0)
    first = export_lib.export_serving_model(model, backbone, ["neg", "pos", "mixed"], "classification",
                                            str(tmp_path / "export"))
    second = export_lib.export_serving_model(model, backbone, ["neg", "pos", "mixed"], "classification",
                                             str(tmp_path / "export"))
    assert [os.path.basename(first), os.path.basename(second)] == ["1", "2"]  # new version, never overwritten
    assert sorted(os.listdir(tmp_path / "export")) == ["1", "2"]  # no temporary folders left
    served = reload_in_fresh_process(first, "text", texts)
    assert np.max(np.abs(np.array(served["probabilities"]) - expected)) <= 1e-5
    assert served["label_names"] == ["neg", "pos", "mixed"]
    assert served["label"] == [["neg", "pos", "mixed"][i] for i in np.argmax(expected, axis=1)]


def test_binary_lstm_export_takes_raw_strings(tmp_path):
    texts = ["good fun", "bad and dull", "good good", "dull"]
    backbone = build_backbone("lstm", num_words=20, maxlen=6, train_texts=texts)
    model = build_model(backbone, ["neg", "pos"], head_dropout=0.0)
    expected = model.predict(backbone.preprocess(tf.constant(texts)), verbose=0)[:, 0]
    path = export_lib.export_serving_model(model, backbone, ["neg", "pos"], "classification", str(tmp_path))
    served = np.array(reload_in_fresh_process(path, "text", texts)["probabilities"])
    assert served.shape == (4, 2)
    assert np.max(np.abs(served[:, 1] - expected)) <= 1e-5 and np.allclose(served.sum(axis=1), 1.0)


def test_image_export_takes_encoded_bytes(tmp_path):
    backbone = build_backbone("small_cnn", input_shape=(16, 16, 3))
    model = build_model(backbone, ["a", "b", "c"], head_dropout=0.0)
    rng = np.random.RandomState(0)
    images = rng.randint(0, 255, (2, 16, 16, 3)).astype(np.uint8)
    encoded = [tf.io.encode_png(image).numpy() for image in images]
    expected = model.predict(backbone.preprocess(images), verbose=0)
    path = export_lib.export_serving_model(model, backbone, ["a", "b", "c"], "classification", str(tmp_path))
    served = reload_in_fresh_process(path, "image", [e.hex() for e in encoded])
    assert np.max(np.abs(np.array(served["probabilities"]) - expected)) <= 1e-5


def test_disk_full_during_export_leaves_no_version_folder(tmp_path, monkeypatch):
    import errno

    import keras

    backbone = build_backbone("small_cnn", input_shape=(16, 16, 3))
    model = build_model(backbone, ["a", "b"])

    def full_disk(self, path, **kwargs):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "saved_model.pb"), "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    # ExportArchive() is a factory: patch the backend class it returns.
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", full_disk)
    with pytest.raises(export_lib.ExportError, match="No space left on device.*free disk space"):
        export_lib.export_serving_model(model, backbone, ["a", "b"], "classification", str(tmp_path / "export"))
    assert os.listdir(tmp_path / "export") == []  # no half-written version folder
