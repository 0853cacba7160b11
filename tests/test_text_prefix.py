"""tfl.text_prefix: tokenizing a prefix gives exactly the preprocessor's own outputs, on texts built to break it."""

import numpy as np
import pytest
import tensorflow as tf

from tfl import assets
from tfl.text_prefix import PrefixPreprocessor

# Cuts inside words, at delimiters, after whitespace runs, control (\x07) and format (\u200b) characters,
# combining marks, CJK, punctuation runs, one giant word, an empty text and texts shorter than any prefix.
TEXTS = [
    "the great film " * 40,
    "the film" + " " * 300 + "great awful movie plot " * 20,
    "a" * 500 + " the film",
    "the\x07film\u200bgreat\tawful\nmovie\r\nplot " * 30,
    "café re\u0301sume\u0301 naïve " * 30,
    "the 电影 great 好 film " * 30,
    "great!!!...??? ,,,;;; film-plot (the) [a] " * 30,
    "\u0301 \u0301 \u0301 " * 200 + "the great film " * 10,
    "",
    "film",
    "the great film",
]


def _preprocessor(preset: str, length: int):
    import keras_hub

    return keras_hub.models.TextClassifierPreprocessor.from_preset(preset, sequence_length=length)


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


class _Spy:
    """The preprocessor, recording the longest text of each call as it runs (PrefixPreprocessor calls it
    traced, so the record is a variable the graph appends to)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = tf.Variable(tf.zeros([0], tf.int32), shape=[None])

    def __call__(self, texts):
        longest = tf.reduce_max(tf.concat([tf.strings.length(texts, unit="UTF8_CHAR"), [0]], axis=0))
        self.calls.assign(tf.concat([self.calls, [longest]], axis=0))
        return self.inner(texts)

    @property
    def longest(self) -> list:
        return self.calls.numpy().tolist()


@pytest.mark.parametrize("chars_per_token", [1, 2, 4, 8])
def test_prefix_tokens_equal_the_whole_texts_tokens(tiny_bert_preset, chars_per_token):
    preprocessor = _preprocessor(tiny_bert_preset, 16)
    expected = preprocessor(tf.constant(TEXTS))
    spy = _Spy(preprocessor)
    got = PrefixPreprocessor(spy, 16, chars_per_token=chars_per_token)(tf.constant(TEXTS))
    assert _same(got, expected)
    assert spy.longest[0] <= 16 * chars_per_token  # the first call saw prefixes only
    # Inside another tf.function too, as tf.data and the export call it.
    wrapped = PrefixPreprocessor(preprocessor, 16, chars_per_token=chars_per_token)
    assert _same(tf.function(wrapped)(tf.constant(TEXTS)), tf.function(preprocessor)(tf.constant(TEXTS)))


def test_invalid_utf8_gives_the_plain_preprocessors_tokens(tiny_bert_preset):
    preprocessor = _preprocessor(tiny_bert_preset, 16)
    texts = tf.constant([b"the great \xff film " * 40, b"the film \xc3 plot", "the great film ".encode() * 40])
    wrapped = tf.function(PrefixPreprocessor(preprocessor, 16, chars_per_token=2))
    assert _same(wrapped(texts), tf.function(preprocessor)(texts))


def test_prefixes_short_of_a_sequence_are_tokenized_again_in_full(tiny_bert_preset):
    spy = _Spy(_preprocessor(tiny_bert_preset, 16))
    texts = tf.constant(["the" + " " * 300 + "film " * 50, "the great film " * 40])
    got = PrefixPreprocessor(spy, 16, chars_per_token=8)(texts)
    assert len(spy.longest) == 2 and spy.longest[1] == len(texts.numpy()[0])  # only the whitespace one, in full
    assert _same(got, spy.inner(texts))


def test_the_real_minilm_vocabulary_gives_the_same_tokens_from_prefixes():
    preprocessor = _preprocessor(assets.asset_path("minilm"), 32)  # `make test` fetches the asset first
    wrapped = PrefixPreprocessor.wrap(preprocessor)
    assert isinstance(wrapped, PrefixPreprocessor) and wrapped.kept_characters == 8 * 32
    # "national " is one token in 9 characters: the 256-character prefix ends inside the 29th word, whose piece
    # "nati" would tokenize to two other tokens at positions 29-30 had the partial word been kept.
    texts = tf.constant(TEXTS + ["national " * 40, "Subject: re: your offer!!! http://example.com/a?b=c " * 40])
    assert _same(wrapped(texts), preprocessor(texts))
    assert _same(wrapped(tf.constant("one text, unbatched")), preprocessor(tf.constant("one text, unbatched")))
    assert _same(tf.function(wrapped)(texts), preprocessor(texts))  # traced, as tf.data and the export run it


def test_what_is_not_a_wordpiece_preprocessor_is_left_as_it_is():
    plain = lambda texts: texts  # noqa: E731
    assert PrefixPreprocessor.wrap(plain) is plain
