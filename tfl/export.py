"""SavedModel export whose ``serving_default`` takes raw inputs, reloadable without tfl.

    path = tfl.export.export_serving_model(model, backbone, label_names, task, "/tmp/run/export")
    # in any process (text models need the tf-text ops registered first):
    import tensorflow as tf, tensorflow_text  # noqa
    serve = tf.saved_model.load(path).signatures["serving_default"]
    serve(inputs=tf.constant(["a fine film"]))["probabilities"]

Text models take a string tensor (tokenization runs inside the graph); image models take encoded
image bytes (PNG/JPEG); token-id models (keras:imdb) take int32 ids. Outputs: ``probabilities``
(one column per label; the value itself for regression), ``label`` (the top label's name) and
``label_names``. Each export is a new numbered folder (TF Serving layout), written to a temporary
folder and renamed into place, so a killed export never looks complete.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from tfl import backbones as backbones_lib
from tfl import heads
from tfl import storage
from tfl.data.sources import IMAGE, TEXT, TOKEN_IDS


class ExportError(RuntimeError):
    """The export could not be written (e.g. the disk is full); nothing partial is left behind."""


class ServingFunctions:
    """Raw inputs -> preprocessing -> model -> named outputs, as functions to trace for a SavedModel."""

    def __init__(self, model: keras.Model, backbone: backbones_lib.Backbone, label_names: list, task: str):
        self.model = model
        self._preprocess = backbone.preprocess
        self._image_size = backbone.image_size
        self._modality = backbone.modality
        self._task = task
        self._num_labels = len(label_names)
        self.label_names = tf.constant(label_names)

    def outputs(self, model_inputs):
        raw = tf.cast(self.model(model_inputs, training=False), tf.float32)
        if heads.is_binary(self._task, self._num_labels):
            raw = tf.concat([1.0 - raw, raw], axis=-1)
        batch = tf.shape(raw)[0]
        names = tf.tile(self.label_names[None, :], [batch, 1])
        top = tf.gather(self.label_names, tf.argmax(raw, axis=-1)) if self._task != "regression" \
            else tf.strings.as_string(raw[:, 0])
        return {"probabilities": raw, "label": top, "label_names": names}

    def serve_text(self, inputs):
        return self.outputs(self._preprocess(inputs))

    def serve_images(self, inputs):
        images = tf.map_fn(lambda b: backbones_lib.decode_image_bytes(b, self._image_size), inputs,
                           fn_output_signature=tf.TensorSpec(self._image_size, tf.float32))
        return self.outputs(self._preprocess(images))

    def serve_ids(self, inputs):
        return self.outputs(inputs)

    def endpoint(self) -> tuple:
        """(function, input signature) for the raw inputs of this modality."""
        if self._modality == TEXT:
            return self.serve_text, [tf.TensorSpec([None], tf.string, name="inputs")]
        if self._modality == IMAGE:
            return self.serve_images, [tf.TensorSpec([None], tf.string, name="inputs")]
        if self._modality == TOKEN_IDS:
            return self.serve_ids, [tf.TensorSpec([None, self.model.input.shape[1]], tf.int32, name="inputs")]
        raise ValueError(f"Cannot export a model for {self._modality} inputs")


def next_version_dir(export_root: str) -> str:
    """export_root/<n+1>, where n is the highest existing numbered version (TF Serving layout)."""
    tf.io.gfile.makedirs(export_root)
    versions = [int(v) for v in storage.list_folder(export_root) if v.isdigit()]
    return os.path.join(export_root, str(max(versions, default=0) + 1))


def serving_module(model: keras.Model, backbone: backbones_lib.Backbone, label_names: list, task: str) -> tf.Module:
    """The endpoint traced once (``module.serving_default``), in a tf.Module holding what it needs and nothing
    more: the weights it reads (not the optimizer's slots), the preprocessing layer's lookup tables (a
    tokenizer's vocabulary, the LSTM vectorizer's) and the endpoint itself (``loaded.serving_default``).
    The preprocessing layers tfl builds hold no weights; one that did would be stored twice (as its layer's and
    as read), and a lookup table inside the model itself would not be tracked (none is today).

    Not Keras's ExportArchive (3.15): it saves every weight twice, as the Keras variable ``track`` lists and as
    the tf.Variable the endpoint captures (keras-team/keras#23553: 177 MB for the MiniLM classifier, 90 MB
    here; a serving process that loads it holds the extra copy too), and it traces the endpoint twice."""
    function, signature = ServingFunctions(model, backbone, label_names, task).endpoint()
    serving_default = tf.function(function, input_signature=signature, autograph=False).get_concrete_function()
    module = tf.Module()
    module.weights_read = list(serving_default.variables)
    # The keras-hub layer (inside a tfl.text_prefix.PrefixPreprocessor for text): tokenizer vocabularies and tables.
    layer = getattr(backbone.preprocess, "preprocessor", backbone.preprocess)
    if isinstance(layer, keras.layers.Layer):
        module.preprocessor = layer
    module.serving_default = serving_default
    return module


def export_serving_model(model: keras.Model, backbone: backbones_lib.Backbone, label_names: list, task: str,
                         export_root: str) -> str:
    """Saves a SavedModel with a raw-input ``serving_default`` under a new version folder; returns it."""
    module = serving_module(model, backbone, label_names, task)
    final = next_version_dir(export_root)
    staging = storage.temporary_name(final)
    try:
        tf.saved_model.save(module, staging, signatures={"serving_default": module.serving_default})
        storage.move_folder(staging, final)
    except (OSError, tf.errors.OpError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:160]
        raise ExportError(f"Could not write the export {final} ({reason}); free disk space or use another "
                          "--model_dir, then rerun the same command") from e
    finally:
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
    return final
