"""One run, start to end: data -> backbone -> freeze -> head -> train -> evaluate -> export -> metrics.json.

    metrics = tfl.run(tfl.Config(data=tfl.DataConfig(source="asset:rotten_tomatoes"),
                                 model=tfl.ModelConfig(backbone="asset:minilm", sequence_length=64),
                                 model_dir="/tmp/rt"))
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from tfl import backbones as backbones_lib
from tfl import data as data_lib
from tfl import export as export_lib
from tfl import freeze as freeze_lib
from tfl import heads, train
from tfl.config import Config


def write_json_atomically(path: str, payload: dict) -> None:
    """Writes to a temporary file in the same folder and renames it, so readers never see half a file."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
    os.replace(f.name, path)


def build_model(backbone: backbones_lib.Backbone, label_names: list, *, task: str = "classification",
                head_dropout: float = 0.1, head_hidden_units: int = 0, seed: int = 0) -> keras.Model:
    """The backbone with a task head on top (see tfl.heads.attach_head)."""
    return heads.attach_head(backbone.model, task=task, label_names=label_names, dropout=head_dropout,
                             hidden_units=head_hidden_units, seed=seed)


def load_data_for(config: Config) -> data_lib.DataSplits:
    d = config.data
    return data_lib.load_data(
        d.source, seed=config.seed, task=config.model.task, text_column=d.text_column, label_column=d.label_column,
        validation_fraction=d.validation_fraction, test_fraction=d.test_fraction, max_examples=d.max_examples,
        classes=tuple(d.classes), num_words=d.num_words, maxlen=d.maxlen, train_split=d.train_split,
        validation_split=d.validation_split, test_split=d.test_split)


def backbone_for(config: Config, splits: data_lib.DataSplits, precision: str) -> backbones_lib.Backbone:
    m, d = config.model, config.data
    train_texts = None
    input_shape = (32, 32, 3)
    if m.backbone == "lstm" and splits.modality == data_lib.TEXT:
        train_texts = [x.decode("utf-8") for x, _ in splits.train.as_numpy_iterator()]
    if m.backbone == "small_cnn":
        first = next(iter(splits.train.take(1)))[0]
        input_shape = tuple(first.shape) if splits.modality == data_lib.IMAGE else (m.image_size or 32,) * 2 + (3,)
        if m.image_size:
            input_shape = (m.image_size, m.image_size, input_shape[-1])
    backbone = backbones_lib.build_backbone(
        m.backbone, sequence_length=m.sequence_length, image_size=m.image_size, weights=m.weights,
        pooling=m.pooling, dtype=precision, num_words=d.num_words, maxlen=d.maxlen, embedding_dim=m.embedding_dim,
        lstm_units=m.lstm_units, input_shape=input_shape, train_texts=train_texts, seed=config.seed)
    backbones_lib.check_fits_data(backbone, splits.modality)
    return backbone


def batches_for(config: Config, splits: data_lib.DataSplits, backbone: backbones_lib.Backbone,
                strategy: tf.distribute.Strategy) -> tuple:
    d = config.data
    if d.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"--batch_size={d.batch_size} is not divisible by the {strategy.num_replicas_in_sync} "
                         "replicas; use a multiple of the replica count")
    decode = None
    if splits.modality == data_lib.IMAGE_FILE:
        decode = lambda path: backbones_lib.decode_image_file(path, backbone.image_size)  # noqa: E731
    common = dict(batch_size=d.batch_size, preprocess=backbone.preprocess, seed=config.seed,
                  shuffle_buffer=d.shuffle_buffer, cache=d.cache, modality=splits.modality, decode_image=decode)
    train_ds = data_lib.make_batches(splits.train, training=True, **common)
    return (train_ds, data_lib.make_batches(splits.validation, **common),
            data_lib.make_batches(splits.test, **common))


def run(config: Config, verbose: int = 1) -> dict:
    """Trains, evaluates and exports as ``config`` says; writes everything under ``config.model_dir``."""
    config.validate()
    started = time.time()
    keras.utils.set_random_seed(config.seed)
    strategy = train.make_strategy(config.train.strategy, config.train.tpu)
    kind = train.device_kind(strategy)
    precision = train.resolve_precision(config.train.precision, kind)
    jit_compile = train.resolve_jit_compile(config.train.jit_compile, kind)
    print(f"tfl: device={kind} replicas={strategy.num_replicas_in_sync} precision={precision} "
          f"jit_compile={jit_compile}")

    splits = load_data_for(config)
    print(f"tfl: data {config.data.source}: {splits.sizes} labels={splits.label_names}")
    keras.config.set_dtype_policy(precision)
    try:
        with strategy.scope():
            backbone = backbone_for(config, splits, precision)
            f = config.freeze
            table = freeze_lib.freeze(backbone, freeze_all=f.freeze_all, freeze_blocks=f.freeze_blocks,
                                      trainable=f.trainable, lora_rank=f.lora_rank)
            model = build_model(backbone, splits.label_names, task=config.model.task,
                                head_dropout=config.model.head_dropout,
                                head_hidden_units=config.model.head_hidden_units, seed=config.seed)
    finally:
        keras.config.set_dtype_policy("float32")
    print(freeze_lib.format_table(table))
    train_ds, val_ds, test_ds = batches_for(config, splits, backbone, strategy)

    t = config.train
    train_size = splits.sizes.get("train") or int(train_ds.cardinality()) * config.data.batch_size
    steps_per_epoch = max(1, math.ceil(train_size / config.data.batch_size))
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
        train_ds = train_ds.repeat()
    stages = None
    if config.freeze.unfreeze_every_epochs:
        k = config.freeze.unfreeze_every_epochs
        stages = [(epoch, lambda n=stage: freeze_lib.set_trainable_top_blocks(backbone, n))
                  for stage, epoch in enumerate(range(0, t.epochs, k))]
    multipliers = (freeze_lib.layer_lr_multipliers(backbone, config.freeze.layer_lr_decay)
                   if config.freeze.layer_lr_decay < 1.0 else None)
    num_labels = len(splits.label_names)
    fit_started = time.perf_counter()
    with strategy.scope():
        history = train.fit(model, train_ds, val_ds, task=config.model.task, num_labels=num_labels, epochs=t.epochs,
                            learning_rate=t.learning_rate, steps_per_epoch=steps_per_epoch,
                            model_dir=config.model_dir, warmup_fraction=t.warmup_fraction, schedule=t.lr_schedule,
                            weight_decay=t.weight_decay, jit_compile=jit_compile,
                            steps_per_execution=t.steps_per_execution,
                            early_stopping_patience=t.early_stopping_patience, lr_multipliers=multipliers,
                            unfreeze_stages=stages, verbose=verbose, train_repeats=bool(t.max_steps_per_epoch))
    fit_seconds = time.perf_counter() - fit_started
    epochs_run = len(history.get("loss", [])) or 1

    validation = train.evaluate(model, val_ds, task=config.model.task, num_labels=num_labels)
    test = train.evaluate(model, test_ds, task=config.model.task, num_labels=num_labels)
    metrics = {
        "validation": validation, "test": test, "history": history,
        "freeze_table": freeze_lib.freeze_table(backbone),
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "total_params": int(model.count_params()),
        "data": {"source": config.data.source, "sizes": splits.sizes, "label_names": splits.label_names,
                 "label_counts": splits.label_counts},
        "precision": precision, "jit_compile": jit_compile, "device": kind,
        "replicas": strategy.num_replicas_in_sync,
        "train_seconds": round(fit_seconds, 2),
        "train_examples_per_second": round(epochs_run * steps_per_epoch * config.data.batch_size / fit_seconds, 2),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version(),
                     "keras_hub": _version("keras_hub")},
        "config": config.to_dict(),
    }
    if config.model_dir:
        model.save(os.path.join(config.model_dir, "model.keras"))
        if config.export:
            metrics["export_path"] = export_lib.export_serving_model(
                model, backbone, splits.label_names, config.model.task, os.path.join(config.model_dir, "export"))
        metrics["wall_seconds"] = round(time.time() - started, 2)
        write_json_atomically(os.path.join(config.model_dir, "metrics.json"), metrics)
    metrics["wall_seconds"] = round(time.time() - started, 2)
    print("tfl: test " + ", ".join(f"{k}={v:.4f}" for k, v in test.items()))
    return metrics


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"
