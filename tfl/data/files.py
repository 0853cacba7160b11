"""File sources: csv:<path> and jsonl:<path> tables (text or image-path column) and images:<folder>.

    data = load_table("csv", "/data/reviews.csv", "text", "label", "classification")
    data = load_image_folder("/data/photos")   # one sub-folder per class

Rows are checked as they are read; every error names the file, the line and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import tensorflow as tf

from tfl import storage
from tfl.data.examples import IMAGE_FILE, TEXT, DataError, Examples, SourceData

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")


def _read_text_file(path: str) -> str:
    """A UTF-8 text file from a local path or a gs:// (any tf.io.gfile) path, without a byte-order mark."""
    if not storage.is_file(path):
        raise DataError(f"Data file {path} does not exist; check the path after csv:/jsonl:")
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8")
    except tf.errors.PermissionDeniedError:
        raise DataError(f"Cannot read {path}: permission denied; check its permissions")
    # Excel and Notepad save "UTF-8" with a BOM; left in, it becomes part of the first column's name.
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataError(f"{path} is empty; give a file with a header row and examples")
    return text


def _note(message: str) -> None:
    print(f"tfl: {message}", file=sys.stderr)


def _csv_rows(path: str, columns: list) -> tuple:
    """(rows as dicts, the line each row starts on, number of blank rows skipped)."""
    # Whole documents in one cell pass the csv module's 128 KiB default field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(_read_text_file(path), newline=""))
    try:
        header = next(reader)
    except csv.Error as e:
        raise DataError(f"{path} line 1 is not valid CSV ({e}); re-save the file as CSV")
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path} has no column {missing[0]!r}; its columns are {header}. "
                        "Set --text_column/--label_column")
    rows, lines, blank = [], [], 0
    while True:
        line_number = reader.line_num + 1  # where this row starts: a quoted field may span lines
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path} line {line_number} is not valid CSV ({e}); fix that row")
        if not any(field.strip() for field in row):  # spreadsheets export empty rows as ",,"
            blank += 1
            continue
        if len(row) != len(header):
            raise DataError(f"{path} line {line_number} has {len(row)} fields, the header has "
                            f"{len(header)}; fix that row (quote fields that contain commas)")
        rows.append(dict(zip(header, row)))
        lines.append(line_number)
    if not rows:
        raise DataError(f"{path} has a header but no examples")
    return rows, lines, blank


def _jsonl_rows(path: str, columns: list) -> tuple:
    """(rows as dicts, the line of each row, number of blank lines skipped)."""
    # Split on newlines only: str.splitlines also splits at U+2028 and friends, which JSON leaves unescaped.
    text_lines = _read_text_file(path).split("\n")
    if text_lines[-1] == "":
        text_lines.pop()  # the final newline ends the last line; it is no blank line
    rows, lines, blank = [], [], 0
    for line_number, line in enumerate(text_lines, start=1):
        if not line.strip():
            blank += 1
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {line_number} is not valid JSON; one JSON object per line")
        if not isinstance(row, dict):
            raise DataError(f"{path} line {line_number} is not a JSON object; one object with "
                            f"{columns} per line")
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(f"{path} line {line_number} has no key {missing[0]!r}; "
                            "set --text_column/--label_column")
        rows.append(row)
        lines.append(line_number)
    return rows, lines, blank


def read_csv_rows(path: str, columns: list) -> list:
    """Rows of a CSV file as dicts; checks the header has ``columns`` and no row is ragged; skips blank rows."""
    return _csv_rows(path, columns)[0]


def read_jsonl_rows(path: str, columns: list) -> list:
    return _jsonl_rows(path, columns)[0]


def labels_from_values(values: list, task: str, *, where: str = "", line_numbers: Optional[list] = None) -> tuple:
    """(label array, label names) for raw label values: class names, tag lists, or numbers.

    Surrounding whitespace is stripped (" neg" and "neg" are one class), with one line on stderr when
    that changed any label; an empty label is an error. ``where`` (the file) and ``line_numbers`` (one
    per value) name the offending row.
    """
    def at(i: int) -> str:
        return f"{where or 'The data'} " + (f"line {line_numbers[i]}" if line_numbers else f"example {i + 1}")

    if task == "multilabel":
        tags, changed = [], 0
        for v in values:
            raw = v if isinstance(v, list) else ([] if v is None else str(v).split("|"))
            clean = [t.strip() if isinstance(t, str) else t for t in raw]
            changed += any(t != c for t, c in zip(raw, clean) if c != "")  # "a||b" and "a|" are no news
            tags.append([t for t in clean if t != ""])  # a row with no tags is a negative for every tag
        names = sorted({str(t) for row in tags for t in row})
        multi_hot = np.zeros((len(tags), len(names)), np.float32)
        for i, row in enumerate(tags):
            for t in row:
                multi_hot[i, names.index(str(t))] = 1.0
        _note_stripped(changed, where)
        return multi_hot, names
    raw = ["" if v is None else str(v) for v in values]
    stripped = [v.strip() for v in raw]
    for i, v in enumerate(stripped):
        if not v:
            raise DataError(f"{at(i)} has an empty label; fill it in or delete that row")
    _note_stripped(sum(a != b for a, b in zip(raw, stripped)), where)
    if task == "regression":
        for i, v in enumerate(stripped):
            try:
                float(v)
            except ValueError:
                raise DataError(f"--task=regression needs numeric labels; {at(i)} has {v!r}. Fix that row "
                                "or use --task=classification")
        return np.array([float(v) for v in stripped], np.float32), ["value"]
    names = sorted(set(stripped), key=_natural_key)
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[v] for v in stripped], np.int64), names


def _note_stripped(count: int, where: str) -> None:
    if count:
        _note(f"stripped surrounding whitespace from {count} label{'s' if count != 1 else ''}"
              + (f" in {where}" if where else ""))


def _natural_key(name: str):
    """Sorts '2' before '10', and numbers before words."""
    try:
        return (0, float(name), "")
    except ValueError:
        return (1, 0.0, name)


def load_table(kind: str, path: str, text_column: str, label_column: str, task: str) -> SourceData:
    rows, lines, blank = (_csv_rows if kind == "csv" else _jsonl_rows)(path, [text_column, label_column])
    skipped = {}
    if blank:
        skipped["blank_rows"] = blank
        _note(f"skipped {blank} blank row{'s' if blank != 1 else ''} in {path}")
    features = np.array([str(r[text_column]) for r in rows], dtype=object)
    modality = TEXT
    if len(features) and all(str(f).lower().endswith(IMAGE_EXTENSIONS) for f in features):
        # An image-path column: paths are relative to the file's folder.
        base = os.path.dirname(storage.absolute(path))
        features = np.array([os.path.join(base, f) for f in features], dtype=object)
        modality = IMAGE_FILE
        keep = _readable_images(list(features), f"column {text_column!r} of {path}",
                                "check that the paths are relative to the file's folder", skipped)
        rows, lines, features = [rows[i] for i in keep], [lines[i] for i in keep], features[keep]
    labels, names = labels_from_values([r[label_column] for r in rows], task, where=path, line_numbers=lines)
    return SourceData(modality, names, pool=Examples(features, labels), skipped=skipped)


def _decode_error(path: str) -> Optional[str]:
    """Why ``path`` does not decode as an image (missing, unreadable, not an image, truncated), or None."""
    try:
        encoded = storage.read_bytes(path)
        if encoded.startswith(b"\xff\xd8\xff"):
            # Still reads every coefficient, so a cut body fails, but skips most of the work: 2x faster on photos.
            tf.io.decode_jpeg(encoded, ratio=8)
        else:
            tf.io.decode_image(encoded, expand_animations=False)
    except tf.errors.OpError as e:
        message = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", e.message or type(e).__name__).strip()
        return message.splitlines()[0][:120] if message else type(e).__name__
    return None


def _readable_images(paths: list, where: str, fix: str, skipped: dict) -> np.ndarray:
    """Indices of the ``paths`` that decode. Each file is decoded once here so that a broken one is
    counted (``skipped["unreadable_images"]``) and reported now, instead of being dropped uncounted
    by the pipeline's ignore_errors; threads, because reads from a bucket are slow one at a time."""
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        errors = list(pool.map(_decode_error, paths))
    bad = [i for i, e in enumerate(errors) if e is not None]
    example = f"e.g. {paths[bad[0]]} ({errors[bad[0]]})" if bad else ""
    if len(bad) == len(paths):
        raise DataError(f"None of the {len(paths)} image files in {where} is a readable PNG/JPEG/GIF/BMP, "
                        f"{example}; {fix}")
    if bad:
        skipped["unreadable_images"] = len(bad)
        _note(f"skipped {len(bad)} of {len(paths)} image files in {where} that do not decode, {example}")
    return np.array([i for i, e in enumerate(errors) if e is None], dtype=np.int64)


def load_image_folder(root: str) -> SourceData:
    """``root/<class name>/*.png|jpg|...``: one sub-folder per class. Files that do not decode as images,
    and other files in the class folders, are skipped with a warning that counts them; a folder where no
    file is an image is an error."""
    if not tf.io.gfile.isdir(root):
        raise DataError(f"Image folder {root} does not exist; give images:<folder with one sub-folder per class>")
    classes = sorted(d for d in storage.list_folder(root) if tf.io.gfile.isdir(os.path.join(root, d)))
    paths, labels, others = [], [], []
    for label, name in enumerate(classes):
        for file in sorted(storage.list_folder(os.path.join(root, name))):
            path = os.path.join(root, name, file)
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(path)
                labels.append(label)
            elif not file.startswith(".") and not tf.io.gfile.isdir(path):  # .DS_Store and the like are no data
                others.append(path)
    if not paths:
        raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in sub-folders of {root}; "
                        "put each class's images in its own sub-folder")
    skipped = {}
    if others:
        skipped["other_files"] = len(others)
        _note(f"skipped {len(others)} file{'s' if len(others) != 1 else ''} in {root} that are not "
              f"{'/'.join(IMAGE_EXTENSIONS)} images, e.g. {others[0]}")
    keep = _readable_images(paths, root, "check that the files are not corrupt or mislabelled", skipped)
    return SourceData(IMAGE_FILE, classes, pool=Examples(np.array(paths, dtype=object)[keep], np.array(labels)[keep]),
                      skipped=skipped)
