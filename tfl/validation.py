"""The validation split scored once at the end of training, not twice.

Keras validates after every epoch, and the run's metrics score the validation split again after ``fit``,
with every metric of the task (tfl.heads.evaluation_metrics) — the same forward pass over the same weights
twice at the last epoch. ``FinalValidation`` replaces Keras's validation of the last epoch: it scores the
split once with tfl's own evaluation and gives the epoch's other callbacks (checkpoint, early stopping,
logs, history) the ``val_`` values Keras would have, from the same predictions.

    final = FinalValidation(val_ds, task="classification", num_labels=2, last_epoch=epochs - 1)
    train.fit(..., final_validation=final)   # fit validates the other epochs itself
    final.metrics                            # tfl's validation metrics of the final weights, or None
    train.evaluate(model, test_ds, ..., predict_step=final.predict_step)  # its traces serve the test split
"""

from __future__ import annotations

from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tfl import heads
from tfl.costs import release_traced_functions
from tfl.train import predict_with_labels, traced_for_any_shape


class FinalValidation(keras.callbacks.Callback):
    """At the end of epoch ``last_epoch`` (0-based): tfl's metrics of the validation split in ``metrics``, and
    ``val_loss`` and each compiled metric's ``val_`` value in the epoch's logs. Training is over then: first the
    model's traced Keras functions are freed (tfl.costs.release_traced_functions; Keras traces again if asked)."""

    def __init__(self, validation: tf.data.Dataset, *, task: str, num_labels: int, last_epoch: int):
        super().__init__()
        self.validation, self.task, self.num_labels, self.last_epoch = validation, task, num_labels, last_epoch
        self.metrics: Optional[dict] = None
        self.predict_step = None  # the traced inference function of the model it scored

    def skip_in_keras(self, first_epoch: int, end_epoch: int) -> list:
        """``validation_freq`` for a fit over epochs [first_epoch, end_epoch): every epoch but the last."""
        return [epoch + 1 for epoch in range(first_epoch, end_epoch) if epoch != self.last_epoch]

    def on_epoch_end(self, epoch, logs=None):
        if epoch != self.last_epoch or self.model.stop_training:  # stopped: a non-finite loss, about to raise
            return
        release_traced_functions(self.model)  # the run's last training step is done: this trace reuses its memory
        self.predict_step = traced_for_any_shape(self.model)
        outputs, labels = predict_with_labels(self.model, self.validation, self.predict_step)
        self.metrics = heads.evaluation_metrics(self.task, self.num_labels, outputs, labels)
        if logs is not None:
            logs.update(keras_logs(self.task, self.num_labels, outputs, labels))


def keras_logs(task: str, num_labels: int, outputs: np.ndarray, labels: np.ndarray) -> dict:
    """What Keras's validation logs for these predictions: the compiled loss (a mean over every example, as
    Keras's size-weighted batch means are) and metrics, prefixed ``val_``."""
    loss, metrics = heads.loss_and_metrics(task, num_labels)
    # Per-example losses, averaged here: calling the loss object itself inside a distribution strategy's scope
    # (as fit's callbacks run) would divide it by the replica count. Labels as the dataset gives them, as in fit.
    logs = {"val_loss": float(np.mean(loss.call(labels, outputs)))}
    for metric in metrics:
        metric.update_state(labels, outputs)
        logs[f"val_{metric.name}"] = float(metric.result())
    return logs
