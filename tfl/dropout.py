"""Dropout that draws 16 random bits per element instead of one 32-bit word.

On a CPU, dropout's cost in a transformer fine-tune is its random numbers: in docs/benchmarks.md's profile of a
MiniLM step, the random draws of Keras's dropout (one Philox word per element) were the largest operation after
the matmuls. Splitting each 32-bit word into two 16-bit halves draws half as many. On a GPU in bfloat16 the same
change made a BERT-base step faster too (docs/benchmarks-gpu.md: measured on an H200 through a JAX port of this
function; this TensorFlow form has not run on a GPU). The rate is rounded to a
multiple of 1/65536 (0.1 -> 0.100006) and the kept values are scaled by the rounded rate's 1 / (1 - rate), so
the output's expectation is the input up to the scale's rounding in the input's dtype (as with Keras's dropout).

keras-hub's layers create their own ``keras.layers.Dropout`` instances; ``use_half_word_dropout`` patches the
``call`` of those in a built model, on each instance only, so their class and config (what model.keras stores)
stay Keras's and no keras-hub code is copied. A copy rebuilt from the config (``clone_model``, ``load_model``,
``copy.deepcopy``) is Keras's plain dropout again.

    hub_backbone = keras_hub.models.Backbone.from_preset("bert_tiny_en_uncased")
    tfl.dropout.use_half_word_dropout(hub_backbone)   # -> the number of Dropout layers patched
"""
import keras
import tensorflow as tf

from tfl.layer_calls import patch_layer_calls

_HALF_WORD_VALUES = 1 << 16


def half_word_dropout(inputs: tf.Tensor, rate: float, seed: tf.Tensor) -> tf.Tensor:
    """Zero each element with probability ``rate`` (rounded to 1/65536; 0 < rounded rate < 1), scale the rest;
    ``seed`` as for ``tf.random.stateless_uniform`` (shape [2], int32)."""
    threshold = round(rate * _HALF_WORD_VALUES)
    shape = tf.shape(inputs)
    size = tf.size(inputs)
    words = tf.random.stateless_uniform([(size + 1) // 2], seed, minval=None, maxval=None, dtype=tf.uint32)
    halves = tf.reshape(tf.reshape(tf.bitcast(words, tf.uint16), [-1])[:size], shape)
    # One scaled 0/1 mask: forward and backward are each one multiply (faster here than Keras's select). Unlike
    # the select, a non-finite value at a dropped position gives NaN instead of 0.
    scale = tf.cast(_HALF_WORD_VALUES / (_HALF_WORD_VALUES - threshold), inputs.dtype)
    return inputs * (tf.cast(halves >= tf.constant(threshold, tf.uint16), inputs.dtype) * scale)


def _drawable(rate: float) -> bool:
    return 0 < round(rate * _HALF_WORD_VALUES) < _HALF_WORD_VALUES


def use_half_word_dropout(model: keras.Layer) -> int:
    """Make every plain ``keras.layers.Dropout`` inside ``model`` (nested layers included) draw with
    ``half_word_dropout`` in training; returns how many were patched. Left as Keras's: a Dropout with a
    ``noise_shape`` (one mask shared along some axes), one whose rounded rate is 0 or 1, one already patched."""
    return patch_layer_calls(model, _wants_half_words, _half_word_call)


def _wants_half_words(layer: keras.Layer) -> bool:
    return type(layer) is keras.layers.Dropout and layer.noise_shape is None and _drawable(layer.rate)


def _half_word_call(layer: keras.layers.Dropout):
    keras_call = layer.call

    def call(inputs, training=False):
        if not training or not _drawable(layer.rate):  # the rate is read at each call, as Keras's call does
            return keras_call(inputs, training=training)
        # The seed generator's next state, folded into int32 as Keras's TF backend does for its own dropout.
        seed = tf.cast(tf.math.floormod(layer.seed_generator.next(), tf.int32.max - 1), tf.int32)
        return half_word_dropout(inputs, layer.rate, seed)

    return call
