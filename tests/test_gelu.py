"""tfl.gelu: keras-hub's tanh-approximate GELU computed in float32 under bfloat16, patched per layer instance."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import bfloat16_tiny_classifier, patched_layers, tiny_bert
from tfl import gelu


def _value_and_gradient(function, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = function(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.range(1.0, 1.0 + x.shape[-1]))
    return tf.cast(y, tf.float32).numpy(), tf.cast(tape.gradient(loss, x), tf.float32).numpy()


def test_float32_gelu_is_tensorflows_gelu_computed_in_float32_and_its_gradient_is_as_exact():
    x32 = tf.random.stateless_normal([64, 48], [3, 4]) * 3
    x16 = tf.cast(x32, tf.bfloat16)
    x64 = tf.cast(x16, tf.float64)  # the reference: float64 autodiff of TensorFlow's own formula
    exact, exact_gradient = _value_and_gradient(lambda v: tf.nn.gelu(v, approximate=True), x64)
    exact_in_float32, _ = _value_and_gradient(lambda v: tf.nn.gelu(v, approximate=True), tf.cast(x16, tf.float32))
    ours, our_gradient = _value_and_gradient(gelu.gelu_tanh_in_float32, x16)
    assert gelu.gelu_tanh_in_float32(x16).dtype == tf.bfloat16
    # The value: the same function in float32 (as a sigmoid), rounded once to bfloat16: within bfloat16's
    # rounding of the float64 value, and as close to it as TensorFlow's own float32 GELU rounded to bfloat16
    rounded = tf.cast(tf.cast(exact_in_float32, tf.bfloat16), tf.float32).numpy()
    np.testing.assert_allclose(ours, exact, rtol=2 ** -8, atol=1e-6)
    assert np.abs(ours - exact).max() <= np.abs(rounded - exact).max()
    exact_rounded = tf.cast(tf.cast(tf.cast(exact, tf.float32), tf.bfloat16), tf.float32).numpy()
    assert np.mean(ours == exact_rounded) >= np.mean(rounded == exact_rounded)  # 98.5% here against 91.7%
    # The closed-form gradient: within bfloat16's rounding (2^-8 relative) of the float64 derivative
    np.testing.assert_allclose(our_gradient, exact_gradient, rtol=2 ** -8, atol=1e-6 * np.abs(exact_gradient).max())
    # computed in bfloat16 throughout (Keras as shipped), both are further off
    plain, plain_gradient = _value_and_gradient(lambda v: tf.nn.gelu(v, approximate=True), x16)
    assert np.abs(plain - exact).max() > np.abs(ours - exact).max()
    assert np.abs(plain_gradient - exact_gradient).max() > np.abs(our_gradient - exact_gradient).max()
    # float32 inputs: tf.nn.gelu itself
    np.testing.assert_array_equal(gelu.gelu_tanh_in_float32(x32).numpy(), tf.nn.gelu(x32, approximate=True).numpy())


def test_every_feed_forward_gelu_of_a_keras_hub_bert_is_patched_and_its_config_stays_keras_hubs(monkeypatch):
    backbone = tiny_bert(0.0)
    inputs = {"token_ids": tf.constant([[2, 5, 7, 9, 3, 0]] * 2), "segment_ids": tf.zeros((2, 6), tf.int32),
              "padding_mask": tf.constant([[True] * 5 + [False]] * 2)}
    before = backbone(inputs)["sequence_output"].numpy()
    configs = [la.get_config() for la in backbone._flatten_layers() if isinstance(la, keras.layers.Dense)]
    calls = []
    original = gelu.gelu_tanh_in_float32
    monkeypatch.setattr(gelu, "gelu_tanh_in_float32", lambda x: calls.append(1) or original(x))
    assert gelu.use_float32_gelu(backbone) == 2  # one feed-forward layer per transformer layer
    assert gelu.use_float32_gelu(backbone) == 0  # already patched
    after = backbone(inputs)["sequence_output"].numpy()
    assert len(calls) == 2
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)  # float32 model: the same function
    assert [la.get_config() for la in backbone._flatten_layers() if isinstance(la, keras.layers.Dense)] == configs
    intermediate = [la for la in backbone._flatten_layers() if la.name == "feedforward_intermediate_dense"]
    assert intermediate and all(la.activation.__name__ == "gelu_approximate" for la in intermediate)
    # An activation set on a patched layer afterwards is the one that runs (e.g. the exact GELU)
    for layer in intermediate:
        layer.activation = keras.activations.relu
    calls.clear()
    relu = backbone(inputs)["sequence_output"].numpy()
    assert not calls and not np.allclose(relu, before, atol=1e-4)


def test_layers_with_another_activation_are_left_alone():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(4, activation="gelu")(inputs)  # Keras's own gelu, not keras-hub's
    model = keras.Model(inputs, keras.layers.Dense(2, activation="relu")(x))
    assert gelu.use_float32_gelu(model) == 0


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="patched on a CPU only")
def test_a_tfl_bfloat16_model_on_the_cpu_trains_with_it_and_saves_keras_hubs_gelu(tmp_path, monkeypatch):
    backbone, model, x, y = bfloat16_tiny_classifier(tmp_path)
    assert len(patched_layers(backbone.keras_hub_backbone, keras.layers.Dense)) == 2  # build_backbone applied it
    dtypes = []
    original = gelu.gelu_tanh_in_float32
    monkeypatch.setattr(gelu, "gelu_tanh_in_float32", lambda v: dtypes.append(v.dtype) or original(v))
    history = model.fit(x, y, batch_size=4, epochs=3, verbose=0)
    assert dtypes and set(dtypes) == {tf.bfloat16}  # fit's traced step called it, on bfloat16 activations
    assert np.all(np.isfinite(history.history["loss"])) and history.history["loss"][-1] < history.history["loss"][0]
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path, compile=False)
    dense = [la for la in reloaded._flatten_layers() if la.name == "feedforward_intermediate_dense"]
    assert len(dense) == 2 and not [la for la in dense if "call" in vars(la)]  # keras-hub's own layer, as stored
    assert all(la.activation.__name__ == "gelu_approximate" for la in dense)
