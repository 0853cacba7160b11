"""Transfer modes on tiny models and generated data: source models, weight mapping, zero-shot, report."""

import json
import os
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfl import backbones as backbones_lib
from tfl import small_models
from tfl import transfer as transfer_lib
from tfl.config import CompareConfig, Config, DataConfig, ModelConfig, TrainConfig
from tfl.job import run
from tfl.runner import build_model


def _write_csv(path, rows):
    path.write_text("text,label\n" + "".join(f"\"{t}\",{y}\n" for t, y in rows))
    return path


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished lstm run on a small sentiment CSV: the source model for transfer tests."""
    tmp = tmp_path_factory.mktemp("source")
    rng = np.random.RandomState(0)
    good, bad = ["great", "fun", "lovely", "superb"], ["awful", "dull", "boring", "poor"]
    rows = [(" ".join(rng.choice(good if y else bad, 3)) + " film", y) for y in [0, 1] * 30]
    csv = _write_csv(tmp / "source.csv", rows)
    config = Config(data=DataConfig(source=f"csv:{csv}", batch_size=8, num_words=40, maxlen=6),
                    model=ModelConfig(backbone="lstm", lstm_units=8, embedding_dim=4),
                    train=TrainConfig(epochs=1, learning_rate=1e-2, precision="float32"),
                    model_dir=str(tmp / "run"), export=False)
    run(config, verbose=0)
    return str(tmp / "run"), csv


def test_source_model_carries_its_vocabulary(source_run):
    run_dir, _ = source_run
    source = transfer_lib.load_source_model(run_dir)
    assert source["backbone"] == "lstm" and source["architecture"]["maxlen"] == 6
    original = keras.saving.load_model(os.path.join(run_dir, "model.keras"), safe_mode=True, compile=False)
    rebuilt = transfer_lib.backbone_from_source(source, reuse_vocabulary=True, train_texts=["unrelated words"])
    text = tf.constant(["great fun film", "a dull unknownword film"])
    # The same raw text gives the same ids as the vectorizer the source model was trained with.
    vocabulary = ["", *source["vocabulary_tokens"]]
    # keras.datasets.imdb's convention: a start id (1), then each word's id or 2 when out of vocabulary,
    # pre-padded with 0 to maxlen.
    expected = [[1] + [vocabulary.index(w) if w in vocabulary else 2 for w in s.split()] for s in
                ["great fun film", "a dull unknownword film"]]
    ids = rebuilt.preprocess(text).numpy()
    assert [list(row[-len(e):]) for row, e in zip(ids, expected)] == expected
    assert all(not row[:-len(e)].any() for row, e in zip(ids, expected))
    assert original.get_layer("head").name == "head"  # the source's head is kept (get_layer raises otherwise)


def test_parameter_transfer_copies_body_and_reinitialises_head(source_run, tmp_path):
    run_dir, _ = source_run
    source = transfer_lib.load_source_model(run_dir)
    backbone = transfer_lib.backbone_from_source(source, reuse_vocabulary=True, train_texts=["x"])
    target = build_model(backbone, ["a", "b", "c"])  # a 3-class task: the head's shape differs
    report = transfer_lib.copy_weights(source, target)
    assert report == {"copied": ["embedding", "lstm"], "reinitialised": ["head"], "missing": []}
    source_model = transfer_lib.rebuild_source_model(source)
    for name in ("embedding", "lstm"):
        for a, b in zip(source_model.get_layer("backbone").get_layer(name).get_weights(),
                        target.get_layer("backbone").get_layer(name).get_weights()):
            assert np.array_equal(a, b)
    assert "reinitialised  head" in transfer_lib.format_mapping_report(report)


def test_source_head_transfer_starts_as_the_source_model(source_run):
    run_dir, _ = source_run
    source = transfer_lib.load_source_model(run_dir)
    backbone = transfer_lib.backbone_from_source(source, reuse_vocabulary=True, train_texts=["x"])
    target = build_model(backbone, ["rotten", "fresh"])  # same two classes, same order, other names
    report = transfer_lib.copy_weights(source, target, reuse_head=True)
    assert report == {"copied": ["embedding", "lstm", "head"], "reinitialised": [], "missing": []}
    ids = backbone.preprocess(tf.constant(["great fun film", "a dull boring film", "lovely superb"]))
    source_model = transfer_lib.rebuild_source_model(source)
    np.testing.assert_allclose(target.predict(ids, verbose=0), source_model.predict(ids, verbose=0), atol=1e-6)
    fresh = build_model(backbone, ["rotten", "fresh"])
    transfer_lib.copy_weights(source, fresh)  # the default: a new head, so other outputs
    assert not np.allclose(fresh.predict(ids, verbose=0), source_model.predict(ids, verbose=0), atol=1e-3)
    with pytest.raises(transfer_lib.TransferError, match="needs as many classes as the source model"):
        transfer_lib.copy_weights(source, build_model(backbone, ["a", "b", "c"]), reuse_head=True)


def test_a_run_with_the_source_head_copies_it(source_run, tmp_path):
    run_dir, csv = source_run
    config = Config(data=DataConfig(source=f"csv:{csv}", batch_size=8, maxlen=6),
                    model=ModelConfig(backbone="lstm", transfer="parameter", source_model=run_dir, transfer_head="source"),
                    train=TrainConfig(epochs=1, learning_rate=1e-2, precision="float32"),
                    model_dir=str(tmp_path / "t"), export=False)
    metrics = run(config, verbose=0)
    assert metrics["transfer_mapping"]["copied"] == ["embedding", "lstm", "head"]


def test_source_head_needs_parameter_transfer():
    from tfl.config import ConfigError

    with pytest.raises(ConfigError, match="needs --transfer=parameter"):
        Config(model=ModelConfig(backbone="lstm", transfer_head="source")).validate()
    with pytest.raises(ConfigError, match="needs --task=classification"):
        Config(model=ModelConfig(backbone="lstm", transfer="parameter", source_model="x", transfer_head="source",
                                 task="regression")).validate()
    with pytest.raises(ConfigError, match="or the parameter strategy"):
        Config(mode="compare", model=ModelConfig(backbone="lstm", source_model="x", transfer_head="source"),
               compare=CompareConfig(strategies=("scratch",))).validate()
    with pytest.raises(ConfigError, match="Unknown --transfer_head='old'"):
        Config(model=ModelConfig(backbone="lstm", transfer="parameter", source_model="x",
                                 transfer_head="old")).validate()


def test_parameter_transfer_to_a_shorter_maxlen_keeps_the_weights(source_run):
    run_dir, _ = source_run
    source = transfer_lib.load_source_model(run_dir)  # trained with maxlen 6
    backbone = transfer_lib.backbone_from_source(source, reuse_vocabulary=True, train_texts=["x"], maxlen=3)
    assert backbone.preprocess(tf.constant(["great fun film and more"])).shape == (1, 3)
    target = build_model(backbone, ["a", "b"])
    assert transfer_lib.copy_weights(source, target)["copied"] == ["embedding", "lstm"]
    assert target.predict(backbone.preprocess(tf.constant(["great fun film"])), verbose=0).shape == (1, 1)  # binary: one sigmoid unit


def test_mismatched_architecture_is_an_error_not_a_no_op(source_run):
    run_dir, _ = source_run
    source = transfer_lib.load_source_model(run_dir)
    other = small_models.build_lstm_backbone(num_words=40, maxlen=6, embedding_dim=7, lstm_units=9,
                                              train_texts=None, seed=0)
    with pytest.raises(transfer_lib.TransferError, match="No layer of the source model"):
        transfer_lib.copy_weights(source, build_model(other, ["a", "b"]))


def test_structure_transfer_refits_the_vocabulary(source_run):
    run_dir, _ = source_run
    source = transfer_lib.load_source_model(run_dir)
    backbone = transfer_lib.backbone_from_source(source, reuse_vocabulary=False, train_texts=["spam spam eggs"])
    assert backbone.vectorizer.get_vocabulary()[4:6] == ["spam", "eggs"]  # after ids 0-3 (pad, start, OOV, unused)
    assert backbone.model.get_layer("lstm").units == 8  # the source's architecture


def test_not_a_source_model(tmp_path):
    with pytest.raises(transfer_lib.TransferError, match="is not a tfl source model"):
        transfer_lib.load_source_model(str(tmp_path))


def test_cli_parameter_transfer_run(source_run, tmp_path):
    from test_cli import run_main

    run_dir, csv = source_run
    result = run_main(f"--source=csv:{csv}", "--transfer=parameter", f"--source_model={run_dir}", "--epochs=1",
                      "--batch_size=8", "--precision=float32", "--noexport", f"--model_dir={tmp_path / 't'}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["transfer_mapping"]["copied"] == ["embedding", "lstm"]
    # The default --transfer_vocabulary=source: the target reads text with the source's word index.
    assert "embedding_rows_copied" not in metrics["transfer_mapping"]
    vocabulary = lambda run: (pathlib.Path(run) / "source_model" / "vocabulary.txt").read_text()  # noqa: E731
    assert vocabulary(tmp_path / "t") == vocabulary(run_dir)


def _known_encoder():
    """A 'sentence encoder' whose word vectors are set by hand: animals on axis 0, vehicles on axis 1."""
    vocabulary = ["cat", "dog", "horse", "car", "bus", "train", "animal", "vehicle"]
    vectors = np.zeros((len(vocabulary) + 2, 2), np.float32)
    for i, word in enumerate(vocabulary):
        vectors[i + 2] = [1.0, 0.1] if word in ("cat", "dog", "horse", "animal") else [0.1, 1.0]
    vectorizer = keras.layers.TextVectorization(vocabulary=vocabulary, output_sequence_length=4)
    ids = keras.Input((4,), dtype="int64")
    embedded = keras.layers.Embedding(len(vocabulary) + 2, 2, mask_zero=True, weights=[vectors])(ids)
    pooled = keras.layers.GlobalAveragePooling1D()(embedded)
    return backbones_lib.Backbone("known", keras.Model(ids, pooled), [], "text", vectorizer)


def test_zero_shot_picks_the_described_label():
    encoder = _known_encoder()
    descriptions = transfer_lib.parse_label_descriptions("pets=cat|dog;transport=car|bus", ["pets", "transport"])
    predictions = transfer_lib.zero_shot_text(encoder, ["horse", "train", "dog cat", "bus", "unknown horse"],
                                              descriptions)
    assert predictions.tolist() == [0, 1, 0, 1, 0]


def test_label_descriptions_from_file_and_defaults(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"neg": "bad", "pos": ["good", "great"]}))
    assert transfer_lib.parse_label_descriptions(str(path), ["neg", "pos"]) == {"neg": ["bad"],
                                                                                "pos": ["good", "great"]}
    defaults = transfer_lib.parse_label_descriptions("", ["sci_fi"])
    assert "sci fi" in defaults["sci_fi"]
    with pytest.raises(transfer_lib.TransferError, match="nothing for label"):
        transfer_lib.parse_label_descriptions("neg=bad", ["neg", "pos"])


def test_clip_zero_shot_picks_the_most_similar_label_by_cosine_not_dot_product():
    """Known answers on embeddings chosen by hand: the label whose direction is nearest an image wins
    however long the vectors are, and a label with several descriptions is scored by their mean."""

    class FixedClip:  # a CLIP backbone's two embedding methods, returning the vectors below
        image_vectors = np.array([[10.0, 1.0, 0.0], [0.1, 0.2, 0.0], [0.0, 1.0, 5.0]], np.float32)
        text_vectors = {1: [1.0, 0.0, 0.0], 2: [0.0, 20.0, 0.0], 3: [0.0, 0.0, 1.0], 4: [0.6, -0.8, 0.0]}

        def get_vision_embeddings(self, images):  # "image" i is the index i
            return self.image_vectors[np.asarray(images)]

        def get_text_embeddings(self, token_ids):  # a description's vector by its first token
            return np.array([self.text_vectors[int(ids[0])] for ids in np.asarray(token_ids)], np.float32)

    token_ids = {"x": np.array([[1]]), "y": np.array([[2]]), "z": np.array([[3], [4]])}
    # Image 0 points along x (cosine 0.995), though its dot product with y's long vector is larger (20 > 10).
    # Image 1 is nearest y. Image 2 is nearest the mean of z's two descriptions (cosine 0.58, y: 0.20);
    # scored by z's second description alone it would go to y (by the first alone, still to z).
    assert transfer_lib.zero_shot_images(FixedClip(), np.arange(3), token_ids).tolist() == [0, 1, 2]


def test_clip_zero_shot_agrees_with_the_clip_models_own_logits():
    """On a tiny random CLIP, each prediction is the argmax of the model's own forward pass: keras-hub's
    CLIP head scores every image against every text by scaled cosine similarity."""
    import itertools

    import keras_hub

    keras.utils.set_random_seed(0)
    vision = keras_hub.models.CLIPVisionEncoder(patch_size=8, hidden_dim=8, num_layers=1, num_heads=2,
                                                intermediate_dim=16, image_shape=(16, 16, 3))
    text = keras_hub.models.CLIPTextEncoder(vocabulary_size=20, embedding_dim=8, hidden_dim=8, num_layers=1,
                                            num_heads=2, intermediate_dim=16, max_sequence_length=5)
    clip = keras_hub.models.CLIPBackbone(vision, text, projection_dim=4)
    images = 3 * np.random.RandomState(0).randn(16, 16, 16, 3).astype("float32")
    descriptions = np.random.RandomState(1).randint(1, 20, size=(6, 5))
    logits = np.asarray(clip({"images": images, "token_ids": descriptions})["vision_logits"])
    assert logits.shape == (16, 6)
    token_ids = {f"label{i}": row[None] for i, row in enumerate(descriptions)}
    assert transfer_lib.zero_shot_images(clip, images, token_ids).tolist() == np.argmax(logits, axis=1).tolist()
    # A random CLIP gives most images one label, so also ask every pair of labels: the answers vary.
    second_wins = 0
    for i, j in itertools.combinations(range(6), 2):
        pair = {f"label{k}": token_ids[f"label{k}"] for k in (i, j)}
        expected = (logits[:, j] > logits[:, i]).astype(int)
        clear = np.abs(logits[:, j] - logits[:, i]) > 1e-3  # near-ties could go either way in float32
        assert transfer_lib.zero_shot_images(clip, images, pair)[clear].tolist() == expected[clear].tolist()
        second_wins += int(expected[clear].sum())
    assert 30 < second_wins < 15 * 16 - 30  # many images go to each side of a pair


def test_compare_writes_report_with_every_strategy(tiny_bert_preset, tmp_path):
    rows = [(t, y) for t, y in [("the great film", 1), ("an awful plot", 0), ("great movie", 1),
                                ("awful film", 0)] * 8]
    csv = _write_csv(tmp_path / "d.csv", rows)
    config = Config(mode="compare", data=DataConfig(source=f"csv:{csv}", batch_size=4),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=8,
                                      label_descriptions="0=awful|bad;1=great|good"),
                    train=TrainConfig(epochs=1, learning_rate=1e-3, precision="float32"),
                    compare=CompareConfig(strategies=("zero_shot", "linear_probe"),
                                          seeds=2, label_fractions=(0.5, 1.0)),
                    model_dir=str(tmp_path / "cmp"))
    report = run(config, verbose=0)
    assert [(r["strategy"], r["fraction"]) for r in report["rows"]] == [
        (s, f) for s in ("zero_shot", "linear_probe") for f in (0.5, 1.0)]
    assert all(r["seeds"] == 2 and 0 <= r["accuracy"]["mean"] <= 1 for r in report["rows"])
    # Fine-tuning and the other strategies run in the config rehearsal (tests/test_configs.py); here the
    # report's own shape: rows per (strategy, fraction), seeds, markdown, json and both plots.
    probe = next(r for r in report["rows"] if r["strategy"] == "linear_probe")
    assert 0 < probe["trainable_params"] < 100  # the head alone: 8 features + bias
    markdown = (tmp_path / "cmp" / "report.md").read_text()
    for strategy in ("zero_shot", "linear_probe"):
        assert f"| {strategy} |" in markdown
    assert json.loads((tmp_path / "cmp" / "report.json").read_text())["rows"] == json.loads(
        json.dumps(report["rows"]))
    for plot in ("learning_curves.png", "label_fractions.png"):
        assert (tmp_path / "cmp" / plot).stat().st_size > 1000


def test_strategy_configs_differ_only_where_they_must():
    from tfl.report import strategy_config

    base = Config(model=ModelConfig(backbone="asset:minilm", transfer_head="source"),
                  compare=CompareConfig(probe_learning_rate=1e-3))
    made = {s: strategy_config(base, s, seed=4, fraction=0.2, model_dir="d") for s in
            ("scratch", "linear_probe", "partial", "fine_tune", "lora", "parameter", "zero_shot", "self_training")}
    assert made["scratch"].model.pretrained is False and made["fine_tune"].model.pretrained is True
    assert made["linear_probe"].freeze.freeze_all and made["linear_probe"].train.learning_rate == 1e-3
    assert made["partial"].freeze.freeze_blocks == 2 and made["lora"].freeze.lora_rank == 4
    assert made["parameter"].model.transfer == "parameter" and made["zero_shot"].mode == "zero_shot"
    # --transfer_head belongs to the parameter strategy alone; the others record the default they run with.
    assert made["parameter"].model.transfer_head == "source" and made["scratch"].model.transfer_head == "new"
    labelled = [s for s in made if s not in ("zero_shot", "self_training")]
    assert all(made[s].seed == 4 for s in made)
    assert all(made[s].data == made["fine_tune"].data and made[s].data.label_fraction == 0.2 for s in labelled)
    # No labels used: the whole training split, unlabelled, at every fraction.
    assert made["zero_shot"].data.label_fraction == made["self_training"].data.label_fraction == 1.0


def test_aligned_parameter_transfer_copies_shared_token_rows(source_run):
    run_dir, _ = source_run
    source = transfer_lib.load_source_model(run_dir)
    backbone = transfer_lib.backbone_from_source(source, reuse_vocabulary=False,
                                                 train_texts=["great spam film", "spam eggs"])
    target = build_model(backbone, ["a", "b"])
    target_vocabulary = backbone.vectorizer.get_vocabulary()
    report = transfer_lib.copy_weights(source, target, target_vocabulary=target_vocabulary)
    assert report["copied"] == ["embedding", "lstm"] and report["reinitialised"] == ["head"]
    source_vocabulary = ["", *source["vocabulary_tokens"]]
    shared = [t for t in target_vocabulary if t in source_vocabulary]
    assert report["embedding_rows_copied"] == len(shared) and {"great", "film"} <= set(shared)
    source_embedding = transfer_lib.rebuild_source_model(source).get_layer("backbone").get_layer("embedding")
    target_embedding = target.get_layer("backbone").get_layer("embedding")
    for token in ("great", "film"):
        assert np.array_equal(target_embedding.get_weights()[0][target_vocabulary.index(token)],
                              source_embedding.get_weights()[0][source_vocabulary.index(token)])


def test_imdb_source_model_saves_the_word_index_with_its_offset(tmp_path, monkeypatch):
    """keras.datasets.imdb ids: word of rank r -> id r + 3; a raw-text target gets the same ids."""
    import keras

    monkeypatch.setattr(keras.datasets.imdb, "get_word_index", lambda: {"the": 1, "movie": 2, "great": 3})
    backbone = small_models.build_lstm_backbone(num_words=20, maxlen=5, embedding_dim=4, lstm_units=3,
                                                 train_texts=None, seed=0)
    model = build_model(backbone, ["negative", "positive"])
    architecture = transfer_lib.source_architecture(backbone, num_words=20, maxlen=5, embedding_dim=4,
                                                    lstm_units=3, data_source="keras:imdb")
    os.makedirs(tmp_path / "run")
    transfer_lib.save_source_model(str(tmp_path / "run"), backbone, model, ["negative", "positive"], architecture)
    source = transfer_lib.load_source_model(str(tmp_path / "run"))
    rebuilt = transfer_lib.backbone_from_source(source, reuse_vocabulary=True, train_texts=["x"])
    ids = rebuilt.preprocess(tf.constant(["the great movie"])).numpy()[0]
    assert ids.tolist() == [0, 1, 1 + 3, 3 + 3, 2 + 3]  # pre-padded, start id, then rank + 3


TEXTS_OF_MANY_LENGTHS = ["great", "the plot", "a great film the plot", "awful", "the movie a film the awful great plot",
                         "film", "a movie the plot is great and the film is awful", "the great the great the great"]


def _padded_pass(backbone, texts):
    """The backbone on every text padded to the full sequence length, in one batch: what a by-length pass must match."""
    return np.array(backbone.model(backbone.preprocess(tf.constant(texts)), training=False), np.float32)


def test_sentence_embeddings_run_by_length_equal_the_padded_pass_in_the_texts_order(tiny_bert_preset):
    backbone = backbones_lib.build_backbone(tiny_bert_preset, sequence_length=16, pooling="mean")
    expected = _padded_pass(backbone, TEXTS_OF_MANY_LENGTHS)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = transfer_lib.normalised_embeddings(backbone, TEXTS_OF_MANY_LENGTHS, batch_size=3)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooled"])
def test_cached_features_run_by_length_equal_the_padded_pass(tiny_bert_preset, pooling):
    from tfl.train import cache_features

    backbone = backbones_lib.build_backbone(tiny_bert_preset, sequence_length=16, pooling=pooling)
    labels = np.arange(len(TEXTS_OF_MANY_LENGTHS)) % 2

    def cut_to_longest(x, y):  # batches of different widths, as length buckets give
        width = tf.reduce_max(tf.reduce_sum(tf.cast(x["padding_mask"], tf.int32), axis=1))
        return {k: v[:, :width] for k, v in x.items()}, y

    dataset = tf.data.Dataset.from_tensor_slices((tf.constant(TEXTS_OF_MANY_LENGTHS), labels)).batch(3).map(
        lambda x, y: (backbone.preprocess(x), y)).map(cut_to_longest)
    features, got_labels, lengths = cache_features(backbone.model, dataset)
    np.testing.assert_allclose(features, _padded_pass(backbone, TEXTS_OF_MANY_LENGTHS), atol=1e-5)
    np.testing.assert_array_equal(got_labels, labels)
    assert list(lengths) == [len(t.split()) + 2 for t in TEXTS_OF_MANY_LENGTHS]  # [CLS] text [SEP]


@pytest.mark.parametrize("left", [False, True])
def test_a_by_length_pass_cuts_right_padding_only_and_keeps_the_order(left):
    from tfl.train import run_by_length

    lengths = np.array([3, 1, 4, 2])
    mask = np.arange(5) < lengths[:, None]
    if left:
        mask = mask[:, ::-1]
    tokens = {"token_ids": np.where(mask, np.arange(1, 5)[:, None] * 10, 0), "padding_mask": mask}
    widths = []

    def run(x):
        widths.append(int(x["token_ids"].shape[1]))
        return tf.reduce_sum(x["token_ids"], axis=1, keepdims=True)  # each text's sum: row i is (i+1)*10*length

    got = run_by_length(run, tokens, batch_size=2)[0][:, 0]
    np.testing.assert_array_equal(got, np.arange(1, 5) * 10 * lengths)
    assert widths == ([5, 5] if left else [2, 4])  # sorted by length: (1, 2) then (3, 4)


def test_token_arrays_without_a_padding_mask_run_in_order_in_fixed_batches():
    """The LSTM's token ids (one [N, L] array, padded by TextVectorization, no mask): batch by batch as they come,
    the last one partial, every output in the texts' order."""
    from tfl.train import run_on_tokens, tokenize_all

    vectorize = tf.keras.layers.TextVectorization(output_sequence_length=6)
    vectorize.adapt(tf.constant(TEXTS_OF_MANY_LENGTHS))
    tokens = tokenize_all(vectorize, TEXTS_OF_MANY_LENGTHS)
    assert isinstance(tokens, np.ndarray) and tokens.shape == (len(TEXTS_OF_MANY_LENGTHS), 6)
    sizes = []

    def run(x):
        sizes.append(int(x.shape[0]))
        return {"count": tf.reduce_sum(tf.cast(x > 0, tf.int32), axis=1), "first": x[:, 0]}

    count, first = run_on_tokens(run, tokens, batch_size=3)  # outputs flattened as tf.nest does: keys sorted
    np.testing.assert_array_equal(count, [min(len(t.split()), 6) for t in TEXTS_OF_MANY_LENGTHS])
    np.testing.assert_array_equal(first, tokens[:, 0])
    assert sizes == [3, 3, 2]
