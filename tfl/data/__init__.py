"""tf.data input pipelines: sources -> deterministic splits -> batches.

    splits = tfl.data.load_data("asset:rotten_tomatoes", seed=0)
    train = tfl.data.make_batches(splits.train, batch_size=32, preprocess=backbone.preprocess,
                                  modality=splits.modality, training=True)

``load_data`` returns unbatched ``(feature, label)`` datasets: raw strings for text, uint8 images,
image file paths, or token ids (keras:imdb). ``make_batches`` applies the model's preprocessing
(tokenizer, image resizing) and caches, shuffles, batches and prefetches.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tfl.data.bucketing import (bucket_batch_count, bucket_batches, choose_boundaries, group_by_length,
                                padding_fraction, token_budget_batch_sizes, token_lengths)
from tfl.data.examples import string_array
from tfl.data.sources import (IMAGE, IMAGE_FILE, TEXT, TOKEN_IDS, DataError, Examples, SourceData,
                              load_source)

AUTOTUNE = tf.data.AUTOTUNE

__all__ = ["DataSplits", "DataError", "load_data", "make_batches", "stratified_split", "preprocessed_text",
           "traced_batch_preprocess",
           "TEXT", "IMAGE", "IMAGE_FILE", "TOKEN_IDS"]


@dataclasses.dataclass
class DataSplits:
    """Unbatched (feature, label) datasets for train/validation/test, plus what they hold."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    label_names: list
    modality: str
    sizes: dict  # split -> exact number of examples, after every filter
    label_counts: dict = dataclasses.field(default_factory=dict)  # split -> {label name: count}
    skipped: dict = dataclasses.field(default_factory=dict)  # what the source skipped -> count (unreadable files, ...)


def stratified_split(labels: np.ndarray, fractions: tuple, seed: int, first_has_every_class: bool = False) -> list:
    """Index arrays, one per fraction (summing to <= 1; the rest goes to the last), stratified by label.

    Deterministic for a seed. Multi-hot or float labels are split without stratification.
    ``first_has_every_class``: the first part gets at least one example of each class (a 1% label
    share of a rare class would otherwise round to none).
    """
    rng = np.random.RandomState(seed)
    groups = [np.arange(len(labels))]
    if labels.ndim == 1 and labels.dtype.kind in "iu":
        groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    parts = [[] for _ in fractions]
    for group in groups:
        group = rng.permutation(group)
        start = 0
        for i, fraction in enumerate(fractions):
            end = len(group) if i == len(fractions) - 1 else start + int(round(fraction * len(group)))
            if i == 0 and first_has_every_class and len(groups) > 1:
                end = max(end, min(1, len(group)))
            parts[i].append(group[start:end])
            start = end
    # Each part in a random order, not the file's: a source sorted by label (asset:imdb) would otherwise
    # feed a shuffle buffer smaller than the split batches of mostly one class.
    return [rng.permutation(np.concatenate(p)) for p in parts]


def _cap(examples: Examples, max_examples: int, seed: int) -> Examples:
    if not max_examples or len(examples) <= max_examples:
        return examples
    keep, rest = stratified_split(examples.labels, (max_examples / len(examples), 1.0), seed)
    # Per-class rounding can miss the cap by a few: top up from the rest, or trim, to exactly max_examples.
    rng = np.random.RandomState(seed)
    if len(keep) < max_examples:
        keep = np.concatenate([keep, rng.choice(rest, max_examples - len(keep), replace=False)])
    elif len(keep) > max_examples:
        keep = rng.choice(keep, max_examples, replace=False)
    return examples.subset(np.sort(keep))


def _keep_classes(data: SourceData, classes: tuple) -> SourceData:
    """Keeps only the listed label ids and renumbers them 0..k-1 (for class-split transfer tasks)."""
    if not classes:
        return data
    bad = [c for c in classes if not 0 <= c < len(data.label_names)]
    if bad:
        raise DataError(f"--classes={list(classes)} names label id {bad[0]}, but the data has labels "
                        f"0..{len(data.label_names) - 1}")
    remap = np.full(len(data.label_names), -1)
    remap[list(classes)] = np.arange(len(classes))

    def select(ex: Optional[Examples]) -> Optional[Examples]:
        if ex is None:
            return None
        kept = ex.subset(np.flatnonzero(np.isin(ex.labels, classes)))
        return Examples(kept.features, remap[kept.labels].astype(np.int64))

    return SourceData(data.modality, [data.label_names[c] for c in classes], pool=select(data.pool),
                      splits={k: select(v) for k, v in data.splits.items()})


def _to_dataset(examples: Examples, modality: str) -> tf.data.Dataset:
    features = examples.features
    if modality in (TEXT, IMAGE_FILE):
        features = string_array(features)
    return tf.data.Dataset.from_tensor_slices((features, examples.labels))


def _counts(examples: Examples, label_names: list) -> dict:
    if examples.labels.ndim != 1 or examples.labels.dtype.kind not in "iu":
        return {}
    values, counts = np.unique(examples.labels, return_counts=True)
    return {label_names[v]: int(c) for v, c in zip(values, counts)}


def load_data(source: str, *, seed: int = 0, task: str = "classification", text_column: str = "text",
              label_column: str = "label", validation_fraction: float = 0.1, test_fraction: float = 0.1,
              max_examples: int = 0, classes: tuple = (), num_words: int = 10000, maxlen: int = 500,
              train_split: str = "train", validation_split: str = "", test_split: str = "test",
              data_dir: Optional[str] = None, label_fraction: float = 1.0) -> DataSplits:
    """Loads ``source`` and splits it deterministically from ``seed`` (stratified by label).

    Sources with their own train/test splits keep them; a missing validation (or test) split is
    carved from train. ``max_examples`` caps the pool before splitting, or each given split.
    ``label_fraction`` keeps a stratified share of the training split (validation and test stay whole,
    so runs at different fractions are scored on the same examples).
    """
    raw = load_source(source, text_column=text_column, label_column=label_column, task=task, num_words=num_words,
                      maxlen=maxlen, train_split=train_split, validation_split=validation_split,
                      test_split=test_split, data_dir=data_dir)
    data = _keep_classes(raw, classes)
    if data.pool is not None:
        pool = _cap(data.pool, max_examples, seed)
        train_fraction = 1.0 - validation_fraction - test_fraction
        parts = stratified_split(pool.labels, (train_fraction, validation_fraction, test_fraction), seed)
        split = dict(zip(("train", "validation", "test"), (pool.subset(p) for p in parts)))
    else:
        split = {k: _cap(v, max_examples, seed) for k, v in data.splits.items()}
        if "test" not in split:
            keep, held_out = stratified_split(split["train"].labels, (1.0 - test_fraction, test_fraction), seed)
            split["train"], split["test"] = split["train"].subset(keep), split["train"].subset(held_out)
        if "validation" not in split:
            share = validation_fraction / (1.0 - test_fraction)
            train_index, val_index = stratified_split(split["train"].labels, (1.0 - share, share), seed)
            split["train"], split["validation"] = split["train"].subset(train_index), split["train"].subset(val_index)
    if label_fraction < 1.0:
        keep, _ = stratified_split(split["train"].labels, (label_fraction, 1.0 - label_fraction), seed,
                                   first_has_every_class=True)
        if len(keep) == 0:
            raise DataError(f"--label_fraction={label_fraction} leaves no training examples; use a larger share")
        split["train"] = split["train"].subset(keep)
    for name in ("validation", "test"):
        if len(split[name]) == 0:
            raise DataError(f"The {name} split of {source} is empty (each class's share rounds to 0 examples); "
                            "raise --max_examples or --validation_fraction/--test_fraction")
    if task == "classification":
        _check_classification_labels(split, data.label_names)
    return DataSplits(
        train=_to_dataset(split["train"], data.modality),
        validation=_to_dataset(split["validation"], data.modality),
        test=_to_dataset(split["test"], data.modality),
        label_names=list(data.label_names), modality=data.modality,
        sizes={k: len(split[k]) for k in ("train", "validation", "test")},
        label_counts={k: _counts(v, data.label_names) for k, v in split.items()},
        skipped=dict(getattr(raw, "skipped", None) or {}))


def _check_classification_labels(split: dict, label_names: list) -> None:
    if len(label_names) < 2:
        raise DataError(f"The label column has a single class ({label_names}); classification needs at "
                        "least two. Check --label_column or use --task=regression")
    train_labels = set(np.unique(split["train"].labels).tolist())
    for name in ("validation", "test"):
        unseen = set(np.unique(split[name].labels).tolist()) - train_labels
        if unseen:
            raise DataError(f"The {name} split has labels that train never saw: "
                            f"{sorted(label_names[u] for u in unseen)}; add training examples of them "
                            "or drop them (--classes)")


def make_batches(dataset: tf.data.Dataset, *, batch_size: int, preprocess: Optional[Callable] = None,
                 training: bool = False, seed: int = 0, shuffle_buffer: int = 10000, cache: bool = True,
                 modality: str = TEXT, decode_image: Optional[Callable] = None,
                 drop_remainder: bool = False, bucket_boundaries: Optional[list] = None,
                 bucket_batch_sizes: Optional[list] = None) -> tf.data.Dataset:
    """Preprocesses, caches, shuffles, batches and prefetches an unbatched (feature, label) dataset.

    ``preprocess`` maps a *batch* of features to model inputs (a keras-hub preprocessor, an image
    resizer). For text, preprocessing is deterministic and cheap to store, so it runs once and is
    cached; for images, the small raw images are cached and resizing runs per batch.
    ``decode_image`` maps one image path to a decoded image (image-file sources).
    ``bucket_boundaries`` (tokenized text with a padding mask): batch examples of similar length and
    pad each batch only to its bucket's boundary (see tfl.data.bucketing); ``bucket_batch_sizes``, one per
    bucket, replace ``batch_size`` there (``token_budget_batch_sizes``: batches of about equal tokens).

    The result knows its exact number of batches (``cardinality()``), so an epoch is never of unknown
    length and a learning-rate schedule can be sized from it; the input must have a known size.
    """
    size = int(dataset.cardinality())
    if size < 0:
        raise DataError("make_batches needs a dataset of known size (e.g. from_tensor_slices, or "
                        "dataset.apply(tf.data.experimental.assert_cardinality(n)))")
    with_model_inputs = lambda x, y: (preprocess(x), y) if preprocess else (x, y)  # noqa: E731
    if modality in (TEXT, TOKEN_IDS):
        dataset = preprocessed_text(dataset, preprocess, cache=cache)
        sizes = bucket_batch_sizes or batch_size
        if bucket_batch_sizes and len(bucket_batch_sizes) != len(bucket_boundaries or ()):
            raise ValueError(f"bucket_batch_sizes needs one size per bucket boundary: got {len(bucket_batch_sizes)} "
                             f"for {len(bucket_boundaries or ())}")
        if bucket_boundaries:  # counted before the shuffle: a pass over the shuffled data would use up its first order
            batches = bucket_batch_count(token_lengths(dataset.batch(1024).map(lambda x, y: x)), bucket_boundaries,
                                         sizes, drop_remainder)
        if training:
            dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if bucket_boundaries:
            dataset = bucket_batches(dataset, bucket_boundaries, sizes, drop_remainder)
            return _settled(dataset.apply(tf.data.experimental.assert_cardinality(batches)).prefetch(AUTOTUNE),
                            training)
        return _settled(dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(AUTOTUNE), training)
    if modality == IMAGE_FILE:
        if decode_image is None:
            raise ValueError("image-file datasets need decode_image")
        # The source decoded every file once when it loaded them (unreadable ones are skipped and
        # counted there), so no file fails here and the size stays exact.
        dataset = dataset.map(lambda path, y: (decode_image(path), y), num_parallel_calls=AUTOTUNE)
    if cache:
        dataset = dataset.cache()
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return _settled(dataset.map(with_model_inputs, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE), training)


def preprocessed_text(dataset: tf.data.Dataset, preprocess: Optional[Callable], *, cache: bool = True) -> tf.data.Dataset:
    """(model inputs, label) per example of an unbatched (text or token ids, label) dataset of known size,
    preprocessed in batches (much faster than per example) and cached when ``cache``: the first full pass
    fills the cache and every dataset built on the result reads it. ``preprocess`` None: as it is."""
    size = int(dataset.cardinality())
    if preprocess is not None:
        traced = traced_batch_preprocess(preprocess)
        # The map's function keeps the preprocessor (and its lookup tables) alive as long as the dataset: the
        # shared trace holds it weakly.
        dataset = dataset.batch(256).map(lambda x, y, _keep=preprocess: (traced(x), y),
                                         num_parallel_calls=AUTOTUNE).unbatch()
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(size))  # unbatch loses the size
    return dataset.cache() if cache else dataset


_TRACED_PREPROCESS = weakref.WeakKeyDictionary()


def traced_batch_preprocess(preprocess: Callable) -> Callable:
    """``preprocess`` (a keras-hub preprocessor, a TextVectorization) as one tf.function per object, shared by
    every pipeline that maps it: tf.data traces a map's function each time a pipeline is built (a second or
    so for a keras-hub preprocessor), and a run builds one per split. The function holds the preprocessor
    weakly, so the cache does not keep it alive; each pipeline does (``preprocessed_text``). Autograph converts
    it as tf.data's own map would."""
    try:
        traced = _TRACED_PREPROCESS.get(preprocess)
    except TypeError:  # not weakly referable: each pipeline traces it, as tf.data does
        return preprocess
    if traced is not None:
        return traced
    reference = weakref.ref(preprocess)
    traced = tf.function(_WeaklyCalled(reference), reduce_retracing=True)
    _TRACED_PREPROCESS[preprocess] = traced
    return traced


class _WeaklyCalled:
    """Calls the object behind a weak reference; a class, not a lambda, so that each tf.function of it has its
    own retracing count (a lambda's is its code object's, shared by every preprocessor)."""

    def __init__(self, reference):
        self.reference = reference

    def __call__(self, batch):
        return self.reference()(batch)


def _settled(dataset: tf.data.Dataset, training: bool) -> tf.data.Dataset:
    """Training batches without tf.data's autotuning thread (AUTOTUNE then keeps its starting values: the core
    count for parallel maps). Keras's fit reads exactly the epoch's batch count and never the end of the data;
    destroying that iterator at the end of fit waited for the autotuning thread (gdb: joining it in its timed
    wait) for 15-28 s in each of 3 one-epoch MiniLM runs on Rotten Tomatoes, against none without it, at the
    same epoch time. Evaluation datasets, read to their end, keep autotuning."""
    if not training:
        return dataset
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def make_feature_batches(features: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int = 0,
                         shuffle_buffer: int = 10000, lengths: Optional[np.ndarray] = None,
                         bucket_boundaries: Optional[list] = None, drop_remainder: bool = False,
                         bucket_batch_sizes: Optional[list] = None) -> tf.data.Dataset:
    """Training batches of cached backbone features, in the order ``make_batches`` gives the raw examples
    they came from: the same shuffle and, with ``bucket_boundaries``, the same length buckets (``lengths``:
    each example's token count), so a probe on cached features sees exactly the batches it would see uncached.
    """
    if not bucket_boundaries:
        return make_batches(tf.data.Dataset.from_tensor_slices((features, labels)), batch_size=batch_size,
                            training=True, seed=seed, shuffle_buffer=shuffle_buffer, drop_remainder=drop_remainder)
    dataset = tf.data.Dataset.from_tensor_slices(((features, lengths), labels)).cache()
    dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    sizes = bucket_batch_sizes or batch_size
    batches = group_by_length(dataset, bucket_boundaries, sizes, drop_remainder, lambda x, _y: x[1])
    count = bucket_batch_count(lengths, bucket_boundaries, sizes, drop_remainder)
    return (batches.map(lambda x, y: (x[0], y)).apply(tf.data.experimental.assert_cardinality(count))
            .prefetch(AUTOTUNE))
