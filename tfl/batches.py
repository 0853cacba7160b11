"""A run's batches from its config: the splits preprocessed (tokenised once, cached), length-bucketed where the
backbone is a keras-hub text encoder, batched at --batch_size / --eval_batch_size, sharded across replicas.

    train, fit_validation, validation, test, bucketing = tfl.batches.batches_for(config, splits, backbone, strategy)
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from tfl import backbones as backbones_lib
from tfl import data as data_lib
from tfl import devices as devices_lib
from tfl.config import Config, ConfigError
from tfl.costs import timed


def image_file_decoder(splits: data_lib.DataSplits, backbone: backbones_lib.Backbone):
    """For image-file sources: path -> image at the backbone's input size; None otherwise."""
    if splits.modality != data_lib.IMAGE_FILE:
        return None
    return lambda path: backbones_lib.decode_image_file(path, backbone.image_size)


def batches_for(config: Config, splits: data_lib.DataSplits, backbone: backbones_lib.Backbone,
                strategy: tf.distribute.Strategy, timings: Optional[dict] = None) -> tuple:
    """(train, validation for fit, validation, test, bucketing): batched, preprocessed, sharded datasets.
    ``timings["bucket_choice"]``: the seconds spent choosing length buckets, which tokenises the training split
    (once: its cache then serves the training batches)."""
    d = config.data
    eval_batch_size = d.eval_batch_size or d.batch_size
    for flag, size in (("batch_size", d.batch_size), ("eval_batch_size", eval_batch_size)):
        if size % strategy.num_replicas_in_sync:
            raise ConfigError(f"--{flag}={size} is not divisible by the {strategy.num_replicas_in_sync} "
                             "replicas; use a multiple of the replica count")
    decode = image_file_decoder(splits, backbone)
    train, preprocessed = splits.train, {}
    with timed(timings, "bucket_choice"):
        if wants_buckets(config, backbone):
            # Tokenised once: the bucket choice's pass fills the cache that the training batches then read
            # (with --nocache, each pass tokenises again, as every epoch does).
            train = data_lib.preprocessed_text(splits.train, backbone.preprocess, cache=d.cache)
            preprocessed = {"preprocess": None, "cache": False}
        bucketing = choose_buckets(config, train, strategy.num_replicas_in_sync) if preprocessed else None
    if d.tokens_per_batch and not bucketing:
        raise ConfigError("--tokens_per_batch needs length buckets, which only a keras-hub text backbone's padding "
                          f"mask allows; --backbone={config.model.backbone} has none: drop --tokens_per_batch")
    common = dict(batch_size=d.batch_size, preprocess=backbone.preprocess, seed=config.seed,
                  shuffle_buffer=d.shuffle_buffer, cache=d.cache, modality=splits.modality, decode_image=decode,
                  bucket_boundaries=bucketing["boundaries"] if bucketing else None)
    # TPUs compile one program per shape: every batch fit() sees must be full. The final metrics are
    # computed on every example by tfl's own loop, from the unpruned validation and test batches.
    tpu = devices_lib.device_kind(strategy) == "tpu"
    train_ds = data_lib.make_batches(train, training=True, drop_remainder=tpu,
                                     bucket_batch_sizes=bucketing and bucketing.get("batch_sizes"),
                                     **{**common, **preprocessed})
    evaluation = {**common, "batch_size": eval_batch_size}
    val_ds = data_lib.make_batches(splits.validation, **evaluation)
    fit_val_ds = data_lib.make_batches(splits.validation, drop_remainder=True, **evaluation) if tpu else val_ds
    datasets = (train_ds, fit_val_ds, val_ds, data_lib.make_batches(splits.test, **evaluation))
    if strategy.num_replicas_in_sync > 1:
        datasets = tuple(devices_lib.shard_by_data(ds) for ds in datasets)
    return (*datasets, bucketing)


def wants_buckets(config: Config, backbone: backbones_lib.Backbone) -> bool:
    """--bucket_shapes applies: a keras-hub text backbone (its preprocessor gives a padding mask)."""
    return bool(config.data.bucket_shapes and backbone.modality == data_lib.TEXT
                and backbone.keras_hub_backbone is not None)


def choose_buckets(config: Config, train: tf.data.Dataset, replicas: int = 1) -> dict:
    """The length buckets (at most --bucket_shapes) chosen from the token lengths of ``train``, unbatched
    (keras-hub preprocessor outputs, label) pairs, with their padding; with --tokens_per_batch, each bucket's
    training batch size ("batch_sizes", multiples of ``replicas``)."""
    d = config.data
    lengths = data_lib.token_lengths(train.batch(1024).map(lambda x, y: x))
    boundaries = data_lib.choose_boundaries(lengths, d.bucket_shapes)
    if boundaries and boundaries[-1] < config.model.sequence_length:
        boundaries[-1] = config.model.sequence_length  # longer validation/test texts still fit
    bucketing = {"boundaries": boundaries, "shapes": len(boundaries), "mean_length": round(float(np.mean(lengths)), 2),
                 "padding_fraction": round(data_lib.padding_fraction(lengths, boundaries), 4),
                 "padding_fraction_without": round(data_lib.padding_fraction(
                     lengths, [config.model.sequence_length]), 4)}
    if d.tokens_per_batch:
        smallest = boundaries[-1] * replicas
        if d.tokens_per_batch < smallest:
            raise ConfigError(f"--tokens_per_batch={d.tokens_per_batch} holds less than one example of the longest "
                              f"length bucket ({boundaries[-1]} tokens) per replica; use at least {smallest}")
        bucketing["batch_sizes"] = data_lib.token_budget_batch_sizes(boundaries, d.tokens_per_batch, replicas)
    print(f"tfl: length buckets {bucketing}")
    return bucketing


def batch_count(dataset: tf.data.Dataset) -> int:
    """Batches per pass of a batched dataset; training never guesses an epoch's length."""
    count = int(dataset.cardinality())
    if count < 0:
        raise ValueError("The training data's size is unknown, so the learning-rate schedule cannot be sized; "
                         "build batches with tfl.make_batches from a dataset of known size")
    if count == 0:
        raise data_lib.DataError("The training split gives no full batch; use a smaller --batch_size or more data")
    return count
