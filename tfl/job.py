"""A job, start to end: the checks that run before any heavy work, the run folder (lock, marker,
config.json), the one table that maps each --mode to the function that runs it, and the error kinds
main.py reports as one line.

    metrics = tfl.run(tfl.Config(model=tfl.ModelConfig(backbone="lstm"), model_dir="/tmp/run"))
"""

from __future__ import annotations

import errno
import json
import os
import re
from typing import Optional

import tensorflow as tf

from tfl import auto, prediction, ranking, report, run_dir, runner, self_training, storage, tuning, zero_shot
from tfl.assets import AssetError
from tfl.backbones import BackboneError, check_backbone_name
from tfl.config import Config, ConfigError, config_from_dict
from tfl.data.sources import DataError
from tfl.devices import MISSING_TF_CONFIG, cluster_from_tf_config, is_chief
from tfl.export import ExportError
from tfl.train import NonFiniteLossError
from tfl.transfer import TransferError


class DiskFullError(OSError):
    """The disk filled up while the run wrote its files (checkpoints, features, exports, caches)."""


# Raised for a user mistake; main.py prints the message on one line and exits 2.
USER_ERRORS = (ConfigError, DataError, BackboneError, AssetError, TransferError)
# Raised when training fails (numerically, or a full disk): also one line, exit 2, but the run folder is kept:
# its backup resumes the run.
TRAINING_ERRORS = (NonFiniteLossError, ExportError, DiskFullError)


def run_mode(config: Config, verbose: int = 1, process_started: Optional[float] = None) -> dict:
    """Runs ``config`` as its --mode says, with no checks and no run-folder bookkeeping. ``process_started``
    (time.time() at the process start) goes to a --mode=train run, whose metrics.json then times the imports."""
    timing = {"process_started": process_started} if config.mode == "train" and process_started is not None else {}
    return MODE_FUNCTIONS[config.mode](config, verbose, **timing)


def compare(config: Config, verbose: int = 1) -> dict:
    """--mode=compare: each strategy's run goes through this same table (see tfl.report)."""
    return report.compare(config, run_mode, verbose=verbose)


# Every --mode (config.MODES lists the names), each a function (config, verbose) -> metrics.
MODE_FUNCTIONS = {
    "train": runner.train_and_evaluate,
    "zero_shot": zero_shot.run_zero_shot,
    "self_train": self_training.run_self_training,
    "compare": compare,
    "predict": prediction.run_predict,
    "rank": lambda config, verbose: ranking.rank(config),
    "auto": auto.run_auto,
    "tune": tuning.tune,
}


def check_model_dir(config: Config) -> None:
    """Refuses a --model_dir that holds a run with a different config, unless --overwrite."""
    if not config.model_dir or config.mode == "predict":
        return
    path = os.path.join(config.model_dir, "config.json")
    if tf.io.gfile.exists(path) and not config.overwrite:
        try:
            previous = json.loads(storage.read_bytes(path))
        except (ValueError, tf.errors.OpError):
            previous = None  # unreadable: it cannot be the same config
        if not isinstance(previous, dict):
            raise ConfigError(f"--model_dir={config.model_dir} holds a config.json that is not a tfl config; use a "
                              "new --model_dir (or --overwrite, if the folder holds a tfl run)")
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


def run(config: Config, verbose: int = 1) -> dict:
    """Trains, evaluates and exports as ``config`` says (or runs its other --mode); writes everything under
    ``config.model_dir``. As on the command line, a folder that holds a run of the same config resumes it; one
    with a different config is refused unless ``overwrite=True``, which starts over (only a tfl run folder)."""
    config.validate()
    check_model_dir(config)
    return _run_in_folder(config, verbose)


def run_checked(config: Config, verbose: int = 1, process_started: Optional[float] = None) -> dict:
    """main.py's run, after check_before_run: --overwrite clears the folder (only a tfl run folder), the
    resolved config is written next to the run, and a run that fails on a user mistake leaves no folder
    behind. ``process_started``: see run_mode."""
    # Only the process that writes the run (the chief; not predict) can have created its folder.
    writes = bool(config.model_dir) and is_chief() and config.mode != "predict"
    created = writes and not tf.io.gfile.exists(config.model_dir)
    try:
        return _run_in_folder(config, verbose, process_started=process_started)
    except USER_ERRORS as e:
        # A folder another live run holds is that run's, even if it appeared after the check above.
        if created and not isinstance(e, run_dir.FolderBusyError) and tf.io.gfile.exists(config.model_dir):
            tf.io.gfile.rmtree(config.model_dir)  # also gives back what the failed run wrote
        raise


def is_disk_full(error: Exception) -> bool:
    """A full disk (or quota) as h5py, numpy or TensorFlow report it: an errno, or only the C library's message."""
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        text in str(error) for text in ("No space left on device", "Disk quota exceeded"))


def disk_full_message(error: Exception, model_dir: str) -> str:
    """Names the file the error names (h5py puts it in its message), else the run folder."""
    named = re.search(r"filename = '([^']+)'", str(error))
    path = getattr(error, "filename", None) or (named.group(1) if named else None)
    where = f"while writing {path}" if path else f"while the run in {model_dir or 'this process'} wrote its files"
    kept = f"; the run folder {model_dir} is kept: the same command resumes from its backup" if model_dir else ""
    return f"no space left on the disk {where}: free space on that disk{kept}"


def _run_in_folder(config: Config, verbose: int, *, process_started: Optional[float] = None) -> dict:
    try:
        return _run_in_folder_unchecked(config, verbose, process_started=process_started)
    except (OSError, tf.errors.OpError) as e:  # h5py, numpy and TensorFlow each report a full disk their way
        if isinstance(e, DiskFullError) or not is_disk_full(e):
            raise
        raise DiskFullError(disk_full_message(e, config.model_dir)) from e


def _run_in_folder_unchecked(config: Config, verbose: int, *, process_started: Optional[float] = None) -> dict:
    # In a multi-worker job only the chief writes the run; predict only reads it.
    if not config.model_dir or not is_chief() or config.mode == "predict":
        return run_mode(config, verbose, process_started)
    # The writing process holds the folder's lock and marks it as a tfl run, so --overwrite can
    # recognise it later.
    run_dir.check_writable(config.model_dir)
    with run_dir.locked(config.model_dir):
        if config.overwrite:
            # --overwrite starts over: an old run's resume state must not leak into the new one.
            run_dir.clear_for_overwrite(config.model_dir)
        else:
            try:  # again under the lock: another run may have written the folder since the check before it
                check_model_dir(config)
            except ConfigError as e:
                raise run_dir.FolderBusyError(str(e)) from e
            run_dir.check_starts_cleanly(config.model_dir)
        run_dir.mark(config.model_dir)
        storage.write_json_atomically(os.path.join(config.model_dir, "config.json"), config.to_dict())
        return run_mode(config, verbose, process_started)
