"""tfds data sets as in-memory examples, so they split, sample and count like every other source.

tfds splits are read once into numpy (text as strings, images as uint8 arrays). tfl is for small
labelled data sets: reading them whole gives exact sizes (the schedule's step count depends on them)
and lets ``--label_fraction``, ``--classes``, ``--seed`` and ``--max_examples`` mean what they mean
for csv or asset sources. For a large tfds set, slice it: ``--train_split=train[:10%]``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from tfl.data.examples import IMAGE, TEXT, DataError, Examples, SourceData


def load_tfds(name: str, *, train_split: str = "train", validation_split: str = "", test_split: str = "test",
              text_column: str = "text", label_column: str = "label", data_dir: Optional[str] = None) -> SourceData:
    """Reads the named tfds splits into memory; an empty ``validation_split`` is carved from train later
    (stratified, from ``--seed``), exactly as for other sources without a validation split."""
    import tensorflow_datasets as tfds

    if not train_split:
        raise DataError(f"tfds:{name} needs --train_split (e.g. train, or train[:80%])")
    wanted = {"train": train_split, "validation": validation_split, "test": test_split}
    wanted = {k: v for k, v in wanted.items() if v}
    try:
        datasets, info = tfds.load(name, split=list(wanted.values()), with_info=True, data_dir=data_dir)
    except Exception as e:  # tfds raises many types for a bad name/split or no network
        raise DataError(f"Could not load tfds:{name} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "check the name and split flags, and that the data set is downloaded")
    # The data set's own (input, label) keys where it declares them (cifar10); else the column flags (glue).
    feature_key, label_key = info.supervised_keys or (text_column, label_column)
    for key, flag in [(feature_key, "--text_column"), (label_key, "--label_column")]:
        if key not in info.features:
            raise DataError(f"tfds:{name} has no feature '{key}'; set {flag} to one of {sorted(info.features)}")
    label_feature = info.features[label_key]
    label_names = list(getattr(label_feature, "names", None) or [])
    if not label_names:
        raise DataError(f"tfds:{name}'s '{label_key}' is not a class label; tfl reads tfds classification "
                        "data sets (use csv:/jsonl: for regression or multilabel data)")
    feature = info.features[feature_key]
    modality = IMAGE if "Image" in type(feature).__name__ else TEXT
    if modality == TEXT and getattr(feature, "dtype", None) not in (tf.string, np.object_, str):
        raise DataError(f"tfds:{name}'s '{feature_key}' is neither text nor an image; set --text_column to a text "
                        f"feature of {sorted(info.features)}")
    splits = {key: _examples(ds, feature_key, label_key, modality, f"tfds:{name} {split}")
              for (key, split), ds in zip(wanted.items(), datasets)}
    return SourceData(modality, label_names, splits=splits)


def _examples(dataset, feature_key: str, label_key: str, modality: str, where: str) -> Examples:
    import tensorflow_datasets as tfds

    features, labels = [], []
    for example in tfds.as_numpy(dataset):
        feature = example[feature_key]
        features.append(feature.decode("utf-8") if modality == TEXT else feature)
        labels.append(int(example[label_key]))
    if not labels:
        raise DataError(f"{where} is empty; check the split flags (--train_split, --test_split)")
    if modality == TEXT:
        return Examples(np.array(features, dtype=object), np.array(labels, np.int64))
    shapes = {f.shape for f in features}
    if len(shapes) > 1:
        raise DataError(f"{where} has images of {len(shapes)} different sizes; tfl batches tfds images as they "
                        "are, so use a data set of one image size or an images:<folder> source")
    return Examples(np.stack(features), np.array(labels, np.int64))
