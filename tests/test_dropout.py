import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import bfloat16_tiny_classifier, save_tiny_bert_preset, tiny_bert
from tfl import dropout

# The scale a kept value gets at rate 0.1 rounded to 1/65536 (6554/65536): 1.1111281..., not Keras's 1.1111111...
HALF_WORD_SCALE = 65536 / (65536 - 6554)


def test_half_word_dropout_keeps_the_rate_and_the_expectation():
    x = tf.ones((999, 999))  # an odd size: the last 32-bit word is half used
    seed = tf.constant([3, 4], tf.int32)
    y = dropout.half_word_dropout(x, 0.1, seed).numpy()
    kept = y != 0
    assert abs(kept.mean() - 0.9) < 0.002
    np.testing.assert_allclose(y[kept], HALF_WORD_SCALE, rtol=1e-7)
    assert abs(y.mean() - 1.0) < 0.003
    # One mask per seed: the same seed draws it again, another seed draws another.
    np.testing.assert_array_equal(dropout.half_word_dropout(x, 0.1, seed).numpy(), y)
    other = dropout.half_word_dropout(x, 0.1, tf.constant([3, 5], tf.int32)).numpy() != 0
    assert (other != kept).mean() > 0.1


def test_half_word_dropout_gradient_is_the_mask_and_it_compiles_with_xla():
    x = tf.random.stateless_normal((7, 33), seed=[0, 1], dtype=tf.bfloat16)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = dropout.half_word_dropout(x, 0.25, tf.constant([1, 2], tf.int32))
    gradient = tape.gradient(y, x).numpy().astype(np.float32)
    expected = np.where(y.numpy().astype(np.float32) != 0, np.float32(tf.cast(4 / 3, tf.bfloat16)), 0.0)
    nonzero_x = x.numpy() != 0
    np.testing.assert_array_equal(gradient[nonzero_x], expected[nonzero_x])
    assert y.dtype == tf.bfloat16
    compiled = tf.function(dropout.half_word_dropout, jit_compile=True)
    np.testing.assert_array_equal(compiled(x, 0.25, tf.constant([1, 2], tf.int32)).numpy(), y.numpy())


def bert_inputs():
    return {"token_ids": tf.constant([[2, 5, 7, 9, 3, 0]] * 3), "segment_ids": tf.zeros((3, 6), tf.int32),
            "padding_mask": tf.constant([[True] * 5 + [False]] * 3)}


@pytest.fixture
def draws(monkeypatch):
    """Counts the calls of half_word_dropout (each is one layer's draw, eagerly or while a function traces)."""
    calls = []
    drawn = dropout.half_word_dropout
    monkeypatch.setattr(dropout, "half_word_dropout", lambda *args: calls.append(1) or drawn(*args))
    return calls


def test_every_dropout_of_a_keras_hub_bert_draws_half_words_and_inference_is_unchanged(draws):
    backbone = tiny_bert(0.1)
    inputs = bert_inputs()
    before = backbone(inputs, training=False)["sequence_output"].numpy()
    # The embeddings' dropout, and per transformer layer: attention probabilities, attention output, feed-forward.
    assert dropout.use_half_word_dropout(backbone) == 1 + 3 * 2
    assert dropout.use_half_word_dropout(backbone) == 0  # already patched
    np.testing.assert_array_equal(backbone(inputs, training=False)["sequence_output"].numpy(), before)
    assert not draws
    trained = backbone(inputs, training=True)["sequence_output"].numpy()
    assert len(draws) == 7 and np.all(np.isfinite(trained)) and not np.array_equal(trained, before)
    embeddings_dropout = backbone.get_layer("embeddings_dropout")
    assert type(embeddings_dropout) is keras.layers.Dropout and embeddings_dropout.get_config()["rate"] == 0.1
    y = tf.function(lambda: embeddings_dropout(tf.ones((64, 64)), training=True))().numpy()
    np.testing.assert_allclose(y[y != 0], HALF_WORD_SCALE, rtol=1e-7)
    embeddings_dropout.rate = 1.0  # a rate changed later that 16 bits cannot draw: Keras's own dropout
    assert not embeddings_dropout(tf.ones((4, 4)), training=True).numpy().any()


def test_use_half_word_dropout_leaves_what_it_cannot_draw_as_keras_has_it():
    inputs = keras.Input((4, 8))
    x = keras.layers.Dropout(0.5, noise_shape=(None, 1, 8))(inputs)  # one mask shared along an axis
    x = keras.layers.Dropout(0.0)(x)
    model = keras.Model(inputs, keras.layers.Dropout(1e-6)(x))  # rounds to 0 of 65536
    assert dropout.use_half_word_dropout(model) == 0
    assert dropout.use_half_word_dropout(tiny_bert(0.0)) == 0


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_bfloat16_tfl_model_trains_with_half_word_dropout_and_saves_keras_dropout(tmp_path, draws, jit_compile):
    _, model, x, y = bfloat16_tiny_classifier(tmp_path, dropout=0.1, jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert len(draws) >= 7 and np.all(np.isfinite(history.history["loss"]))  # traced through fit's step
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = [la for la in keras.models.load_model(path, compile=False)._flatten_layers()
                if isinstance(la, keras.layers.Dropout)]
    assert reloaded and not [la for la in reloaded if "call" in vars(la)]  # Keras's own dropout, as stored


@pytest.mark.parametrize("kind, dtype, patched", [("gpu", "mixed_bfloat16", True), ("gpu", None, False),
                                                 ("tpu", "mixed_bfloat16", False)])
def test_a_bfloat16_gpu_backbone_draws_half_words_too_and_others_keep_keras_dropout(tmp_path, monkeypatch, kind,
                                                                                   dtype, patched):
    from tfl import devices, gelu, layer_norm
    from tfl.backbones import build_backbone

    monkeypatch.setattr(devices, "device_kind", lambda strategy=None: kind)
    backbone = build_backbone(save_tiny_bert_preset(tmp_path, dropout=0.1), sequence_length=8, dtype=dtype)
    # what is left unpatched afterwards: none when the build patched all 7, else all 7
    assert dropout.use_half_word_dropout(backbone.keras_hub_backbone) == (0 if patched else 7)
    assert gelu.use_float32_gelu(backbone.keras_hub_backbone) == 2  # the float32 GELU is for CPUs only
    assert layer_norm.use_closed_form_layer_norm(backbone.keras_hub_backbone) == 5  # so is the layer-norm one
