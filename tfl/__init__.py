"""tfl: transfer learning for Keras 3 / TensorFlow.

Library use (no flags involved)::

    import tfl
    splits = tfl.load_data("asset:rotten_tomatoes", seed=0)
    backbone = tfl.build_backbone("asset:minilm", sequence_length=64)
    print(tfl.format_table(tfl.freeze(backbone, freeze_blocks=3)))
    model = tfl.build_model(backbone, splits.label_names)

Or a whole run from a Config: ``tfl.run(tfl.Config(...))``.
"""

import importlib

__version__ = "0.1.0"

# Public names -> their modules. Imported on first use, so `import tfl` (and the CLI's flag
# parsing) does not pay for importing TensorFlow until something needs it.
_EXPORTS = {
    "AssetError": "tfl.assets", "asset_path": "tfl.assets", "fetch": "tfl.assets",
    "Backbone": "tfl.backbones", "BackboneError": "tfl.backbones", "build_backbone": "tfl.backbones",
    "Config": "tfl.config", "ConfigError": "tfl.config", "DataConfig": "tfl.config", "ModelConfig": "tfl.config",
    "FreezeConfig": "tfl.config", "TrainConfig": "tfl.config", "PredictConfig": "tfl.config",
    "DataError": "tfl.data", "load_data": "tfl.data", "make_batches": "tfl.data",
    "export_serving_model": "tfl.export",
    "format_table": "tfl.freezing", "freeze": "tfl.freezing", "freeze_table": "tfl.freezing",
    "build_model": "tfl.runner", "run": "tfl.job", "predict": "tfl.prediction",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tfl' has no attribute '{name}'")
