"""Runs on object stores: everything tfl reads from user paths and writes under --model_dir goes
through tf.io.gfile. TensorFlow's in-memory ram:// filesystem stands in for gs:// here; a local-only
open(), os.makedirs or os.replace on such a path either fails or leaves a 'ram:' folder on disk."""

import json
import os
import uuid

import numpy as np
import pytest
import tensorflow as tf

from tfl import storage
from tfl.config import Config, DataConfig, ModelConfig, TrainConfig


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A fresh ram:// prefix; the working directory is an empty folder that must stay empty."""
    monkeypatch.chdir(tmp_path)
    yield f"ram://bucket-{uuid.uuid4().hex[:8]}"
    assert os.listdir(tmp_path) == [], "something was written to the local disk instead of the bucket"


def test_atomic_writes_and_folder_moves_on_an_object_store(bucket):
    storage.write_json_atomically(f"{bucket}/a/b.json", {"x": 1})
    assert json.loads(storage.read_bytes(f"{bucket}/a/b.json")) == {"x": 1}
    for name in ("saved_model.pb", "variables/variables.index", "assets/vocab.txt"):
        storage.write_text_atomically(f"{bucket}/staging/{name}", name)
    storage.move_folder(f"{bucket}/staging", f"{bucket}/final")
    assert not tf.io.gfile.exists(f"{bucket}/staging")
    assert storage.read_bytes(f"{bucket}/final/variables/variables.index") == b"variables/variables.index"
    assert sorted(storage.list_folder(f"{bucket}/final")) == ["assets", "saved_model.pb", "variables"]
    assert storage.list_folder(f"{bucket}/a") == ["b.json"]  # no temporary file left behind


def test_a_run_reads_and_writes_only_through_the_bucket(bucket):
    from tfl import job

    rng = np.random.RandomState(0)
    rows = ["text,label"] + [f"a {'great' if i % 2 else 'awful'} film {rng.randint(99)},{'pos' if i % 2 else 'neg'}"
                             for i in range(40)]
    storage.write_text_atomically(f"{bucket}/data/reviews.csv", "\n".join(rows) + "\n")
    common = dict(data=DataConfig(source=f"csv:{bucket}/data/reviews.csv", batch_size=8, maxlen=8, num_words=50),
                  train=TrainConfig(epochs=2, learning_rate=1e-2, precision="float32"))
    metrics = job.run_checked(Config(model=ModelConfig(backbone="lstm"), model_dir=f"{bucket}/run", **common))
    run = f"{bucket}/run"
    for name in ("config.json", "metrics.json", "model.keras", "best.weights.h5", "source_model/source.json",
                 "source_model/model.weights.h5", "source_model/vocabulary.txt", "export/1/saved_model.pb"):
        assert storage.is_file(f"{run}/{name}"), name
    assert tf.io.gfile.isdir(f"{run}/logs")
    assert json.loads(storage.read_bytes(f"{run}/metrics.json"))["test"] == metrics["test"]
    assert len(storage.read_bytes(f"{run}/training_log.csv").decode().strip().splitlines()) == 1 + 2
    assert not [n for n in storage.list_folder(run) if ".tmp" in n]

    serving = tf.saved_model.load(f"{run}/export/1").signatures["serving_default"]
    assert next(iter(serving(inputs=tf.constant(["a great film", "an awful film"])).values())).shape[0] == 2

    # The bucket's run is a source model for parameter transfer.
    transferred = job.run_checked(Config(model=ModelConfig(backbone="lstm", transfer="parameter",
                                                              source_model=run),
                                            model_dir=f"{bucket}/run2", **common))
    assert transferred["transfer_mapping"]["copied"]
    with pytest.raises(job.ConfigError, match="holds a run with a different config"):
        job.check_model_dir(Config(model=ModelConfig(backbone="small_cnn"), model_dir=run, **common))


def test_image_folders_and_label_descriptions_on_an_object_store(bucket):
    from tfl.data.sources import load_image_folder
    from tfl.transfer import parse_label_descriptions

    for cls, value in [("cat", 30), ("dog", 220)]:
        for i in range(3):
            tf.io.gfile.makedirs(f"{bucket}/img/{cls}")
            tf.io.write_file(f"{bucket}/img/{cls}/{i}.png", tf.io.encode_png(np.full((4, 4, 3), value, np.uint8)))
    data = load_image_folder(f"{bucket}/img")
    assert data.label_names == ["cat", "dog"] and len(data.pool.features) == 6
    assert data.pool.features[0] == f"{bucket}/img/cat/0.png"
    storage.write_json_atomically(f"{bucket}/labels.json", {"cat": "a photo of a cat", "dog": ["a dog"]})
    assert parse_label_descriptions(f"{bucket}/labels.json", ["cat", "dog"]) == {
        "cat": ["a photo of a cat"], "dog": ["a dog"]}
