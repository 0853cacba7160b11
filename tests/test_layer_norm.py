"""tfl.layer_norm: Keras's LayerNormalization with a closed-form gradient for half-precision inputs, per instance."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import bfloat16_tiny_classifier, patched_layers, tiny_bert
from tfl import layer_norm


def _values_and_gradients(function, x, gamma, beta):
    upstream = tf.random.stateless_normal(x.shape, [9, 9], dtype=tf.float64)  # a different weight per element
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        y = function(x, gamma, beta)
        loss = tf.reduce_sum(tf.cast(y, tf.float64) * upstream)
    return [tf.cast(v, tf.float64).numpy() for v in [y] + tape.gradient(loss, [x, gamma, beta])]


# (input dtype, input scale, epsilon): keras-hub's BERT epsilon on activations of unit scale, and an epsilon that
# matters (comparable to the variance), which a formula that dropped it somewhere would fail
CASES = [(tf.bfloat16, 3.0, 1e-12), (tf.float16, 3.0, 1e-12), (tf.bfloat16, 0.3, 0.05)]


@pytest.mark.parametrize("dtype, scale, epsilon", CASES)
def test_the_closed_form_gradient_is_kerass_layer_norm_gradient(dtype, scale, epsilon):
    x32 = tf.random.stateless_normal([4, 6, 48], [1, 2]) * scale + scale / 3
    gamma = tf.random.stateless_normal([48], [3, 4]) * 0.2 + 1
    beta = tf.random.stateless_normal([48], [5, 6]) * 0.2
    x16 = tf.cast(x32, dtype)

    def keras_layer_norm(x, g, b):
        return keras.ops.layer_normalization(x, g, b, epsilon=epsilon)

    # the reference: Keras's own layer norm, differentiated by TensorFlow in float64, on the same rounded values
    exact = _values_and_gradients(keras_layer_norm, tf.cast(x16, tf.float64), tf.cast(gamma, tf.float64),
                                  tf.cast(beta, tf.float64))
    ours = _values_and_gradients(lambda x, g, b: layer_norm.layer_norm_last_axis(x, g, b, epsilon), x16, gamma, beta)
    assert layer_norm.layer_norm_last_axis(x16, gamma, beta, epsilon).dtype == dtype
    keras_ours = _values_and_gradients(keras_layer_norm, x16, gamma, beta)  # Keras as shipped, same input
    for name, mine, reference, keras_value in zip(["value", "d/dx", "d/dgamma", "d/dbeta"], ours, exact, keras_ours):
        scale = np.abs(reference).max()
        assert scale > 0.1, name  # a gradient that vanished would pass any tolerance
        # within bfloat16's rounding (the value and d/dx are bfloat16, and the gradient arriving at the
        # bfloat16 output is rounded to bfloat16 before the weights' float32 sums)
        np.testing.assert_allclose(mine, reference, rtol=2 ** -8, atol=2 ** -8 * scale, err_msg=name)
        if name in ("d/dgamma", "d/dbeta"):  # the same rounded upstream and float32 sums as Keras's autodiff
            np.testing.assert_allclose(mine, keras_value, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    # Keras's float32 autodiff of the same bfloat16 input rounds d/dx no closer than the closed form does
    assert np.abs(ours[1] - exact[1]).max() <= np.abs(keras_ours[1] - exact[1]).max() * 1.01
    # float32 inputs: the same function, differentiated by TensorFlow
    np.testing.assert_allclose(layer_norm.layer_norm_last_axis(x32, gamma, beta, epsilon).numpy(),
                               keras_layer_norm(x32, gamma, beta).numpy(), atol=1e-5)


def test_every_layer_norm_of_a_keras_hub_bert_is_patched_and_its_config_stays_kerass(monkeypatch):
    backbone = tiny_bert(0.0)
    inputs = {"token_ids": tf.constant([[2, 5, 7, 9, 3, 0]] * 2), "segment_ids": tf.zeros((2, 6), tf.int32),
              "padding_mask": tf.constant([[True] * 5 + [False]] * 2)}
    norms = [la for la in backbone._flatten_layers() if isinstance(la, keras.layers.LayerNormalization)]
    configs = [la.get_config() for la in norms]
    calls = []
    original = layer_norm.layer_norm_last_axis
    monkeypatch.setattr(layer_norm, "layer_norm_last_axis", lambda *a: calls.append(1) or original(*a))
    assert layer_norm.use_closed_form_layer_norm(backbone) == len(norms) == 5  # embeddings' + 2 per layer
    assert layer_norm.use_closed_form_layer_norm(backbone) == 0  # already patched
    backbone(inputs)
    assert not calls  # a float32 model runs Keras's own layer norm
    x = tf.cast(tf.random.stateless_normal([2, 6, norms[0].gamma.shape[0]], [7, 8]), tf.bfloat16)
    y = norms[0](x)
    assert calls == [1] and y.dtype == tf.float32  # the layer's own compute dtype, as Keras's call returns
    expected = keras.ops.layer_normalization(x, norms[0].gamma, norms[0].beta, epsilon=norms[0].epsilon)
    # equal up to one bfloat16 rounding: the float32 arithmetic is ordered differently from Keras's
    np.testing.assert_allclose(y.numpy(), tf.cast(expected, tf.float32).numpy(), rtol=2 ** -8, atol=2 ** -8)
    assert [la.get_config() for la in norms] == configs


class _OwnLayerNorm(keras.layers.LayerNormalization):
    def call(self, inputs):
        return super().call(inputs) * 2.0


def test_layer_norms_over_other_axes_or_without_an_offset_or_with_their_own_call_are_left_alone():
    inputs = keras.Input((3, 4))
    x = keras.layers.LayerNormalization(axis=1)(inputs)
    x = keras.layers.LayerNormalization(axis=2)(x)  # the last axis, but not written as -1: left as Keras's
    x = keras.layers.LayerNormalization(center=False)(x)
    x = keras.layers.LayerNormalization(scale=False)(x)
    x = _OwnLayerNorm()(x)
    with pytest.warns(UserWarning, match="rms_scaling"):  # deprecated by Keras, still a layer one may meet
        x = keras.layers.LayerNormalization(rms_scaling=True)(x)
    model = keras.Model(inputs, keras.layers.LayerNormalization()(x))
    assert layer_norm.use_closed_form_layer_norm(model) == 1  # the last one only


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="patched on a CPU only")
def test_a_tfl_bfloat16_model_on_the_cpu_trains_with_it_and_saves_kerass_layer_norm(tmp_path, monkeypatch):
    from test_export import reload_in_fresh_process
    from tfl.export import export_serving_model

    backbone, model, x, y = bfloat16_tiny_classifier(tmp_path)
    patched = patched_layers(backbone.keras_hub_backbone, keras.layers.LayerNormalization)
    assert len(patched) == 5  # build_backbone applied it on the CPU
    dtypes = []
    original = layer_norm.layer_norm_last_axis
    monkeypatch.setattr(layer_norm, "layer_norm_last_axis", lambda v, *a: dtypes.append(v.dtype) or original(v, *a))
    gamma = patched[1].gamma.numpy().copy()
    history = model.fit(x, y, batch_size=4, epochs=3, verbose=0)
    assert dtypes and set(dtypes) == {tf.bfloat16}  # fit's traced step called it, on bfloat16 activations
    assert np.all(np.isfinite(history.history["loss"])) and history.history["loss"][-1] < history.history["loss"][0]
    assert not np.allclose(patched[1].gamma.numpy(), gamma)  # its scale trained through the closed-form gradient
    expected = model.predict(x, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path, compile=False)
    norms = [la for la in reloaded._flatten_layers() if isinstance(la, keras.layers.LayerNormalization)]
    assert len(norms) == 5 and not [la for la in norms if "call" in vars(la)]  # Keras's own layer, as stored
    # Keras's layer norm and the patched one differ by bfloat16 roundings only
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), expected, atol=0.02)
    # the SavedModel traces the patched call (custom gradient and all); it serves the same in a process without tfl
    served = reload_in_fresh_process(
        export_serving_model(model, backbone, ["awful", "great"], "classification", str(tmp_path / "export")),
        "text", ["a great film", "an awful plot"])
    # (the model's one sigmoid unit is the served second class; bfloat16 results move by a few units of its last
    # place with the batch's size, 2 served against predict's 8)
    np.testing.assert_allclose(np.array(served["probabilities"])[:, 1], expected[:2, 0], atol=2 ** -7)
