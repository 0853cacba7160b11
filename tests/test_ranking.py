"""tfl.ranking: the candidate zoo, features at every depth from one pass, scores, --mode=rank and its report."""

import json

import numpy as np
import pytest

from conftest import VOCAB

_WORDS = ["the", "a", "film", "movie", "plot"]
# Four words each, the second one the label's keyword (equal lengths: mean pooling keeps its weight fixed).
KEYWORD_TEXTS = [f"{_WORDS[i % 5]} {'great' if i % 2 else 'awful'} {_WORDS[(i // 5) % 5]} {_WORDS[(i // 2) % 5]}"
                 for i in range(48)]
KEYWORD_LABELS = np.arange(48) % 2  # 1 = "great"


def _mean_over_mask(sequence, mask):
    mask = np.asarray(mask, np.float32)[..., None]
    return (np.asarray(sequence) * mask).sum(axis=1) / mask.sum(axis=1)


def test_depth_k_features_equal_the_backbone_truncated_at_block_k(tiny_bert_preset):
    import keras_hub

    from tfl import ranking

    texts = ["the great film", "a awful movie the plot the film", "great", "the film the film the film a plot"]
    zoo = ranking.candidates("text", [tiny_bert_preset], sequence_length=16, controls=False)
    assert len(zoo) == 1 and [d for d, _ in zoo[0].depths] == [0, 1, 2]
    features = ranking.extract_features(zoo, texts, modality="text", batch_size=3)  # batches of mixed lengths
    assert sorted(features) == [f"{tiny_bert_preset}@{k}" for k in range(3)]

    # Directly: a backbone with only the first k transformer blocks, same weights, full padding, pooled here.
    full = keras_hub.models.BertBackbone.from_preset(tiny_bert_preset)
    inputs = keras_hub.models.TextClassifierPreprocessor.from_preset(tiny_bert_preset, sequence_length=16)(texts)
    mask = inputs["padding_mask"]
    embeddings = full.get_layer("embeddings_layer_norm")(
        full.get_layer("token_embedding")(inputs["token_ids"])
        + full.get_layer("position_embedding")(full.get_layer("token_embedding")(inputs["token_ids"]))
        + full.get_layer("segment_embedding")(inputs["segment_ids"]))
    np.testing.assert_allclose(features[f"{tiny_bert_preset}@0"]["features"], _mean_over_mask(embeddings, mask),
                               atol=1e-5)
    for k in (1, 2):
        truncated = keras_hub.models.BertBackbone(**{**full.get_config(), "num_layers": k})
        for layer in truncated.layers:
            if layer.weights:
                layer.set_weights(full.get_layer(layer.name).get_weights())
        expected = _mean_over_mask(truncated(inputs)["sequence_output"], mask)
        got = features[f"{tiny_bert_preset}@{k}"]
        np.testing.assert_allclose(got["features"], expected, atol=1e-5)
        assert got["depth"] == k and got["block"] == f"transformer_layer_{k - 1}" and got["pretrained"]
    assert not np.allclose(features[f"{tiny_bert_preset}@1"]["features"],
                           features[f"{tiny_bert_preset}@2"]["features"], atol=1e-3)


@pytest.fixture(scope="module")
def keyword_preset(tmp_path_factory, tiny_bert_preset):
    """The tiny BERT 'pretrained' so that its embeddings see only the keyword: great = +e, awful = -e."""
    import keras_hub

    backbone = keras_hub.models.BertBackbone.from_preset(tiny_bert_preset)
    tokens = np.zeros_like(backbone.get_layer("token_embedding").get_weights()[0])
    tokens[VOCAB.index("great"), :4], tokens[VOCAB.index("awful"), :4] = 5.0, -5.0
    backbone.get_layer("token_embedding").set_weights([tokens])
    for name in ("position_embedding", "segment_embedding"):
        layer = backbone.get_layer(name)
        layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    # Every other token normalises to the layer norm's offset: a constant feature, the bias LogME's linear
    # model lacks, so "great" = offset + p and "awful" = offset - p fit one-hot targets exactly.
    norm = backbone.get_layer("embeddings_layer_norm")
    norm.set_weights([np.ones_like(norm.gamma), np.ones_like(norm.beta)])
    folder = tmp_path_factory.mktemp("keyword_bert")
    backbone.save_to_preset(str(folder))
    keras_hub.models.BertTokenizer(vocabulary=VOCAB, lowercase=True).save_to_preset(str(folder))
    return str(folder)


def test_features_that_separate_the_labels_rank_above_their_random_control(keyword_preset):
    from tfl import ranking

    rows = ranking.rank_candidates(KEYWORD_TEXTS, KEYWORD_LABELS, modality="text", backbones=[keyword_preset],
                                   sequence_length=16, seed=0)
    names = [row["candidate"] for row in rows]
    control = f"{keyword_preset}@2{ranking.RANDOM_SUFFIX}"
    assert sorted(names) == sorted([f"{keyword_preset}@{k}" for k in range(3)] + [control])
    keyword = f"{keyword_preset}@0"  # the embeddings are the keyword itself: an exact linear fit
    assert names.index(keyword) < names.index(control), names
    by_name = {row["candidate"]: row for row in rows}
    assert by_name[keyword]["logme"] > by_name[control]["logme"] + 0.1
    assert by_name[keyword]["h_score"] == pytest.approx(1.0)  # C - 1: the maximum
    assert [row["logme"] for row in rows] == sorted((row["logme"] for row in rows), reverse=True)
    assert all(row["dim"] == 8 and row["seconds"] >= row["score_seconds"] >= 0 for row in rows)
    assert not by_name[control]["pretrained"] and "leep" not in by_name[control]


def test_score_candidates_on_plain_arrays():
    from tfl import ranking, transferability

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    good, noise = np.eye(3)[y] + 0.3 * rng.normal(size=(200, 3)), rng.normal(size=(200, 3))
    probabilities = np.full((200, 4), 0.1)
    probabilities[np.arange(200), y] = 0.7
    scores = ranking.score_candidates({"good": good, "noise": {"features": noise, "source_probabilities": probabilities}},
                                      y, "classification")
    assert scores["good"]["logme"] == pytest.approx(transferability.logme(good, y))
    assert scores["good"]["logme"] > scores["noise"]["logme"] and set(scores["good"]) == {"dim", "logme", "h_score",
                                                                                          "seconds"}
    assert scores["noise"]["leep"] == pytest.approx(transferability.leep(probabilities, y))
    assert scores["noise"]["nce"] == pytest.approx(0.0)  # the source's argmax is the label
    regression = ranking.score_candidates({"good": good}, good @ [1.0, -1.0, 0.5], "regression")
    assert set(regression["good"]) == {"dim", "logme", "seconds"}


def test_stratified_subset_keeps_the_class_shares():
    from tfl import ranking

    labels = np.array([0] * 300 + [1] * 100)
    keep = ranking.stratified_subset(labels, 40, seed=0)
    assert len(keep) == 40 and np.bincount(labels[keep]).tolist() == [30, 10]
    assert np.array_equal(keep, ranking.stratified_subset(labels, 40, seed=0))
    assert len(ranking.stratified_subset(labels, 1000, seed=0)) == 400


def _rank_config(source, model_dir, backbones, **rank):
    from tfl.config import Config, DataConfig, ModelConfig, RankConfig

    return Config(mode="rank", data=DataConfig(source=source), model=ModelConfig(sequence_length=16),
                  rank=RankConfig(backbones=tuple(backbones), **rank), model_dir=str(model_dir))


def test_rank_mode_writes_rank_json_and_md_with_every_candidate(tmp_path, text_csv, tiny_bert_preset, capsys):
    from tfl import job

    config = _rank_config(f"csv:{text_csv}", tmp_path / "run", [tiny_bert_preset], rank_examples=24)
    job.check_before_run(config)
    result = job.run_checked(config)
    report = json.loads((tmp_path / "run" / "rank.json").read_text())
    markdown = (tmp_path / "run" / "rank.md").read_text()
    names = [row["candidate"] for row in report["rows"]]
    assert sorted(names) == sorted([f"{tiny_bert_preset}@{k}" for k in range(3)]
                                   + [f"{tiny_bert_preset}@2 (random init)"])
    assert report["examples"] == 24 and report["label_counts"] == {"neg": 12, "pos": 12}
    assert [row["candidate"] for row in result["rows"]] == names
    for row in report["rows"]:
        assert {"candidate", "depth", "logme", "h_score", "dim", "feature_seconds", "score_seconds", "seconds"} <= set(row)
        assert row["candidate"] in markdown
    assert [row["logme"] for row in report["rows"]] == sorted((row["logme"] for row in report["rows"]), reverse=True)
    printed = capsys.readouterr().out
    assert all(name in printed for name in names) and "LogME" in printed


def test_unknown_backbones_name_is_one_line_naming_the_choices(tmp_path, text_csv):
    from tfl import job

    config = _rank_config(f"csv:{text_csv}", tmp_path / "run", ["no_such_encoder"])
    with pytest.raises(job.USER_ERRORS) as caught:  # main.py prints these as one error: line, exit 2
        job.run_checked(config)
    message = str(caught.value)
    assert "\n" not in message and "no_such_encoder" in message and "expected some of" in message
    assert "keras-hub" in message and "lstm/small_cnn run" in message
    assert not (tmp_path / "run").exists()  # a user mistake leaves nothing behind


def test_a_zoo_name_of_the_other_modality_is_refused(text_csv, tmp_path):
    from tfl import assets, ranking
    from tfl.backbones import BackboneError

    if not assets.is_fetched("efficientnet_lite0"):
        pytest.skip("asset:efficientnet_lite0 not fetched")
    with pytest.raises(BackboneError, match="takes image inputs but the data holds text"):
        ranking.check_backbones(["asset:efficientnet_lite0"], "text")


def test_a_saved_lstm_source_model_is_ranked_with_leep_and_nce_from_its_classifier(tmp_path):
    import keras

    from tfl import heads, ranking, small_models, transfer, transferability

    texts = [t.replace("the film", "good") for t in KEYWORD_TEXTS]
    backbone = small_models.build_lstm_backbone(50, 12, 8, 4, train_texts=texts, seed=0)
    model = heads.attach_head(backbone.model, task="classification", label_names=["neg", "pos"])
    keras.utils.set_random_seed(1)
    model.get_layer("head").set_weights([w + 0.5 for w in model.get_layer("head").get_weights()])
    architecture = transfer.source_architecture(backbone, num_words=50, maxlen=12, embedding_dim=8, lstm_units=4)
    transfer.save_source_model(str(tmp_path / "src"), backbone, model, ["neg", "pos"], architecture)

    zoo = ranking.candidates("text", [str(tmp_path / "src")])  # a run folder in --backbones
    features = ranking.extract_features(zoo, texts, modality="text")
    name = f"{tmp_path / 'src'}@1"
    assert sorted(features) == sorted([name, name + ranking.RANDOM_SUFFIX])
    expected = heads.probabilities("classification", 2, model.predict(backbone.preprocess(np.array(texts)), verbose=0))
    np.testing.assert_allclose(features[name]["source_probabilities"], expected, atol=1e-5)
    np.testing.assert_allclose(features[name]["features"],
                               backbone.model.predict(backbone.preprocess(np.array(texts)), verbose=0), atol=1e-5)
    scores = ranking.score_candidates(features, KEYWORD_LABELS, "classification")
    assert scores[name]["leep"] == pytest.approx(transferability.leep(expected, KEYWORD_LABELS))
    assert "leep" in scores[name] and "nce" in scores[name] and "leep" not in scores[name + ranking.RANDOM_SUFFIX]


def test_efficientnet_lite0_gives_every_block_and_its_imagenet_classifier():
    from tfl import assets, ranking

    if not assets.is_fetched("efficientnet_lite0"):
        pytest.skip("asset:efficientnet_lite0 not fetched")
    images = np.random.RandomState(0).randint(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    zoo = ranking.candidates("image", [], image_size=64)
    features = ranking.extract_features(zoo, images, modality="image", batch_size=4)
    pretrained = {k: v for k, v in features.items() if v["pretrained"]}
    assert [v["block"] for v in pretrained.values()] == ["stem"] + [f"block{i}" for i in range(1, 8)] + ["top"]
    assert [v["features"].shape[1] for v in pretrained.values()] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    last = pretrained["asset:efficientnet_lite0@8"]["source_probabilities"]
    assert last.shape == (6, 1000) and np.allclose(last.sum(axis=1), 1.0, atol=1e-4)
    assert sum("source_probabilities" in v for v in features.values()) == 1  # the classifier tops the last depth
    assert list(features)[-1] == f"asset:efficientnet_lite0@8{ranking.RANDOM_SUFFIX}"


def test_depths_selects_candidates_and_keeps_the_controls():
    from tfl import ranking
    from tfl.config import ConfigError

    entry = lambda backbone, depth, pretrained=True: {"backbone": backbone, "depth": depth,  # noqa: E731
                                                      "pretrained": pretrained}
    features = {"a@0": entry("a", 0), "a@1": entry("a", 1), "a@2": entry("a", 2),
                "a@2 (random init)": entry("a", 2, False), "b@0": entry("b", 0), "b@3": entry("b", 3)}
    assert ranking.select_depths(features, "all") == features
    assert sorted(ranking.select_depths(features, "last")) == ["a@2", "a@2 (random init)", "b@3"]
    assert sorted(ranking.select_depths(features, "0,2")) == ["a@0", "a@2", "a@2 (random init)", "b@0"]
    for bad in ("deep", "1,", "-1"):
        with pytest.raises(ConfigError, match="--depths=.* expected all, last or a comma list"):
            _rank_config("asset:rotten_tomatoes", "", [], depths=bad).validate()


def test_a_score_that_could_not_be_computed_is_null_in_rank_json_and_ranked_last(tmp_path):
    from tfl import ranking

    features = {"flat": {"features": np.full((20, 3), np.nan, np.float32), "backbone": "flat", "depth": 0},
                "useful": {"features": np.eye(2, dtype=np.float32)[np.arange(20) % 2] + 0.01
                           * np.random.RandomState(0).randn(20, 2).astype(np.float32), "backbone": "useful", "depth": 0}}
    labels = np.arange(20) % 2
    rows = ranking.ranking_rows(features, ranking.score_candidates(features, labels))
    assert [r["candidate"] for r in rows] == ["useful", "flat"] and np.isnan(rows[1]["logme"])
    ranking.write_report(str(tmp_path), rows, {"source": "x", "task": "classification", "examples": 20,
                                              "label_counts": {}, "seconds": 1.0})

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    saved = json.loads((tmp_path / "rank.json").read_text(), parse_constant=refuse)
    assert saved["rows"][1]["logme"] is None and "errors" in saved["rows"][1]
