"""tfl's own small models, as backbones: the seed's IMDB LSTM and its CIFAR-10 CNN (``lstm`` and ``small_cnn`` in
``tfl.backbones.BACKBONES``).

    backbone = tfl.small_models.build_lstm_backbone(10000, 500, 50, 100, train_texts=texts, seed=0)
"""

from __future__ import annotations

import keras

from tfl.backbone_types import Backbone, BackboneError, Block
from tfl.data.sources import IMAGE, TEXT, TOKEN_IDS
from tfl.images import fit_images
from tfl.imdb_vocabulary import IMDB_INDEX_FROM, ImdbVectorizer, fit_imdb_word_index


def build_lstm_backbone(num_words: int, maxlen: int, embedding_dim: int, lstm_units: int, train_texts,
                        seed: int) -> Backbone:
    """The seed's Keras IMDB model: Embedding(num_words, 50) -> LSTM(100, dropout .2, recurrent .2).

    With ``train_texts`` an ImdbVectorizer (keras.datasets.imdb's ids, word index fitted on these
    texts) turns raw strings into ``maxlen`` ids; without, the inputs are already ids (keras:imdb).

        backbone = build_lstm_backbone(10000, 500, 50, 100, train_texts=["a fine film", ...], seed=0)
        backbone.model(backbone.preprocess(tf.constant(["a fine film"])))   # (1, 100) features
    """
    if num_words <= IMDB_INDEX_FROM + 1:
        raise BackboneError(f"--num_words={num_words} leaves no id for any word (ids 0-3 are padding, start, "
                            "out-of-vocabulary and unused); use --num_words=10000 as the seed")
    ids = keras.Input((maxlen,), dtype="int32", name="token_ids")
    # mask_zero: the padding in front of each text does not reach the LSTM state.
    embedded = keras.layers.Embedding(num_words, embedding_dim, mask_zero=True, name="embedding",
                                      embeddings_initializer=keras.initializers.RandomUniform(seed=seed))(ids)
    features = keras.layers.LSTM(lstm_units, dropout=0.2, recurrent_dropout=0.2, name="lstm", seed=seed,
                                 kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                                 recurrent_initializer=keras.initializers.Orthogonal(seed=seed))(embedded)
    model = keras.Model(ids, features, name="backbone")
    blocks = [Block("embedding", [model.get_layer("embedding")]), Block("lstm", [model.get_layer("lstm")])]
    if train_texts is None:
        return Backbone("lstm", model, blocks, TOKEN_IDS, source="lstm")
    words = fit_imdb_word_index(train_texts, num_words)
    if not words:
        raise BackboneError("The training texts hold no words for the lstm vocabulary; check --text_column")
    vectorizer = ImdbVectorizer(num_words, maxlen, words, name="vectorizer")
    return Backbone("lstm", model, blocks, TEXT, vectorizer, vectorizer=vectorizer, source="lstm")


def build_small_cnn_backbone(input_shape: tuple, seed: int) -> Backbone:
    """The seed's CIFAR-10 CNN (keras examples cifar10_cnn) without its classifier layer."""
    init = lambda i: keras.initializers.GlorotUniform(seed=seed + i)  # noqa: E731
    images = keras.Input(input_shape, name="images")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(images)
    for stage, filters in [(1, 32), (2, 64)]:
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{stage}_conv1",
                                kernel_initializer=init(2 * stage))(x)
        x = keras.layers.Conv2D(filters, 3, activation="relu", name=f"block{stage}_conv2",
                                kernel_initializer=init(2 * stage + 1))(x)
        x = keras.layers.MaxPooling2D(name=f"block{stage}_pool")(x)
        x = keras.layers.Dropout(0.25, name=f"block{stage}_dropout", seed=seed)(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(512, activation="relu", name="dense", kernel_initializer=init(9))(x)
    x = keras.layers.Dropout(0.5, name="dense_dropout", seed=seed)(x)
    model = keras.Model(images, x, name="backbone")
    blocks = [Block(f"block{s}", [l for l in model.layers if l.name.startswith(f"block{s}_")]) for s in (1, 2)]
    blocks.append(Block("dense", [model.get_layer("flatten"), model.get_layer("dense"),
                                  model.get_layer("dense_dropout")]))
    preprocess = lambda images: fit_images(images, tuple(input_shape))  # noqa: E731
    return Backbone("small_cnn", model, blocks, IMAGE, preprocess, tuple(input_shape), source="small_cnn")
