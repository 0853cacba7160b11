"""The three transfer modes: parameter transfer, structure transfer, and zero-shot.

    tfl.transfer.save_source_model(run_dir, backbone, model, label_names)       # after training a source task
    source = tfl.transfer.load_source_model(run_dir)
    backbone = tfl.transfer.backbone_from_source(source, train_texts=..., reuse_vocabulary=True)
    report = tfl.transfer.copy_weights(source, target_model)                     # parameter transfer
    predictions = tfl.transfer.zero_shot_text(backbone, texts, {"fresh": ["a good movie"], ...})

A *source model* folder holds the architecture (``source.json``), the trained weights
(``model.weights.h5``) and, for text, the vocabulary that turns raw text into the same ids
(``vocabulary.txt``). Structure transfer rebuilds the architecture with fresh weights (and a
vocabulary fitted on the new task); parameter transfer also reuses the vocabulary and copies every
layer whose name and shapes match, re-initialising the head (as big_vision's ``dont_load=['head/*']``).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tfl import backbones as backbones_lib
from tfl import heads, small_models
from tfl import storage
from tfl import train as train_lib
from tfl.data.examples import string_array
from tfl.imdb_vocabulary import IMDB_SPECIAL_TOKENS, ImdbVectorizer

SOURCE_KIND = "tfl-source-model"
SOURCE_FILE = "source.json"
SOURCE_DIR = "source_model"
ALWAYS_REINITIALISED = ("head",)  # a new task's head starts fresh unless asked (--transfer_head=source)


class TransferError(ValueError):
    """A source model that is missing, not a tfl source model, or does not fit the target."""


# ---- source models --------------------------------------------------------------------------

def save_source_model(run_dir: str, backbone: backbones_lib.Backbone, model: keras.Model, label_names: list,
                      architecture: dict) -> Optional[str]:
    """Writes ``<run_dir>/source_model/`` for tfl's own architectures (lstm, small_cnn); returns it."""
    if backbone.name not in backbones_lib.SMALL_MODELS:
        return None  # keras-hub and keras.applications backbones are reused through their presets
    final = os.path.join(run_dir, SOURCE_DIR)
    staging = storage.temporary_name(final)
    if tf.io.gfile.exists(staging):
        tf.io.gfile.rmtree(staging)
    tf.io.gfile.makedirs(staging)
    model.save_weights(os.path.join(staging, "model.weights.h5"))
    tokens = (backbone.vectorizer.get_vocabulary()[1:] if backbone.vectorizer is not None
              else imdb_vocabulary(architecture) if architecture.get("data_source") == "keras:imdb" else None)
    vocabulary = None
    if tokens:
        vocabulary = "vocabulary.txt"
        # Line k holds the token with id k + 1 (id 0, padding, is implied; ids 1-3 are start, out-of-vocabulary
        # and unused, as keras.datasets.imdb; files from before that convention hold [UNK] first).
        storage.write_text_atomically(os.path.join(staging, vocabulary), "\n".join(tokens))
    info = {"kind": SOURCE_KIND, "backbone": backbone.name, "modality": backbone.modality,
            "label_names": list(label_names), "architecture": architecture, "vocabulary": vocabulary}
    storage.write_json_atomically(os.path.join(staging, SOURCE_FILE), info)
    if tf.io.gfile.exists(final):
        tf.io.gfile.rmtree(final)
    storage.move_folder(staging, final)
    return final


def imdb_vocabulary(architecture: dict) -> Optional[list]:
    """keras.datasets.imdb ids as a token list (id 1 first), the same convention as the lstm vectorizer on
    raw text: 1 start, 2 out-of-vocabulary, 3 unused, word of frequency rank r -> r + 3 (index_from=3).
    Needs the word index download; None where offline.

        imdb_vocabulary({"num_words": 10000})[:5]   # ["<START>", "<UNK>", "<UNUSED>", "the", "and"]
    """
    import keras

    try:
        word_index = keras.datasets.imdb.get_word_index()
    except Exception:
        return None
    words = [w for w, _ in sorted(word_index.items(), key=lambda item: item[1])]
    special = list(IMDB_SPECIAL_TOKENS[1:])
    return special + words[:architecture["num_words"] - len(special) - 1]


def load_source_model(path: str) -> dict:
    """Reads a source model folder (a run's model_dir or its source_model/ folder)."""
    folder = os.path.join(path, SOURCE_DIR) if tf.io.gfile.isdir(os.path.join(path, SOURCE_DIR)) else path
    info_path = os.path.join(folder, SOURCE_FILE)
    if not storage.is_file(info_path):
        raise TransferError(f"--source_model={path} is not a tfl source model (no {SOURCE_FILE}); give the "
                            "--model_dir of an lstm or small_cnn run")
    info = json.loads(storage.read_bytes(info_path))
    if info.get("kind") != SOURCE_KIND:
        raise TransferError(f"{info_path} is not a tfl source model file")
    info["folder"] = folder
    if info.get("vocabulary"):
        info["vocabulary_tokens"] = storage.read_bytes(os.path.join(folder, info["vocabulary"])).decode("utf-8").split("\n")
    return info


def backbone_from_source(source: dict, *, reuse_vocabulary: bool, train_texts=None, seed: int = 0,
                         dtype: Optional[str] = None, maxlen: Optional[int] = None) -> backbones_lib.Backbone:
    """The source's architecture, freshly initialised. Parameter transfer reuses its vocabulary
    (the same raw text gives the same ids); structure transfer fits a new one on ``train_texts``.
    ``maxlen``: the target's tokens per text (None: the source's; the command line always passes --maxlen). The LSTM's weights do not depend on
    it, so short target texts (sentences) need not be padded to a long source's length (reviews)."""
    arch = dict(source["architecture"])
    if maxlen and "maxlen" in arch:
        arch["maxlen"] = maxlen
    if source["backbone"] == "small_cnn":
        return small_models.build_small_cnn_backbone(tuple(arch["input_shape"]), seed)
    if source["modality"] == backbones_lib.TEXT and train_texts is None:
        raise TransferError("The source model is a text model but the target data is not text; use text data")
    backbone = small_models.build_lstm_backbone(
        arch["num_words"], arch["maxlen"], arch["embedding_dim"], arch["lstm_units"],
        None if reuse_vocabulary else train_texts, seed)
    tokens = source.get("vocabulary_tokens")
    if reuse_vocabulary and tokens:
        special = list(IMDB_SPECIAL_TOKENS[1:])
        if tokens[:len(special)] == special:
            vectorizer = ImdbVectorizer(arch["num_words"], arch["maxlen"], tokens[len(special):],
                                                      name="vectorizer")
        else:  # a source model saved before the imdb convention: its own post-padded ids, [UNK] = 1
            vectorizer = keras.layers.TextVectorization(max_tokens=arch["num_words"],
                                                        output_sequence_length=arch["maxlen"], name="vectorizer",
                                                        vocabulary=tokens[1:])  # [UNK] is implied
        backbone.preprocess, backbone.vectorizer, backbone.modality = vectorizer, vectorizer, backbones_lib.TEXT
    return backbone


def source_architecture(backbone: backbones_lib.Backbone, *, num_words: int, maxlen: int, embedding_dim: int,
                        lstm_units: int, data_source: str = "") -> dict:
    if backbone.name == "small_cnn":
        return {"input_shape": list(backbone.image_size)}
    return {"num_words": num_words, "maxlen": maxlen, "embedding_dim": embedding_dim, "lstm_units": lstm_units,
            "data_source": data_source}


def rebuild_source_model(source: dict) -> keras.Model:
    backbone = backbone_from_source(source, reuse_vocabulary=True, train_texts=[])
    model = heads.attach_head(backbone.model, task="classification", label_names=source["label_names"])
    model.load_weights(os.path.join(source["folder"], "model.weights.h5"))
    return model


def copy_weights(source: dict, target: keras.Model, target_vocabulary: Optional[list] = None,
                 reuse_head: bool = False) -> dict:
    """Copies every target layer whose name and weight shapes match the source; the head is re-initialised
    unless ``reuse_head`` (the target's class i takes the source's class i; the class counts must match).

    ``target_vocabulary`` (the target's own fitted vocabulary, ``get_vocabulary()``): the embedding is
    copied row by row for the tokens both vocabularies share, the other rows keep their fresh
    initialisation. Without it, the target must use the source's vocabulary (same ids).
    Returns {"copied": [...], "reinitialised": [...], "missing": [...]} (layer names), plus
    "embedding_rows_copied" when aligned. Raises if nothing could be copied: a transfer that silently
    copies nothing is a bug, not a run.
    """
    source_model = rebuild_source_model(source)
    by_name = {layer.name: layer for layer in _weighted_layers(source_model)}
    report = {"copied": [], "reinitialised": [], "missing": []}
    for layer in _weighted_layers(target):
        theirs = by_name.get(layer.name)
        if target_vocabulary is not None and layer.name == "embedding" and not source.get("vocabulary_tokens"):
            report["reinitialised"].append(layer.name)  # the source's ids have no words to align by
        elif target_vocabulary is not None and layer.name == "embedding" and theirs is not None:
            report["embedding_rows_copied"] = copy_embedding_rows(
                theirs, layer, ["", *source["vocabulary_tokens"]], target_vocabulary)
            report["copied"].append(layer.name)
        elif reuse_head and layer.name == "head":
            if theirs is None or [w.shape for w in theirs.weights] != [w.shape for w in layer.weights]:
                raise TransferError(f"--transfer_head=source needs as many classes as the source model: it has "
                                    f"{len(source['label_names'])} ({source['label_names']}), the target's head "
                                    f"does not match; use --transfer_head=new")
            layer.set_weights(theirs.get_weights())
            report["copied"].append(layer.name)
        elif layer.name in ALWAYS_REINITIALISED:
            report["reinitialised"].append(layer.name)
        elif theirs is None:
            report["missing"].append(layer.name)
        elif [w.shape for w in theirs.weights] != [w.shape for w in layer.weights]:
            report["reinitialised"].append(layer.name)
        else:
            layer.set_weights(theirs.get_weights())
            report["copied"].append(layer.name)
    if not report["copied"]:
        raise TransferError(f"No layer of the source model {source['folder']} matches the target by name and "
                            f"shape (reinitialised: {report['reinitialised']}, missing: {report['missing']}); "
                            "use --transfer=structure or a compatible source")
    return report


def copy_embedding_rows(source_layer, target_layer, source_tokens: list, target_tokens: list) -> int:
    """Copies the embedding row of every token the two vocabularies share; returns how many."""
    source_rows = {token: i for i, token in enumerate(source_tokens)}
    source_matrix = source_layer.get_weights()[0]
    matrix = target_layer.get_weights()[0]
    copied = 0
    for i, token in enumerate(target_tokens[:len(matrix)]):
        j = source_rows.get(token)
        if j is not None and j < len(source_matrix) and (i > 0 or j == 0):
            matrix[i] = source_matrix[j]
            copied += 1
    target_layer.set_weights([matrix])
    return copied


def _weighted_layers(model: keras.Model) -> list:
    """Layers with weights, in order, looking inside nested models (the backbone) but not inside layers."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _weighted_layers(layer)
        elif layer.weights:
            found.append(layer)
    return found


def format_mapping_report(report: dict) -> str:
    return "\n".join(f"  {key:14s} {', '.join(value) or '-' if isinstance(value, list) else value}"
                     for key, value in report.items())


# ---- zero-shot ------------------------------------------------------------------------------

def parse_label_descriptions(value: str, label_names: list) -> dict:
    """Label -> list of descriptions, from a JSON file, an inline 'label=desc|desc;label=desc', or defaults.

    Defaults use the label names themselves in a few neutral templates.
    """
    if not value:
        templates = ["{}", "this is {}", "an example of {}", "it is about {}", "something {}"]
        return {name: [t.format(name.replace("_", " ")) for t in templates] for name in label_names}
    if storage.is_file(value):
        raw = json.loads(storage.read_bytes(value))
        descriptions = {k: [v] if isinstance(v, str) else list(v) for k, v in raw.items()}
    else:
        descriptions = {}
        for part in value.split(";"):
            if not part.strip():
                continue
            if "=" not in part:
                raise TransferError(f"--label_descriptions part '{part}' is not label=description[|description]")
            label, _, text = part.partition("=")
            descriptions[label.strip()] = [t.strip() for t in text.split("|") if t.strip()]
    missing = [name for name in label_names if not descriptions.get(name)]
    if missing:
        raise TransferError(f"--label_descriptions has nothing for label(s) {missing}; describe every label in "
                            f"{label_names}")
    return {name: descriptions[name] for name in label_names}


def normalised_embeddings(backbone: backbones_lib.Backbone, texts, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled encoder outputs, L2-normalised: the sentence embeddings of a sentence encoder. Run by length
    (``train.run_by_length``): the texts are tokenised first, then encoded in batches of similar length."""
    tokens = train_lib.tokenize_all(backbone.preprocess, string_array(texts))
    vectors = train_lib.run_on_tokens(train_lib.traced_for_any_shape(backbone.model), tokens, batch_size)[0]
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def label_embeddings(backbone: backbones_lib.Backbone, descriptions: dict) -> np.ndarray:
    """One unit vector per label: the normalised mean of its descriptions' embeddings (all encoded in one pass)."""
    vectors = normalised_embeddings(backbone, [text for texts in descriptions.values() for text in texts])
    ends = np.cumsum([len(texts) for texts in descriptions.values()])
    means = np.stack([part.mean(axis=0) for part in np.split(vectors, ends[:-1])])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def zero_shot_scores(input_embeddings: np.ndarray, label_vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity of each input to each label (both already unit vectors)."""
    return input_embeddings @ label_vectors.T


ZERO_SHOT_TEMPERATURE = 20.0  # cosines (a few hundredths apart) -> probabilities that rank well for AUC


def zero_shot_probabilities(scores: np.ndarray) -> np.ndarray:
    """Cosine scores -> a softmax over labels at a fixed temperature (zero-shot and self-training share it)."""
    logits = scores * ZERO_SHOT_TEMPERATURE
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def zero_shot_text(backbone: backbones_lib.Backbone, texts, descriptions: dict) -> np.ndarray:
    """Predicted label index per text, by cosine similarity to the label descriptions."""
    return np.argmax(zero_shot_scores(normalised_embeddings(backbone, texts), label_embeddings(backbone, descriptions)),
                     axis=1)


def zero_shot_images(clip_backbone, images, text_token_ids: dict) -> np.ndarray:
    """CLIP/SigLIP zero-shot: predicted label per image from each label's tokenized description.

    ``images``: preprocessed image batch; ``text_token_ids``: label -> token id array (1, length).
    """
    image_vectors = np.array(clip_backbone.get_vision_embeddings(images), np.float32)
    image_vectors /= np.linalg.norm(image_vectors, axis=1, keepdims=True)
    label_vectors = []
    for ids in text_token_ids.values():
        vector = np.asarray(clip_backbone.get_text_embeddings(ids), np.float32).mean(axis=0)
        label_vectors.append(vector / np.linalg.norm(vector))
    return np.argmax(zero_shot_scores(image_vectors, np.stack(label_vectors)), axis=1)
