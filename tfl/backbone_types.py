"""What every backbone is, whichever family built it (``tfl.backbones``, ``tfl.small_models``): the model,
its ordered blocks, and the one error kind."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import keras
import numpy as np


class BackboneError(ValueError):
    """An unknown backbone, a backbone that cannot load, or one that does not fit the data."""


@dataclasses.dataclass
class Block:
    """A named group of consecutive layers that are frozen or trained together."""

    name: str
    layers: list

    def count_params(self) -> int:
        return int(sum(np.prod(w.shape) for layer in self.layers for w in layer.weights))


@dataclasses.dataclass
class Backbone:
    """A backbone, ready for a head: ``model`` maps preprocessed inputs to a feature vector."""

    name: str
    model: keras.Model  # inputs -> pooled features (batch, dim)
    blocks: list  # ordered Block list, input side first
    modality: str  # TEXT | IMAGE | TOKEN_IDS: what raw inputs it takes
    preprocess: Optional[Callable] = None  # batch of raw inputs -> model inputs (tf ops only)
    image_size: tuple = ()  # (height, width, channels) for image backbones
    keras_hub_backbone: object = None  # the keras_hub.models.Backbone, where there is one (for LoRA)
    vectorizer: object = None  # lstm: the ImdbVectorizer (keras.datasets.imdb ids), fitted on the training texts
    source: str = ""  # what was loaded, for the record
    # Layers the features do not depend on (BERT's pooler under mean or cls pooling): in no block and always
    # frozen, so the optimizer never holds weights that get no gradient (Keras warns about each one).
    unused_layers: tuple = ()
