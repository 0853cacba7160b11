"""The run folder (``--model_dir``): writable before heavy work, marked as tfl's, locked while written.

- ``check_writable``: the folder can be created and written, checked with a probe file.
- A marker file that only tfl writes (``.tfl-run.json``, recognised by its content) says the folder
  holds a tfl run: ``--overwrite`` clears only such a folder (or an empty one), never a home
  directory or a bucket root that a typo named.
- A lock file (``.tfl-lock.json``: host, pid, start, heartbeat) is held by the process writing the
  run (the chief in a multi-worker job): a second job into the same folder is refused while the
  first lives. A lock left by a dead local process is taken over; on shared or object storage,
  where the pid cannot be checked, a lock whose heartbeat is older than ``STALE_SECONDS`` is.

    with tfl.run_dir.locked("runs/x"):
        ...  # write the run
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time

import tensorflow as tf

from tfl import storage
from tfl.config import ConfigError

MARKER = ".tfl-run.json"
LOCK = ".tfl-lock.json"
MARKER_CONTENT = {"written_by": "tfl", "what": "a tfl run folder; --overwrite may clear it"}
HEARTBEAT_SECONDS = 30
STALE_SECONDS = 300  # no heartbeat for this long: the lock's owner is gone


def check_writable(model_dir: str) -> None:
    """Creates ``model_dir`` if needed and writes a probe file there; one-line ConfigError if it cannot."""
    probe = os.path.join(model_dir, f".tfl-write-check-{os.getpid()}")
    try:
        if storage.is_file(model_dir):
            raise ConfigError(f"--model_dir={model_dir} is a file; give a folder path")
        tf.io.gfile.makedirs(model_dir)
        with tf.io.gfile.GFile(probe, "wb") as f:
            f.write(b"ok")
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as e:
        reason = getattr(e, "message", None) or getattr(e, "strerror", None) or type(e).__name__
        raise ConfigError(f"--model_dir={model_dir} cannot be created or written ({str(reason).splitlines()[0]}); "
                          "choose a folder you can write to")


def mark(model_dir: str) -> None:
    """Records that ``model_dir`` holds a tfl run (what lets --overwrite clear it later)."""
    if not is_tfl_run(model_dir):
        storage.write_json_atomically(os.path.join(model_dir, MARKER), MARKER_CONTENT)


def is_tfl_run(model_dir: str) -> bool:
    path = os.path.join(model_dir, MARKER)
    try:
        return storage.is_file(path) and json.loads(storage.read_bytes(path)) == MARKER_CONTENT
    except (ValueError, tf.errors.OpError):
        return False


# What tfl writes into a run folder; --overwrite removes these and nothing else.
RUN_ENTRIES = {"config.json", "metrics.json", "model.keras", "best.weights.h5", "training_log.csv", "logs", "backup",
               "source_model", "export", "runs", "report.md", "report.json", "learning_curves.png",
               "label_fractions.png", "rank.md", "rank.json", "chosen", "trials", "tuner", "learning_rate",
               "fine_tune", MARKER}


# The sections every tfl config.json has had, marker or not (later ones, e.g. mode or predict, may be missing).
OLD_RUN_SECTIONS = {"data", "model", "train"}


def _is_tfl_entry(name: str) -> bool:
    return name in RUN_ENTRIES or ".tmp-" in name  # staging names of atomic writes


def looks_like_a_tfl_run(model_dir: str) -> bool:
    """The marker, or (a run from before markers existed) a tfl config.json with metrics.json or backup/."""
    if is_tfl_run(model_dir):
        return True
    from tfl.config import config_from_dict

    config_path = os.path.join(model_dir, "config.json")
    try:
        values = json.loads(storage.read_bytes(config_path))
        config_from_dict(values)
        # Every field has a default, so {} (anyone's config.json) would parse: a tfl one names its sections.
        if not (OLD_RUN_SECTIONS <= set(values) and values["data"].get("source")
                and values["model"].get("backbone")):
            return False
    except (ValueError, TypeError, AttributeError, tf.errors.OpError):
        return False
    return any(tf.io.gfile.exists(os.path.join(model_dir, name)) for name in ("metrics.json", "backup"))


def check_starts_cleanly(model_dir: str) -> None:
    """A run starts only in a new or empty folder, or in one that holds a tfl run (to resume or overwrite it):
    never among someone else's files, which a later --overwrite could then remove."""
    if not tf.io.gfile.isdir(model_dir):
        return
    others = [e for e in storage.list_folder(model_dir) if e != LOCK and not e.startswith(".tfl-write-check")]
    if others and not looks_like_a_tfl_run(model_dir):
        raise ConfigError(f"--model_dir={model_dir} holds other files (e.g. {sorted(others)[0]}) and no tfl run; "
                          "give a new or empty folder")


def clear_for_overwrite(model_dir: str) -> None:
    """Removes what tfl wrote into a folder that holds a tfl run; refuses any other folder. Files that
    tfl does not write (someone's notes, say) stay."""
    if not tf.io.gfile.isdir(model_dir):
        return
    entries = [e for e in storage.list_folder(model_dir) if e != LOCK]
    if not entries:
        return
    if not looks_like_a_tfl_run(model_dir):
        raise ConfigError(f"--overwrite clears only a folder that holds a tfl run, and --model_dir={model_dir} "
                          f"holds other files (e.g. {sorted(entries)[0]}) without tfl's run marker; nothing was "
                          "deleted. Choose a new --model_dir")
    for entry in entries:
        if not _is_tfl_entry(entry):
            continue
        path = os.path.join(model_dir, entry)
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        else:
            tf.io.gfile.remove(path)
    kept = sorted(e for e in entries if not _is_tfl_entry(e))
    if kept:
        print(f"tfl: --overwrite kept {len(kept)} file(s) tfl did not write in {model_dir}, e.g. {kept[0]}",
              file=sys.stderr)


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _read_lock(path: str):
    try:
        return json.loads(storage.read_bytes(path))
    except (ValueError, tf.errors.OpError):
        return None  # vanished or half-written by another process: treat as no lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _stale_reason(lock: dict):
    """Why an existing lock can be taken over, or None while its owner may be alive."""
    try:
        age = time.time() - float(lock.get("heartbeat", 0))
        pid = int(lock.get("pid", -1))
    except (TypeError, ValueError):
        return "it is unreadable"
    if lock.get("host") == socket.gethostname():
        return None if _pid_alive(pid) else f"its process {pid} on this host is gone"
    if age > STALE_SECONDS:
        return f"its heartbeat is {age:.0f} s old"
    return None


def _remove_stale(path: str, token: str) -> None:
    """Removes a stale lock so that of several processes taking it over at once, one wins the next create:
    locally the lock is first renamed to a name of this process's own (a rename succeeds only once)."""
    try:
        if storage.is_remote(path):
            tf.io.gfile.remove(path)
            return
        aside = f"{path}.stale-{token.replace(':', '-')}"
        os.rename(path, aside)
        os.remove(aside)
    except (FileNotFoundError, tf.errors.NotFoundError):
        pass  # another process moved it first; the exclusive create decides


def _write_lock(path: str, payload: dict, exclusive: bool) -> bool:
    """Writes the lock; with ``exclusive`` on a local disk, only if no lock exists (O_EXCL)."""
    data = json.dumps(payload).encode("utf-8")
    if exclusive and not storage.is_remote(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    storage.write_bytes_atomically(path, data)
    # Object stores have no exclusive create: read back, and the last writer wins consistently.
    return (_read_lock(path) or {}).get("token") == payload["token"]


class _Lock:
    def __init__(self, path: str, payload: dict):
        self.path, self.payload = path, payload
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            if (_read_lock(self.path) or {}).get("token") != self.payload["token"]:
                return  # taken over or removed: not ours to refresh
            self.payload["heartbeat"] = time.time()
            try:
                storage.write_bytes_atomically(self.path, json.dumps(self.payload).encode("utf-8"))
            except tf.errors.OpError:
                pass  # a missed heartbeat only makes the lock look older

    def release(self):
        self._stop.set()
        _held.discard(self.path)
        if (_read_lock(self.path) or {}).get("token") == self.payload["token"]:
            try:
                tf.io.gfile.remove(self.path)
            except tf.errors.NotFoundError:
                pass


_held = set()  # lock paths this process holds: nested acquire() calls are no-ops


class FolderBusyError(ConfigError):
    """Another run holds the folder's lock, or wrote its run there first: the folder is that run's, whoever
    created it (a failed start must not remove it)."""


def acquire(model_dir: str):
    """Takes the run folder's lock, or raises ConfigError naming the live run that holds it.

    Returns None when this process already holds it (nested calls), else a lock to ``release()``."""
    path = os.path.join(model_dir, LOCK)
    if path in _held:
        return None
    token = f"{socket.gethostname()}:{os.getpid()}:{time.time()}"
    payload = dict(_owner(), folder=model_dir, started=time.time(), heartbeat=time.time(), token=token)
    for _ in range(5):
        existing = _read_lock(path) if tf.io.gfile.exists(path) else None
        if existing is not None:
            reason = _stale_reason(existing)
            if reason is None:
                raise FolderBusyError(
                    f"--model_dir={model_dir} is being written by another run (host {existing.get('host')}, "
                    f"pid {existing.get('pid')}); wait for it to finish or use another --model_dir")
            print(f"tfl: taking over the lock in {model_dir}: {reason}", file=sys.stderr)
            _remove_stale(path, token)
        if _write_lock(path, payload, exclusive=True):
            _held.add(path)
            return _Lock(path, payload)
    raise FolderBusyError(f"--model_dir={model_dir} is contended by other runs; use another --model_dir")


@contextlib.contextmanager
def locked(model_dir: str):
    """Holds the run folder's lock for the ``with`` block (a no-op if this process holds it already)."""
    lock = acquire(model_dir)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
