"""--mode=rank: score a zoo of pretrained candidates on the target's labelled examples, without training.

A *candidate* is (backbone, depth): the features after block ``depth`` of a backbone, pooled to one
vector per example (text: the mean over real tokens; images: the global average), scored with the
estimators of ``tfl.transferability``. Every depth of one backbone comes from **one** forward pass
per batch (a Keras model whose outputs are every block's pooled output).

    zoo = ranking.candidates("text", backbones=["asset:minilm"], sequence_length=64)
    features = ranking.extract_features(zoo, texts, modality="text")     # candidate -> {"features", ...}
    scores = ranking.score_candidates(features, labels, "classification")  # candidate -> {"logme", ...}
    rows = ranking.ranking_rows(features, scores)                           # best LogME first

or the whole thing from raw inputs: ``ranking.rank_candidates(inputs, labels, modality="text")``.

The zoo, per modality of the data (``DEFAULT_ZOO``; ``backbones=`` replaces it):

* text: ``asset:minilm`` (all-MiniLM-L6-v2) and ``asset:minilm_l3`` (paraphrase-MiniLM-L3-v2, where
  that asset exists), each at depth 0 (embeddings alone) and after each transformer block 1..L; any
  keras-hub text encoder preset or folder (BERT family: blocks named ``transformer_layer_<i>``);
* images: ``asset:efficientnet_lite0`` after its stem (depth 0), each of its 7 stages and its head
  conv (depth 8), with LEEP/NCE from its ImageNet classifier at the last depth;
* any modality: the lstm / small_cnn source models that runs saved (``source_models=``, or a run folder
  in ``backbones=``): their backbone's output, with LEEP/NCE from the source task's classifier;
* for each architecture, a randomly initialised copy at its last depth, as a control: a candidate
  that does not beat its own random control carries nothing its architecture alone would not.

Scores are comparable only between candidates scored on the same examples; the ranking sorts by
LogME (higher is better).
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional

import numpy as np

from tfl import storage, transferability
from tfl.data import stratified_split
# The zoo's names too, so a script needs only tfl.ranking.
from tfl.zoo import (DEFAULT_ZOO, RANDOM_SUFFIX, FeatureSource, available_zoo, candidates,  # noqa: F401
                     check_backbones, extract_features, keras_hub_features, source_model_features)


# ---- scores ---------------------------------------------------------------------------------

def score_candidates(features_by_candidate: dict, labels, task: str = "classification") -> dict:
    """Every estimator that applies, per candidate: candidate -> {"logme", "h_score", "leep", "nce", "dim",
    "seconds"}.

    ``features_by_candidate``: name -> [N, D] array, or name -> {"features": [N, D], optionally
    "source_probabilities": [N, C_s]} (as ``extract_features`` returns). LogME for every task
    (regression: its regression form; multilabel: one target per label); H-score for classification;
    LEEP and NCE where a source classifier's probabilities are given (classification). ``seconds`` is
    the time the scores took (not the features).

        scores = score_candidates({"a": feats_a, "b": feats_b}, y, "classification")
        scores["a"]["logme"], scores["a"]["h_score"]
    """
    labels = np.asarray(labels)
    scores = {}
    for name, value in features_by_candidate.items():
        entry = value if isinstance(value, dict) else {"features": value}
        features = np.asarray(entry["features"])
        started = time.perf_counter()
        row = {"dim": int(features.shape[1])}
        estimators = {}
        if task == "classification":
            estimators["logme"] = lambda: transferability.logme(features, labels)  # noqa: E731
            estimators["h_score"] = lambda: transferability.h_score(features, labels)  # noqa: E731
            probabilities = entry.get("source_probabilities")
            if probabilities is not None:
                probabilities = np.asarray(probabilities, np.float64)
                estimators["leep"] = lambda: transferability.leep(probabilities, labels)  # noqa: E731
                estimators["nce"] = lambda: transferability.nce(np.argmax(probabilities, axis=1), labels)  # noqa: E731
        else:  # regression targets, or multilabel 0/1 targets each scored as a regression
            targets = labels.astype(np.float64)
            estimators["logme"] = lambda: transferability.logme(features, targets, "regression")  # noqa: E731
        for key, estimate in estimators.items():
            try:
                row[key] = estimate()
            except transferability.TransferabilityError as e:  # e.g. constant or non-finite features
                row[key] = float("nan")
                row.setdefault("errors", {})[key] = str(e)
        row["seconds"] = time.perf_counter() - started
        scores[name] = row
    return scores


def ranking_rows(features_by_candidate: dict, scores: dict) -> list:
    """One row per candidate, best LogME first (a score that could not be computed, NaN, last): candidate,
    backbone, depth, block, pretrained, dim, the scores, feature_seconds (the source's shared pass),
    score_seconds and seconds (their sum)."""
    finite = {name: row["logme"] for name, row in scores.items() if math.isfinite(row["logme"])}
    order = (transferability.rank(finite) if finite else []) + [name for name in scores if name not in finite]
    rows = []
    for name in order:
        entry = features_by_candidate[name]
        entry = entry if isinstance(entry, dict) else {}
        score = scores[name]
        row = {"candidate": name, "backbone": entry.get("backbone", name), "depth": entry.get("depth"),
               "block": entry.get("block", ""), "pretrained": entry.get("pretrained", True), "dim": score["dim"]}
        row.update({k: score[k] for k in ("logme", "h_score", "leep", "nce", "errors") if k in score})
        row["feature_seconds"] = round(float(entry.get("feature_seconds", 0.0)), 3)
        row["score_seconds"] = round(score["seconds"], 3)
        row["seconds"] = round(row["feature_seconds"] + row["score_seconds"], 3)
        rows.append(row)
    return rows


def rank_candidates(inputs, labels, **options) -> list:
    """The whole ranking from raw inputs and labels, best first (``rank_with_features``' rows; same options)::

        rows = rank_candidates(texts, labels, modality="text", backbones=["asset:minilm"], sequence_length=64)
        {row["candidate"]: row["logme"] for row in rows}
    """
    return rank_with_features(inputs, labels, **options)[2]


def rank_with_features(inputs, labels, *, modality: str, task: str = "classification", backbones=(),
                       source_models=(), sequence_length: int = 128, image_size: int = 0,
                       maxlen: Optional[int] = None, controls: bool = True, batch_size: int = 64, seed: int = 0,
                       depths: str = "all") -> tuple:
    """(zoo, features, rows): ``candidates`` -> ``extract_features`` -> ``score_candidates`` ->
    ``ranking_rows`` (best first), with the zoo and the features kept for a caller that uses them again (a
    benchmark's probes on other examples)."""
    zoo = candidates(modality, backbones, source_models, sequence_length=sequence_length, image_size=image_size,
                     maxlen=maxlen, controls=controls, seed=seed)
    features = select_depths(extract_features(zoo, inputs, modality=modality, batch_size=batch_size), depths)
    return zoo, features, ranking_rows(features, score_candidates(features, labels, task))


def deepest_depths(entries) -> dict:
    """backbone -> its deepest depth among ``entries`` (ranking rows or extract_features entries: dicts with
    "backbone" and "depth"; a depth of None counts as 0)."""
    deepest = {}
    for entry in entries:
        deepest[entry["backbone"]] = max(deepest.get(entry["backbone"], 0), entry["depth"] or 0)
    return deepest


def select_depths(features_by_candidate: dict, depths: str = "all") -> dict:
    """Keeps the candidates at ``depths``: "all", "last" (each backbone's deepest) or a comma list such as "1,3".
    Random-init controls are kept whatever the choice (they exist at one depth only)."""
    if depths == "all":
        return features_by_candidate
    deepest = deepest_depths(features_by_candidate.values())
    wanted = None if depths == "last" else {int(d) for d in depths.split(",")}
    return {name: entry for name, entry in features_by_candidate.items()
            if not entry["pretrained"] or (entry["depth"] == deepest[entry["backbone"]] if wanted is None
                                           else entry["depth"] in wanted)}


# ---- examples -------------------------------------------------------------------------------

def stratified_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of exactly ``count`` examples (all if fewer), stratified by label, from ``seed``."""
    labels = np.asarray(labels)
    if not count or len(labels) <= count:
        return np.arange(len(labels))
    keep, rest = stratified_split(labels, (count / len(labels), 1.0), seed)
    rng = np.random.RandomState(seed)
    if len(keep) < count:  # per-class rounding: top up from the rest
        keep = np.concatenate([keep, rng.choice(rest, count - len(keep), replace=False)])
    elif len(keep) > count:
        keep = rng.choice(keep, count, replace=False)
    return np.sort(keep)


def training_examples(splits, count: int, seed: int) -> tuple:
    """(inputs, labels) of at most ``count`` examples of the training split, stratified by label."""
    inputs, labels = [], []
    for x, y in splits.train.as_numpy_iterator():
        inputs.append(x)
        labels.append(y)
    labels = np.asarray(labels)
    keep = stratified_subset(labels, count, seed)
    return [inputs[i] for i in keep], labels[keep]


# ---- the report -----------------------------------------------------------------------------

_COLUMNS = [("candidate", "candidate"), ("depth", "depth"), ("block", "block"), ("logme", "LogME"),
            ("h_score", "H-score"), ("leep", "LEEP"), ("nce", "NCE"), ("dim", "dim"),
            ("feature_seconds", "features s"), ("score_seconds", "score s")]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(rows: list) -> str:
    """The ranking as a Markdown table (also how it is printed)."""
    columns = [(k, title) for k, title in _COLUMNS if k in ("candidate", "depth", "block", "logme", "dim",
                                                            "feature_seconds", "score_seconds")
               or any(k in row for row in rows)]
    cells = [[title for _, title in columns]] + [[_cell(row.get(k)) for k, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def format_markdown(rows: list, info: dict) -> str:
    lines = [f"# Transferability ranking: {info['source']}", "",
             f"{info['examples']} training examples ({info['label_counts']}), task {info['task']}; candidates "
             "ranked by LogME (higher is better: the per-example log evidence of a linear model on the frozen "
             "features). H-score: class-mean variance share; LEEP / NCE: from a source classifier's predictions "
             "(log-likelihood / negative conditional entropy, nats). A `(random init)` row is the same "
             "architecture with fresh weights: a control. `features s` is the backbone's whole pass (all its "
             f"depths at once), `score s` the estimators. Total {info['seconds']:.1f}s."]
    if rows and info["examples"] <= max(row["dim"] for row in rows):
        lines[-1] += (f" With {info['examples']} examples and up to {max(row['dim'] for row in rows)} dims, "
                      "H-score approaches its maximum (classes - 1) for any features: compare by LogME.")
    lines += ["", format_table(rows), ""]
    return "\n".join(lines)


def write_report(model_dir: str, rows: list, info: dict) -> dict:
    """Writes ``rank.json`` ({"rows", "info"}) and ``rank.md`` under model_dir; returns the JSON content."""
    report = {"rows": rows, **info}
    # A score that could not be computed is NaN in memory and null in the file (NaN is not JSON).
    finite_rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                   for row in rows]
    storage.write_json_atomically(os.path.join(model_dir, "rank.json"), {**report, "rows": finite_rows})
    storage.write_text_atomically(os.path.join(model_dir, "rank.md"), format_markdown(rows, info))
    return report


def rank(config, splits=None) -> dict:
    """--mode=rank: ranks the zoo on the training split of ``config.data`` and writes the report.

    ``config.rank.backbones`` (empty: the offline zoo for the data's modality), ``config.model.source_model``
    (an lstm/small_cnn run, added to the zoo), ``config.rank.rank_examples`` training examples at most;
    ``splits``: the data of ``config`` when the caller has loaded it already.
    """
    from tfl.runner import load_data_for  # the runner dispatches here: import it late

    started = time.time()
    sources = [config.model.source_model] if config.model.source_model else []
    check_backbones(config.rank.backbones, None, sources)  # unknown names fail before the data loads
    splits = load_data_for(config) if splits is None else splits
    check_backbones(config.rank.backbones, splits.modality, sources)
    inputs, labels = training_examples(splits, config.rank.rank_examples, config.seed)
    print(f"tfl: rank {config.data.source}: {len(labels)} training examples, labels={splits.label_names}")
    rows = rank_candidates(inputs, labels, modality=splits.modality, task=config.model.task,
                           backbones=config.rank.backbones, source_models=sources,
                           sequence_length=config.model.sequence_length, image_size=config.model.image_size,
                           maxlen=config.data.maxlen, seed=config.seed, depths=config.rank.depths)
    counts = {}
    if labels.ndim == 1 and labels.dtype.kind in "iu":
        values, numbers = np.unique(labels, return_counts=True)
        counts = {splits.label_names[v]: int(n) for v, n in zip(values, numbers)}
    info = {"source": config.data.source, "task": config.model.task, "examples": int(len(labels)),
            "label_counts": counts, "seconds": round(time.time() - started, 2)}
    print(format_table(rows))
    if config.model_dir:
        write_report(config.model_dir, rows, info)
    return {"rows": rows, **info}
