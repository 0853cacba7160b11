"""--mode=self_train: no labels at all. Zero-shot pseudo-labels on the unlabelled training texts, then a few
rounds of a linear probe on frozen sentence embeddings, each round trained on the texts it is surest of; with
``--pseudo_label_share``, then the encoder itself fine-tuned on the surest share of the zero-shot labels.

    probe = tfl.self_training.self_train(train_embeddings, zero_shot_scores)   # numpy only
    predictions = probe.predict(test_embeddings)

Zero-shot scores each text against the label descriptions alone; a probe trained on its most confident
answers (balanced per class, so one over-predicted class cannot take over) can learn a boundary in the
embedding space that fits these texts better than the descriptions do. It does not always: on Rotten
Tomatoes with MiniLM the probe did not beat zero-shot, the fine-tune did by 2.3 points
(configs/self_train_rt.flags). Labels are never read for training: the training split's labels are dropped,
the validation split only scores (per probe round, and per fine-tune epoch) and the test split once per
stage, at the end. The probe's schedule is fixed; the fine-tune's share and epochs in the config were picked
on the validation split.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from tfl import backbones as backbones_lib
from tfl import data as data_lib
from tfl import devices, heads, runner
from tfl import transfer as transfer_lib
from tfl.config import Config
from tfl.costs import training_seconds
from tfl.data.examples import string_array
from tfl.runner import load_data_for
from tfl.storage import write_json_atomically

# Share of the training texts each round learns from: the surest 20%, then 40%, then 60% (per class).
ROUNDS = (0.2, 0.4, 0.6)


@dataclasses.dataclass
class LinearProbe:
    """Softmax regression on standardised embeddings."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: np.ndarray

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        return softmax(((embeddings - self.mean) / self.scale) @ self.weights + self.bias)

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        return np.argmax(self.probabilities(embeddings), axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def fit_probe(embeddings: np.ndarray, labels: np.ndarray, num_labels: int, mean: np.ndarray, scale: np.ndarray,
              l2: float = 1e-2, steps: int = 300, learning_rate: float = 0.5) -> LinearProbe:
    """Full-batch gradient descent on the L2-regularised cross-entropy: deterministic, no framework needed."""
    x = (embeddings - mean) / scale
    targets = np.eye(num_labels)[labels]
    weights, bias = np.zeros((x.shape[1], num_labels)), np.zeros(num_labels)
    for _ in range(steps):
        error = softmax(x @ weights + bias) - targets
        weights -= learning_rate * (x.T @ error / len(x) + l2 * weights)
        bias -= learning_rate * error.mean(axis=0)
    return LinearProbe(mean, scale, weights, bias)


def confident_subset(probabilities: np.ndarray, share: float) -> tuple:
    """(indices, pseudo-labels): per predicted class, its surest ``share`` of the texts' count over classes.

    Each class gets the same number of examples (or all it has), ranked by the probability of that class:
    balanced, so a class the describer over-predicts does not crowd the others out."""
    predicted = np.argmax(probabilities, axis=1)
    per_class = max(1, int(round(share * len(probabilities) / probabilities.shape[1])))
    chosen = []
    for label in range(probabilities.shape[1]):
        members = np.flatnonzero(predicted == label)
        if not len(members):  # the probe still learns it, but only as "not the others"
            print(f"tfl: self-training: no text is scored as class {label} this round; check "
                  "--label_descriptions for it", file=sys.stderr)
        order = members[np.argsort(-probabilities[members, label], kind="stable")]
        chosen.append(order[:per_class])
    indices = np.concatenate(chosen)
    return indices, predicted[indices]


def self_train(train_embeddings: np.ndarray, zero_shot_scores: np.ndarray, rounds=ROUNDS,
               on_round=None) -> LinearProbe:
    """Rounds of (pick the surest texts, fit a probe on their pseudo-labels, re-score every text).

    ``zero_shot_scores``: cosine similarity of each training text to each label. ``on_round(k, share, probe)``
    is called after each round (reporting only)."""
    num_labels = zero_shot_scores.shape[1]
    mean, scale = train_embeddings.mean(axis=0), train_embeddings.std(axis=0) + 1e-6  # label-free statistics
    probabilities = transfer_lib.zero_shot_probabilities(zero_shot_scores)
    probe = None
    for k, share in enumerate(rounds, start=1):
        indices, pseudo = confident_subset(probabilities, share)
        probe = fit_probe(train_embeddings[indices], pseudo, num_labels, mean, scale)
        probabilities = probe.probabilities(train_embeddings)
        if on_round is not None:
            on_round(k, share, probe)
    return probe


def _texts_and_labels(dataset) -> tuple:
    pairs = [(x.decode("utf-8"), y) for x, y in dataset.as_numpy_iterator()]
    return [p[0] for p in pairs], np.array([p[1] for p in pairs])


def fine_tune_on_pseudo_labels(config: Config, splits: data_lib.DataSplits, texts: list, probabilities: np.ndarray,
                               share: float, verbose: int = 1) -> dict:
    """The encoder itself fine-tuned, a whole tfl training run (``<model_dir>/fine_tune``, exportable), on the
    surest ``share`` of the training texts (balanced per class) with the labels ``probabilities`` (zero-shot's)
    give them. Validation and test stay the labelled splits: they only score."""
    indices, pseudo = confident_subset(probabilities, share)
    train = tf.data.Dataset.from_tensor_slices((string_array(np.asarray(texts, dtype=object)[indices]),
                                                pseudo.astype(np.int64)))
    names = splits.label_names
    pseudo_splits = dataclasses.replace(
        splits, train=train, sizes={**splits.sizes, "train": len(indices)},
        label_counts={**splits.label_counts, "train": {names[k]: int(np.sum(pseudo == k)) for k in range(len(names))}})
    print(f"tfl: self-training: fine-tuning {config.model.backbone} on the surest {len(indices):,d} training texts "
          f"and their zero-shot labels {pseudo_splits.label_counts['train']}")
    model_dir = os.path.join(config.model_dir, "fine_tune") if config.model_dir else ""
    return runner.train_and_evaluate(dataclasses.replace(config, mode="train", model_dir=model_dir), verbose,
                                     splits=pseudo_splits)


def encoding_seconds_per_text(seconds: dict, counts: dict) -> float:
    """Seconds per text of an encoder pass, from the train and validation passes' times: their difference over
    their difference in texts, so that each pass's fixed cost (tracing its function) does not count per text;
    the train pass's plain average where that cannot separate them."""
    extra = counts["train"] - counts["validation"]
    if extra > 0 and seconds["train"] > seconds["validation"]:
        return (seconds["train"] - seconds["validation"]) / extra
    return seconds["train"] / max(counts["train"], 1)


def fine_tune_budget(config: Config, sizes: dict, forward_seconds: float, seconds_left: Optional[float]) -> tuple:
    """(whether the fine-tune on pseudo-labels runs, the reason): it runs unless its estimate, every weight
    trained, is over ``seconds_left`` (None: no budget, no reason)."""
    share = config.train.pseudo_label_share
    if share <= 0 or seconds_left is None:
        return share > 0, ""
    epochs = config.train.epochs
    estimate = training_seconds(forward_seconds, train_examples=int(share * sizes["train"]), epochs=epochs,
                                eval_examples=sizes["validation"] * epochs + sizes["test"], trained_share=1.0)
    left = f"the {max(seconds_left, 0):.0f} s left of --budget_minutes"
    if estimate <= seconds_left:
        return True, (f"the encoder is fine-tuned on pseudo-labels (--pseudo_label_share={share:g}): its estimate, "
                      f"{estimate:.0f} s with every weight trained, fits {left}")
    return False, (f"the fine-tune on pseudo-labels (--pseudo_label_share={share:g}) would take about {estimate:.0f} s "
                   f"with every weight trained, over {left}: the self-trained probe's result stands")


def run_self_training(config: Config, verbose: int = 1, *, budget_seconds: Optional[float] = None,
                      started: Optional[float] = None) -> dict:
    """Zero-shot, then self-training on the unlabelled training texts; test metrics of both. With
    ``budget_seconds`` (``--mode=auto``'s, counted from ``started``), the fine-tune on pseudo-labels runs only
    when its estimate (from the seconds the encoder took per text here) fits what is left of it."""
    started = time.time() if started is None else started
    splits = load_data_for(config)
    backbone = backbones_lib.build_backbone(config.model.backbone, sequence_length=config.model.sequence_length,
                                            pooling="mean", dtype=devices.resolve_precision(config.train.precision))
    if backbone.modality != data_lib.TEXT or splits.modality != data_lib.TEXT:
        raise backbones_lib.BackboneError("--mode=self_train (and --mode=auto --nolabels) works on text data with a "
                                          "text encoder: --backbone=asset:minilm or a keras-hub text preset")
    descriptions = transfer_lib.parse_label_descriptions(config.model.label_descriptions, splits.label_names)
    label_vectors = transfer_lib.label_embeddings(backbone, descriptions)
    embedded, train_texts, seconds = {}, [], {}
    for name in ("train", "validation", "test"):
        texts, labels = _texts_and_labels(getattr(splits, name))
        if name == "train":  # kept for the fine-tune on pseudo-labels
            train_texts = texts
        print(f"tfl: self-training: encoding {len(texts):,d} {name} texts with {config.model.backbone}"
              + (" (their labels are not used)" if name == "train" else ""))
        encoding_started = time.time()
        embedded[name] = (transfer_lib.normalised_embeddings(backbone, texts), labels)
        seconds[name] = time.time() - encoding_started
    num_labels = len(splits.label_names)

    def evaluate(probabilities, split):
        outputs = probabilities[:, 1:] if heads.is_binary("classification", num_labels) else probabilities
        return heads.evaluation_metrics("classification", num_labels, outputs, embedded[split][1])

    zero_shot = {split: evaluate(transfer_lib.zero_shot_probabilities(
        transfer_lib.zero_shot_scores(embedded[split][0], label_vectors)), split) for split in ("validation", "test")}
    rounds = []

    def report_round(k, share, probe):
        rounds.append({"round": k, "share": share,
                       "validation": evaluate(probe.probabilities(embedded["validation"][0]), "validation")})
        print(f"tfl: self-training round {k}: validation accuracy {rounds[-1]['validation']['accuracy']:.4f}")

    train_scores = transfer_lib.zero_shot_scores(embedded["train"][0], label_vectors)
    probe = self_train(embedded["train"][0], train_scores, on_round=report_round)
    test = probe_test = evaluate(probe.probabilities(embedded["test"][0]), "test")
    fine_tuned, trainable, train_seconds = {}, int(probe.weights.size + probe.bias.size), 0.0
    forward_seconds = encoding_seconds_per_text(seconds, {k: len(v[1]) for k, v in embedded.items()})
    seconds_left = None if budget_seconds is None else budget_seconds - (time.time() - started)
    fine_tune_runs, budget_reason = fine_tune_budget(config, splits.sizes, forward_seconds, seconds_left)
    if budget_reason:
        print(f"tfl: self-training: {budget_reason}")
    if fine_tune_runs:
        del backbone  # the fine-tune builds its own
        zero_shot_train = transfer_lib.zero_shot_probabilities(train_scores)
        run = fine_tune_on_pseudo_labels(config, splits, train_texts, zero_shot_train, config.train.pseudo_label_share,
                                         verbose)
        test, trainable, train_seconds = run["test"], run["trainable_params"], run["train_seconds"]
        fine_tuned = {"validation": run["validation"], "test": run["test"],
                      "examples": run["data"]["sizes"]["train"]}
    metrics = {"test": test, "mode": "self_train", "zero_shot": zero_shot, "rounds": rounds, "probe_test": probe_test,
               "fine_tune": fine_tuned, "fine_tune_budget": budget_reason, "label_descriptions": descriptions,
               "trainable_params": trainable,
               "train_seconds": train_seconds, "wall_seconds": round(time.time() - started, 2),
               "config": config.to_dict(),
               "data": {"source": config.data.source, "sizes": splits.sizes, "label_names": splits.label_names}}
    if config.model_dir and devices.is_chief():
        write_json_atomically(os.path.join(config.model_dir, "metrics.json"), metrics)
    print(f"tfl: zero-shot test accuracy {zero_shot['test']['accuracy']:.4f}; self-trained (no labels) "
          + ("probe {:.4f}, fine-tuned ".format(probe_test["accuracy"]) if fine_tuned else "")
          + ", ".join(f"{k}={v:.4f}" for k, v in test.items()))
    return metrics
