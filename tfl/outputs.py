"""What a finished training run leaves under --model_dir besides metrics.json (which tfl.runner writes last):
model.keras, source_model/ (what --source_model needs) and export/<n>/ (the serving SavedModel).

    write_outputs(config, splits, backbone, model, metrics)
"""

from __future__ import annotations

import os
from typing import Optional

import keras
import tensorflow as tf

from tfl import backbones as backbones_lib
from tfl import data as data_lib
from tfl import export as export_lib
from tfl import transfer as transfer_lib
from tfl.config import Config
from tfl.costs import timed
from tfl.keras_workarounds import save_weights_through_disk


def save_model_atomically(model: keras.Model, path: str) -> None:
    """model.keras is written next to its place under a temporary name and renamed: never half a file."""
    temporary = path[: -len(".keras")] + f".tmp-{os.getpid()}.keras"
    try:
        save_weights_through_disk(model, temporary)
        tf.io.gfile.rename(temporary, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(temporary):
            tf.io.gfile.remove(temporary)


def write_outputs(config: Config, splits: data_lib.DataSplits, backbone: backbones_lib.Backbone,
                  model: keras.Model, metrics: dict, timings: Optional[dict] = None) -> None:
    """model.keras, source_model/ and export/<n>/ under ``config.model_dir`` (metrics.json comes after);
    their seconds in ``timings["saving"]`` and ``timings["export"]``."""
    m = config.model
    with timed(timings, "saving"):
        save_model_atomically(model, os.path.join(config.model_dir, "model.keras"))
        if m.transfer:
            architecture = dict(transfer_lib.load_source_model(m.source_model)["architecture"])
            if "maxlen" in architecture:  # the target's length, as its vectorizer pads to it
                architecture["maxlen"] = config.data.maxlen
        else:
            architecture = transfer_lib.source_architecture(
                backbone, num_words=config.data.num_words, maxlen=config.data.maxlen, embedding_dim=m.embedding_dim,
                lstm_units=m.lstm_units, data_source=config.data.source)
        transfer_lib.save_source_model(config.model_dir, backbone, model, splits.label_names, architecture)
    with timed(timings, "export"):
        if config.export:
            metrics["export_path"] = export_lib.export_serving_model(
                model, backbone, splits.label_names, m.task, os.path.join(config.model_dir, "export"))
