"""The seed's IMDB data offline (asset:imdb, asset:rt_polarity) and the lstm's keras.datasets.imdb ids on raw text.

The expected ids come from a pure-Python re-statement of keras' imdb convention written here, not from tfl:
a word index by frequency over the training texts, word of rank r -> r + 3, 1 = start, 2 = out-of-vocabulary,
only ids < num_words kept, then keras.utils.pad_sequences' defaults (pre-padding, pre-truncation).
"""

import collections
import os
import re
import string

import numpy as np
import pytest
import tensorflow as tf

from test_export import reload_in_fresh_process
from tfl import assets
from tfl import small_models
from tfl import export as export_lib
from tfl import transfer as transfer_lib
from tfl.config import Config, DataConfig, ModelConfig
from tfl.data import load_data
from tfl.runner import backbone_for, build_model, train_texts_of

START, OOV, INDEX_FROM = 1, 2, 3


def words_of(text: str) -> list:
    """Lower-case; <br /> and punctuation out (an apostrophe joins: don't -> dont); split on whitespace."""
    text = re.sub(r"<br\s*/?>", " ", text.lower()).replace("'", "")
    return "".join(" " if c in string.punctuation else c for c in text).split()


def word_index(train_texts: list) -> dict:
    """keras' imdb word index: rank 1 = the most frequent word (ties: alphabetical)."""
    counts = collections.Counter(w for t in train_texts for w in words_of(t))
    return {w: rank for rank, w in enumerate(sorted(counts, key=lambda w: (-counts[w], w)), start=1)}


def keras_imdb_ids(text: str, index: dict, num_words: int, maxlen: int) -> list:
    ids = [START] + [index[w] + INDEX_FROM if w in index and index[w] + INDEX_FROM < num_words else OOV
                     for w in words_of(text)]
    ids = ids[-maxlen:]  # pad_sequences(truncating="pre")
    return [0] * (maxlen - len(ids)) + ids  # pad_sequences(padding="pre")


TRAIN = ["The film was great, GREAT fun!<br /><br />Don't miss it.",
         "A dull film. Dull, dull and long...",
         "great acting; the plot? thin (very thin)",
         "It's a film about film-making: the end"]


def test_ids_are_keras_imdb_ids_of_the_training_word_index():
    num_words, maxlen = 12, 7  # a vocabulary cut: words of rank >= 9 are out-of-vocabulary
    backbone = small_models.build_lstm_backbone(num_words, maxlen, 4, 3, TRAIN, seed=0)
    index = word_index(TRAIN)
    texts = ["Great film!", "the DULL plot<br />was thin", "unseen words only",
             "a great film, a dull film, a thin plot, the end, don't",  # longer than maxlen: the start is cut
             "", "film-making"]
    ids = backbone.preprocess(tf.constant(texts)).numpy()
    assert ids.dtype == np.int32 and ids.shape == (len(texts), maxlen)
    assert ids.tolist() == [keras_imdb_ids(t, index, num_words, maxlen) for t in texts]
    assert ids[0].tolist() == [0, 0, 0, 0, START, index["great"] + 3, index["film"] + 3] == [0, 0, 0, 0, 1, 6, 4]
    assert ids[2].tolist()[-4:] == [START, OOV, OOV, OOV] and START not in ids[3]
    vocabulary = backbone.vectorizer.get_vocabulary()
    assert vocabulary[:4] == ["", "<START>", "<UNK>", "<UNUSED>"] and len(vocabulary) == num_words
    assert all(vocabulary[rank + INDEX_FROM] == w for w, rank in index.items() if rank + INDEX_FROM < num_words)


def test_the_same_ids_in_tf_data_and_from_a_column():
    backbone = small_models.build_lstm_backbone(30, 6, 4, 3, TRAIN, seed=0)
    texts = ["great fun", "Thin plot, long film."]
    batches = tf.data.Dataset.from_tensor_slices(texts).batch(2).map(backbone.preprocess)
    expected = [keras_imdb_ids(t, word_index(TRAIN), 30, 6) for t in texts]
    assert next(iter(batches)).numpy().tolist() == expected
    assert backbone.preprocess(tf.constant([[t] for t in texts])).numpy().tolist() == expected


@pytest.fixture
def unique_word_csv(tmp_path):
    """Each row holds a word no other row has, so where each word ends up says which split saw it."""
    path = tmp_path / "unique.csv"
    rows = [(f"{'good' if i % 2 else 'bad'} film uniq{i}", i % 2) for i in range(60)]
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return path


def test_the_vocabulary_is_fitted_on_the_training_split_only(unique_word_csv):
    config = Config(data=DataConfig(source=f"csv:{unique_word_csv}", num_words=1000, maxlen=5),
                    model=ModelConfig(backbone="lstm", lstm_units=4, embedding_dim=4))
    splits = load_data(config.data.source, seed=0, num_words=1000, maxlen=5)
    backbone = backbone_for(config, splits, "float32")
    vocabulary = backbone.vectorizer.get_vocabulary()

    def unique_words(split):
        return [t.decode().split()[-1] for t, _ in split.as_numpy_iterator()]

    assert set(unique_words(splits.train)) <= set(vocabulary)
    held_out = unique_words(splits.validation) + unique_words(splits.test)
    assert len(held_out) == 12 and not set(held_out) & set(vocabulary)
    index = word_index(train_texts_of(splits))
    held_out_texts = [t.decode() for t, _ in splits.test.as_numpy_iterator()]
    ids = backbone.preprocess(tf.constant(held_out_texts)).numpy()
    assert ids.tolist() == [keras_imdb_ids(t, index, 1000, 5) for t in held_out_texts]
    assert (ids[:, -1] == OOV).all()  # each test text ends in its own unseen word


def test_lstm_export_serves_raw_strings_with_the_same_ids(tmp_path):
    backbone = small_models.build_lstm_backbone(40, 8, 4, 3, TRAIN, seed=0)
    model = build_model(backbone, ["negative", "positive"], head_dropout=0.0)
    texts = ["Great film!<br /><br />Great fun.", "dull, DULL, dull", "a film about nothing we saw", ""]
    expected = model.predict(backbone.preprocess(tf.constant(texts)), verbose=0)[:, 0]
    path = export_lib.export_serving_model(model, backbone, ["negative", "positive"], "classification",
                                           str(tmp_path / "export"))
    served = reload_in_fresh_process(path, "text", texts)
    assert np.max(np.abs(np.array(served["probabilities"])[:, 1] - expected)) <= 1e-5
    assert served["label_names"] == ["negative", "positive"]


def _save_source(tmp_path, backbone, data_source=""):
    model = build_model(backbone, ["negative", "positive"])
    architecture = transfer_lib.source_architecture(backbone, num_words=backbone.model.get_layer("embedding").input_dim,
                                                    maxlen=backbone.model.input.shape[1], embedding_dim=4,
                                                    lstm_units=3, data_source=data_source)
    os.makedirs(tmp_path / "run", exist_ok=True)
    transfer_lib.save_source_model(str(tmp_path / "run"), backbone, model, ["negative", "positive"], architecture)
    return transfer_lib.load_source_model(str(tmp_path / "run"))


def test_a_source_model_rebuilds_the_identical_preprocessing(tmp_path):
    backbone = small_models.build_lstm_backbone(30, 6, 4, 3, TRAIN, seed=0)
    source = _save_source(tmp_path, backbone)
    assert source["vocabulary_tokens"][:4] == ["<START>", "<UNK>", "<UNUSED>", "film"]
    rebuilt = transfer_lib.backbone_from_source(source, reuse_vocabulary=True, train_texts=["other words"])
    texts = tf.constant(["Great film!", "the dull, thin plot of a long film", "nothing known"])
    assert rebuilt.vectorizer.get_vocabulary() == backbone.vectorizer.get_vocabulary()
    assert rebuilt.preprocess(texts).numpy().tolist() == backbone.preprocess(texts).numpy().tolist()


def test_keras_imdb_source_and_raw_text_share_the_ids(tmp_path, monkeypatch):
    """A model trained on keras:imdb ids reads raw text with the same ids (start 1, OOV 2, rank + 3)."""
    import keras

    monkeypatch.setattr(keras.datasets.imdb, "get_word_index", lambda: {"the": 1, "movie": 2, "great": 3, "a": 4})
    backbone = small_models.build_lstm_backbone(7, 6, 4, 3, train_texts=None, seed=0)
    source = _save_source(tmp_path, backbone, data_source="keras:imdb")
    rebuilt = transfer_lib.backbone_from_source(source, reuse_vocabulary=True, train_texts=["x"])
    ids = rebuilt.preprocess(tf.constant(["The great movie, a great movie!"])).numpy()[0]
    index = {"the": 1, "movie": 2, "great": 3, "a": 4}  # num_words 7 keeps ranks 1-3 only: "a" -> OOV
    assert ids.tolist() == keras_imdb_ids("The great movie, a great movie!", index, 7, 6) == [1, 4, 6, 5, 2, 6, 5][-6:]


def test_aligned_parameter_transfer_copies_rows_by_token(tmp_path):
    source_backbone = small_models.build_lstm_backbone(30, 6, 4, 3, TRAIN, seed=0)
    source = _save_source(tmp_path, source_backbone)
    target_texts = ["spam spam eggs", "great spam", "the film"]
    target_backbone = transfer_lib.backbone_from_source(source, reuse_vocabulary=False, train_texts=target_texts,
                                                        seed=1)
    target_vocabulary = target_backbone.vectorizer.get_vocabulary()
    assert target_vocabulary[4:6] == ["spam", "eggs"]
    target = build_model(target_backbone, ["a", "b"])
    report = transfer_lib.copy_weights(source, target, target_vocabulary=target_vocabulary)
    source_vocabulary = ["", *source["vocabulary_tokens"]]
    shared = [t for t in target_vocabulary if t in source_vocabulary]
    assert report["embedding_rows_copied"] == len(shared)
    assert {"<START>", "<UNK>", "great", "the", "film"} <= set(shared)
    source_model = transfer_lib.rebuild_source_model(source)
    source_rows = source_model.get_layer("backbone").get_layer("embedding").get_weights()[0]
    target_rows = target.get_layer("backbone").get_layer("embedding").get_weights()[0]
    for token in ("<START>", "<UNK>", "great", "film"):
        assert np.array_equal(target_rows[target_vocabulary.index(token)], source_rows[source_vocabulary.index(token)])


def test_a_source_model_from_before_the_imdb_ids_keeps_its_own(tmp_path):
    """vocabulary.txt files that start with [UNK] (post-padded ids, OOV 1) still rebuild what they trained with."""
    source = {"backbone": "lstm", "modality": "text", "vocabulary_tokens": ["[UNK]", "film", "great"],
              "architecture": {"num_words": 10, "maxlen": 4, "embedding_dim": 4, "lstm_units": 3}}
    rebuilt = transfer_lib.backbone_from_source(source, reuse_vocabulary=True, train_texts=["x"])
    assert rebuilt.preprocess(tf.constant(["great film bad"])).numpy().tolist() == [[3, 2, 1, 0]]


@pytest.mark.skipif(not assets.is_fetched("imdb"), reason="imdb asset not fetched (python -m tfl.assets fetch imdb)")
def test_real_imdb_counts_and_raw_text():
    splits = load_data("asset:imdb", seed=0)
    assert splits.sizes == {"train": 20000, "validation": 2500, "test": 2500}
    assert sum(c["positive"] for c in splits.label_counts.values()) == 12500
    assert splits.label_names == ["negative", "positive"] and splits.modality == "text"
    texts = [t.decode() for t, _ in splits.train.take(200).as_numpy_iterator()]
    assert any("<br />" in t for t in texts)  # raw text, as the reviews were written


@pytest.mark.skipif(not assets.is_fetched("rt_polarity"), reason="rt_polarity asset not fetched")
def test_real_rt_polarity_counts():
    splits = load_data("asset:rt_polarity", seed=0)
    assert sum(splits.sizes.values()) == 8530
    assert sum(c["negative"] for c in splits.label_counts.values()) == 4265
    assert splits.label_names == ["negative", "positive"]
