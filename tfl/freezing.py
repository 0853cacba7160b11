"""Which parts of the backbone train: block freezing, name rules, gradual unfreezing, layer-wise LR, LoRA.

    table = tfl.freeze(backbone, freeze_blocks=4)   # embeddings + 3 encoder layers frozen
    print(tfl.format_table(table))

Frozen layers have ``trainable = False``. In Keras 3 a BatchNormalization layer with
``trainable = False`` also runs in inference mode (moving statistics, no updates), which is what a
frozen pretrained block needs; tests check both.
"""

from __future__ import annotations

import re
from typing import Optional

import keras
import numpy as np

from tfl.backbones import Backbone, BackboneError


def freeze(backbone: Backbone, *, freeze_all: bool = False, freeze_blocks: int = 0, trainable: str = "",
           lora_rank: int = 0) -> list:
    """Sets ``trainable`` per block (or per layer with the ``trainable`` regex); returns the table.

    ``freeze_blocks``: the first N blocks (input side) are frozen. ``trainable``: layers whose
    ``block/layer`` name matches the regex train, all others are frozen. ``lora_rank``: the backbone's
    own weights freeze and low-rank adapters train (keras-hub backbones).
    """
    blocks = backbone.blocks
    if freeze_blocks > len(blocks):
        raise BackboneError(f"--freeze_blocks={freeze_blocks} but {backbone.name} has {len(blocks)} blocks "
                            f"({', '.join(b.name for b in blocks)}); use 0..{len(blocks)} or --freeze_all")
    backbone.model.trainable = True
    pattern = re.compile(trainable) if trainable else None
    for index, block in enumerate(blocks):
        for layer in block.layers:
            if pattern is not None:
                layer.trainable = bool(pattern.search(f"{block.name}/{layer.name}"))
            else:
                layer.trainable = not (freeze_all or index < freeze_blocks)
    freeze_unused(backbone)
    if pattern is not None and not any(layer.trainable for b in blocks for layer in b.layers):
        raise BackboneError(f"--trainable='{trainable}' matches no layer of {backbone.name}; its blocks are "
                            f"{[b.name for b in blocks]}")
    if lora_rank:
        enable_lora(backbone, lora_rank)
    return freeze_table(backbone)


def enable_lora(backbone: Backbone, rank: int) -> None:
    hub = backbone.keras_hub_backbone
    if hub is None or not hasattr(hub, "enable_lora"):
        raise BackboneError(f"--lora_rank needs a keras-hub backbone with enable_lora; {backbone.name} has none. "
                            "Use --freeze_blocks or --trainable instead")
    hub.enable_lora(rank)


def set_trainable_top_blocks(backbone: Backbone, count: int) -> None:
    """Gradual unfreezing: the top ``count`` blocks train, the rest are frozen."""
    first_trainable = len(backbone.blocks) - count
    for index, block in enumerate(backbone.blocks):
        for layer in block.layers:
            layer.trainable = index >= first_trainable
    freeze_unused(backbone)


def freeze_unused(backbone: Backbone) -> None:
    """Layers the features never read (BERT's pooler under mean or cls pooling) stay frozen: no weight without
    a gradient."""
    for layer in backbone.unused_layers:
        layer.trainable = False


def freeze_table(backbone: Backbone) -> list:
    """One row per block: name, params, trainable params, and status (trainable/frozen/partial), then one
    "unused" row for the layers the features never read (``Backbone.unused_layers``), if any.

    Status follows the layers' ``trainable`` flags; params include non-trainable state such as
    BatchNorm moving statistics, so a trainable block can hold fewer trainable params than params.
    """
    rows = []
    for block in backbone.blocks:
        total = block.count_params()
        trainable = int(sum(int(np.prod(w.shape)) for layer in block.layers for w in layer.trainable_weights))
        flags = [layer.trainable for layer in block.layers if layer.weights]
        status = "trainable" if all(flags) else ("frozen" if not any(flags) else "partial")
        rows.append({"block": block.name, "params": total, "trainable_params": trainable, "status": status})
    if backbone.unused_layers:
        unused = int(sum(np.prod(w.shape) for layer in backbone.unused_layers for w in layer.weights))
        names = ", ".join(layer.name for layer in backbone.unused_layers)
        rows.append({"block": f"{names} (unused)", "params": unused, "trainable_params": 0,
                     "status": "unused"})
    return rows


def format_table(rows: list) -> str:
    lines = [f"{'block':28s} {'params':>12s} {'trainable':>12s}  status"]
    lines += [f"{r['block'][:28]:28s} {r['params']:12,d} {r['trainable_params']:12,d}  {r['status']}" for r in rows]
    total = sum(r["params"] for r in rows)
    trainable = sum(r["trainable_params"] for r in rows)
    lines.append(f"{'total':28s} {total:12,d} {trainable:12,d}")
    return "\n".join(lines)


def layer_lr_multipliers(backbone: Backbone, decay: float) -> dict:
    """Variable path -> learning-rate factor: decay**(blocks above it); the top block gets 1.0.

    The head (not a backbone block) keeps the full learning rate.
    """
    multipliers = {}
    depth = len(backbone.blocks)
    for index, block in enumerate(backbone.blocks):
        factor = decay ** (depth - 1 - index)
        for layer in block.layers:
            for weight in layer.weights:
                multipliers[weight.path] = factor
    return multipliers


@keras.saving.register_keras_serializable(package="tfl")
class LayerwiseAdamW(keras.optimizers.AdamW):
    """AdamW whose learning rate is scaled per variable (layer-wise learning-rate decay).

    ``lr_multipliers`` maps ``variable.path`` to a factor; variables not listed use 1.0.
    """

    def __init__(self, lr_multipliers: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        self.lr_multipliers = dict(lr_multipliers or {})
        self._factors: list = []

    def build(self, variables):
        super().build(variables)
        # update_step sees backend variables without Keras paths: look factors up by the optimizer's index.
        self._factors = [float(self.lr_multipliers.get(v.path, 1.0)) for v in variables]

    def scaled_learning_rate(self, variable, learning_rate):
        factor = self._factors[self._get_variable_index(variable)]
        return learning_rate * factor if factor != 1.0 else learning_rate

    def update_step(self, gradient, variable, learning_rate):
        return super().update_step(gradient, variable, self.scaled_learning_rate(variable, learning_rate))

    def get_config(self):
        return {**super().get_config(), "lr_multipliers": self.lr_multipliers}
