"""keras-hub's tanh-approximate GELU computed in float32 when its input is bfloat16 (or float16).

On a CPU the feed-forward GELU of a transformer fine-tune is one of the largest costs after the matmuls (the
op profile in docs/benchmarks.md, ``benchmarks/profile_step.py``), the more so on hosts whose matmuls run on
AMX. Under mixed_bfloat16 it runs in bfloat16, and TensorFlow's CPU kernels for element-wise bfloat16 ops are
slower than for float32 (each element converted on the way in and out), so it runs cast to float32 and back,
and the gradient is the derivative in closed form, computed in float32 in the forward pass from the values it
already has and kept for the backward pass in place of the input; docs/cpu_patches.md measures what that is worth
on a whole step. It is the same function written with a sigmoid,
x sigmoid(2u) for 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3): five element-wise passes instead of
``tf.nn.gelu``'s eight, one of them a slow Pow (in a throwaway timing of one (32, 128, 1536) activation, forward
and backward, 47 ms instead of 62). The result is at least as precise; the cast back is the same rounding to
bfloat16 that the layer's output has anyway.

``use_float32_gelu`` swaps it in for keras-hub's ``gelu_approximate`` on the Dense layers of a built model, on
each instance and only while that layer's own ``call`` runs, so the layers' class and config (what model.keras
stores) stay keras-hub's and no keras-hub code is copied.

    hub_backbone = keras_hub.models.Backbone.from_preset("bert_tiny_en_uncased", dtype="mixed_bfloat16")
    tfl.gelu.use_float32_gelu(hub_backbone)   # -> the number of layers patched
"""
import math

import keras
import tensorflow as tf

from tfl.layer_calls import patch_layer_calls

_HALF_PRECISION = (tf.bfloat16, tf.float16)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # tf.nn.gelu's 0.7978845608028654
_CUBIC = 0.044715
_TWO_C = 2.0 * _SQRT_2_OVER_PI  # 2u = x (2c + 2c 0.044715 x^2)


def gelu_tanh_in_float32(x: tf.Tensor) -> tf.Tensor:
    """tf.nn.gelu(x, approximate=True), computed in float32 for a bfloat16/float16 ``x``, in x's dtype."""
    x = tf.convert_to_tensor(x)
    if x.dtype not in _HALF_PRECISION:
        return tf.nn.gelu(x, approximate=True)
    return _half_precision_gelu(x)


@tf.custom_gradient
def _half_precision_gelu(x: tf.Tensor):
    # The derivative is computed here, from the forward pass's own float32 values, and kept (in float32: in
    # bfloat16 it is off by more than bfloat16's rounding of the product) instead of x. A gradient function that
    # recomputed it from x would not save that memory in a tf.function (how Keras trains): TensorFlow runs its ops
    # that need only x as soon as the forward pass has x, and holds every layer's result until the backward pass.
    with tf.name_scope("gelu"):
        x32 = tf.cast(x, tf.float32)
        x_squared = tf.square(x32)
        s = _sigmoid_of_twice_u(x32, x_squared)
        y32 = x32 * s
        # d/dx [x sigmoid(2u)] = s + x s (1 - s) 2 du/dx with s = sigmoid(2u): no 1 + tanh(u) to cancel where u
        # is very negative
        derivative = s + y32 * (1.0 - s) * (_TWO_C + 3.0 * _TWO_C * _CUBIC * x_squared)

    def gradient(upstream):
        # A custom gradient's ops get no name scope of their own: the op profile reads this one.
        with tf.name_scope("gelu_grad"):
            return tf.cast(tf.cast(upstream, tf.float32) * derivative, x.dtype)

    return tf.cast(y32, x.dtype), gradient


def _sigmoid_of_twice_u(x32: tf.Tensor, x_squared: tf.Tensor) -> tf.Tensor:
    """sigmoid(2u) = 0.5 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), from x and x^2 in float32."""
    return tf.sigmoid(x32 * (_TWO_C + _TWO_C * _CUBIC * x_squared))


def _is_keras_hub_gelu_approximate(activation) -> bool:
    return (getattr(activation, "__name__", "") == "gelu_approximate"
            and getattr(activation, "__module__", "").startswith("keras_hub"))


def use_float32_gelu(model: keras.Layer) -> int:
    """Make every Dense / EinsumDense inside ``model`` whose activation is keras-hub's ``gelu_approximate``
    compute it with ``gelu_tanh_in_float32``; returns how many were patched (an already patched layer is left
    alone)."""
    return patch_layer_calls(model, _wants_float32_gelu, _call_with_float32_gelu)


def _wants_float32_gelu(layer: keras.Layer) -> bool:
    return (isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
            and _is_keras_hub_gelu_approximate(layer.activation))


def _call_with_float32_gelu(layer: keras.layers.Layer):
    keras_call = layer.call

    def call(*args, **kwargs):
        original = layer.activation
        if not _is_keras_hub_gelu_approximate(original):  # set to another activation since: that one runs
            return keras_call(*args, **kwargs)
        layer.activation = gelu_tanh_in_float32  # only while the layer's own call runs: its config keeps keras-hub's
        try:
            return keras_call(*args, **kwargs)
        finally:
            layer.activation = original

    return call
