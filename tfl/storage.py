"""Run files on a local disk or an object store (gs://, or any other tf.io.gfile scheme).

On a TPU VM or a multi-worker job the run folder is usually a bucket, so everything tfl writes or
reads from user paths goes through tf.io.gfile. Writes are made whole elsewhere and then moved into
place, so a reader never sees half a file or half a folder.

    tfl.storage.write_json_atomically("gs://bucket/run/metrics.json", {"accuracy": 0.9})
"""

from __future__ import annotations

import io
import json
import os

import tensorflow as tf

gfile = tf.io.gfile


def is_remote(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)


def is_file(path: str) -> bool:
    return gfile.exists(path) and not gfile.isdir(path)


def list_folder(path: str) -> list:
    """Entry names of a folder; object stores mark sub-folders with a trailing '/', dropped here."""
    return [name.rstrip("/") for name in gfile.listdir(path)]


def read_bytes(path: str) -> bytes:
    with gfile.GFile(path, "rb") as f:
        return f.read()


def temporary_name(path: str) -> str:
    """A sibling name for staging ``path`` (same folder, so the final move stays on one filesystem)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


def write_bytes_atomically(path: str, payload: bytes) -> None:
    folder = os.path.dirname(path)
    if folder:
        gfile.makedirs(folder)
    staging = temporary_name(path)
    try:
        with gfile.GFile(staging, "wb") as f:
            f.write(payload)
        gfile.rename(staging, path, overwrite=True)
    finally:
        if gfile.exists(staging):
            gfile.remove(staging)


def write_text_atomically(path: str, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def write_json_atomically(path: str, payload: dict) -> None:
    """Writes a temporary file in the same folder and renames it, so readers never see half a file."""
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def save_figure(figure, path: str, dpi: int = 100) -> None:
    """matplotlib writes only local files: render to memory, then write through gfile."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_bytes_atomically(path, buffer.getvalue())


def move_folder(staging: str, final: str) -> None:
    """Moves a finished staging folder to ``final`` (which must not exist).

    Locally this is one atomic rename. Object stores have no folders to rename: files are copied
    one by one, the top-level files (saved_model.pb, source.json: what readers look for) last, and
    the staging folder is deleted afterwards.
    """
    if not is_remote(staging):
        os.replace(staging, final)
        return
    copies = []
    for folder, _, files in gfile.walk(staging):
        relative = os.path.relpath(folder.rstrip("/"), staging.rstrip("/"))
        target = final if relative == "." else os.path.join(final, relative)
        copies += [(relative == ".", os.path.join(folder, name), os.path.join(target, name)) for name in files]
    for _, source, target in sorted(copies):  # False (sub-folders) sorts before True (top level)
        gfile.makedirs(os.path.dirname(target))
        gfile.copy(source, target, overwrite=True)
    gfile.rmtree(staging)
