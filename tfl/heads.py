"""Task heads: the layers on top of the backbone's features, and the loss and metrics that fit them.

    model = tfl.heads.attach_head(backbone.model, task="classification", label_names=["neg", "pos"])
    loss, metrics = tfl.heads.loss_and_metrics("classification", 2)

Two labels make a binary classifier (one sigmoid unit); more make a softmax. The output layer is
float32 whatever the compute precision, so losses and probabilities stay stable under mixed precision.
"""

from __future__ import annotations

import keras
import numpy as np


def output_units(task: str, num_labels: int) -> int:
    if task == "regression" or (task == "classification" and num_labels == 2):
        return 1
    return num_labels


def is_binary(task: str, num_labels: int) -> bool:
    return task == "classification" and num_labels == 2


def attach_head(backbone_model: keras.Model, *, task: str, label_names: list, dropout: float = 0.1,
                hidden_units: int = 0, seed: int = 0, name: str = "tfl_model",
                backbone_training: bool | None = None) -> keras.Model:
    """backbone inputs -> backbone features -> [dropout -> dense relu] -> dropout -> output (float32).

    ``backbone_training=False`` runs the backbone in inference mode always (a frozen feature
    extractor: no dropout, BatchNorm on moving statistics), as the keras-io transfer guide advises.
    """
    features = backbone_model(backbone_model.input, training=backbone_training)
    x = features
    if hidden_units:
        x = keras.layers.Dropout(dropout, seed=seed, name="head_hidden_dropout")(x)
        x = keras.layers.Dense(hidden_units, activation="relu", name="head_hidden",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(x)
    activation = {"classification": "softmax", "multilabel": "sigmoid", "regression": None}[task]
    if is_binary(task, len(label_names)):
        activation = "sigmoid"
    outputs = keras.layers.Dense(output_units(task, len(label_names)), activation=activation, dtype="float32",
                                 name="head", kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))(x)
    return keras.Model(backbone_model.input, outputs, name=name)


HEAD_LAYERS = ("head_hidden_dropout", "head_hidden", "head_dropout", "head")


def head_only_model(model: keras.Model, feature_dim: int) -> keras.Model:
    """The head of ``model`` on a features input, sharing its layers (training one trains the other)."""
    features = keras.Input((feature_dim,), name="features")
    x = features
    for name in HEAD_LAYERS:
        try:
            x = model.get_layer(name)(x)
        except ValueError:
            continue
    return keras.Model(features, x, name="head_only")


def loss_and_metrics(task: str, num_labels: int) -> tuple:
    """The loss and the Keras metrics tracked during training for a task."""
    if task == "regression":
        return keras.losses.MeanSquaredError(), [keras.metrics.MeanAbsoluteError(name="mae")]
    if task == "multilabel":
        return keras.losses.BinaryCrossentropy(), [keras.metrics.BinaryAccuracy(name="accuracy"),
                                                   keras.metrics.AUC(multi_label=True, name="auc")]
    if num_labels == 2:
        return keras.losses.BinaryCrossentropy(), [keras.metrics.BinaryAccuracy(name="accuracy"),
                                                   keras.metrics.AUC(name="auc")]
    return keras.losses.SparseCategoricalCrossentropy(), [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


def probabilities(task: str, num_labels: int, outputs: np.ndarray) -> np.ndarray:
    """Model outputs -> one probability per label (the binary head's single unit is expanded to two)."""
    if is_binary(task, num_labels):
        return np.concatenate([1.0 - outputs, outputs], axis=-1)
    return outputs


def evaluation_metrics(task: str, num_labels: int, outputs: np.ndarray, labels: np.ndarray) -> dict:
    """Test-set metrics from predictions: accuracy, macro-F1 (and AUC for binary), or MAE/MSE."""
    outputs = np.asarray(outputs, np.float64)
    if task == "regression":
        errors = outputs.reshape(-1) - np.asarray(labels, np.float64).reshape(-1)
        return {"mae": float(np.mean(np.abs(errors))), "mse": float(np.mean(errors ** 2))}
    if task == "multilabel":
        predicted = outputs >= 0.5
        truth = np.asarray(labels) >= 0.5
        return {"accuracy": float(np.mean(predicted == truth)),
                "macro_f1": _macro_f1(predicted, truth),
                "exact_match": float(np.mean(np.all(predicted == truth, axis=1)))}
    labels = np.asarray(labels).reshape(-1).astype(int)
    probs = probabilities(task, num_labels, outputs)
    predicted = np.argmax(probs, axis=-1)
    one_hot = lambda v: np.eye(num_labels, dtype=bool)[v]  # noqa: E731
    result = {"accuracy": float(np.mean(predicted == labels)),
              "macro_f1": _macro_f1(one_hot(predicted), one_hot(labels))}
    if num_labels == 2:
        result["auc"] = binary_auc(probs[:, 1], labels)
    return result


def _macro_f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean over labels of F1; a label absent from both predictions and truth counts as 1."""
    tp = np.sum(predicted & truth, axis=0)
    fp = np.sum(predicted & ~truth, axis=0)
    fn = np.sum(~predicted & truth, axis=0)
    denominator = 2 * tp + fp + fn
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
    return float(np.mean(f1))


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties get average ranks)."""
    labels = np.asarray(labels).astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = np.asarray(scores)[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))
