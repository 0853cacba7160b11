"""Exact sizes, always: for every kind of source, with and without length buckets, on 1 and 2 replicas,
the optimizer takes exactly one step per batch the pipeline yields, the learning-rate schedule ends
exactly at the last step, and metrics.json reports the real steps per epoch and examples/s."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfl
from tfl import assets, train
from tfl.config import Config, DataConfig, FreezeConfig, ModelConfig, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 2


def counting_callbacks(monkeypatch):
    """Adds a callback to every fit() that counts the batches Keras really trains on (one call per
    batch with steps_per_execution=1) and records the learning rate before the last and after it."""
    import keras

    seen = {"batches": 0}

    class Counter(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen["lr_at_last_step"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

        def on_train_batch_end(self, batch, logs=None):
            seen["batches"] += 1

        def on_train_end(self, logs=None):
            seen["lr_after_training"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            seen["total_steps"] = self.model.optimizer._learning_rate.total_steps

    original = train.make_callbacks
    monkeypatch.setattr(train, "make_callbacks", lambda *a, **k: original(*a, **k) + [Counter()])
    return seen


def write_text_files(tmp_path, rows=45):
    rng = np.random.RandomState(0)
    lines = []
    for i in range(rows):
        label = "pos" if i % 3 else "neg"
        words = rng.choice(["great", "film", "the"] if label == "pos" else ["awful", "plot", "a"], rng.randint(2, 9))
        lines.append((" ".join(words), label))
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in lines))
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in lines))
    return csv_path, jsonl_path


def write_image_folder(tmp_path, per_class=21):
    root = tmp_path / "images"
    for cls, value in [("dark", 30), ("light", 220)]:
        os.makedirs(root / cls)
        for i in range(per_class):
            pixels = np.clip(np.random.RandomState(i).normal(value, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            tf.io.write_file(str(root / cls / f"{i}.png"), tf.io.encode_png(pixels))
    return root


def keras_stand_in(monkeypatch, tmp_path, name):
    """keras.datasets' real loading code on a small stand-in file (its download and hash check bypassed)."""
    import importlib

    rng = np.random.RandomState(0)
    path = tmp_path / f"{name}.npz"
    if name == "imdb":
        seqs = lambda n: np.array([[int(v) for v in rng.randint(1, 5000, rng.randint(3, 30))] for _ in range(n)],  # noqa: E731
                                  dtype=object)
        np.savez(path, x_train=seqs(50), y_train=np.arange(50) % 2, x_test=seqs(20), y_test=np.arange(20) % 2)
    else:  # mnist
        np.savez(path, x_train=rng.randint(0, 255, (50, 28, 28), np.uint8), y_train=np.arange(50) % 10,
                 x_test=rng.randint(0, 255, (20, 28, 28), np.uint8), y_test=np.arange(20) % 10)
    module = importlib.import_module(f"keras.src.datasets.{name}")
    monkeypatch.setattr(module, "get_file", lambda *a, **k: str(path))


def sources(tmp_path, monkeypatch, kind):
    csv_path, jsonl_path = write_text_files(tmp_path)
    if kind == "csv":
        return f"csv:{csv_path}", "lstm", 45
    if kind == "jsonl":
        return f"jsonl:{jsonl_path}", "lstm", 45
    if kind == "images":
        return f"images:{write_image_folder(tmp_path)}", "small_cnn", 42
    if kind == "keras_imdb_token_ids":
        keras_stand_in(monkeypatch, tmp_path, "imdb")
        return "keras:imdb", "lstm", 70
    if kind == "keras_mnist":
        keras_stand_in(monkeypatch, tmp_path, "mnist")
        return "keras:mnist", "small_cnn", 70
    if kind == "asset":
        if not assets.is_fetched("rotten_tomatoes"):
            pytest.skip("Rotten Tomatoes asset not fetched (make test fetches it)")
        return "asset:rotten_tomatoes", "lstm", 60
    raise AssertionError(kind)


def check_invariants(metrics, seen, batch_size, total_examples=None):
    steps = metrics["steps_per_epoch"]
    sizes = metrics["data"]["sizes"]
    if total_examples is not None:
        assert sum(sizes.values()) == total_examples
    assert seen["batches"] == EPOCHS * steps == metrics["optimizer_steps"] == seen["total_steps"]
    assert steps >= -(-sizes["train"] // batch_size)  # buckets only add (partial) batches
    assert seen["lr_after_training"] == 0.0 < seen["lr_at_last_step"]  # linear decay ends at the last step
    assert metrics["train_examples_seen"] == EPOCHS * sizes["train"]
    rate = metrics["train_examples_seen"] / metrics["train_seconds"]
    assert metrics["train_examples_per_second"] == pytest.approx(rate, rel=0.02)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "images", "keras_imdb_token_ids", "keras_mnist", "asset"])
def test_every_source_trains_exactly_the_batches_it_yields(kind, tmp_path, monkeypatch):
    source, backbone, total = sources(tmp_path, monkeypatch, kind)
    seen = counting_callbacks(monkeypatch)
    config = Config(data=DataConfig(source=source, batch_size=8, maxlen=12, num_words=100,
                                    max_examples=total if kind == "asset" else 0),
                    model=ModelConfig(backbone=backbone, lstm_units=8, embedding_dim=8),
                    train=TrainConfig(epochs=EPOCHS, precision="float32", warmup_fraction=0.0),
                    model_dir=str(tmp_path / "run"), export=False)
    metrics = tfl.run(config, verbose=0)
    check_invariants(metrics, seen, 8, total)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps_per_epoch"] == metrics["steps_per_epoch"]


def test_gradient_accumulation_updates_once_per_n_batches_and_the_schedule_still_ends_at_the_last(tmp_path,
                                                                                                  monkeypatch):
    source, backbone, total = sources(tmp_path, monkeypatch, "csv")
    seen = counting_callbacks(monkeypatch)
    config = Config(data=DataConfig(source=source, batch_size=4, maxlen=12, num_words=100),
                    model=ModelConfig(backbone=backbone, lstm_units=8, embedding_dim=8),
                    train=TrainConfig(epochs=EPOCHS, precision="float32", gradient_accumulation_steps=2),
                    export=False)
    metrics = tfl.run(config, verbose=0)
    steps = metrics["steps_per_epoch"]
    assert seen["batches"] == EPOCHS * steps == seen["total_steps"]
    assert steps >= -(-metrics["data"]["sizes"]["train"] // 4)
    assert metrics["optimizer_steps"] == EPOCHS * steps // 2  # weight updates
    assert seen["lr_after_training"] == 0.0 < seen["lr_at_last_step"]
    assert metrics["config"]["train"]["gradient_accumulation_steps"] == 2


def test_tfds_text_source_trains_whole_epochs_and_honours_label_fraction(tmp_path, monkeypatch):
    """The bug this guards: tfds text trained 1 step an epoch, the rest at learning rate 0."""
    import tensorflow_datasets as tfds

    seen = counting_callbacks(monkeypatch)
    common = dict(source="tfds:glue/sst2", text_column="sentence", test_split="validation", batch_size=32,
                  maxlen=16, num_words=200)
    with tfds.testing.mock_data(num_examples=640):
        metrics = tfl.run(Config(data=DataConfig(**common), model=ModelConfig(backbone="lstm", lstm_units=8),
                                 train=TrainConfig(epochs=EPOCHS, precision="float32", warmup_fraction=0.0),
                                 export=False), verbose=0)
        check_invariants(metrics, seen, 32)
        # mock_data gives 640 examples to each requested split; validation is carved from train (stratified).
        assert metrics["data"]["sizes"]["test"] == 640
        assert metrics["data"]["sizes"]["train"] + metrics["data"]["sizes"]["validation"] == 640
        assert metrics["steps_per_epoch"] == -(-metrics["data"]["sizes"]["train"] // 32) >= 17
        full_train = metrics["data"]["sizes"]["train"]

        tenth = tfl.load_data("tfds:glue/sst2", text_column="sentence", test_split="validation", label_fraction=0.1,
                              seed=1)
        assert abs(tenth.sizes["train"] - round(0.1 * full_train)) <= 2
        assert tenth.sizes["validation"] == metrics["data"]["sizes"]["validation"]
        other_seed = tfl.load_data("tfds:glue/sst2", text_column="sentence", test_split="validation",
                                   label_fraction=0.1, seed=2)
        texts = lambda d: sorted(x.decode() for x, _ in d.train.as_numpy_iterator())  # noqa: E731
        assert texts(tenth) != texts(other_seed)  # --seed draws the subset
        capped = tfl.load_data("tfds:glue/sst2", text_column="sentence", test_split="validation", max_examples=50)
        assert capped.sizes["test"] == 50 and capped.sizes["train"] + capped.sizes["validation"] == 50


def test_tfds_classes_are_kept_and_renumbered():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=300):
        everything = tfl.load_data("tfds:cifar10")
        splits = tfl.load_data("tfds:cifar10", classes=(3, 5))
        names = everything.label_names
        assert len(names) == 10 and splits.label_names == [names[3], names[5]]
        # Every test image of class 3 or 5 is kept (the test split is not sampled), renumbered 0 and 1.
        original = np.array([y for _, y in everything.test.as_numpy_iterator()])
        kept = np.array([y for _, y in splits.test.as_numpy_iterator()])
        assert np.bincount(kept, minlength=2).tolist() == [int((original == 3).sum()), int((original == 5).sum())]
        assert min(np.bincount(kept, minlength=2)) > 0


@pytest.mark.parametrize("bucket_shapes,freeze_all", [(0, False), (3, False), (3, True)])
def test_keras_hub_text_with_and_without_buckets(bucket_shapes, freeze_all, tmp_path, monkeypatch, tiny_bert_preset):
    csv_path, _ = write_text_files(tmp_path, rows=60)
    seen = counting_callbacks(monkeypatch)
    config = Config(data=DataConfig(source=f"csv:{csv_path}", batch_size=4, bucket_shapes=bucket_shapes),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=12),
                    freeze=FreezeConfig(freeze_all=freeze_all),
                    train=TrainConfig(epochs=EPOCHS, precision="float32", warmup_fraction=0.0), export=False)
    metrics = tfl.run(config, verbose=0)
    check_invariants(metrics, seen, 4, 60)
    if bucket_shapes:
        assert metrics["bucketing"]["shapes"] >= 2
        assert metrics["steps_per_epoch"] > -(-metrics["data"]["sizes"]["train"] // 4)  # a partial batch per bucket
    if freeze_all:
        assert metrics["feature_cache"]["examples"] == metrics["data"]["sizes"]["train"]


TWO_REPLICAS = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import tfl
from tfl import train
from tfl.config import Config, DataConfig, ModelConfig, TrainConfig
seen = {"batches": 0}
class Counter(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        seen["batches"] += 1
original = train.make_callbacks
train.make_callbacks = lambda *a, **k: original(*a, **k) + [Counter()]
source, backbone, buckets = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = Config(data=DataConfig(source=source, batch_size=4, maxlen=8, num_words=50, bucket_shapes=buckets),
                model=ModelConfig(backbone=backbone, sequence_length=12, lstm_units=8, embedding_dim=8),
                train=TrainConfig(epochs=2, precision="float32", strategy="mirrored", warmup_fraction=0.0),
                export=False)
metrics = tfl.run(config, verbose=0)
print(json.dumps({"replicas": metrics["replicas"], "batches": seen["batches"], "steps": metrics["steps_per_epoch"],
                  "optimizer_steps": metrics["optimizer_steps"], "sizes": metrics["data"]["sizes"]}))
"""


@pytest.mark.parametrize("backbone,buckets", [("lstm", 0), ("bert", 3)])
def test_two_replicas_train_exactly_the_batches_they_yield(backbone, buckets, tmp_path, tiny_bert_preset):
    csv_path, _ = write_text_files(tmp_path, rows=60)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", TWO_REPLICAS, f"csv:{csv_path}",
                             tiny_bert_preset if backbone == "bert" else "lstm", str(buckets)],
                            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert out["batches"] == 2 * out["steps"] == out["optimizer_steps"]
    assert out["steps"] >= -(-out["sizes"]["train"] // 4)
