"""The candidate zoo of --mode=rank and its features: (backbone, depth) pairs, every depth of a backbone
from one forward pass per batch (a Keras model whose outputs are every block's pooled output).

    sources = tfl.zoo.candidates("text", backbones=["asset:minilm"], sequence_length=64)
    features = tfl.zoo.extract_features(sources, texts, modality="text")   # candidate -> {"features", ...}

Scores and the ranking itself are in tfl.ranking.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from tfl import backbones as backbones_lib
from tfl import heads
from tfl import train as train_lib
from tfl import transfer as transfer_lib
from tfl.assets import AssetError
from tfl.backbones import BackboneError
from tfl.data import IMAGE, IMAGE_FILE, TEXT

# The offline zoo per data modality; a name that does not resolve here (not fetched, or not yet an
# asset of this version) is left out of the default zoo and refused when named in --backbones.
DEFAULT_ZOO = {TEXT: ("asset:minilm", "asset:minilm_l3"), IMAGE: ("asset:efficientnet_lite0",)}
RANDOM_SUFFIX = " (random init)"


@dataclasses.dataclass
class FeatureSource:
    """One backbone (pretrained or a random control) and the model that gives all its candidates at once.

    ``model`` maps preprocessed inputs to a list: one pooled feature tensor per entry of ``depths``,
    then, where ``has_source_classifier``, the source classifier's class probabilities.
    """

    backbone: str  # the name it was built from (an asset, a preset, a folder, a source model folder)
    pretrained: bool
    model: keras.Model
    depths: list  # [(depth, block name)], one per feature output
    preprocess: Optional[Callable]  # a batch of raw inputs -> model inputs
    modality: str
    image_shape: tuple = ()  # image backbones: (height, width, channels) to decode image files to
    has_source_classifier: bool = False

    def candidate_name(self, depth: int) -> str:
        return f"{self.backbone}@{depth}" + ("" if self.pretrained else RANDOM_SUFFIX)


# ---- the zoo --------------------------------------------------------------------------------

def is_source_model_folder(name: str) -> bool:
    """A run's model_dir (or its source_model/ folder) holding a tfl source model (lstm, small_cnn)."""
    for folder in (os.path.join(name, transfer_lib.SOURCE_DIR), name):
        if tf.io.gfile.exists(os.path.join(folder, transfer_lib.SOURCE_FILE)):
            return True
    return False


def available_zoo(modality: str) -> list:
    """The names of the default zoo for a data modality that resolve on this machine (fetched assets)."""
    kind = IMAGE if modality == IMAGE_FILE else modality
    found = []
    for name in DEFAULT_ZOO.get(kind, ()):
        try:
            backbones_lib.check_backbone_name(name)
        except (BackboneError, AssetError):
            continue
        found.append(name)
    return found


def check_backbones(names, modality: str, source_models=()) -> list:
    """The backbone names to rank (the default zoo if ``names`` is empty), checked before anything loads.

    ``modality=None`` (the data not loaded yet): only checks that each name resolves. Raises
    BackboneError in one line naming the valid choices for an unknown name, a zoo name that does not
    fit the data's modality, or an empty zoo.
    """
    kind = IMAGE if modality == IMAGE_FILE else modality
    zoo = available_zoo(modality) if modality else available_zoo(TEXT) + available_zoo(IMAGE)
    choices = (f"{zoo or 'none offline for ' + str(kind) + ' data'} (the offline zoo"
               f"{' for ' + kind + ' data' if kind else ''}), a keras-hub encoder preset name or folder, or the "
               "--model_dir of an lstm/small_cnn run")
    names = [n.strip() for n in names if n.strip()]
    for name in names:
        if is_source_model_folder(name):
            continue
        if name in backbones_lib.SMALL_MODELS or name in backbones_lib.keras_application_names():
            raise BackboneError(f"--backbones={name} is not a rankable backbone (give a pretrained one); expected "
                                f"some of {choices}")
        try:
            backbones_lib.check_backbone_name(name)
        except AssetError as e:  # a known asset, not fetched: say how to fetch it
            raise BackboneError(f"--backbones={name}: {str(e).splitlines()[0]}") from None
        except BackboneError:
            raise BackboneError(f"Unknown --backbones entry '{name}'; expected some of {choices}") from None
        other = [k for k, v in DEFAULT_ZOO.items() if name in v and k != kind]
        if kind and other:
            raise BackboneError(f"--backbones={name} takes {other[0]} inputs but the data holds {kind}; expected "
                                f"some of {choices}")
    for path in source_models:
        if path and not is_source_model_folder(path):
            raise BackboneError(f"--source_model={path} is not a tfl source model (no {transfer_lib.SOURCE_FILE}); "
                                "give the --model_dir of an lstm or small_cnn run")
    names = names or list(zoo)
    if kind and not names and not any(source_models):
        raise BackboneError(f"No candidate to rank for {kind} data: fetch the offline zoo (python -m tfl.assets "
                            f"fetch {' '.join(n[len('asset:'):] for n in DEFAULT_ZOO.get(kind, ()))}) or give "
                            "--backbones=<preset or folder> or --source_model=<lstm/small_cnn run>")
    return names


def candidates(modality: str, backbones=(), source_models=(), *, sequence_length: int = 128, image_size: int = 0,
               maxlen: Optional[int] = None, controls: bool = True, seed: int = 0) -> list:
    """The zoo for a data modality: a list of FeatureSource, each giving every depth of one backbone.

    ``backbones``: names (keras-hub presets or folders, ``asset:...``, lstm/small_cnn run folders);
    empty = the default offline zoo for the modality. ``source_models``: run folders of lstm/small_cnn
    source models (as ``--source_model``). ``controls``: add a randomly initialised copy of each
    architecture (its last depth only). ``maxlen``: the lstm's tokens per text (default the source's).

        zoo = candidates("text", ["asset:minilm"], sequence_length=64)
        [s.candidate_name(d) for s in zoo for d, _ in s.depths]   # asset:minilm@0 ... @6, ... (random init)
    """
    names = check_backbones(backbones, modality, source_models)
    names += [p for p in source_models if p and p not in names]
    zoo = []
    for name in names:
        for pretrained in ((True, False) if controls else (True,)):
            if is_source_model_folder(name):
                source = source_model_features(name, pretrained=pretrained, maxlen=maxlen, seed=seed)
            else:
                source = keras_hub_features(name, pretrained=pretrained, sequence_length=sequence_length,
                                            image_size=image_size, seed=seed)
            if source.modality != modality and not (source.modality == IMAGE and modality == IMAGE_FILE):
                raise BackboneError(f"--backbones={name} takes {source.modality} inputs but the data holds "
                                    f"{modality}; give a {modality} backbone")
            if not pretrained:  # the control: the architecture alone, at its full depth
                source = _last_depth_only(source)
            zoo.append(source)
    return zoo


def keras_hub_features(name: str, *, pretrained: bool = True, sequence_length: int = 128, image_size: int = 0,
                       seed: int = 0) -> FeatureSource:
    """A keras-hub backbone (by tfl name) with one pooled output per block, input side first.

    Text: depth 0 is the embeddings' output, depth k the output of transformer block k, each
    mean-pooled over the padding mask (the pooler is not on that path and is left out). Images: depth 0
    is the stem, then each stage; each globally average-pooled.
    """
    if not pretrained:
        keras.utils.set_random_seed(seed)  # keras-hub initialisers draw from the global seed
    backbone = backbones_lib.build_backbone(name, sequence_length=sequence_length, image_size=image_size,
                                            pretrained=pretrained)
    hub = backbone.keras_hub_backbone
    blocks = [b for b in backbone.blocks if b.name != "pooler"]
    outputs = [b.layers[-1].output for b in blocks]
    if backbone.modality == TEXT:
        if not isinstance(hub.input, dict) or "padding_mask" not in hub.input:
            raise BackboneError(f"--backbones={name} is a text backbone without a padding_mask input; expected a "
                                "BERT-family encoder (token_ids, padding_mask)")
        pool = keras.layers.GlobalAveragePooling1D(name="mean_pool")
        pooled = [pool(x, mask=hub.input["padding_mask"]) for x in outputs]
    else:
        pool = keras.layers.GlobalAveragePooling2D(name="avg_pool")
        pooled = [pool(x) for x in outputs]
    has_classifier = False
    if pretrained and name == "asset:efficientnet_lite0":
        pooled.append(_imagenet_probabilities(pooled[-1]))
        has_classifier = True
    try:
        model = keras.Model(hub.input, pooled, name="features_by_depth")
    except ValueError as e:  # blocks nested inside one layer (ViT's encoder) have no output in the backbone's graph
        raise BackboneError(f"--backbones={name}: its blocks' outputs are not reachable one by one "
                            f"({str(e).splitlines()[0][:120]}); rank BERT-family encoders or convolutional "
                            "backbones") from None
    return FeatureSource(name, pretrained, model, [(i, b.name) for i, b in enumerate(blocks)], backbone.preprocess,
                         backbone.modality, backbone.image_size, has_classifier)


def _imagenet_probabilities(pooled_top):
    """EfficientNet-Lite0's own ImageNet classifier (timm: global average -> dense 1000) on its last features."""
    from safetensors.numpy import load_file

    from tfl.assets import efficientnet_lite0_preset

    weights = load_file(os.path.join(efficientnet_lite0_preset(), "model.safetensors"))
    kernel, bias = weights["classifier.weight"], weights["classifier.bias"]
    dense = keras.layers.Dense(kernel.shape[0], activation="softmax", dtype="float32", name="imagenet_classifier")
    probabilities = dense(pooled_top)
    dense.set_weights([kernel.T, bias])
    return probabilities


def source_model_features(path: str, *, pretrained: bool = True, maxlen: Optional[int] = None,
                          seed: int = 0) -> FeatureSource:
    """A saved lstm/small_cnn source model: its backbone's output (depth = its last block) and its classifier's
    probabilities over the source task's labels; ``pretrained=False``: the same architecture and vocabulary
    with fresh weights and no classifier."""
    source = transfer_lib.load_source_model(path)
    backbone = transfer_lib.backbone_from_source(source, reuse_vocabulary=True, train_texts=[], seed=seed,
                                                 maxlen=maxlen)
    outputs = [backbone.model.output]
    if pretrained:
        classifier = heads.attach_head(backbone.model, task="classification", label_names=source["label_names"])
        classifier.load_weights(os.path.join(source["folder"], "model.weights.h5"))
        head = heads.head_only_model(classifier, backbone.model.output.shape[-1])
        num_labels = len(source["label_names"])
        binary = heads.is_binary("classification", num_labels)
        scores = head(backbone.model.output)
        outputs.append(keras.layers.Concatenate(name="source_probabilities")([1.0 - scores, scores]) if binary
                       else scores)
    model = keras.Model(backbone.model.input, outputs, name="features_by_depth")
    depth = len(backbone.blocks) - 1
    return FeatureSource(path, pretrained, model, [(depth, backbone.blocks[-1].name)], backbone.preprocess,
                         backbone.modality, backbone.image_size, has_source_classifier=pretrained)


def _last_depth_only(source: FeatureSource) -> FeatureSource:
    outputs = source.model.outputs
    model = keras.Model(source.model.input, [outputs[len(source.depths) - 1]], name="features_last_depth")
    return dataclasses.replace(source, model=model, depths=source.depths[-1:], has_source_classifier=False)


# ---- features -------------------------------------------------------------------------------

def extract_features(zoo: list, inputs, *, modality: str, batch_size: int = 64) -> dict:
    """Runs every source of the zoo once over ``inputs`` (raw texts, images, image paths or token ids).

    Returns candidate name -> {"features": float32 [N, D], "source_probabilities": [N, C] (the last
    depth of a source with a source classifier), "backbone", "depth", "block", "pretrained", "feature_seconds"} in the
    order of ``inputs``; ``feature_seconds`` is the time of the source's whole pass (preprocessing
    included), shared by all the depths it gave.
    """
    result = {}
    for source in zoo:
        started = time.perf_counter()
        outputs = _forward(source, inputs, modality, batch_size)
        seconds = time.perf_counter() - started
        for (depth, block), features in zip(source.depths, outputs):
            entry = {"features": features, "backbone": source.backbone, "depth": depth, "block": block,
                     "pretrained": source.pretrained, "feature_seconds": seconds}
            if source.has_source_classifier and depth == source.depths[-1][0]:  # the classifier sits on top
                entry["source_probabilities"] = outputs[-1]
            result[source.candidate_name(depth)] = entry
        print(f"tfl: rank features of {source.backbone}{'' if source.pretrained else RANDOM_SUFFIX}: "
              f"{len(source.depths)} depth(s) in {seconds:.1f}s")
    return result


def _forward(source: FeatureSource, inputs, modality: str, batch_size: int) -> list:
    """[array per model output], rows in the order of ``inputs``."""
    run = train_lib.traced_for_any_shape(source.model)
    as_list = train_lib.float32_outputs
    if modality == TEXT and source.modality == TEXT:
        return train_lib.run_on_tokens(run, train_lib.tokenize_all(source.preprocess, inputs), batch_size)
    dataset = tf.data.Dataset.from_tensor_slices(np.asarray(inputs))
    if modality == IMAGE_FILE:
        dataset = dataset.map(lambda path: backbones_lib.decode_image_file(path, source.image_shape),
                              num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size)
    if source.preprocess is not None:
        dataset = dataset.map(source.preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    return train_lib.concatenate_outputs(as_list(run(batch)) for batch in dataset.prefetch(tf.data.AUTOTUNE))
