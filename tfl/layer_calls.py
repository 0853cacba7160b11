"""Replace the ``call`` of chosen layers inside a built model, on each instance only: their class and config
(what model.keras stores) stay as they were, so a copy rebuilt from the config (``clone_model``, ``load_model``,
``copy.deepcopy``) runs the original code again. tfl.dropout, tfl.gelu and tfl.layer_norm patch keras-hub's layers this way
instead of copying keras-hub's code.

    patched = tfl.layer_calls.patch_layer_calls(model, lambda layer: ..., lambda layer: new_call)
"""

from __future__ import annotations

from typing import Callable

import keras


def patch_layer_calls(model: keras.Layer, wants: Callable[[keras.Layer], bool],
                      make_call: Callable[[keras.Layer], Callable]) -> int:
    """Set ``layer.call = make_call(layer)`` on each layer inside ``model`` (itself and nested layers included)
    for which ``wants(layer)``; a layer whose call is already patched is left alone. Returns how many."""
    patched = 0
    # Keras 3 has no public walk over nested layers (keras-hub's encoder layers hold theirs as attributes);
    # _flatten_layers is the one Keras's own tracking uses.
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if "call" not in vars(layer) and wants(layer):
            layer.call = make_call(layer)
            patched += 1
    return patched
