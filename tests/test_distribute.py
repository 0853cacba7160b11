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
