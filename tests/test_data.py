"""The data layer on small data the tests write: CSV, JSONL, image folders, tfds mock data, keras cache."""

import collections
import csv
import gc
import json
import os
import weakref

import numpy as np
import pytest
import tensorflow as tf

from tfl import data as data_lib
from tfl.data import DataError, load_data, make_batches, stratified_split


def _texts(dataset):
    return sorted(x.decode() for x, _ in dataset.as_numpy_iterator())


def test_stratified_split_is_deterministic_and_stratified():
    labels = np.array([0] * 80 + [1] * 20)
    a = stratified_split(labels, (0.8, 0.1, 0.1), seed=3)
    b = stratified_split(labels, (0.8, 0.1, 0.1), seed=3)
    c = stratified_split(labels, (0.8, 0.1, 0.1), seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert sorted(np.concatenate(a).tolist()) == list(range(100))  # a partition
    assert [int((labels[p] == 1).sum()) for p in a] == [16, 2, 2]  # 20% positives in each part


def test_a_source_sorted_by_label_gives_splits_in_mixed_order():
    # asset:imdb lists 12,500 negatives then 12,500 positives; in file order a shuffle buffer smaller than
    # the train split would feed batches of one class for most of an epoch.
    labels = np.array([0] * 500 + [1] * 500)
    train, _ = stratified_split(labels, (0.8, 0.2), seed=0)
    first_tenth = labels[train[:80]]
    assert 0.3 < first_tenth.mean() < 0.7


def test_csv_source_splits_and_label_names(text_csv):
    splits = load_data(f"csv:{text_csv}", seed=0, validation_fraction=0.2, test_fraction=0.2)
    assert splits.label_names == ["neg", "pos"]
    assert splits.modality == data_lib.TEXT
    assert splits.sizes == {"train": 24, "validation": 8, "test": 8}
    assert splits.label_counts["test"] == {"neg": 4, "pos": 4}
    again = load_data(f"csv:{text_csv}", seed=0, validation_fraction=0.2, test_fraction=0.2)
    assert _texts(splits.test) == _texts(again.test)
    # The splits partition the file's rows: every (text, label) row lands in exactly one split. The
    # fixture repeats a few texts, so compare multisets of rows, not sets.
    with open(text_csv, newline="", encoding="utf-8") as f:
        rows = collections.Counter((r["text"], r["label"]) for r in csv.DictReader(f))
    in_splits = collections.Counter(
        (x.decode(), splits.label_names[y]) for part in (splits.train, splits.validation, splits.test)
        for x, y in part.as_numpy_iterator())
    assert in_splits == rows


def test_csv_splits_are_disjoint(tmp_path):
    """On unique texts: no example is in two splits, and together they hold every example once."""
    path = tmp_path / "unique.csv"
    path.write_text("text,label\n" + "".join(f"review {i},{'pos' if i % 3 else 'neg'}\n" for i in range(60)))
    splits = load_data(f"csv:{path}", seed=5, validation_fraction=0.2, test_fraction=0.2)
    train, validation, test = (set(_texts(d)) for d in (splits.train, splits.validation, splits.test))
    assert (len(train), len(validation), len(test)) == (splits.sizes["train"], splits.sizes["validation"],
                                                        splits.sizes["test"]) == (36, 12, 12)
    assert not train & validation and not train & test and not validation & test
    assert train | validation | test == {f"review {i}" for i in range(60)}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures peak memory through /proc")
def test_one_long_text_does_not_pad_every_other_in_memory(tmp_path):
    """Texts stay Python strings on their way into tf.data: numpy's fixed-width unicode would hold each of the
    2,000 rows at the longest one's 200,000 characters, 1.6 GB here (the SpamAssassin e-mails took 5.6 GB)."""
    from tfl.costs import peak_rss_mb, reset_peak_rss
    from tfl.data.examples import string_array

    path = tmp_path / "one_long.csv"
    rows = [f"short text {i},{'pos' if i % 2 else 'neg'}" for i in range(1999)] + ["x" * 200_000 + ",pos"]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    assert reset_peak_rss()  # else an earlier peak in this process could hide this one
    before = peak_rss_mb()
    splits = load_data(f"csv:{path}", seed=0)
    assert peak_rss_mb() - before < 300
    assert max(len(t) for t in _texts(splits.train) + _texts(splits.validation) + _texts(splits.test)) == 200_000
    converted = string_array([3, "two", b"one", "caf\u00e9".encode()])
    assert converted.dtype == object and list(converted) == ["3", "two", "one", "caf\u00e9"]
    assert string_array([["a", "b"], ["c", "d"]]).shape == (2, 2)


def test_max_examples_caps_the_pool(text_csv):
    splits = load_data(f"csv:{text_csv}", seed=0, max_examples=20)
    assert sum(splits.sizes.values()) == 20


def test_jsonl_multilabel_and_regression(tmp_path):
    path = tmp_path / "tags.jsonl"
    rows = [{"text": f"t{i}", "tags": ["a", "b"] if i % 3 == 0 else ["b"], "score": i / 10} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    multi = load_data(f"jsonl:{path}", task="multilabel", label_column="tags")
    assert multi.label_names == ["a", "b"]
    _, label = next(iter(multi.train))
    assert label.shape == (2,) and label.dtype == tf.float32
    regression = load_data(f"jsonl:{path}", task="regression", label_column="score")
    assert regression.label_names == ["value"]
    assert sum(regression.sizes.values()) == 30


def _write_png(path, value, size=(12, 10)):
    image = np.full(size + (3,), value, np.uint8)
    tf.io.write_file(str(path), tf.io.encode_png(image))


def test_image_folder_decodes_and_resizes(tmp_path):
    for cls, value in [("cat", 10), ("dog", 200)]:
        os.makedirs(tmp_path / cls)
        for i in range(10):
            _write_png(tmp_path / cls / f"{i}.png", value)
    splits = load_data(f"images:{tmp_path}", seed=0)
    assert splits.label_names == ["cat", "dog"] and splits.modality == data_lib.IMAGE_FILE
    from tfl.backbones import decode_image_file
    batches = make_batches(splits.train, batch_size=4, modality=splits.modality,
                           decode_image=lambda p: decode_image_file(p, (8, 8, 3)))
    images, labels = next(iter(batches))
    assert images.shape == (4, 8, 8, 3) and images.dtype == tf.float32
    for image, label in zip(images.numpy(), labels.numpy()):
        assert np.allclose(image, 10 if label == 0 else 200)


def test_image_folder_skips_a_corrupt_file(tmp_path):
    os.makedirs(tmp_path / "a"), os.makedirs(tmp_path / "b")
    for i in range(10):
        _write_png(tmp_path / "a" / f"{i}.png", 1)
        _write_png(tmp_path / "b" / f"{i}.png", 2)
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    splits = load_data(f"images:{tmp_path}", seed=0, validation_fraction=0.1, test_fraction=0.1)
    assert sum(splits.sizes.values()) == 20  # the broken file is skipped (with a warning), the rest kept
    assert splits.skipped == {"unreadable_images": 1}
    # Truncated bodies are caught at load time too (tests/test_data_formats.py), so batches hold every example.
    from tfl.backbones import decode_image_file
    total = sum(int(x.shape[0]) for x, _ in make_batches(
        splits.train, batch_size=4, modality=splits.modality, decode_image=lambda p: decode_image_file(p, (4, 4, 3))))
    assert total == splits.sizes["train"]


def test_image_folder_of_only_corrupt_files_is_an_error(tmp_path):
    os.makedirs(tmp_path / "a")
    (tmp_path / "a" / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="None of the 1 image files"):
        load_data(f"images:{tmp_path}")


def test_tfds_source_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20):
        splits = load_data("tfds:glue/sst2", test_split="validation", text_column="sentence")
        assert splits.label_names == ["negative", "positive"]
        assert splits.modality == data_lib.TEXT
        text, label = next(iter(splits.train))
        assert text.dtype == tf.string and label.dtype == tf.int64
        # mock_data fills every requested split; validation is carved from train (stratified, from --seed).
        assert splits.sizes["train"] + splits.sizes["validation"] == 20 and splits.sizes["test"] == 20
        assert len(list(splits.train)) == splits.sizes["train"] and len(list(splits.validation)) == splits.sizes[
            "validation"] > 0


def test_tfds_cifar10_mock_is_an_image_source():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=120):
        splits = load_data("tfds:cifar10", max_examples=100)
        image, _ = next(iter(splits.train))
        assert splits.modality == data_lib.IMAGE and image.shape == (32, 32, 3)
        assert splits.sizes["train"] + splits.sizes["validation"] == 100 and splits.sizes["test"] == 100
        assert len(list(splits.train)) == splits.sizes["train"]


def test_keras_imdb_through_keras_datasets(tmp_path, monkeypatch):
    """The real keras.datasets.imdb code path on a stand-in cache file (its hash check is bypassed)."""
    from keras.src.datasets import imdb as keras_imdb

    rng = np.random.RandomState(0)
    seqs = lambda n: np.array([[int(v) for v in rng.randint(1, 20000, size=rng.randint(5, 30))] for _ in range(n)],  # noqa
                              dtype=object)
    npz = tmp_path / "imdb.npz"
    np.savez(npz, x_train=seqs(30), y_train=np.arange(30) % 2, x_test=seqs(10), y_test=np.arange(10) % 2)
    monkeypatch.setattr(keras_imdb, "get_file", lambda *a, **k: str(npz))
    splits = load_data("keras:imdb", num_words=1000, maxlen=50)
    assert splits.modality == data_lib.TOKEN_IDS and splits.label_names == ["negative", "positive"]
    assert splits.sizes["train"] + splits.sizes["validation"] == 30 and splits.sizes["test"] == 10
    assert splits.sizes["validation"] == 4  # 2 of each class, stratified
    ids, _ = next(iter(splits.train))
    assert ids.shape == (50,) and int(tf.reduce_max(ids)) < 1000  # num_words applied, padded to maxlen


def test_classes_filter_renumbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"x{i},{i % 4}\n" for i in range(40)))
    splits = load_data(f"csv:{path}", classes=(2, 3))
    assert splits.label_names == ["2", "3"]
    labels = {int(y) for _, y in splits.train.as_numpy_iterator()}
    assert labels == {0, 1}


@pytest.mark.parametrize("content,needle", [
    ("", "is empty"),
    ("text,other\nhello,1\n", "no column 'label'"),
    ("text,label\nhello,1\nbad,row,extra\n", "line 3 has 3 fields"),
    ("text,label\n" + "".join(f"x{i},same\n" for i in range(10)), "single class"),
])
def test_csv_mistakes_give_clear_errors(tmp_path, content, needle):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=needle):
        load_data(f"csv:{path}")


def test_non_utf8_and_missing_files(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9,1\nb,0\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_data(f"csv:{path}")
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"csv:{tmp_path}/missing.csv")
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"images:{tmp_path}/nowhere")
    os.makedirs(tmp_path / "empty" / "cls")
    with pytest.raises(DataError, match="No images"):
        load_data(f"images:{tmp_path}/empty")


def test_unseen_test_labels_are_refused(tmp_path):
    path = tmp_path / "d.csv"
    # 'rare' has one example: after a split it sits in one part only.
    path.write_text("text,label\n" + "".join(f"x{i},{i % 2}\n" for i in range(20)) + "lonely,rare\n")
    with pytest.raises(DataError, match="never saw"):
        load_data(f"csv:{path}", seed=1, validation_fraction=0.3, test_fraction=0.3)


def test_text_batches_preprocess_once_and_shuffle(text_csv):
    splits = load_data(f"csv:{text_csv}", seed=0)
    # tf.data traces a Python function once however often it runs, so count in the graph: the counter
    # grows each time the map *executes*, by the number of examples it preprocessed.
    preprocessed = tf.Variable(0, dtype=tf.int64)

    def preprocess(texts):
        with tf.control_dependencies([preprocessed.assign_add(tf.size(texts, out_type=tf.int64))]):
            return tf.strings.length(texts)

    batches = make_batches(splits.train, batch_size=8, preprocess=preprocess, training=True, seed=1)
    first = [(x.numpy().tolist(), y.numpy().tolist()) for x, y in batches]
    second = [(x.numpy().tolist(), y.numpy().tolist()) for x, y in batches]
    # Two epochs, each example preprocessed once: the second epoch reads the cache.
    assert int(preprocessed.numpy()) == splits.sizes["train"]
    assert sum(len(y) for _, y in first) == sum(len(y) for _, y in second) == splits.sizes["train"]
    assert first != second  # reshuffled each epoch...
    flatten = lambda epoch: sorted(pair for x, y in epoch for pair in zip(x, y))  # noqa: E731
    assert flatten(first) == flatten(second)  # ...the same examples
    expected = sorted((len(t), int(y)) for t, y in splits.train.as_numpy_iterator())
    assert flatten(first) == expected  # preprocessed: text -> its length
    x, _ = next(iter(batches))
    assert x.dtype == tf.int32
    assert int(preprocessed.numpy()) == splits.sizes["train"]


def test_pipelines_of_one_text_preprocessor_share_one_trace_and_do_not_keep_it_alive():
    """tf.data traces a map's function per pipeline (~1.1 s for MiniLM's preprocessor); a run builds four."""
    traces = []

    class Lower:  # a batch preprocessor that counts the times its Python runs (once per trace)
        def __call__(self, batch):
            traces.append(1)
            return tf.strings.lower(batch)

    lower = Lower()
    texts = tf.data.Dataset.from_tensor_slices((tf.constant(["A b", "C", "D"]), tf.constant([0, 1, 0])))
    for training in (True, False, False):
        batches = make_batches(texts, batch_size=2, preprocess=lower, training=training)
    assert sorted(t for x, _ in batches for t in x.numpy().tolist()) == [b"a b", b"c", b"d"]
    assert len(traces) == 1
    alive = weakref.ref(lower)
    del lower, batches
    gc.collect()
    assert alive() is None  # the shared trace holds the preprocessor weakly


def test_training_batches_run_without_the_autotuning_thread_and_evaluation_batches_with_it():
    """The autotuning thread made destroying fit's unfinished iterator wait 15-28 s (tfl.data._settled)."""
    texts = tf.data.Dataset.from_tensor_slices((tf.constant(["a b", "c"] * 8), tf.constant([0, 1] * 8)))
    ids = lambda x: tf.strings.to_hash_bucket_fast(tf.strings.split(x).to_tensor(), 50)  # noqa: E731
    training = make_batches(texts, batch_size=4, preprocess=ids, training=True)
    assert training.options().autotune.enabled is False
    assert make_batches(texts, batch_size=4, preprocess=ids).options().autotune.enabled is not False
    assert sum(1 for _ in training) == int(training.cardinality()) == 4
