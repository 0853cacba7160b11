"""Long texts tokenized only as far as the sequence needs, with the same result as tokenizing all of them.

A keras-hub text preprocessor tokenizes the whole text and then keeps the first ``sequence_length`` tokens:
an e-mail of 100,000 characters costs its whole tokenization for 64 tokens (400 SpamAssassin e-mails, 5,400
characters on average, took 16.7 s to tokenize at sequence 64 against 1.8 s for their prefixes, once, in a
throwaway script on 2 shared cores). ``PrefixPreprocessor`` tokenizes a prefix instead:

    preprocess = PrefixPreprocessor.wrap(keras_hub.models.TextClassifierPreprocessor.from_preset(...))
    preprocess(tf.constant(["a long text ...", ...]))   # the preprocessor's own outputs, bit for bit

Why it is exact, for WordPiece tokenizers (the BERT family; others are left as they are): the prefix
(``CHARS_PER_TOKEN`` characters per position) is cut back to its last delimiter, a character the tokenizer
always splits on (whitespace, control and format characters), so every word in it is whole and tokenizes as
in the full text. The result is the full text's whenever the prefix gave at least a full sequence of tokens
(its first tokens are then the full text's first tokens) or was the whole text; any other text (a prefix of
mostly whitespace, say) is tokenized again in full. tests/test_text_prefix.py checks it against the
preprocessor on texts built to break it.
"""

from __future__ import annotations

import tensorflow as tf

CHARS_PER_TOKEN = 8  # prose runs about 4 characters a WordPiece token; rows short of tokens are redone in full
# keras-hub's WordPiece delimiters are whitespace, \p{Cc} and \p{Cf} (word_piece_tokenizer.WHITESPACE_REGEX):
# a word cut at the end of the prefix is dropped back to the last of them.
PARTIAL_LAST_WORD = r"[^\s\p{Cc}\p{Cf}]+$"


class PrefixPreprocessor:
    """Calls ``preprocessor`` on each text's prefix, or on the whole text where the prefix is not enough.
    ``preprocessor`` (tracked by the export) is the keras-hub layer it wraps."""

    def __init__(self, preprocessor, sequence_length: int, chars_per_token: int = CHARS_PER_TOKEN):
        self.preprocessor = preprocessor
        self.sequence_length = int(sequence_length)
        self.kept_characters = chars_per_token * self.sequence_length
        # One trace of the tokenizer for both of its calls below (prefixes, then the texts redone in full):
        # tracing keras-hub's WordPiece preprocessor takes a second or so, and every pipeline or export that
        # traces this wrapper would otherwise trace it twice. A callable object, not a lambda or a bound method:
        # TensorFlow counts retracing per code object, which those share across every wrapper.
        self._tokenize = tf.function(_Calls(preprocessor), autograph=False,
                                     input_signature=[tf.TensorSpec([None], tf.string)])

    @classmethod
    def wrap(cls, preprocessor):
        """``PrefixPreprocessor`` around a keras-hub text preprocessor whose tokenizer splits words on
        delimiters (WordPiece) and whose outputs have a padding mask; the preprocessor itself otherwise."""
        import keras_hub

        tokenizer = getattr(preprocessor, "tokenizer", None)
        length = getattr(preprocessor, "sequence_length", None)
        if not (isinstance(tokenizer, keras_hub.tokenizers.WordPieceTokenizer) and getattr(tokenizer, "split", False)
                and length and "padding_mask" in preprocessor(tf.constant(["a"]))):
            return preprocessor
        return cls(preprocessor, length)

    def __call__(self, texts):
        texts = tf.convert_to_tensor(texts)
        if texts.shape.rank != 1:  # a single text, or an unknown rank: the plain path
            return self.preprocessor(texts)
        # Invalid UTF-8 (raw bytes sent to an export) goes the plain way: character counts are undefined for it.
        valid = tf.equal(tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace"), texts)
        texts_or_empty = tf.where(valid, texts, "")
        prefix = tf.strings.substr(texts_or_empty, 0, self.kept_characters, unit="UTF8_CHAR")
        cut = tf.strings.length(prefix, unit="UTF8_CHAR") < tf.strings.length(texts_or_empty, unit="UTF8_CHAR")
        prefix = tf.where(cut, tf.strings.regex_replace(prefix, PARTIAL_LAST_WORD, ""), prefix)
        tokens = self._tokenize(prefix)
        filled = tf.reduce_sum(tf.cast(tokens["padding_mask"], tf.int32), axis=1) >= self.sequence_length
        redo = tf.where((cut & ~filled) | ~valid)  # [k, 1]: rows whose prefix held less than a sequence, or invalid

        def in_full():
            whole = self._tokenize(tf.gather_nd(texts, redo))
            return {key: tf.tensor_scatter_nd_update(value, redo, whole[key]) for key, value in tokens.items()}

        return tf.cond(tf.size(redo) > 0, in_full, lambda: tokens)


class _Calls:
    """``function(batch)``, as an object of its own (see PrefixPreprocessor's tf.function)."""

    def __init__(self, function):
        self.function = function

    def __call__(self, batch):
        return self.function(batch)
