"""The user-mistake errors tfl reports as one line, and the checks that run before any heavy work."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from tfl import run_dir, storage
from tfl.assets import AssetError
from tfl.backbones import BackboneError, check_backbone_name
from tfl.config import Config, ConfigError, config_from_dict
from tfl.data.sources import DataError
from tfl.export import ExportError
from tfl.train import MISSING_TF_CONFIG, NonFiniteLossError, cluster_from_tf_config, is_chief
from tfl.transfer import TransferError

# Raised for a user mistake; main.py prints the message on one line and exits 2.
USER_ERRORS = (ConfigError, DataError, BackboneError, AssetError, TransferError)
# Raised when training fails numerically: also one line, exit 2, but the run folder is kept.
TRAINING_ERRORS = (NonFiniteLossError, ExportError)


def check_model_dir(config: Config) -> None:
    """Refuses a --model_dir that holds a run with a different config, unless --overwrite."""
    if not config.model_dir or config.mode == "predict":
        return
    path = os.path.join(config.model_dir, "config.json")
    if tf.io.gfile.exists(path) and not config.overwrite:
        previous = json.loads(storage.read_bytes(path))
        try:  # through the dataclasses, so sections added since that run compare as their defaults
            previous = config_from_dict(previous).to_dict()
        except (TypeError, ValueError):
            pass  # not a config this version reads: it differs
        current = config.to_dict()
        ignore = {"overwrite", "predict"}
        if {k: v for k, v in previous.items() if k not in ignore} != {k: v for k, v in current.items() if k not in ignore}:
            raise ConfigError(f"--model_dir={config.model_dir} holds a run with a different config; use a new "
                              "--model_dir, or --overwrite to replace it")


def check_before_run(config: Config) -> None:
    """Everything that can be checked cheaply, before data or weights load."""
    config.validate()
    check_backbone_name(config.model.backbone)
    check_model_dir(config)
    if config.train.strategy == "multi_worker" and not cluster_from_tf_config():
        raise ConfigError(MISSING_TF_CONFIG)


def run_checked(config: Config) -> dict:
    """Checks that --model_dir can be written, takes its lock, clears it for --overwrite (only a tfl run
    folder), writes the resolved config next to the run, then runs it; a run that fails on a user
    mistake leaves no folder behind."""
    from tfl.runner import run

    # In a multi-worker job only the chief writes the run; predict only reads it.
    writes = bool(config.model_dir) and is_chief() and config.mode != "predict"
    if not writes:
        return run(config)
    created = not tf.io.gfile.exists(config.model_dir)
    try:
        run_dir.check_writable(config.model_dir)
        with run_dir.locked(config.model_dir):
            if config.overwrite:
                # --overwrite starts over: an old run's resume state must not leak into the new one.
                run_dir.clear_for_overwrite(config.model_dir)
            else:
                run_dir.check_starts_cleanly(config.model_dir)
            run_dir.mark(config.model_dir)
            storage.write_json_atomically(os.path.join(config.model_dir, "config.json"), config.to_dict())
            return run(config)
    except (ValueError, AssetError) as e:
        if created and tf.io.gfile.exists(config.model_dir):  # a user mistake: leave no half-made run behind
            tf.io.gfile.rmtree(config.model_dir)
        if isinstance(e, USER_ERRORS) or "not divisible" in str(e):
            raise ConfigError(str(e)) from e
        raise
