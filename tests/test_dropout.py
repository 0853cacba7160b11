import keras
import numpy as np
import tensorflow as tf

from tests.conftest import VOCAB
from tfl import dropout

# The scale a kept value gets at rate 0.1 rounded to 1/65536 (6554/65536): 1.1111281..., not Keras's 1.1111111...
HALF_WORD_SCALE = 65536 / (65536 - 6554)


def test_half_word_dropout_keeps_the_rate_and_the_expectation():
    x = tf.ones((1000, 999))  # odd size: the last 32-bit word is half used
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


def test_half_word_dropout_gradient_is_the_mask():
    x = tf.random.stateless_normal((7, 33), seed=[0, 1], dtype=tf.bfloat16)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = dropout.half_word_dropout(x, 0.25, tf.constant([1, 2], tf.int32))
    gradient = tape.gradient(y, x).numpy().astype(np.float32)
    expected = np.where(y.numpy().astype(np.float32) != 0, np.float32(tf.cast(4 / 3, tf.bfloat16)), 0.0)
    nonzero_x = x.numpy() != 0
    np.testing.assert_array_equal(gradient[nonzero_x], expected[nonzero_x])
    assert y.dtype == tf.bfloat16


def tiny_bert(dropout_rate: float):
    import keras_hub

    return keras_hub.models.BertBackbone(vocabulary_size=len(VOCAB), num_layers=2, num_heads=2, hidden_dim=8,
                                         intermediate_dim=16, max_sequence_length=16, dropout=dropout_rate)


def bert_inputs():
    return {"token_ids": tf.constant([[2, 5, 7, 9, 3, 0]] * 3), "segment_ids": tf.zeros((3, 6), tf.int32),
            "padding_mask": tf.constant([[True] * 5 + [False]] * 3)}


def test_draw_half_words_patches_a_keras_hub_bert_and_keeps_its_config_and_inference():
    backbone = tiny_bert(0.1)
    inputs = bert_inputs()
    before = backbone(inputs, training=False)["sequence_output"].numpy()
    # The embeddings' dropout, and per transformer layer: attention probabilities, attention output, feed-forward.
    assert dropout.draw_half_words(backbone) == 1 + 3 * 2
    assert dropout.draw_half_words(backbone) == 0  # already patched
    np.testing.assert_array_equal(backbone(inputs, training=False)["sequence_output"].numpy(), before)
    embeddings_dropout = backbone.get_layer("embeddings_dropout")
    assert type(embeddings_dropout) is keras.layers.Dropout and embeddings_dropout.get_config()["rate"] == 0.1
    # In training, the patched call runs: kept values carry the rounded rate's scale, inside a tf.function too.
    x = tf.ones((64, 64))
    y = tf.function(lambda: embeddings_dropout(x, training=True))().numpy()
    np.testing.assert_allclose(y[y != 0], HALF_WORD_SCALE, rtol=1e-7)
    assert 0.8 < (y != 0).mean() < 0.97
    trained = backbone(inputs, training=True)["sequence_output"].numpy()
    assert np.all(np.isfinite(trained)) and not np.array_equal(trained, before)


def test_draw_half_words_leaves_what_it_cannot_draw_the_same():
    inputs = keras.Input((4, 8))
    x = keras.layers.Dropout(0.5, noise_shape=(None, 1, 8))(inputs)  # one mask shared along an axis
    x = keras.layers.Dropout(0.0)(x)
    model = keras.Model(inputs, keras.layers.Dropout(1e-6)(x))  # rounds to 0 of 65536
    assert dropout.draw_half_words(model) == 0
    assert dropout.draw_half_words(tiny_bert(0.0)) == 0


def test_a_tfl_backbone_on_the_cpu_draws_half_words(tmp_path):
    import keras_hub

    from tfl.backbones import build_backbone

    tiny_bert(0.1).save_to_preset(str(tmp_path))
    keras_hub.models.BertTokenizer(vocabulary=VOCAB, lowercase=True).save_to_preset(str(tmp_path))
    backbone = build_backbone(str(tmp_path), sequence_length=8)
    dropouts = [la for la in backbone.keras_hub_backbone._flatten_layers() if type(la) is keras.layers.Dropout]
    assert len(dropouts) == 7 and all("call" in vars(la) for la in dropouts)
