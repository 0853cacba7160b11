"""--mode=self_train: zero-shot pseudo-labels, then rounds of a probe; no label is read for training."""

import json

import numpy as np

from tfl import self_training
from tfl.config import CompareConfig, Config, DataConfig, ModelConfig, TrainConfig
from tfl.job import run


def _clusters(n=400, seed=0):
    """Two classes of unit vectors around two centres in 16-d, and label vectors that point off-centre."""
    rng = np.random.RandomState(seed)
    labels = np.arange(n) % 2
    centres = np.zeros((2, 16))
    centres[0, 0], centres[1, 1] = 1.0, 1.0
    x = centres[labels] + rng.normal(0, 0.35, (n, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # The 'descriptions' are rotated towards a nuisance direction: zero-shot is right only part of the time.
    described = np.array([[1.0, 0.0, 1.6] + [0] * 13, [0.0, 1.0, -1.6] + [0] * 13])
    described /= np.linalg.norm(described, axis=1, keepdims=True)
    return x, labels, described


def test_self_training_beats_the_zero_shot_it_starts_from():
    x, labels, described = _clusters()
    zero_shot = np.mean(np.argmax(x @ described.T, axis=1) == labels)
    seen = []
    probe = self_training.self_train(x, x @ described.T, on_round=lambda k, share, p: seen.append((k, share)))
    self_trained = np.mean(probe.predict(x) == labels)
    assert seen == [(1, 0.2), (2, 0.4), (3, 0.6)]
    assert 0.7 < zero_shot < 0.85 and self_trained > zero_shot + 0.1, (zero_shot, self_trained)  # measured .79, .95
    held_out, held_out_labels, _ = _clusters(seed=1)  # texts it never saw: the probe generalises
    assert np.mean(probe.predict(held_out) == held_out_labels) > zero_shot + 0.1  # measured .93


def test_confident_subset_is_balanced_and_surest_first():
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.7, 0.3], [0.45, 0.55], [0.2, 0.8]])
    indices, pseudo = self_training.confident_subset(probabilities, share=0.34)  # 1 per class of 6 texts
    assert indices.tolist() == [0, 5] and pseudo.tolist() == [0, 1]
    indices, pseudo = self_training.confident_subset(probabilities, share=1.0)  # 3 a class; class 1 has 2
    assert indices.tolist() == [0, 2, 3, 5, 4] and pseudo.tolist() == [0, 0, 0, 1, 1]


def test_a_class_zero_shot_never_predicts_is_named(capsys):
    indices, pseudo = self_training.confident_subset(np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]]), share=1.0)
    assert pseudo.tolist() == [0, 1]
    assert "no text is scored as class 2" in capsys.readouterr().err


def test_self_train_mode_and_compare_strategy_on_a_tiny_encoder(tiny_bert_preset, tmp_path):
    rows = [("the great film", 1), ("an awful plot", 0), ("great movie", 1), ("awful film", 0)] * 10
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"\"{t}\",{y}\n" for t, y in rows))
    config = Config(mode="compare", data=DataConfig(source=f"csv:{csv}", batch_size=4),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=8,
                                      label_descriptions="0=awful|bad;1=great|good"),
                    train=TrainConfig(precision="float32"),
                    compare=CompareConfig(strategies=("zero_shot", "self_training"), seeds=1,
                                          label_fractions=(0.5, 1.0)),
                    model_dir=str(tmp_path / "cmp"))
    report = run(config, verbose=0)
    # Neither uses labels: one run each, reported at both fractions.
    assert [(r["strategy"], r["fraction"]) for r in report["rows"]] == [
        (s, f) for s in ("zero_shot", "self_training") for f in (0.5, 1.0)]
    ran = sorted(p.name for p in (tmp_path / "cmp" / "runs").iterdir())
    assert ran == ["self_training-f0.5-s0", "zero_shot-f0.5-s0"]
    metrics = json.loads((tmp_path / "cmp" / "runs" / "self_training-f0.5-s0" / "metrics.json").read_text())
    assert metrics["data"]["sizes"]["train"] == 32  # every training text (80% of 40), not the 0.5 fraction
    assert metrics["mode"] == "self_train" and [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert 0 <= metrics["test"]["accuracy"] <= 1 and "accuracy" in metrics["zero_shot"]["test"]
    assert metrics["trainable_params"] == 8 * 2 + 2  # a softmax probe on the 8-wide embeddings


def test_pseudo_label_share_fine_tunes_the_encoder_on_the_surest_pseudo_labels(tiny_bert_preset, tmp_path):
    rows = [("the great film", 1), ("an awful plot", 0), ("great movie", 1), ("awful film", 0)] * 10
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"\"{t}\",{y}\n" for t, y in rows))
    config = Config(mode="self_train", data=DataConfig(source=f"csv:{csv}", batch_size=4, labels=False),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=8,
                                      label_descriptions="0=awful|bad;1=great|good"),
                    train=TrainConfig(precision="float32", epochs=1, pseudo_label_share=0.5),
                    model_dir=str(tmp_path / "st"))
    metrics = run(config, verbose=0)
    tuned = json.loads((tmp_path / "st" / "fine_tune" / "metrics.json").read_text())
    # 50% of the 32 training texts: up to 8 per class (balanced), as many as zero-shot gave that class. The tiny
    # encoder's weights are random, so zero-shot may give one class fewer than 8; the other then has 16 or more.
    counts = tuned["data"]["label_counts"]["train"]
    assert max(counts.values()) == 8 and metrics["fine_tune"]["examples"] == tuned["data"]["sizes"]["train"]
    assert sum(counts.values()) == tuned["data"]["sizes"]["train"] >= 8
    assert tuned["data"]["sizes"]["test"] == metrics["data"]["sizes"]["test"]  # scored on the same test split
    assert metrics["test"] == tuned["test"] and "accuracy" in metrics["probe_test"]
    assert metrics["trainable_params"] == tuned["trainable_params"] > 8 * 2 + 2  # the encoder trained


def test_the_fine_tune_learns_zero_shot_labels_never_the_files(monkeypatch):
    """The texts and labels handed to the fine-tune are zero-shot's surest, here the opposite of the file's."""
    import tensorflow as tf

    from tfl import data as data_lib

    texts = [f"text {i}" for i in range(8)]
    file_labels = np.array([0, 1] * 4)
    splits = data_lib.DataSplits(
        train=tf.data.Dataset.from_tensor_slices((texts, file_labels)), validation=None, test=None,
        label_names=["neg", "pos"], modality=data_lib.TEXT, sizes={"train": 8, "validation": 2, "test": 2},
        label_counts={"train": {"neg": 4, "pos": 4}})
    # Zero-shot says the opposite of the file for every text, surest on texts 0-3.
    surest = np.array([0.9, 0.9, 0.8, 0.8, 0.6, 0.6, 0.55, 0.55])
    probabilities = np.stack([np.where(file_labels == 1, surest, 1 - surest),
                              np.where(file_labels == 1, 1 - surest, surest)], axis=1)
    captured = {}

    def fake_run(config, verbose, splits):
        captured["pairs"] = [(x.decode(), int(y)) for x, y in splits.train.as_numpy_iterator()]
        captured["splits"] = splits
        return {}

    monkeypatch.setattr(self_training.runner, "train_and_evaluate", fake_run)
    self_training.fine_tune_on_pseudo_labels(Config(mode="self_train", model_dir=""), splits, texts, probabilities,
                                             share=0.5, verbose=0)
    assert sorted(captured["pairs"]) == [("text 0", 1), ("text 1", 0), ("text 2", 1), ("text 3", 0)]
    assert captured["splits"].sizes["train"] == 4 and captured["splits"].label_counts["train"] == {"neg": 2, "pos": 2}
