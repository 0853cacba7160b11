"""EinsumDense projections as one 2-D matmul over every token, so the kernel's gradient is one matmul too.

Keras's TensorFlow backend turns an attention projection such as "abc,cde->abde" (batch, tokens, hidden) x
(hidden, heads, head size) into a batched matmul of a 3-D input with a 2-D kernel. Its gradient for the kernel is
then one small matmul per sequence (contracting only that sequence's tokens) followed by a sum over the batch:
on a CPU at short sentences, the sums alone were 8% of a MiniLM step's op time at 32 x 24 tokens
(benchmarks/profile_step.py, ops named ".../MatMul/Sum_1"). Flattening batch and tokens into one axis first gives
the same products in one matmul each way, contracting all 768 tokens of the batch at once.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def flat_split(equation: str):
    """(contracted axes, kernel's output axes) when ``equation`` contracts the input's trailing axes with the
    kernel's leading ones in the same order and the output is the input's leading axes then the kernel's rest
    (e.g. "abc,cde->abde", "abcd,cde->abe"), each axis named once per operand; else None."""
    inputs, _, output = equation.partition("->")
    x, _, kernel = inputs.partition(",")
    contracted = "".join(axis for axis in kernel if axis in x and axis not in output)
    n = len(contracted)
    if (not n or "." in equation or any(len(set(part)) != len(part) for part in (x, kernel, output))
            or len(set(x + kernel)) != len(set(x)) + len(kernel) - n
            or not x.endswith(contracted) or not kernel.startswith(contracted)
            or output != x[:-n] + kernel[n:]):
        return None
    return n, len(kernel) - n


def use_flat_matmuls(model: keras.Layer) -> int:
    """Make every plain ``keras.layers.EinsumDense`` inside ``model`` whose equation ``flat_split`` accepts compute
    through one 2-D matmul; patched per instance (``call`` only), so class, config, weights, LoRA (read through
    ``kernel``) and quantized calls (which bypass ``call``) stay Keras's. Returns how many were patched."""
    patched = 0
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if (type(layer) is keras.layers.EinsumDense and "call" not in vars(layer)
                and flat_split(layer.equation) is not None):
            layer.call = _flat_call(layer)
            patched += 1
    return patched


def _flat_call(layer: keras.layers.EinsumDense):
    contracted, _ = flat_split(layer.equation)

    def call(inputs, training=None):
        kernel = tf.convert_to_tensor(layer.kernel)  # the compute dtype under mixed precision, LoRA added
        depth = int(np.prod(kernel.shape[:contracted]))
        x = tf.matmul(tf.reshape(inputs, [-1, depth]), tf.reshape(kernel, [depth, -1]))
        x = tf.reshape(x, tf.concat([tf.shape(inputs)[:-contracted], kernel.shape[contracted:]], axis=0))
        if layer.bias is not None:
            x = x + tf.cast(layer.bias, x.dtype)
        return layer.activation(x) if layer.activation is not None else x

    return call
