import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import save_tiny_bert_preset
from tfl import flat_matmul


def test_flat_split_accepts_projections_that_contract_trailing_input_axes_only():
    assert flat_matmul.flat_split("abc,cde->abde") == (1, 2)  # query, key, value
    assert flat_matmul.flat_split("abcd,cde->abe") == (2, 1)  # attention output
    assert flat_matmul.flat_split("ab,bc->ac") == (1, 1)
    for equation in ("abc,dce->abde",  # the contracted axis is not the kernel's first
                     "abc,cd->adb",  # the output is reordered
                     "abcd,abde->abce",  # a batch axis shared with the kernel
                     "abc,dc->abd", "...b,bc->...c", "abc,de->abde",
                     "abb,bbc->ac", "acc,ccd->ad", "abc,cde->abdd"):  # an axis twice: a diagonal, not a sum
        assert flat_matmul.flat_split(equation) is None, equation


@pytest.mark.parametrize("equation, output_shape, input_shape, bias_axes", [
    ("abc,cde->abde", (None, 3, 4), (2, 5, 6), "de"),
    ("abcd,cde->abe", (None, 7), (2, 5, 3, 4), "e"),
    ("abc,cde->abde", (None, 3, 4), (2, 5, 6), None),
])
@pytest.mark.parametrize("lora", [False, True])
def test_a_patched_einsum_dense_gives_kerass_outputs_and_gradients(equation, output_shape, input_shape, bias_axes,
                                                                   lora):
    keras.utils.set_random_seed(0)
    layer = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes, activation="gelu")
    x = tf.random.stateless_normal(input_shape, seed=[1, 2])
    layer(x)
    if lora:
        layer.enable_lora(2)
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):  # lora_b starts at zero: make it count
            variable.assign(tf.random.stateless_normal(variable.shape, seed=[3, 4]))
    results = []
    for patched in (False, True):
        if patched:
            assert flat_matmul.use_flat_matmuls(layer) == 1 and "call" in vars(layer)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.sin(y))
        results.append([y] + tape.gradient(loss, [x] + layer.trainable_variables))
    assert len(results[0]) == 2 + (2 if lora else 1) + (bias_axes is not None)  # LoRA: the kernel is frozen
    for keras_value, ours in zip(*results):
        np.testing.assert_allclose(ours, keras_value, rtol=1e-5, atol=1e-6)
    assert flat_matmul.use_flat_matmuls(layer) == 0  # once only


def test_under_mixed_precision_the_patched_projection_computes_in_bfloat16():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = keras.layers.EinsumDense("abc,cde->abde", (None, 3, 4), bias_axes="de")
        x = tf.random.stateless_normal((2, 5, 6), seed=[1, 2])
        expected = layer(x)
        flat_matmul.use_flat_matmuls(layer)
        ours = layer(x)
    finally:
        keras.config.set_dtype_policy("float32")
    assert ours.dtype == expected.dtype == tf.bfloat16 and ours.shape == (2, 5, 3, 4)
    np.testing.assert_allclose(tf.cast(ours, tf.float32), tf.cast(expected, tf.float32), rtol=2e-2, atol=2e-2)


def test_a_cpu_bert_backbone_projects_flat_trains_and_saves_plain_einsum_dense(tmp_path):
    from tfl import train
    from tfl.backbones import build_backbone
    from tfl.runner import build_model

    backbone = build_backbone(save_tiny_bert_preset(tmp_path), sequence_length=8)
    einsum = [la for la in backbone.keras_hub_backbone._flatten_layers() if isinstance(la, keras.layers.EinsumDense)]
    assert len(einsum) == 8 and all("call" in vars(la) for la in einsum)  # q, k, v, output x 2 layers
    model = build_model(backbone, ["awful", "great"])
    train.compile_model(model, train.make_optimizer(1e-3, 4), task="classification", num_labels=2, jit_compile=False)
    x = backbone.preprocess(tf.constant(["a great film", "an awful plot"] * 4))
    history = model.fit(x, tf.constant([1, 0] * 4), batch_size=4, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path, compile=False)
    layers = [la for la in reloaded._flatten_layers() if isinstance(la, keras.layers.EinsumDense)]
    assert len(layers) == 8 and not [la for la in layers if "call" in vars(la)]  # Keras's own, as stored
    np.testing.assert_allclose(reloaded(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_backbone_built_for_another_device_keeps_kerass_einsum(tmp_path, monkeypatch):
    from tfl import devices
    from tfl.backbones import build_backbone

    monkeypatch.setattr(devices, "device_kind", lambda strategy=None: "gpu")
    backbone = build_backbone(save_tiny_bert_preset(tmp_path), sequence_length=8)
    assert flat_matmul.use_flat_matmuls(backbone.keras_hub_backbone) == 8  # none was patched before
