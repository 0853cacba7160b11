"""Optimizer and schedule, callbacks, fit with resume, and evaluation (devices: tfl.devices).

    history = tfl.train.fit(model, train_ds, val_ds, epochs=3, learning_rate=5e-5, model_dir=d, ...)
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from tfl import heads, storage
from tfl.freezing import LayerwiseAdamW
from tfl.fused_adam import use_fused_adam
from tfl.keras_workarounds import (CSVLogger, build_optimizer_eagerly, clip_with_tensorflow, patch_keras_for_distribution,
                                   saving_without_copies, with_loss_scaling)


# ---- optimizer and schedule -----------------------------------------------------------------

@keras.saving.register_keras_serializable(package="tfl")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak`` over ``warmup_steps``, then linear or cosine decay to 0 (or constant)."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, decay: str = "linear"):
        self.peak, self.total_steps, self.warmup_steps, self.decay = peak, total_steps, warmup_steps, decay

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.cast(max(self.warmup_steps, 1), tf.float32)
        decay_steps = tf.cast(max(self.total_steps - self.warmup_steps, 1), tf.float32)
        progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.decay == "cosine":
            after = 0.5 * (1.0 + tf.cos(math.pi * progress))
        elif self.decay == "linear":
            after = 1.0 - progress
        else:
            after = tf.constant(1.0)
        factor = tf.where(step < self.warmup_steps, (step + 1.0) / warmup, after)
        return self.peak * factor

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "decay": self.decay}


def make_optimizer(learning_rate: float, total_steps: int, *, warmup_fraction: float = 0.1, schedule: str = "linear",
                   weight_decay: float = 0.01, lr_multipliers: Optional[dict] = None,
                   gradient_accumulation_steps: int = 1) -> keras.optimizers.Optimizer:
    """AdamW with warm-up and decay; per-variable learning-rate factors for layer-wise decay.

    ``gradient_accumulation_steps`` > 1: Keras's own accumulation, one update every N batches from their mean
    gradient. ``total_steps`` counts batches either way: Keras's schedules read the batch counter."""
    lr = WarmupDecay(learning_rate, total_steps, int(warmup_fraction * total_steps), schedule)
    kwargs = dict(learning_rate=lr, weight_decay=weight_decay, global_clipnorm=1.0,
                  gradient_accumulation_steps=gradient_accumulation_steps if gradient_accumulation_steps > 1 else None)
    optimizer = (LayerwiseAdamW(lr_multipliers=lr_multipliers, **kwargs) if lr_multipliers
                 else keras.optimizers.AdamW(**kwargs))
    return use_fused_adam(clip_with_tensorflow(optimizer))


def batch_counter(optimizer: keras.optimizers.Optimizer):
    """The optimizer's count of batches: its ``iterations``, except under gradient accumulation, where
    ``iterations`` counts updates (a tensor computed from the batch counter, which has no public name)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer counts its inner one's
    return optimizer._iterations if optimizer.gradient_accumulation_steps else optimizer.iterations


# ---- training -------------------------------------------------------------------------------

class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; the message names the step and the likely causes."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops at the first NaN/Inf batch loss and remembers where, so the run can fail with a clear message
    (unlike TerminateOnNaN, which stops silently and lets the run look successful)."""

    def __init__(self):
        super().__init__()
        self.failed_at, self._epoch = None, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.failed_at = (self._epoch + 1, batch + 1, float(loss))
            self.model.stop_training = True


def read_backup(backup_dir: str) -> Optional[dict]:
    """The {"epoch", "batch"} a resumable backup in ``backup_dir`` was saved at, or None."""
    path = os.path.join(backup_dir, "training_metadata.json")
    if not backup_dir or not tf.io.gfile.exists(path):
        return None
    return json.loads(storage.read_bytes(path))


def describe_backup(model_dir: str) -> Optional[str]:
    """'epoch E, batch B' of a resumable backup in ``model_dir``, or None."""
    meta = read_backup(os.path.join(model_dir, "backup")) if model_dir else None
    return None if meta is None else f"epoch {meta.get('epoch', 0)}, after batch {meta.get('batch', 0)}"


class Backup(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore (weights, optimizer, epoch; the previous copy kept), with six changes:

    - with an integer ``save_freq`` it saves at every epoch end too: Keras then saves only every N
      batches, so a kill right after an epoch would lose it;
    - fit() says whether to restore (``restore``) and whether the optimizer too (``restore_optimizer``):
      gradual unfreezing compiles one optimizer per stage, and only the first stage a rerun trains
      restores; a backup from the previous stage's end holds an optimizer with other variables;
    - the backup stays after each model.fit: fit() removes it (``remove``) once every stage is done;
    - a mid-epoch save records the epoch in progress, also in a resumed process;
    - it writes without Keras's copies of the weights (keras_workarounds.saving_without_copies);
    - no save at the end of the run's last epoch (``run_epochs``, set by fit()): fit() would remove it unread.
    """

    def __init__(self, backup_dir: str, save_freq="epoch"):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=True, delete_checkpoint=False)
        self.restore, self.restore_optimizer = True, True
        self.run_epochs = None

    def on_train_begin(self, logs=None):
        if self.restore:
            super().on_train_begin(logs)

    def _load_model(self):
        if self.restore_optimizer or not tf.io.gfile.exists(self._weights_path):
            return super()._load_model()
        self.model.load_weights(self._weights_path, objects_to_skip=[self.model.optimizer])
        self.model._initial_epoch = (read_backup(self.backup_dir) or {}).get("epoch", 0)

    def on_epoch_begin(self, epoch, logs=None):
        # Keras counts epochs only at epoch ends, from 0 in each process: after a resume, a mid-epoch
        # save would record epoch 0 and a second kill would restart the run at its first epoch.
        self._current_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.run_epochs:  # (the save copied each optimizer slot: 45 MiB at once for MiniLM's)
            return
        super().on_epoch_end(epoch, logs)
        if self.save_freq != "epoch":
            self._save_model()
            self._batches_seen_since_last_saving = 0  # the next save N steps after this one

    def _save_model(self):
        with saving_without_copies():
            super()._save_model()

    def remove(self) -> None:
        if tf.io.gfile.exists(self.backup_dir):
            tf.io.gfile.rmtree(self.backup_dir)


class BestWeights(keras.callbacks.ModelCheckpoint):
    """Keras's ModelCheckpoint, written without Keras's copies of the weights (saving_without_copies)."""
    def _save_model(self, *args, **kwargs):
        with saving_without_copies():
            super()._save_model(*args, **kwargs)


def make_callbacks(model_dir: str, *, early_stopping_patience: int = 0, backup: bool = True,
                   save_every_steps: int = 0) -> list:
    """Resume state, best checkpoint, early stopping, TensorBoard and CSV logs under ``model_dir``.

    The backup (weights, optimizer state, epoch) is written at each epoch end, and also every
    ``save_every_steps`` steps; it keeps the previous copy too, so a kill during a save loses nothing.
    Keras resumes at the start of the saved epoch with the saved weights and optimizer step.
    """
    callbacks = [StopOnNonFiniteLoss()]
    if early_stopping_patience:
        # min_delta: a loss that moves in the fifth decimal has not improved.
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=early_stopping_patience,
                                                       min_delta=1e-4, restore_best_weights=True))
    if not model_dir:
        return callbacks
    if backup:
        callbacks.append(Backup(os.path.join(model_dir, "backup"), save_freq=save_every_steps or "epoch"))
    callbacks += [
        BestWeights(os.path.join(model_dir, "best.weights.h5"), monitor="val_loss", save_best_only=True,
                    save_weights_only=True),
        keras.callbacks.TensorBoard(os.path.join(model_dir, "logs")),
        CSVLogger(os.path.join(model_dir, "training_log.csv"), append=True),
    ]
    return callbacks


def compile_model(model: keras.Model, optimizer, *, task: str, num_labels: int, jit_compile: bool,
                  steps_per_execution: int = 1) -> None:
    loss, metrics = heads.loss_and_metrics(task, num_labels)
    model.compile(optimizer=with_loss_scaling(model, optimizer), loss=loss, metrics=metrics, jit_compile=jit_compile,
                  steps_per_execution=steps_per_execution)
    build_optimizer_eagerly(model)  # else built inside the first trace, which then runs twice


def fit(model: keras.Model, train: tf.data.Dataset, validation: tf.data.Dataset, *, task: str, num_labels: int,
        epochs: int, learning_rate: float, steps_per_epoch: int, model_dir: str = "",
        warmup_fraction: float = 0.1, schedule: str = "linear", weight_decay: float = 0.01,
        jit_compile: bool = False, steps_per_execution: int = 1, early_stopping_patience: int = 0,
        lr_multipliers: Optional[dict] = None, unfreeze_stages: Optional[list] = None, verbose: int = 1,
        train_repeats: bool = False, save_every_steps: int = 0, extra_callbacks: tuple = (),
        gradient_accumulation_steps: int = 1, final_validation=None) -> dict:
    """Compiles and trains; returns the merged Keras history. ``extra_callbacks`` run after tfl's own
    (e.g. tfl.costs.EpochTimes). ``final_validation`` (a tfl.validation.FinalValidation) scores the last
    epoch's validation instead of Keras, ahead of the callbacks that read it.

    ``steps_per_epoch`` sizes the learning-rate schedule. It is passed on to Keras only for a repeating
    ``train`` dataset (``train_repeats``): Keras keeps one iterator across epochs when given steps, so a
    finite dataset would run dry in the second epoch.
    ``unfreeze_stages``: [(first_epoch, set_trainable_fn), ...] for gradual unfreezing. Changing
    ``trainable`` needs a recompile, so each stage compiles a fresh optimizer whose schedule continues
    where the previous one stopped (Adam moments restart for the newly trained blocks).
    A backup in ``model_dir`` resumes the run: the stages before the saved epoch only set ``trainable``,
    the stage holding it compiles and restores, as an uninterrupted run would have it at that epoch.
    """
    stages = unfreeze_stages or [(0, None)]
    total_steps = epochs * steps_per_epoch
    history: dict = {}
    callbacks = make_callbacks(model_dir, early_stopping_patience=early_stopping_patience,
                               save_every_steps=save_every_steps) + list(extra_callbacks)
    if final_validation is not None:
        callbacks.insert(1, final_validation)  # after the non-finite guard, before early stopping and checkpoints
    backup = next((c for c in callbacks if isinstance(c, Backup)), None)
    saved = read_backup(backup.backup_dir) if backup else None
    resume_stage = 0
    if saved:
        print(f"tfl: resuming from the backup in {backup.backup_dir} ({describe_backup(model_dir)})")
        resume_at = min(saved.get("epoch", 0), epochs - 1)
        resume_stage = max(i for i, (first_epoch, _) in enumerate(stages) if first_epoch <= resume_at)
    for index, (first_epoch, set_trainable) in enumerate(stages):
        if first_epoch >= epochs:
            break
        last_epoch = stages[index + 1][0] if index + 1 < len(stages) else epochs
        last_epoch = min(last_epoch, epochs)
        if set_trainable is not None:
            set_trainable()
        if index < resume_stage:
            continue  # trained before the backup was saved
        optimizer = make_optimizer(learning_rate, total_steps, warmup_fraction=warmup_fraction, schedule=schedule,
                                   weight_decay=weight_decay, lr_multipliers=lr_multipliers,
                                   gradient_accumulation_steps=gradient_accumulation_steps)
        batch_counter(optimizer).assign(first_epoch * steps_per_epoch)
        compile_model(model, optimizer, task=task, num_labels=num_labels, jit_compile=jit_compile,
                      steps_per_execution=steps_per_execution)
        if model.distribute_strategy.num_replicas_in_sync > 1:
            patch_keras_for_distribution(model, model.distribute_strategy)
        if backup:
            # Later stages go on from the model in memory. A backup saved at the end of the previous
            # stage (epoch == first_epoch, batch 0) holds that stage's optimizer: this stage starts a
            # fresh one, as an uninterrupted run does.
            backup.restore, backup.run_epochs = index == resume_stage, epochs
            backup.restore_optimizer = not (index > 0 and saved and saved.get("epoch") == first_epoch
                                            and saved.get("batch", 0) == 0)
        model._initial_epoch = None  # Keras keeps a restored epoch for every later fit() of the model
        result = model.fit(train, validation_data=validation, epochs=last_epoch, initial_epoch=first_epoch,
                           steps_per_epoch=steps_per_epoch if train_repeats else None, callbacks=callbacks, verbose=verbose,
                           shuffle=False,  # tf.data shuffles
                           validation_freq=final_validation.skip_in_keras(first_epoch, last_epoch)
                           if final_validation is not None else 1)
        for key, values in result.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        nan_guard = callbacks[0]
        if nan_guard.failed_at:
            if backup:
                backup.remove()  # it may hold the non-finite weights
            epoch, step, loss = nan_guard.failed_at
            raise NonFiniteLossError(
                f"loss became {loss} at epoch {epoch}, step {step}; likely causes: a learning rate too high "
                f"(now {learning_rate:g}), float16 without loss scaling, or bad labels/inputs (NaN, out of range). "
                "The best checkpoint so far is kept in --model_dir")
        if model.stop_training:
            break
    if backup:
        backup.remove()  # the run is complete: the same command again starts over
    return history


class _InferenceCall:
    """``model(x, training=False)``: a callable object, so that each tf.function of it is its own key in
    TensorFlow's retracing count (a lambda's key is its code object, shared by every model and call, and a
    compare run's fresh models then read as "excessive retracing")."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x):
        return self.model(x, training=False)


def predict_with_labels(model: keras.Model, dataset: tf.data.Dataset, predict_step: Optional[Callable] = None) -> tuple:
    """(outputs, labels) as numpy arrays over a batched (inputs, labels) dataset, in one pass. ``predict_step``:
    ``traced_for_any_shape(model)`` from an earlier pass, whose trace serves this one."""
    outputs, labels = [], []
    predict_step = predict_step or traced_for_any_shape(model)
    for x, y in dataset:
        outputs.append(np.asarray(predict_step(x), np.float32))
        labels.append(y.numpy())
    return np.concatenate(outputs), np.concatenate(labels)


def evaluate(model: keras.Model, dataset: tf.data.Dataset, *, task: str, num_labels: int,
             predict_step: Optional[Callable] = None) -> dict:
    outputs, labels = predict_with_labels(model, dataset, predict_step)
    return heads.evaluation_metrics(task, num_labels, outputs, labels)


def traced_for_any_shape(model: keras.Model) -> Callable:
    """model(x, training=False) as one tf.function for batches of any size and length (text batches are cut
    to their own length, buckets differ in length, a last batch is partial), traced once, on the first batch,
    with every dimension but the last relaxed. Build it once per model and reuse it across passes."""
    traced = {}

    def run(x):
        if "function" not in traced:
            signature = tf.nest.map_structure(
                lambda t: tf.TensorSpec([None] * (len(t.shape) - 1) + list(t.shape[-1:]) if len(t.shape) > 2
                                        else [None] * len(t.shape), t.dtype), x)
            traced["function"] = tf.function(_InferenceCall(model), input_signature=[signature], autograph=False)
        return traced["function"](x)

    return run


def tokenize_all(preprocess: Callable, texts) -> object:
    """All texts through the preprocessor, in batches: a dict of [N, L] arrays, or one [N, L] array."""
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(list(texts), tf.string)).batch(256)  # str or bytes
    parts = [preprocess(batch) for batch in dataset]
    if isinstance(parts[0], dict):
        return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    return np.concatenate([np.asarray(p) for p in parts])


def float32_outputs(outputs) -> list:
    return [np.asarray(tf.cast(o, tf.float32)) for o in tf.nest.flatten(outputs)]


def run_by_length(run: Callable, tokens: dict, batch_size: int) -> list:
    """[array per output of ``run``] over token arrays with a padding mask, rows in the tokens' order: run in
    batches of similar length, each cut to its longest text. Pooling over the padding mask makes the result
    independent of the padding, and short sentences skip most of it. Padding on the left (a mask that is not
    ones then zeros) is never cut."""
    mask = tokens["padding_mask"].astype(bool)
    lengths = mask.sum(axis=1)
    right_padded = bool(np.all(mask == (np.arange(mask.shape[1]) < lengths[:, None])))
    order = np.argsort(lengths, kind="stable")
    parts = []
    progress = keras.utils.Progbar(-(-len(order) // batch_size), verbose=int(sys.stdout.isatty()), unit_name="batch")
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        width = max(int(lengths[index].max()), 1) if right_padded else mask.shape[1]
        parts.append(float32_outputs(run({k: tf.constant(v[index, :width]) for k, v in tokens.items()})))
        progress.add(1)
    outputs = concatenate_outputs(parts)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return [o[inverse] for o in outputs]


def run_on_tokens(run: Callable, tokens, batch_size: int) -> list:
    """[array per output of ``run``] over ``tokenize_all``'s output: by length where there is a padding mask."""
    if isinstance(tokens, dict) and "padding_mask" in tokens:
        return run_by_length(run, tokens, batch_size)
    batches = (tokens[i:i + batch_size] for i in range(0, len(tokens), batch_size))
    return concatenate_outputs(float32_outputs(run(tf.constant(b))) for b in batches)


def concatenate_outputs(parts) -> list:
    parts = list(parts)
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def cache_features(model: keras.Model, dataset: tf.data.Dataset) -> tuple:
    """(features, labels, token lengths or None) of a batched (inputs, labels) dataset through the frozen
    ``model``, computed once, in the dataset's order. Text (inputs with a padding mask) is tokenised already and
    small: it is gathered and run by length (``run_by_length``); anything else runs batch by batch as it comes."""
    run = traced_for_any_shape(model)
    features, tokens, labels = [], [], []
    for x, y in dataset:
        labels.append(y.numpy())
        if isinstance(x, dict) and "padding_mask" in x:
            tokens.append({k: np.asarray(v) for k, v in x.items()})
        else:
            features.append(float32_outputs(run(x))[0])
    labels = np.concatenate(labels)
    if not tokens:
        return np.concatenate(features), labels, None
    width = max(t["padding_mask"].shape[1] for t in tokens)  # bucketed batches differ in width: pad (masked) to one
    tokens = {k: np.concatenate([np.pad(t[k], [(0, 0), (0, width - t[k].shape[1])]) for t in tokens])
              for k in tokens[0]}
    features = run_by_length(run, tokens, 256)[0]
    return features, labels, tokens["padding_mask"].astype(bool).sum(axis=1).astype(np.int32)
