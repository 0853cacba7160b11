"""Predictions from a finished run, served by its latest export: exactly what a server would return.

    rows = tfl.predict("runs/minilm_rt", ["a gripping film", "two hours I will never get back"])
    rows = tfl.predict("runs/minilm_rt", "csv:new_reviews.csv", text_column="text")
    python main.py --mode=predict --model_dir=runs/minilm_rt --input=csv:new.csv --output=predictions.csv

Inputs: a list of strings (or encoded image bytes), ``csv:<path>`` / ``jsonl:<path>`` (the
``text_column``; labels are not needed), ``images:<folder>`` (every image file under it), or one text.
Each row holds the input, the predicted label and one probability per class.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Optional, Union

import numpy as np
import tensorflow as tf

from tfl import storage, text_ops
from tfl.data.sources import IMAGE_EXTENSIONS, DataError, read_csv_rows, read_jsonl_rows

BATCH = 64


def latest_export(model_dir: str) -> str:
    """<model_dir>/export/<highest version>; a one-line DataError when the run has no export."""
    root = os.path.join(model_dir, "export")
    versions = [int(v) for v in storage.list_folder(root) if v.isdigit()] if tf.io.gfile.isdir(root) else []
    if not versions:
        raise DataError(f"--model_dir={model_dir} has no export/<version>/ to predict with; give the folder of a "
                        "finished training run (trained with --export, the default)")
    return os.path.join(root, str(max(versions)))


def load_serving_function(path: str):
    """The export's ``serving_default``. A keras-hub text export tokenizes in its graph with TensorFlow Text's
    ops, which only an import of ``tensorflow_text`` registers: without it the load fails ("Op type not
    registered 'RegexSplitWithOffsets'"), so it is imported here, as any serving process must (all of it, also
    in the command's process, where tfl.text_ops loads it as used)."""
    try:
        text_ops.load_all()  # registers the ops (a tfl dependency)
    except ImportError:
        pass  # an LSTM or image export loads without it; a text export then fails below, in one line
    try:
        return tf.saved_model.load(path).signatures["serving_default"]
    except (tf.errors.OpError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise DataError(f"Cannot load the export {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "give the folder of a finished tfl run whose export/<version>/ is complete")


def read_inputs(inputs: Union[str, list], text_column: str = "text") -> tuple:
    """(values for the serving signature, what to print for each in the ``input`` column)."""
    if isinstance(inputs, (list, tuple)):
        return list(inputs), [x if isinstance(x, str) else f"<{len(x)} bytes>" for x in inputs]
    kind, _, path = inputs.partition(":")
    if kind in ("csv", "jsonl") and path:
        rows = (read_csv_rows if kind == "csv" else read_jsonl_rows)(path, [text_column])
        texts = [str(r[text_column]) for r in rows]
        return texts, texts
    if kind == "images" and path:
        if not tf.io.gfile.isdir(path):
            raise DataError(f"--input=images:{path} is not a folder; give a folder of image files")
        files = sorted(os.path.join(folder, name) for folder, _, names in tf.io.gfile.walk(path) for name in names
                       if name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
        return [storage.read_bytes(f) for f in files], files
    if not inputs.strip():
        raise DataError("--input is empty; give a text, csv:<path>, jsonl:<path> or images:<folder>")
    return [inputs], [inputs]


def _trained_modality(model_dir: str) -> Optional[str]:
    """What the run was trained on (metrics.json), or None for runs that do not say."""
    import json

    path = os.path.join(model_dir, "metrics.json")
    try:
        return json.loads(storage.read_bytes(path)).get("data", {}).get("modality")
    except (ValueError, tf.errors.OpError):
        return None


def predict(model_dir: str, inputs: Union[str, list], *, text_column: str = "text") -> list:
    """One dict per input: ``input``, ``label`` and ``p(<class>)`` for each class, from the latest export."""
    serve = load_serving_function(latest_export(model_dir))
    values, shown = read_inputs(inputs, text_column)
    trained_on = _trained_modality(model_dir)
    images_given = isinstance(inputs, str) and inputs.startswith("images:")
    if trained_on and images_given != (trained_on in ("image", "image_file")):
        raise DataError(f"The run in {model_dir} was trained on {trained_on} data, and --input={inputs[:60]} is "
                        f"{'images' if images_given else 'text'}; give inputs of the kind it was trained on")
    spec = serve.structured_input_signature[1]["inputs"]
    if spec.dtype != tf.string:
        raise DataError(f"The export in {model_dir} takes token ids, not raw inputs; predict with raw text needs a "
                        "model trained on text (csv/jsonl/asset/tfds sources)")
    rows = []
    for start in range(0, len(values), BATCH):
        try:
            out = serve(inputs=tf.constant(values[start:start + BATCH]))
        except (tf.errors.InvalidArgumentError, ValueError) as e:
            raise DataError(f"The export could not read input {start + 1}.. ({str(e).splitlines()[0][:120]}); "
                            "check that the inputs are what the model was trained on (text or image files)")
        names = [n.decode() for n in out["label_names"].numpy()[0]]
        probabilities = np.asarray(out["probabilities"])
        for i, label in enumerate(out["label"].numpy()):
            row = {"input": shown[start + i], "label": label.decode()}
            row.update({f"p({name})": float(p) for name, p in zip(names, probabilities[i])})
            rows.append(row)
    return rows


def run_predict(config, verbose: int = 1) -> dict:
    """--mode=predict: ``config.predict.input`` through the run's export, as CSV to ``config.predict.output``
    (or stdout)."""
    _, _, input_path = config.predict.input.partition(":")
    if config.predict.output and config.predict.input.startswith(("csv:", "jsonl:", "images:")) and \
            os.path.abspath(config.predict.output) == os.path.abspath(input_path):
        raise DataError(f"--output={config.predict.output} is the --input file itself; give another path for the "
                        "predictions (the input is never overwritten)")
    rows = predict(config.model_dir, config.predict.input, text_column=config.data.text_column)
    text = write_predictions(rows, config.predict.output)
    if not config.predict.output:
        print(text, end="")
    return {"predictions": len(rows), "output": config.predict.output}


def write_predictions(rows: list, output: Optional[str] = None) -> str:
    """The rows as CSV, written atomically to ``output`` (any tf.io.gfile path), or returned for stdout."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["input", "label"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    if output:
        try:
            storage.write_text_atomically(output, buffer.getvalue())
        except (tf.errors.OpError, OSError) as e:
            raise DataError(f"Cannot write --output={output} ({type(e).__name__}); give a path in a folder you can "
                            "write to")
    return buffer.getvalue()
