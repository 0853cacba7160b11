"""keras.datasets.imdb's word ids from raw text: the lstm backbone's vectorizer (tfl.backbones).

    vectorizer = ImdbVectorizer(num_words=10, maxlen=6, words=fit_imdb_word_index(train_texts, 10))
"""

from __future__ import annotations

import collections

import keras
import tensorflow as tf

# keras.datasets.imdb's ids: 0 padding, 1 start of text, 2 out-of-vocabulary, 3 unused, and the word of
# frequency rank r (1 = most frequent) -> r + 3; only ids below num_words are kept, the others become 2.
IMDB_SPECIAL_TOKENS = ("", "<START>", "<UNK>", "<UNUSED>")  # the tokens of ids 0-3 in get_vocabulary()
IMDB_INDEX_FROM = 3
# Python's string.punctuation less the apostrophe, which is dropped on its own so that "don't" stays one word.
_IMDB_PUNCTUATION = r"[!\"#$%&()*+,\-./:;<=>?@\[\\\]^_`{|}~]"


@keras.saving.register_keras_serializable(package="tfl")
def imdb_standardize(texts):
    """Lower-cases and removes ``<br />`` and punctuation (tf ops: runs in tf.data and in the export).

        imdb_standardize(tf.constant(["Don't miss it!<br /><br />A GREAT film."]))
        # [b"dont miss it   a great film "]: split on whitespace, "dont miss it a great film"
    """
    texts = tf.strings.lower(texts, encoding="utf-8")
    texts = tf.strings.regex_replace(texts, r"<br\s*/?>", " ")  # IMDB's line breaks; "br" is no word
    texts = tf.strings.regex_replace(texts, "'", "")
    # A space, not nothing: "film.The" and "good/bad" are two words each.
    return tf.strings.regex_replace(texts, _IMDB_PUNCTUATION, " ")


def imdb_words(texts):
    """A batch of raw strings -> a RaggedTensor of their words, as the lstm vectorizer sees them."""
    return tf.strings.split(imdb_standardize(texts))


def fit_imdb_word_index(texts, num_words: int) -> list:
    """The words that get ids under ``num_words``, most frequent first (ties in alphabetical order):
    keras.datasets.imdb's word index, fitted on ``texts`` (pass the training split only).

        fit_imdb_word_index(["the film", "The end."], num_words=10)   # ["the", "end", "film"]
    """
    counts = collections.Counter()
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(list(texts), tf.string)).batch(1024).map(imdb_words)
    for words in dataset:
        counts.update(words.flat_values.numpy().tolist())
    ranked = sorted(counts, key=lambda word: (-counts[word], word))  # UTF-8 bytes sort as the characters do
    return [word.decode("utf-8") for word in ranked[:max(num_words - IMDB_INDEX_FROM - 1, 0)]]


@keras.saving.register_keras_serializable(package="tfl")
class ImdbVectorizer(keras.layers.Layer):
    """Raw strings -> keras.datasets.imdb ids of the seed model: the start token, then each word's id
    (rank + 3, out-of-vocabulary 2), the last ``maxlen`` kept and zeros in front, as keras' imdb
    ``load_data`` followed by ``pad_sequences(maxlen=...)`` (pre-padding, pre-truncation).

        vectorizer = ImdbVectorizer(num_words=10, maxlen=6, words=["the", "film", "good"])
        vectorizer(tf.constant(["The good film!", "the worst"]))   # [[0, 0, 1, 4, 6, 5], [0, 0, 0, 1, 4, 2]]
        vectorizer.get_vocabulary()   # ["", "<START>", "<UNK>", "<UNUSED>", "the", "film", "good"]: index = id
    """

    def __init__(self, num_words: int, maxlen: int, words=(), **kwargs):
        super().__init__(**kwargs)
        self.num_words, self.maxlen = int(num_words), int(maxlen)
        self.words = list(words)[:max(self.num_words - IMDB_INDEX_FROM - 1, 0)]
        # Rank lookup: 0 for an unknown word, r for the word of rank r.
        self._ranks = keras.layers.StringLookup(vocabulary=self.words, num_oov_indices=1, mask_token=None,
                                                name="word_ranks")
        self._convert_input_args = False  # string inputs, as TextVectorization
        self._allow_non_tensor_positional_args = True
        self.supports_jit = False

    def build(self, input_shape=None):
        pass

    def call(self, texts):
        texts = tf.convert_to_tensor(texts, tf.string)
        if texts.shape.rank == 2:  # a (batch, 1) column
            texts = tf.squeeze(texts, -1)
        ranks = tf.cast(self._ranks(imdb_words(texts)), tf.int32)
        oov = IMDB_SPECIAL_TOKENS.index("<UNK>")
        ids = tf.ragged.map_flat_values(
            lambda r: tf.where((r > 0) & (r + IMDB_INDEX_FROM < self.num_words), r + IMDB_INDEX_FROM, oov), ranks)
        start = tf.RaggedTensor.from_tensor(tf.ones([tf.shape(texts)[0], 1], tf.int32))
        ids = tf.concat([start, ids], axis=1)[:, -self.maxlen:]  # pre-truncation keeps the end
        # Pre-padding: pad the reversed rows at their end, then turn them back.
        return tf.reverse(tf.reverse(ids, axis=[1]).to_tensor(0, shape=[None, self.maxlen]), axis=[1])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.maxlen)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor((inputs.shape[0], self.maxlen), dtype="int32")

    def get_vocabulary(self) -> list:
        """Token of each id (the index): the four special tokens, then the words by rank."""
        return [*IMDB_SPECIAL_TOKENS, *self.words]

    def get_config(self):
        return {**super().get_config(), "num_words": self.num_words, "maxlen": self.maxlen, "words": self.words}
