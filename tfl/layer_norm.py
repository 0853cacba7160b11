"""Keras's LayerNormalization with its gradient in closed form, for bfloat16 (or float16) inputs.

Keras 3 normalises a half-precision input in float32 and lets TensorFlow differentiate the float32 ops; on a
CPU, the backward pass of a transformer's layer norms is then one of the larger costs between the matmuls
(the op profile in docs/benchmarks.md, ``benchmarks/profile_step.py``: the element-wise ``Mul`` passes). Here
the forward pass is the same normalisation, in float32 (equal to Keras's up to the rounding to the input's
dtype), and the backward pass is the textbook closed form,
dx = inv_std (g - mean(g) - x_hat mean(g x_hat)) with g = dy gamma, from the forward pass's float32 x_hat and
inverse standard deviation per position, kept in place of the input. Autodiff keeps several float32 tensors per
layer norm for the backward pass instead. docs/cpu_patches.md measures what it is worth on a whole step.

``use_closed_form_layer_norm`` swaps it in for the ``call`` of every LayerNormalization inside a built model
that normalises over the last axis with a scale and an offset (keras-hub's transformer encoders), on each
instance: the layers' class and config (what model.keras stores) stay Keras's, and a float32 input runs
Keras's own code.

    hub_backbone = keras_hub.models.Backbone.from_preset("bert_tiny_en_uncased", dtype="mixed_bfloat16")
    tfl.layer_norm.use_closed_form_layer_norm(hub_backbone)   # -> the number of layers patched
"""

import keras
import tensorflow as tf

from tfl.layer_calls import patch_layer_calls

_HALF_PRECISION = (tf.bfloat16, tf.float16)


def layer_norm_last_axis(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: float) -> tf.Tensor:
    """(x - mean) / sqrt(variance + epsilon) * gamma + beta over x's last axis, computed in float32, in x's
    dtype; for a bfloat16/float16 ``x`` with the gradient in closed form."""
    x = tf.convert_to_tensor(x)
    gamma, beta = tf.cast(gamma, tf.float32), tf.cast(beta, tf.float32)
    if x.dtype not in _HALF_PRECISION:
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + epsilon) * tf.cast(gamma, x.dtype) + tf.cast(beta, x.dtype)

    @tf.custom_gradient
    def normalise(x, gamma, beta):
        x32 = tf.cast(x, tf.float32)
        mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
        inv_std = tf.math.rsqrt(variance + epsilon)
        # Kept for the backward pass instead of x: in a tf.function TensorFlow would compute it there as soon as the
        # forward pass has x and hold it until the gradient arrives, so keeping it costs nothing more.
        x_hat = (x32 - mean) * inv_std

        def gradient(upstream):
            # A custom gradient's ops get no name scope of their own; the op profile attributes ops by name.
            with tf.name_scope("layer_norm_grad"):
                return _closed_form_gradient(upstream, x_hat, inv_std, gamma, x.dtype)

        return tf.cast(x_hat * gamma + beta, x.dtype), gradient

    return normalise(x, gamma, beta)


def _closed_form_gradient(upstream, x_hat, inv_std, gamma, dtype) -> tuple:
    """(d/dx, d/dgamma, d/dbeta) of the normalisation over the last axis, from x_hat = (x - mean) inv_std."""
    dy = tf.cast(upstream, tf.float32)
    g = dy * gamma
    dx = inv_std * (g - tf.reduce_mean(g, axis=-1, keepdims=True)
                    - x_hat * tf.reduce_mean(g * x_hat, axis=-1, keepdims=True))
    positions = list(range(len(x_hat.shape) - 1))
    return tf.cast(dx, dtype), tf.reduce_sum(dy * x_hat, axis=positions), tf.reduce_sum(dy, axis=positions)


def use_closed_form_layer_norm(model: keras.Layer) -> int:
    """Make every LayerNormalization inside ``model`` that normalises over the last axis with a scale and an
    offset compute ``layer_norm_last_axis`` on bfloat16/float16 inputs; returns how many were patched (an
    already patched layer is left alone)."""
    return patch_layer_calls(model, _normalises_last_axis, _call_in_closed_form)


def _normalises_last_axis(layer: keras.Layer) -> bool:
    # Keras's own call only: a subclass with a call of its own keeps it.
    return (isinstance(layer, keras.layers.LayerNormalization)
            and type(layer).call is keras.layers.LayerNormalization.call and layer.axis in (-1, [-1], (-1,))
            and layer.center and layer.scale and not getattr(layer, "rms_scaling", False))


def _call_in_closed_form(layer: keras.layers.LayerNormalization):
    keras_call = layer.call

    def call(inputs, *args, **kwargs):
        if args or kwargs or tf.as_dtype(inputs.dtype) not in _HALF_PRECISION:
            return keras_call(inputs, *args, **kwargs)
        outputs = layer_norm_last_axis(inputs, layer.gamma, layer.beta, layer.epsilon)
        return tf.cast(outputs, layer.compute_dtype)  # as Keras's call ends

    return call
