"""MirroredStrategy over two logical CPU devices: the model, optimizer and data run on 2 replicas."""

import json
import os
import subprocess
import sys

from test_cli import ROOT

SCRIPT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import tfl
from tfl.config import Config, DataConfig, ModelConfig, TrainConfig
source, backbone = sys.argv[1], sys.argv[2]
config = Config(data=DataConfig(source=source, batch_size=8, max_examples=64, maxlen=8, num_words=50),
                model=ModelConfig(backbone=backbone, image_size=16),
                train=TrainConfig(epochs=1, learning_rate=1e-3, precision="float32", strategy="mirrored"))
metrics = tfl.run(config, verbose=0)
print(json.dumps({"replicas": metrics["replicas"], "test": metrics["test"]}))
"""


def run_two_replicas(source, backbone):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", SCRIPT, source, backbone], capture_output=True, text=True,
                            env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_text_and_image_models_train_on_two_cpu_replicas(text_csv, tmp_path):
    text = run_two_replicas(f"csv:{text_csv}", "lstm")
    assert text["replicas"] == 2 and 0.0 <= text["test"]["accuracy"] <= 1.0
    import numpy as np
    import tensorflow as tf

    for cls, value in [("a", 20), ("b", 230)]:
        os.makedirs(tmp_path / "img" / cls)
        for i in range(16):
            tf.io.write_file(str(tmp_path / "img" / cls / f"{i}.png"),
                             tf.io.encode_png(np.full((16, 16, 3), value, np.uint8)))
    image = run_two_replicas(f"images:{tmp_path / 'img'}", "small_cnn")
    assert image["replicas"] == 2 and "accuracy" in image["test"]


def test_tpu_shaped_check_on_the_real_model_and_input_paths(tiny_bert_preset, text_csv):
    """TPU-breaking changes fail here without a TPU: strings must stay in tf.data, batches full."""
    import tensorflow as tf

    from tfl import train
    from tfl.backbones import build_backbone
    from tfl.data import load_data, make_batches
    from tfl.runner import build_model

    splits = load_data(f"csv:{text_csv}")
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    model = build_model(backbone, splits.label_names)
    full = make_batches(splits.train, batch_size=4, preprocess=backbone.preprocess, training=True,
                        drop_remainder=True)
    assert train.tpu_compatibility_problems(model, full) == []
    ragged = make_batches(splits.train, batch_size=4, preprocess=backbone.preprocess, training=True)
    assert train.tpu_compatibility_problems(model, ragged) == [
        "the batch dimension is not static (batch with drop_remainder=True)"]
    # Raw strings reaching the model (tokenization moved out of tf.data) is what TPUs cannot run.
    raw = make_batches(splits.train, batch_size=4, training=True, drop_remainder=True)
    assert any("string input" in p for p in train.tpu_compatibility_problems(model, raw))
    lstm = build_backbone("lstm", num_words=30, maxlen=6, train_texts=["good film", "bad film"])
    lstm_model = build_model(lstm, splits.label_names)
    lstm_batches = make_batches(splits.train, batch_size=4, preprocess=lstm.preprocess, training=True,
                                drop_remainder=True)
    assert train.tpu_compatibility_problems(lstm_model, lstm_batches) == []
    assert tf.executing_eagerly()
