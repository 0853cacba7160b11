"""SavedModel export: raw inputs in, same probabilities as the Keras model, reloaded without tfl."""

import atexit
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from tfl import export as export_lib
from tfl.backbones import build_backbone
from tfl.runner import build_model

# A serving process without tfl: it loads each export it is sent (one JSON request per line on stdin) and
# answers with the signature's outputs on one "served: " line. One per test worker, started on first use,
# so each check costs a SavedModel load, not a fresh TensorFlow import.
SERVER = """
import json, sys, traceback
import numpy as np
import tensorflow as tf
import tensorflow_text  # registers the tokenizer ops; tfl is not imported
for line in sys.stdin:
    request = json.loads(line)
    try:
        assert "tfl" not in sys.modules
        serve = tf.saved_model.load(request["path"]).signatures["serving_default"]
        inputs = request["inputs"]
        if request["kind"] == "image":
            inputs = [bytes.fromhex(x) for x in inputs]
        out = serve(inputs=tf.constant(inputs))
        answer = {"probabilities": out["probabilities"].numpy().tolist(),
                  "label": [x.decode() for x in out["label"].numpy()],
                  "label_names": [x.decode() for x in out["label_names"].numpy()[0]]}
    except Exception:
        answer = {"error": traceback.format_exc()[-3000:]}
    print("served: " + json.dumps(answer), flush=True)
"""
_server = {}


def reload_in_fresh_process(path, kind, inputs, timeout=300):
    """The export at ``path``, loaded and called in a process that never imported tfl (one per test worker,
    reused: each check is a fresh SavedModel load in it). A server that hangs or dies is replaced."""
    process = _server.get("process")
    if process is None or process.poll() is not None:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
        _server["stderr"] = tempfile.TemporaryFile(mode="w+")
        process = _server["process"] = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=_server["stderr"], text=True, env=env, cwd="/")
        atexit.register(process.kill)
        answers = _server["answers"] = queue.Queue()
        threading.Thread(target=lambda: [answers.put(line) for line in process.stdout] + [answers.put(None)],
                         daemon=True).start()
    process.stdin.write(json.dumps({"path": str(path), "kind": kind, "inputs": inputs}) + "\n")
    process.stdin.flush()
    deadline = time.time() + timeout
    while True:
        try:
            line = _server["answers"].get(timeout=max(0.0, deadline - time.time()))
        except queue.Empty:
            line = None
        if line is None:  # hung or exited: replace it next time, and say why
            process.kill()
            _server.pop("process")
            _server["stderr"].seek(0)
            raise AssertionError(f"the serving process did not answer: {_server['stderr'].read()[-3000:]}")
        if line.startswith("served: "):
            answer = json.loads(line[len("served: "):])
            assert "error" not in answer, answer.get("error")
            return answer


def test_the_serving_process_reports_a_failed_load(tmp_path):
    with pytest.raises(AssertionError, match="SavedModel file does not exist|No such file|not found"):
        reload_in_fresh_process(tmp_path / "no_export", "text", ["x"])


def test_text_export_round_trip_in_a_fresh_process(tiny_bert_preset, tmp_path):
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    model = build_model(backbone, ["neg", "pos", "mixed"], head_dropout=0.0)
    # Two texts longer than the prefix the export tokenizes (8 characters a position: tfl.text_prefix), one of
    # them short of tokens there (so tokenized again in full); expected from keras-hub's own preprocessor.
    texts = ["the great film", "an awful plot", "movie", "the great film " * 20, "the" + " " * 200 + "awful plot"]
    expected = model.predict(backbone.preprocess.preprocessor(tf.constant(texts)), verbose=0)
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

    backbone = build_backbone("small_cnn", input_shape=(16, 16, 3))
    model = build_model(backbone, ["a", "b"])

    def full_disk(module, path, **kwargs):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "saved_model.pb"), "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_lib.tf.saved_model, "save", full_disk)
    with pytest.raises(export_lib.ExportError, match="No space left on device.*free disk space"):
        export_lib.export_serving_model(model, backbone, ["a", "b"], "classification", str(tmp_path / "export"))
    assert os.listdir(tmp_path / "export") == []  # no half-written version folder


def _stored_values(path) -> int:
    reader = tf.train.load_checkpoint(os.path.join(str(path), "variables", "variables"))
    return sum(int(np.prod(shape)) for name, shape in reader.get_variable_to_shape_map().items()
               if name.endswith("VARIABLE_VALUE"))


def test_export_stores_each_weight_once_traces_once_and_leaves_the_optimizer_out(tiny_bert_preset, tmp_path,
                                                                                  monkeypatch):
    import keras

    from tfl import train

    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    model = build_model(backbone, ["neg", "pos"], head_dropout=0.0)
    train.compile_model(model, train.make_optimizer(1e-3, 10), task="classification", num_labels=2,
                        jit_compile=False)
    assert model.optimizer.variables  # AdamW's slots exist: the export must not carry them
    traces = []
    serve_text = export_lib.ServingFunctions.serve_text
    monkeypatch.setattr(export_lib.ServingFunctions, "serve_text",
                        lambda self, x: traces.append(1) or serve_text(self, x))
    path = export_lib.export_serving_model(model, backbone, ["neg", "pos"], "classification", str(tmp_path / "tfl"))
    assert len(traces) == 1
    assert _stored_values(path) == model.count_params()
    loaded = tf.saved_model.load(path)  # the endpoint is also an attribute, as Keras's archive made it
    np.testing.assert_allclose(loaded.serving_default(tf.constant(["a fine film"]))["probabilities"].numpy(),
                               loaded.signatures["serving_default"](inputs=tf.constant(["a fine film"]))
                               ["probabilities"].numpy())
    # Keras's own archive stores each weight twice (keras-team/keras#23553): fails the day Keras fixes it, when
    # tfl could go back to keras.export.ExportArchive.
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda x: model(x, training=False),
                         input_signature=[{k: tf.TensorSpec([None, 8], tf.int32) for k in ("token_ids", "segment_ids",
                                                                                          "padding_mask")}])
    archive.write_out(str(tmp_path / "keras"), verbose=False)
    assert _stored_values(tmp_path / "keras") == 2 * model.count_params()
