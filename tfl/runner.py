"""One training run as named stages: devices -> data -> build (backbone, freeze, head, transfer) -> batches
-> fit -> evaluate -> write outputs (tfl.outputs: model, export; then metrics.json, with each stage's seconds).
Modes are dispatched in tfl.job.

    metrics = tfl.run(tfl.Config(data=tfl.DataConfig(source="asset:rotten_tomatoes"),
                                 model=tfl.ModelConfig(backbone="asset:minilm", sequence_length=64),
                                 model_dir="/tmp/rt"))
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tfl import backbones as backbones_lib
from tfl import data as data_lib
from tfl import devices as devices_lib
from tfl import freezing as freeze_lib
from tfl import heads, train
from tfl import transfer as transfer_lib
from tfl.config import ACCUMULATION_ON_ONE_DEVICE, Config, ConfigError
from tfl.batches import batch_count, batches_for, image_file_decoder
from tfl.costs import EpochTimes, peak_rss_mb, release_traced_functions, timed
from tfl.train import cache_features
from tfl.outputs import write_outputs
from tfl.storage import write_json_atomically
from tfl.validation import FinalValidation


def build_model(backbone: backbones_lib.Backbone, label_names: list, *, task: str = "classification",
                head_dropout: float = 0.1, head_hidden_units: int = 0, seed: int = 0,
                frozen_backbone: bool = False) -> keras.Model:
    """The backbone with a task head on top (see tfl.heads.attach_head).

    ``frozen_backbone``: the backbone always runs in inference mode (a linear probe's feature extractor).
    """
    return heads.attach_head(backbone.model, task=task, label_names=label_names, dropout=head_dropout,
                             hidden_units=head_hidden_units, seed=seed,
                             backbone_training=False if frozen_backbone else None)


def load_data_for(config: Config) -> data_lib.DataSplits:
    d = config.data
    return data_lib.load_data(
        d.source, seed=config.seed, task=config.model.task, text_column=d.text_column, label_column=d.label_column,
        validation_fraction=d.validation_fraction, test_fraction=d.test_fraction, max_examples=d.max_examples,
        classes=tuple(d.classes), num_words=d.num_words, maxlen=d.maxlen, train_split=d.train_split,
        validation_split=d.validation_split, test_split=d.test_split, label_fraction=d.label_fraction)


def train_texts_of(splits: data_lib.DataSplits) -> list:
    return [x.decode("utf-8") for x, _ in splits.train.as_numpy_iterator()]


def backbone_for(config: Config, splits: data_lib.DataSplits, precision: str) -> backbones_lib.Backbone:
    m, d = config.model, config.data
    if m.transfer:
        source = transfer_lib.load_source_model(m.source_model)
        texts = train_texts_of(splits) if splits.modality == data_lib.TEXT else None
        reuse = m.transfer == "parameter" and m.transfer_vocabulary == "source"
        backbone = transfer_lib.backbone_from_source(source, reuse_vocabulary=reuse, train_texts=texts,
                                                     seed=config.seed, maxlen=d.maxlen)
        backbones_lib.check_fits_data(backbone, splits.modality)
        return backbone
    train_texts = None
    input_shape = (32, 32, 3)
    if m.backbone == "lstm" and splits.modality == data_lib.TEXT:
        train_texts = train_texts_of(splits)
    if m.backbone == "small_cnn":
        first = next(iter(splits.train.take(1)))[0]
        input_shape = tuple(first.shape) if splits.modality == data_lib.IMAGE else (m.image_size or 32,) * 2 + (3,)
        if m.image_size:
            input_shape = (m.image_size, m.image_size, input_shape[-1])
    backbone = backbones_lib.build_backbone(
        m.backbone, sequence_length=m.sequence_length, image_size=m.image_size, weights=m.weights,
        pooling=m.pooling, dtype=precision, num_words=d.num_words, maxlen=d.maxlen, embedding_dim=m.embedding_dim,
        lstm_units=m.lstm_units, input_shape=input_shape, train_texts=train_texts, seed=config.seed,
        pretrained=m.pretrained, depth=m.backbone_depth)
    backbones_lib.check_fits_data(backbone, splits.modality)
    return backbone


def examples_trained(train_size: int, epochs: int, steps_per_epoch: int, batch_size: int, *,
                     capped: bool = False, drop_remainder: bool = False) -> int:
    """Examples that went through training steps: whole passes over the training split, or, with
    --max_steps_per_epoch, full batches (an upper bound: a capped epoch may end a pass with a partial batch)."""
    if capped:
        return epochs * steps_per_epoch * batch_size
    per_epoch = (train_size // batch_size) * batch_size if drop_remainder else train_size
    return epochs * per_epoch


@dataclasses.dataclass(frozen=True)
class Devices:
    """Where and how a run computes (see tfl.devices)."""
    strategy: tf.distribute.Strategy
    kind: str
    precision: str
    jit_compile: bool
    chief: bool  # this process writes the run


def train_and_evaluate(config: Config, verbose: int = 1, *, process_started: Optional[float] = None,
                       splits: Optional[data_lib.DataSplits] = None, score_test: bool = True) -> dict:
    """One training run, stage by stage; writes it under ``config.model_dir`` (on the chief). ``splits``: the
    data to use instead of loading ``config.data.source`` (self-training's pseudo-labelled training split).
    ``score_test`` False: the test split is not looked at (a search's trials); metrics["test"] is None.

    metrics["timings"] holds each stage's wall seconds; ``process_started`` (time.time() when the process
    started, as main.py records it) adds the seconds before the run as "imports" and counts "total" from there.
    """
    started = time.time()
    timings = {} if process_started is None else {"imports": round(started - process_started, 3)}
    with timed(timings, "devices"):
        devices = set_up_devices(config)
    with timed(timings, "data_load"):
        splits = splits or load_data_for(config)
    print(f"tfl: data {config.data.source}: {splits.sizes} labels={splits.label_names}")
    backbone, model, mapping = build(config, splits, devices, timings)
    with timed(timings, "batches"):
        batches = batches_for(config, splits, backbone, devices.strategy, timings)
    training = fit_model(config, splits, backbone, model, batches, devices, verbose, timings)
    with timed(timings, "evaluation"):
        metrics = evaluate_model(config, splits, backbone, model, mapping, batches, training, devices, score_test)
    writes = bool(config.model_dir) and devices.chief
    if writes and config.export:
        # Training and scoring are over: what only they use (traced functions, the input pipelines and their
        # buffers) is freed for the export's trace to reuse, which would otherwise set the run's peak memory.
        training.pop("predict_step", None)
        batches = None
        release_traced_functions(model)
    if writes:
        write_outputs(config, splits, backbone, model, metrics, timings)
    timings["total"] = round(time.time() - (started if process_started is None else process_started), 3)
    metrics.update(timings=timings, peak_rss_mb=peak_rss_mb(), wall_seconds=round(time.time() - started, 2))
    if writes:  # last: its presence means the run finished
        write_json_atomically(os.path.join(config.model_dir, "metrics.json"), metrics)
    if score_test:
        print("tfl: test " + ", ".join(f"{k}={v:.4f}" for k, v in metrics["test"].items()))
    return metrics


def set_up_devices(config: Config) -> Devices:
    """Seeds, the strategy, precision and XLA for this machine."""
    keras.utils.set_random_seed(config.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()  # identical reruns on CPU, at some speed cost
    strategy = devices_lib.make_strategy(config.train.strategy, config.train.tpu)
    kind = devices_lib.device_kind(strategy)
    devices = Devices(strategy=strategy, kind=kind, precision=devices_lib.resolve_precision(config.train.precision, kind),
                      jit_compile=devices_lib.resolve_jit_compile(config.train.jit_compile, kind,
                                                                  strategy.num_replicas_in_sync),
                      chief=devices_lib.is_chief())
    print(f"tfl: device={kind} replicas={strategy.num_replicas_in_sync} precision={devices.precision} "
          f"jit_compile={devices.jit_compile}" + ("" if devices.chief else " (not the chief: the chief writes the run)"))
    return devices


def build(config: Config, splits: data_lib.DataSplits, devices: Devices, timings: Optional[dict] = None) -> tuple:
    """(backbone, model, transfer mapping or None): backbone, freezing, head and parameter transfer,
    built under the strategy at the run's precision; their seconds in ``timings["build"]`` and
    ``timings["transfer"]``."""
    keras.config.set_dtype_policy(devices.precision)
    try:
        with devices.strategy.scope():
            with timed(timings, "build"):
                backbone = backbone_for(config, splits, devices.precision)
                f = config.freeze
                table = freeze_lib.freeze(backbone, freeze_all=f.freeze_all, freeze_blocks=f.freeze_blocks,
                                          trainable=f.trainable, lora_rank=f.lora_rank)
                model = build_model(backbone, splits.label_names, task=config.model.task,
                                    head_dropout=config.model.head_dropout,
                                    head_hidden_units=config.model.head_hidden_units, seed=config.seed,
                                    frozen_backbone=config.freeze.freeze_all)
            with timed(timings, "transfer"):
                mapping = transfer_parameters(config, backbone, model)
    finally:
        keras.config.set_dtype_policy("float32")
    print(freeze_lib.format_table(table))
    if mapping:
        print("tfl: parameter transfer from " + config.model.source_model + "\n" +
              transfer_lib.format_mapping_report(mapping))
    return backbone, model, mapping


def transfer_parameters(config: Config, backbone: backbones_lib.Backbone, model: keras.Model):
    """--transfer=parameter: the source model's weights copied into ``model``; the mapping, or None."""
    if config.model.transfer != "parameter":
        return None
    aligned = backbone.vectorizer is not None and config.model.transfer_vocabulary == "target"
    return transfer_lib.copy_weights(transfer_lib.load_source_model(config.model.source_model), model,
                                     target_vocabulary=backbone.vectorizer.get_vocabulary() if aligned else None,
                                     reuse_head=config.model.transfer_head == "source")


def fit_model(config: Config, splits: data_lib.DataSplits, backbone: backbones_lib.Backbone, model: keras.Model,
              batches: tuple, devices: Devices, verbose: int, timings: Optional[dict] = None) -> dict:
    """Trains ``model`` (a linear probe: its head, on cached features); returns the training metrics.
    ``timings``: "feature_cache" (a linear probe's backbone features), "fit" and its "epochs"."""
    t = config.train
    if t.gradient_accumulation_steps > 1 and devices.strategy.num_replicas_in_sync > 1:
        raise ConfigError(ACCUMULATION_ON_ONE_DEVICE)  # --strategy=auto chose several replicas
    train_ds, fit_val_ds, val_ds, _, bucketing = batches
    # The batches the training pipeline really yields (make_batches counts them exactly, buckets included).
    steps_per_epoch = batch_count(train_ds)
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
        train_ds = train_ds.repeat()
    stages = None
    if config.freeze.unfreeze_every_epochs:
        k = config.freeze.unfreeze_every_epochs
        stages = [(epoch, lambda n=stage: freeze_lib.set_trainable_top_blocks(backbone, n))
                  for stage, epoch in enumerate(range(0, t.epochs, k))]
    jit = devices.jit_compile
    if jit and bucketing and devices.kind == "cpu" and t.jit_compile == "auto":
        # Under XLA each batch shape is a compile: every bucket's full and partial batch, in training and in
        # evaluation, again at each unfreezing stage (a recompile).
        padded_per_example = bucketing["mean_length"] / (1.0 - bucketing["padding_fraction"])
        jit, why = devices_lib.xla_pays_off(shapes=4 * bucketing["shapes"] * len(stages or [0]),
                                            steps=t.epochs * steps_per_epoch,  # examples per step: token budgets too
                                            tokens_per_step=padded_per_example * splits.sizes["train"]
                                            / steps_per_epoch)
        print(f"tfl: jit_compile={jit}: {why}")
    multipliers = (freeze_lib.layer_lr_multipliers(backbone, config.freeze.layer_lr_decay)
                   if config.freeze.layer_lr_decay < 1.0 else None)
    fit_started = time.perf_counter()
    trained, fit_train, fit_val, feature_cache = model, train_ds, fit_val_ds, None
    with timed(timings, "feature_cache"):
        if config.freeze.freeze_all and t.cache_frozen_features and not t.max_steps_per_epoch:
            trained, fit_train, fit_val, feature_cache = cached_feature_batches(
                config, splits, backbone, model, val_ds, bucketing, steps_per_epoch, devices.kind)
    # Only the chief writes the run; other workers keep their callbacks' files in scratch space.
    writes_here = devices.chief or not config.model_dir
    work_dir = config.model_dir if writes_here else devices_lib.worker_scratch_dir(config.model_dir)
    epoch_times = EpochTimes()
    # The last epoch's validation is scored once, by tfl's evaluation (tfl.validation); not for a probe on cached
    # features (its head and the full model are scored apart), with early stopping (it may restore weights) or
    # on a TPU (fit validates on full batches only, the run's metrics on every example).
    final = (FinalValidation(val_ds, task=config.model.task, num_labels=len(splits.label_names),
                             last_epoch=t.epochs - 1)
             if trained is model and devices.kind != "tpu" and not t.early_stopping_patience else None)
    try:
        with devices.strategy.scope(), timed(timings, "fit"):
            history = train.fit(
                trained, fit_train, fit_val, task=config.model.task, num_labels=len(splits.label_names),
                epochs=t.epochs, learning_rate=t.learning_rate, steps_per_epoch=steps_per_epoch, model_dir=work_dir,
                warmup_fraction=t.warmup_fraction, schedule=t.lr_schedule, weight_decay=t.weight_decay,
                jit_compile=jit, steps_per_execution=t.steps_per_execution,
                early_stopping_patience=t.early_stopping_patience, lr_multipliers=multipliers,
                unfreeze_stages=stages, verbose=verbose, train_repeats=bool(t.max_steps_per_epoch),
                save_every_steps=t.save_every_steps, extra_callbacks=(epoch_times,),
                gradient_accumulation_steps=t.gradient_accumulation_steps, final_validation=final)
    finally:
        if work_dir != config.model_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    if timings is not None:
        timings["epochs"] = epoch_times.seconds
    fit_seconds = time.perf_counter() - fit_started
    epochs_run = len(history.get("loss", []))
    examples_seen = examples_trained(splits.sizes["train"], epochs_run, steps_per_epoch, config.data.batch_size,
                                     capped=bool(t.max_steps_per_epoch), drop_remainder=devices.kind == "tpu")
    return {"history": history, "feature_cache": feature_cache, "train_seconds": round(fit_seconds, 2),
            "final_validation": final.metrics if final is not None else None,
            "predict_step": final.predict_step if final is not None else None,
            "steps_per_epoch": steps_per_epoch, "epochs_run": epochs_run, "jit_compile": jit,
            "optimizer_steps": int(trained.optimizer.iterations.numpy()), "train_examples_seen": examples_seen,
            "train_examples_per_second": round(examples_seen / fit_seconds, 2) if fit_seconds > 0 else 0.0}


def cached_feature_batches(config: Config, splits: data_lib.DataSplits, backbone: backbones_lib.Backbone,
                           model: keras.Model, val_ds: tf.data.Dataset, bucketing, steps_per_epoch: int,
                           kind: str) -> tuple:
    """(head model, train batches, validation batches, cache summary) for a linear probe.

    The frozen backbone's outputs never change, so they are computed once and the head (sharing its
    layers with the full model) trains on the cache: epochs 2+ cost almost nothing. Features are taken
    in the data's own order and then shuffled and bucketed as the uncached path does, so the head sees
    the same batches.
    """
    started = time.perf_counter()
    in_order = data_lib.make_batches(splits.train, batch_size=256, preprocess=backbone.preprocess,
                                     modality=splits.modality, cache=False,
                                     decode_image=image_file_decoder(splits, backbone))
    print(f"tfl: computing frozen backbone features of {splits.sizes['train']:,d} training and "
          f"{splits.sizes['validation']:,d} validation examples (once)")
    train_x, train_y, train_lengths = cache_features(backbone.model, in_order)
    val_x, val_y, _ = cache_features(backbone.model, val_ds)
    head = heads.head_only_model(model, train_x.shape[1])
    train_batches = data_lib.make_feature_batches(
        train_x, train_y, batch_size=config.data.batch_size, seed=config.seed,
        shuffle_buffer=config.data.shuffle_buffer, lengths=train_lengths,
        bucket_boundaries=bucketing["boundaries"] if bucketing else None, drop_remainder=kind == "tpu",
        bucket_batch_sizes=bucketing and bucketing.get("batch_sizes"))
    if batch_count(train_batches) != steps_per_epoch:  # the schedule was sized from the uncached pipeline
        raise RuntimeError(f"cached-feature batches ({batch_count(train_batches)}) differ from the pipeline's "
                           f"({steps_per_epoch}); please report this with the config")
    val_batches = tf.data.Dataset.from_tensor_slices((val_x, val_y)).batch(config.data.batch_size,
                                                                           drop_remainder=kind == "tpu")
    feature_cache = {"examples": int(len(train_x)), "dim": int(train_x.shape[1]),
                     "seconds": round(time.perf_counter() - started, 2)}
    print(f"tfl: linear probe on cached backbone features {feature_cache}")
    return head, train_batches, val_batches, feature_cache


def evaluate_model(config: Config, splits: data_lib.DataSplits, backbone: backbones_lib.Backbone,
                   model: keras.Model, mapping, batches: tuple, training: dict, devices: Devices,
                   score_test: bool = True) -> dict:
    """The run's metrics: validation and test scores of ``model`` (test None unless ``score_test``), with what
    trained and how."""
    num_labels = len(splits.label_names)
    _, _, val_ds, test_ds, bucketing = batches
    # The validation split was scored at the last epoch's end when fit_model could (tfl.validation).
    predict_step = training.get("predict_step") or train.traced_for_any_shape(model)  # one trace for both
    validation = training.get("final_validation") or train.evaluate(model, val_ds, task=config.model.task,
                                                                   num_labels=num_labels, predict_step=predict_step)
    test = (train.evaluate(model, test_ds, task=config.model.task, num_labels=num_labels, predict_step=predict_step)
            if score_test else None)
    return {
        "validation": validation, "test": test, "history": training["history"],
        "freeze_table": freeze_lib.freeze_table(backbone),
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "total_params": int(model.count_params()),
        "data": {"source": config.data.source, "sizes": splits.sizes, "label_names": splits.label_names,
                 "label_counts": splits.label_counts, "skipped": splits.skipped, "modality": splits.modality},
        "transfer_mapping": mapping, "feature_cache": training["feature_cache"], "bucketing": bucketing,
        "precision": devices.precision, "device": devices.kind,
        "steps_per_execution": config.train.steps_per_execution, "replicas": devices.strategy.num_replicas_in_sync,
        **{k: training[k] for k in ("train_seconds", "steps_per_epoch", "epochs_run", "optimizer_steps", "jit_compile",
                                    "train_examples_seen", "train_examples_per_second")},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version(),
                     "keras_hub": _version("keras_hub")},
        "config": config.to_dict(),
    }


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"
