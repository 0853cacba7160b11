"""What every data source returns: labelled examples in memory, what kind of feature they hold, and
the one error type for a user mistake in the data."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


class DataError(ValueError):
    """A user mistake in the data; the message names the problem and the fix."""


# What a feature is, so the model side can check it fits its backbone.
TEXT, IMAGE, IMAGE_FILE, TOKEN_IDS = "text", "image", "image_file", "token_ids"


def string_array(values) -> np.ndarray:
    """``values`` as an object array of Python str (UTF-8 bytes decoded), same shape. Never numpy's ``astype(str)``:
    its fixed-width unicode pads every text to the longest one, 4 bytes a character (6,046 SpamAssassin e-mails,
    88 MB on disk, took 5.6 GB)."""
    values = np.asarray(values, dtype=object)
    strings = np.empty(values.size, dtype=object)
    strings[:] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values.ravel()]
    return strings.reshape(values.shape)


@dataclasses.dataclass
class Examples:
    """Labelled examples in memory. ``features``: str array (text or image paths), uint8 images or ids."""

    features: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Examples":
        return Examples(self.features[index], self.labels[index])


@dataclasses.dataclass
class SourceData:
    """What a source yields: either one pool to split, or named splits (any may be missing)."""

    modality: str
    label_names: list
    pool: Optional[Examples] = None
    splits: dict = dataclasses.field(default_factory=dict)  # "train"/"validation"/"test" -> Examples
    # What the loader left out and why, for metrics.json: "blank_rows", "unreadable_images", "other_files".
    skipped: dict = dataclasses.field(default_factory=dict)
