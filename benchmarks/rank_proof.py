"""Is the transferability ranking right, and does --mode=auto's pick land near the best? Rank the offline
zoo, then fine-tune every candidate, over several seeds, and compare.

    PYTHONPATH=. .venv/bin/python benchmarks/rank_proof.py \
        [--tasks=asset:rotten_tomatoes,asset:spam_assassin] [--examples=400] [--test_examples=400] \
        [--backbones=asset:minilm,asset:minilm_l3] [--depths=1,3,6] [--seeds=3] [--epochs=1] \
        [--out=docs/transferability.md] [--quick]

Per task and seed s (the seed draws the stratified split of ``--examples`` training, validation and test
examples, the head's initialisation and the shuffling):

1. **rank**: ``tfl.ranking.rank_with_features`` (what ``--mode=rank`` runs; the features are kept for the
   probes), on that seed's training examples: every (backbone, depth) of the zoo at ``--depths`` and a
   randomly initialised control per backbone;
2. **ground truth**: every candidate with depth >= 1 is fine-tuned end to end by
   ``tfl.runner.train_and_evaluate`` with the recipe of ``--recipe`` (a flagfile; --epochs, --learning_rate
   and --batch_size replace its own). A candidate (backbone, depth k) is the backbone cut after block k
   (``--backbone_depth=k``, what --mode=auto runs; tests/test_auto.py checks it equals the ranking's
   depth-k features). The random controls are ``--nopretrained`` runs of the full depth;
3. **auto's pick**: ``tfl.auto.choose`` on the same ranking (no budget limit: the recipe's fine-tune) names
   the candidate --mode=auto would run; its accuracy against the best candidate's, and its compute (the
   ranking plus that one fine-tune) against fine-tuning every candidate;
4. **report**: per task, the scores and test accuracies (mean over seeds), Kendall's tau and weighted tau
   between each estimator and the accuracy (``transferability.kendall_tau``) on the means and per seed,
   and seconds to rank vs seconds to fine-tune; the host with its float32/bfloat16 matmul peak measured in
   the same run (``benchmarks/run.py``).

Everything in --out is written by this script; a rerun replaces it. The measurements go beside it (--out with
.json for .md, e.g. docs/transferability.json; commit it with the document) and into <work_dir>/results.json, so
``--render_only`` can write the document again without training. ``--label_free=FLAGFILE`` (default
configs/self_train_rt.flags; empty: none) then runs that no-labels command as a user would (``main.py`` in a fresh
process: zero-shot by label descriptions, then self-training) and adds its test accuracies, plain zero-shot against
self-trained, to the document (issue #16); ``--label_free_only`` runs just that and adds it to the stored
measurements. ``--quick``: tiny caps (one small
task, MiniLM-L3 only, 96 examples, two steps per fine-tune, one seed) for a smoke test in a few minutes.
--bucket_shapes replaces the recipe's length buckets: each bucket shape is one more trace of the training
and evaluation steps per candidate, which a one-epoch run on a few hundred examples does not earn back.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.run import matmul_gflops  # noqa: E402
from tfl import auto, ranking, transferability  # noqa: E402
from tfl.costs import release_memory  # noqa: E402
from tfl.demo import config_from_flagfile  # noqa: E402
from tfl.runner import load_data_for, train_and_evaluate  # noqa: E402
from tfl.self_training import fit_probe  # noqa: E402

ESTIMATORS = (("logme", "LogME"), ("h_score", "H-score"), ("leep", "LEEP"), ("nce", "NCE"))
HIT_POINTS = 1.0  # the top-ranked candidate "hits" if its accuracy is within this many points of the best

INTRO = """\
Each task below is ranked and then fine-tuned on the same labelled training examples, once per seed (the
seed draws the split, the head's initialisation and the shuffling). The ranking is tfl's `--mode=rank`:
frozen features of every candidate (a pretrained text encoder cut after one of its transformer blocks,
mean-pooled), scored by LogME and H-score without any training; each backbone also has a randomly
initialised copy as a control. The ground truth is what tfl's own training path reaches with each
candidate: the encoder cut after that block (`--backbone_depth`, the first blocks' pretrained weights)
plus a fresh head, every weight trained, with the recipe named in the generated section, scored on
held-out test examples; the random controls are fine-tuned the same way. A good estimator orders the
candidates as the fine-tuned accuracies do (Kendall's tau near one; the weighted tau stresses the top of
the order) and its first choice is the best candidate or close to it. The taus are computed on the means
over seeds (scores and accuracies), and per seed (mean ± standard deviation). The pretrained-only columns
leave the random controls out, since telling those apart from pretrained encoders is the easy part.
`--mode=auto`'s pick is what `tfl.auto.choose` makes of the same ranking; its compute is the ranking plus
that one fine-tune, against fine-tuning every candidate. Held-out accuracies carry sampling noise (one
standard error is given) and come from a short schedule: read small differences between neighbouring
depths as ties.

Beside the fine-tunes, each candidate gets a second, cheap ground truth: a linear probe (softmax regression,
`tfl.self_training.fit_probe`) on its frozen features of the same training examples, scored on the same test
examples. LogME and H-score model exactly that (a linear model on fixed features), so they are expected to track
the probes' order whatever fine-tuning does, except where every candidate's probe reaches about the same accuracy
and the order is noise; where the estimators track the probes and not the fine-tunes, it is fine-tuning that
reorders the candidates (deeper cuts have more layers to adapt). This column was added after the first run of this
proof, when a throwaway check on one seed of Rotten Tomatoes had shown LogME ordering frozen probes well and the
fine-tunes not.

`tfl.auto.choose` was changed once during the first run of this proof (2026-11-26). It used to fine-tune the
backbone cut at the best-scored depth; on the first task that landed several points below the best candidate, so it now
fine-tunes the whole backbone that LogME names (and cuts only for a linear probe). When it was changed, only
the first task's results and two fine-tunes of the second (neither at full depth) had been seen; the picks
below are the changed rule's."""


# ---- candidates as training runs ------------------------------------------------------------

def training_model(base, row: dict, full_depth: int):
    """The ModelConfig that fine-tunes the ranking's candidate ``row``: the backbone cut after its block
    (``--backbone_depth``, as ``--mode=auto`` runs it; 0 = whole), or a random-init control."""
    depth = row["depth"] if row["pretrained"] and row["depth"] < full_depth else 0
    return dataclasses.replace(base.model, backbone=row["backbone"], backbone_depth=depth,
                               pretrained=row["pretrained"])


# ---- one task, one seed ---------------------------------------------------------------------

def task_config(args, task: str, seed: int):
    """The recipe for ``task`` with a pool of exactly train + validation + test examples (scaled down
    together when the data set holds fewer), drawn from ``seed``."""
    pool = sum(load_data_for(config_from_flagfile(args.recipe, source=task)).sizes.values())
    wanted = (args.examples, args.validation_examples, args.test_examples)
    scale = min(1.0, pool / sum(wanted))
    sizes = [max(2, int(n * scale)) for n in wanted]
    overrides = dict(source=task, epochs=args.epochs, max_examples=sum(sizes), export=False, seed=seed,
                     bucket_shapes=args.bucket_shapes, validation_fraction=sizes[1] / sum(sizes),
                     test_fraction=sizes[2] / sum(sizes))
    overrides.update({k: getattr(args, k) for k in ("learning_rate", "batch_size") if getattr(args, k)})
    if args.quick:
        overrides["max_steps_per_epoch"] = 2
    return config_from_flagfile(args.recipe, **overrides)


def run_seed(task: str, args, backbone_names: list, seed: int) -> dict:
    base = task_config(args, task, seed)
    splits = load_data_for(base)
    inputs, labels = ranking.training_examples(splits, 0, seed)  # the whole training split
    started = time.perf_counter()
    zoo, features, rows = ranking.rank_with_features(
        inputs, labels, modality=splits.modality, task=base.model.task, backbones=backbone_names,
        sequence_length=base.model.sequence_length, seed=seed, depths=args.depths)  # features kept for the probes
    rank_seconds = time.perf_counter() - started
    probes = probe_accuracies(zoo, features, labels, splits, args.depths)
    print(ranking.format_table(rows), flush=True)
    deepest = ranking.deepest_depths(rows)  # the controls sit at each backbone's full depth, whatever --depths keeps
    runs = {}
    for row in rows:
        if row["depth"] < 1:  # the embeddings alone: ranked, not a model one fine-tunes
            continue
        config = dataclasses.replace(base, model=training_model(base, row, deepest[row["backbone"]]))
        metrics = train_and_evaluate(config, verbose=0)
        release_memory()  # each run's models and traced functions would otherwise pile up (OOM)
        runs[row["candidate"]] = {
            "test_accuracy": metrics["test"]["accuracy"], "validation_accuracy": metrics["validation"]["accuracy"],
            "train_seconds": metrics["train_seconds"], "wall_seconds": metrics["wall_seconds"],
            "optimizer_steps": metrics["optimizer_steps"], "precision": metrics["precision"]}
        print(f"proof: {task} seed {seed} {row['candidate']}: test accuracy {runs[row['candidate']]['test_accuracy']:.4f}"
              f" in {metrics['wall_seconds']:.0f} s", flush=True)
    values, counts = np.unique(labels, return_counts=True)
    result = {"seed": seed, "rows": rows, "runs": runs, "probes": probes, "rank_seconds": rank_seconds,
              "sizes": splits.sizes,
              "label_counts": {splits.label_names[v]: int(n) for v, n in zip(values, counts)}}
    return {**result, "auto": auto_pick(result, base.train.epochs),
            "recipe": {"flagfile": args.recipe, "epochs": base.train.epochs, "learning_rate": base.train.learning_rate,
                       "batch_size": base.data.batch_size, "sequence_length": base.model.sequence_length,
                       "warmup_fraction": base.train.warmup_fraction, "lr_schedule": base.train.lr_schedule,
                       "bucket_shapes": base.data.bucket_shapes,
                       "precision": next(iter(runs.values()))["precision"] if runs else "-",
                       "max_steps_per_epoch": base.train.max_steps_per_epoch}}


def probe_accuracies(zoo: list, features: dict, labels, splits, depths: str) -> dict:
    """Candidate -> test accuracy of a linear probe on its frozen features (``tfl.self_training.fit_probe``:
    softmax regression on standardised features), trained on the ranking's own training examples: the
    accuracy LogME and H-score model directly, a second ground truth beside the fine-tunes'."""
    pairs = list(splits.test.as_numpy_iterator())
    test_labels = np.array([y for _, y in pairs])
    test = ranking.select_depths(ranking.extract_features(zoo, [x for x, _ in pairs], modality=splits.modality),
                                 depths)
    accuracies = {}
    for name, entry in features.items():
        train_features = np.asarray(entry["features"], np.float64)
        probe = fit_probe(train_features, labels, len(splits.label_names), train_features.mean(axis=0),
                          train_features.std(axis=0) + 1e-6)
        accuracies[name] = float(np.mean(probe.predict(np.asarray(test[name]["features"], np.float64)) == test_labels))
    return accuracies


def auto_pick(seed: dict, epochs: int) -> dict:
    """The candidate ``tfl.auto.choose`` makes of one seed's ranking with no budget limit (the recipe's epochs)."""
    counts = seed["label_counts"]
    pick = auto.choose(seed["rows"], train_examples=seed["sizes"]["train"], smallest_class=min(counts.values()),
                       epochs=epochs, budget_seconds=math.inf, ranked_examples=sum(counts.values()))
    return {"candidate": f"{pick.backbone}@{pick.depth}", "strategy": pick.strategy}


# ---- judging the ranking --------------------------------------------------------------------

def mean_rows(seeds: list) -> list:
    """One row per candidate fine-tuned in every seed: the estimators' scores and the test accuracy, each
    the mean over seeds (with the accuracy's standard deviation), best mean LogME first."""
    names = [n for n in seeds[0]["runs"] if all(n in s["runs"] for s in seeds)]
    rows = []
    for name in names:
        per_seed = [next(r for r in s["rows"] if r["candidate"] == name) for s in seeds]
        accuracy = [s["runs"][name]["test_accuracy"] for s in seeds]
        row = {k: per_seed[0][k] for k in ("candidate", "backbone", "depth", "pretrained")}
        for key, _ in ESTIMATORS:
            values = [r.get(key, float("nan")) for r in per_seed]
            row[key] = float(np.mean(values)) if all(math.isfinite(v) for v in values) else float("nan")
        probe = [s.get("probes", {}).get(name, float("nan")) for s in seeds]  # absent from older results
        row.update(test_accuracy=float(np.mean(accuracy)), test_std=float(np.std(accuracy)),
                   probe_accuracy=float(np.mean(probe)),
                   wall_seconds=float(np.mean([s["runs"][name]["wall_seconds"] for s in seeds])),
                   optimizer_steps=seeds[0]["runs"][name]["optimizer_steps"])
        rows.append(row)
    return sorted(rows, key=lambda r: -r["logme"] if math.isfinite(r["logme"]) else math.inf)


def judge(rows: list, truth: str = "test_accuracy") -> list:
    """Per estimator present for every candidate: taus (all candidates, pretrained only) and the top-1 check,
    against ``truth`` (the fine-tunes' "test_accuracy" or the linear probes' "probe_accuracy"); none when a
    candidate lacks it."""
    accuracy = {row["candidate"]: row[truth] for row in rows}
    if not all(math.isfinite(v) for v in accuracy.values()):
        return []
    pretrained = [row["candidate"] for row in rows if row["pretrained"]]
    verdicts = []
    for key, title in ESTIMATORS:
        scores = {row["candidate"]: row.get(key, float("nan")) for row in rows}
        if not all(math.isfinite(v) for v in scores.values()):
            continue
        verdict = {"estimator": title}
        for group, names in (("all", list(accuracy)), ("pretrained", pretrained)):
            for weighted in (True, False):
                try:
                    tau = transferability.rank_correlation({n: scores[n] for n in names},
                                                           {n: accuracy[n] for n in names}, weighted=weighted)
                except transferability.TransferabilityError:
                    tau = float("nan")
                verdict[f"tau{'_w' if weighted else ''}_{group}"] = tau
        top = transferability.rank(scores)[0]
        best = max(accuracy, key=accuracy.get)
        gap = 100 * (accuracy[best] - accuracy[top])
        verdict.update(top=top, top_accuracy=accuracy[top], best=best, best_accuracy=accuracy[best], gap_points=gap,
                       hit=gap <= HIT_POINTS + 1e-9)
        verdicts.append(verdict)
    return verdicts


def seed_rows(seed: dict) -> list:
    """One seed's candidates in mean_rows' form."""
    return mean_rows([seed])


def judge_task(task: str, seeds: list) -> dict:
    rows = mean_rows(seeds)
    per_seed = [{v["estimator"]: v for v in judge(seed_rows(s))} for s in seeds]
    per_seed_probe = [{v["estimator"]: v for v in judge(seed_rows(s), "probe_accuracy")} for s in seeds]
    fine_tune = [sum(r["wall_seconds"] for r in s["runs"].values()) for s in seeds]
    picks = []
    for s, total in zip(seeds, fine_tune):
        name = s["auto"]["candidate"]
        best = max(r["test_accuracy"] for r in s["runs"].values())
        picks.append({"candidate": name, "gap_points": 100 * (best - s["runs"][name]["test_accuracy"]),
                      "compute_share": (s["rank_seconds"] + s["runs"][name]["wall_seconds"]) / total})
    mean_accuracy = {r["candidate"]: r["test_accuracy"] for r in rows}
    return {"task": task, "seeds": seeds, "rows": rows, "verdicts": judge(rows), "per_seed": per_seed,
            "probe_verdicts": judge(rows, "probe_accuracy"), "per_seed_probe": per_seed_probe,
            "picks": picks, "auto_gap_of_means": 100 * (max(mean_accuracy.values()) - float(np.mean(
                [s["runs"][p["candidate"]]["test_accuracy"] for s, p in zip(seeds, picks)]))),
            "rank_seconds": float(np.mean([s["rank_seconds"] for s in seeds])),
            "fine_tune_seconds": float(np.mean(fine_tune))}


def standard_error(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")


# ---- the report -----------------------------------------------------------------------------

def _f(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


def host_info() -> dict:
    model, flags = "", []
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = [f for f in line.split(":", 1)[1].split() if f in ("avx512_bf16", "amx_bf16", "avx512f")]
    except (OSError, subprocess.SubprocessError):
        pass
    return {"node": platform.node(), "cpus": os.cpu_count(), "model": model, "flags": flags,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _mean_std(values) -> str:
    values = [v for v in values if math.isfinite(v)]
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "n/a"


def verdict_lines(verdicts: list, per_seed: list, title: str) -> list:
    if not verdicts:
        return []
    lines = [title, "", "| estimator | τ_w all | τ all | τ_w pretrained | τ pretrained | τ_w all per seed | "
             "top-ranked (acc) | best (acc) | gap, points | top-1 within 1 point |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        taus = [s[v["estimator"]]["tau_w_all"] for s in per_seed if v["estimator"] in s]
        lines.append(f"| {v['estimator']} | {_f(v['tau_w_all'])} | {_f(v['tau_all'])} | {_f(v['tau_w_pretrained'])} | "
                     f"{_f(v['tau_pretrained'])} | {_mean_std(taus)} | `{v['top']}` ({_f(v['top_accuracy'])}) | "
                     f"`{v['best']}` ({_f(v['best_accuracy'])}) | {v['gap_points']:.1f} | "
                     f"{'yes' if v['hit'] else 'no'} |")
    return lines + [""]


def task_markdown(result: dict) -> list:
    seeds, rows = result["seeds"], result["rows"]
    present = [(k, t) for k, t in ESTIMATORS if any(math.isfinite(row.get(k, float("nan"))) for row in rows)]
    sizes, recipe = seeds[0]["sizes"], seeds[0]["recipe"]
    best = max(row["test_accuracy"] for row in rows)
    lines = [f"## {result['task']}", "",
             f"Per seed: training examples {sizes['train']} ({', '.join(f'{k} {v}' for k, v in seeds[0]['label_counts'].items())}"
             f" for seed {seeds[0]['seed']}), validation {sizes['validation']}, test {sizes['test']}; seeds "
             f"{', '.join(str(s['seed']) for s in seeds)}. Fine-tune recipe: `{recipe['flagfile']}` with "
             f"epochs {recipe['epochs']}" + (f" (at most {recipe['max_steps_per_epoch']} steps)"
                                             if recipe["max_steps_per_epoch"] else "") +
             f", learning rate {recipe['learning_rate']:g} ({recipe['lr_schedule']}, warm-up "
             f"{recipe['warmup_fraction']:g}), batch {recipe['batch_size']}, sequence {recipe['sequence_length']} "
             f"({recipe['bucket_shapes']} length buckets), precision {recipe['precision']}, every weight trained. One "
             f"standard error of the best mean test accuracy over {len(seeds)} x {sizes['test']} test examples: "
             f"{100 * standard_error(best, len(seeds) * sizes['test']):.1f} points.", ""]
    header = ["rank", "candidate"] + [t for _, t in present] + ["fine-tuned test acc (mean ± std)", "steps",
                                                                "fine-tune s", "linear probe test acc"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in enumerate(rows, 1):
        cells = [str(index), f"`{row['candidate']}`"] + [_f(row.get(k), 4) for k, _ in present]
        cells += [f"{row['test_accuracy']:.3f} ± {row['test_std']:.3f}", str(row["optimizer_steps"]),
                  _f(row["wall_seconds"], 0), _f(row.get("probe_accuracy"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Rank = order by mean LogME (what `--mode=rank` reports first); scores, accuracies and "
              "seconds are means over the seeds.", ""]
    lines += verdict_lines(result["verdicts"], result["per_seed"], "Against the fine-tuned accuracies:")
    lines += verdict_lines(result.get("probe_verdicts", []), result.get("per_seed_probe", []),
                           "Against the linear probes' accuracies (the frozen features' own test accuracy):")
    picks = result["picks"]
    lines += ["", "`--mode=auto`'s pick per seed: " + "; ".join(
        f"seed {s['seed']}: `{p['candidate']}`, {p['gap_points']:.1f} points below that seed's best, "
        f"{100 * p['compute_share']:.0f}% of the compute of fine-tuning every candidate" for s, p in zip(seeds, picks))
        + f". Its mean accuracy is {result['auto_gap_of_means']:.1f} points below the best candidate's mean.", "",
        f"Compute (mean per seed): ranking all {len(seeds[0]['rows'])} candidates took {result['rank_seconds']:.0f} s "
        f"(building the models, one feature pass per backbone, the scores); fine-tuning the {len(rows)} candidates "
        f"took {result['fine_tune_seconds']:.0f} s (data, model building, `fit` and evaluation): "
        f"{result['fine_tune_seconds'] / result['rank_seconds']:.1f}x the ranking's time."]
    return lines + [""]


def summary_markdown(results: list) -> list:
    lines = ["## Summary", "",
             "Against the fine-tuned accuracies (the issue's ground truth), and in the last two columns against the "
             "linear probes' (each candidate's frozen features):", "",
             "| task | estimator | τ_w all | τ_w pretrained | τ all | τ pretrained | τ_w all per seed | "
             "top-1 within 1 point | rank s | fine-tune s | τ_w all, probe | τ_w pretrained, probe |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        probe = {v["estimator"]: v for v in result.get("probe_verdicts", [])}
        for v in result["verdicts"]:
            per_seed = [s[v["estimator"]]["tau_w_all"] for s in result["per_seed"] if v["estimator"] in s]
            p = probe.get(v["estimator"], {})
            lines.append(f"| {result['task']} | {v['estimator']} | {_f(v['tau_w_all'])} | {_f(v['tau_w_pretrained'])} | "
                         f"{_f(v['tau_all'])} | {_f(v['tau_pretrained'])} | {_mean_std(per_seed)} | "
                         f"{'yes' if v['hit'] else 'no'} ({v['gap_points']:.1f}) | {result['rank_seconds']:.0f} | "
                         f"{result['fine_tune_seconds']:.0f} | {_f(p.get('tau_w_all'))} | "
                         f"{_f(p.get('tau_w_pretrained'))} |")
    for _, title in ESTIMATORS:
        def mean_of(key, verdicts="verdicts"):
            values = [v[key] for r in results for v in r.get(verdicts, []) if v["estimator"] == title]
            return _f(float(np.nanmean(values))) if values else "-"
        count = sum(v["estimator"] == title for r in results for v in r["verdicts"])
        if count:
            lines.append(f"| mean over {count} task(s) | {title} | {mean_of('tau_w_all')} | "
                         f"{mean_of('tau_w_pretrained')} | | | | | | | {mean_of('tau_w_all', 'probe_verdicts')} | "
                         f"{mean_of('tau_w_pretrained', 'probe_verdicts')} |")
    lines += ["", "`--mode=auto` (its pick from the ranking, then one fine-tune), per task, mean over seeds:", "",
              "| task | picks | points below the best candidate's mean | compute vs fine-tuning every candidate |",
              "|---|---|---|---|"]
    for result in results:
        picks = result["picks"]
        names = ", ".join(f"`{name}`" for name in sorted({p["candidate"] for p in picks}))
        lines.append(f"| {result['task']} | {names} | "
                     f"{result['auto_gap_of_means']:.1f} | "
                     f"{100 * float(np.mean([p['compute_share'] for p in picks])):.0f}% |")
    return lines + [""]


def label_free_result(flagfile: str, work_dir: str) -> dict:
    """``python main.py --flagfile=FLAGFILE`` in a fresh process, as a user runs it; its metrics.json, trimmed to
    what the document shows."""
    flagfile, model_dir = os.path.abspath(flagfile), os.path.join(os.path.abspath(work_dir), "label_free")
    if not os.path.isfile(flagfile):
        raise SystemExit(f"error: --label_free={flagfile} is not a file; name a no-labels flagfile such as "
                         "configs/self_train_rt.flags")
    command = [sys.executable, os.path.join(ROOT, "main.py"), f"--flagfile={flagfile}", f"--model_dir={model_dir}",
               "--overwrite"]
    started = time.time()
    if subprocess.run(command, cwd=ROOT).returncode:
        raise SystemExit(f"error: `{shlex.join(command)}` failed (its own error is above); nothing was written")
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    tuned = metrics.get("fine_tune") or {}
    return {"flagfile": os.path.relpath(flagfile, ROOT), "seconds": time.time() - started,
            "sizes": metrics["data"]["sizes"],
            "source": metrics["data"]["source"], "backbone": metrics["config"]["model"]["backbone"],
            "zero_shot": metrics["zero_shot"], "probe_test": metrics["probe_test"],
            "probe_validation": metrics["rounds"][-1]["validation"] if metrics["rounds"] else None,
            "fine_tune": {k: tuned[k] for k in ("validation", "test", "examples") if k in tuned},
            "pseudo_label_share": metrics["config"]["train"]["pseudo_label_share"],
            "date": now()}


LABEL_FREE_FLAGFILE = "configs/self_train_rt.flags"
LABEL_FREE_TARGET = 0.75  # issue #16: Rotten Tomatoes test accuracy with no labels


def label_free_markdown(result: dict) -> list:
    """The no-labels section: plain zero-shot against self-training, validation and test, from ``result``."""
    if not result:
        return []
    accuracy = lambda metrics: f"{100 * metrics['accuracy']:.1f}%" if metrics else "-"  # noqa: E731
    tuned = result["fine_tune"]
    rows = [("plain zero-shot (label descriptions)", result["zero_shot"]["validation"], result["zero_shot"]["test"]),
            ("self-trained probe on frozen embeddings (last round)", result["probe_validation"], result["probe_test"])]
    if tuned:
        rows.append((f"encoder fine-tuned on the surest {result['pseudo_label_share']:.0%} of the training texts with "
                     f"their zero-shot labels ({tuned['examples']:,} texts)", tuned["validation"], tuned["test"]))
    best = rows[-1][2]["accuracy"]
    sizes = result["sizes"]
    return (["## No labels: zero-shot, then self-training", "",
            f"`python main.py --flagfile={result['flagfile']}` ({result['source']}, {result['backbone']}), run by "
            f"this script in a fresh process on {result['date']}, {result['seconds'] / 60:.1f} min: no training label "
            f"is read ({sizes['train']:,} unlabelled training texts); the label descriptions are the flagfile's "
            f"`--label_descriptions` (its comments say how they were chosen); validation {sizes['validation']:,} "
            f"texts; the test split ({sizes['test']:,} texts) is scored once per stage.", "",
            "| | validation accuracy | test accuracy |", "|---|---|---|"]
            + [f"| {name} | {accuracy(validation)} | {accuracy(test)} |" for name, validation, test in rows]
            + ["", f"Issue #16's target with no labels, test accuracy ≥ {LABEL_FREE_TARGET:.0%}: "
               f"{100 * best:.1f}%, {'met' if best >= LABEL_FREE_TARGET else '**not met**'} "
               f"({100 * (best - result['zero_shot']['test']['accuracy']):+.1f} points over plain zero-shot).", ""])


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def document(results: list, host: dict, command: str, seconds: float, note: str = "",
             label_free: Optional[dict] = None, date: str = "") -> str:
    """The whole document; ``date``: when the measurements were taken (a rendering's stored date), else now."""
    date = date or now()
    flags = ", ".join(host["flags"]) or "none of avx512f/avx512_bf16/amx_bf16"
    lines = ["# Transferability ranking vs. fine-tuned accuracy", "",
             f"Written by `{command}` on {date}, in {seconds / 60:.1f} min. Do not edit: rerun the command."
             + (f" {note}" if note else ""), "",
             f"Host: {host['node']}, {host['cpus']} CPUs ({host['model'] or 'model unknown'}; {flags}); 2048² matmul "
             f"peak measured at the start of this run: float32 {host['gflops_float32']:.0f} GFLOP/s, bfloat16 "
             f"{host['gflops_bfloat16']:.0f} GFLOP/s; load average (1, 5, 15 min) {host['load_average']} at the start, "
             f"{host['load_average_end']} at the end (the machine was shared).", "",
             INTRO, "", "<!-- generated by benchmarks/rank_proof.py -->", ""]
    lines += summary_markdown(results) + label_free_markdown(label_free)
    for result in results:
        lines += task_markdown(result)
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="asset:rotten_tomatoes,asset:spam_assassin")
    parser.add_argument("--examples", type=int, default=400, help="labelled training examples per task and seed")
    parser.add_argument("--validation_examples", type=int, default=32,
                        help="only fit's end-of-epoch validation uses them (no early stopping, no selection)")
    parser.add_argument("--test_examples", type=int, default=400)
    parser.add_argument("--backbones", default="asset:minilm,asset:minilm_l3")
    parser.add_argument("--recipe", default="configs/minilm_rotten_tomatoes.flags",
                        help="the flagfile whose training recipe every candidate gets (its --source is replaced)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="0 = the recipe's")
    parser.add_argument("--batch_size", type=int, default=16, help="0 = the recipe's")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 per task")
    parser.add_argument("--depths", default="1,3,6", help="as --depths of --mode=rank (controls always kept)")
    parser.add_argument("--bucket_shapes", type=int, default=2)
    parser.add_argument("--out", default="docs/transferability.md")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "rank_proof"))
    parser.add_argument("--quick", action="store_true", help="tiny caps: a smoke test in a few minutes")
    parser.add_argument("--merge", default="", help="--render_only: more work_dirs whose tasks join the document")
    parser.add_argument("--label_free", default=None,
                        help="after the tasks: this no-labels flagfile, run as main.py runs it (empty: none; default "
                             f"{LABEL_FREE_FLAGFILE}, none with --quick)")
    parser.add_argument("--label_free_only", action="store_true",
                        help="run only --label_free and add it to the stored measurements (as --render_only reads)")
    parser.add_argument("--render_only", action="store_true",
                        help="no training: rewrite --out from the measurements beside it (e.g. docs/transferability"
                             ".json; else <work_dir>/results.json), auto's picks made again by the current "
                             "tfl.auto.choose")
    args = parser.parse_args()
    if args.render_only:
        return render_only(args)
    if args.label_free is None:
        args.label_free = "" if args.quick else LABEL_FREE_FLAGFILE
    if args.label_free_only:
        return label_free_only(args)
    if args.quick:
        args.tasks, args.backbones = args.tasks.split(",")[0], "asset:minilm_l3"
        args.examples, args.validation_examples, args.test_examples, args.seeds = 96, 32, 64, 1
    command = "PYTHONPATH=. .venv/bin/python benchmarks/rank_proof.py" + (
        " " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    started = time.time()
    host = host_info()
    host["gflops_float32"] = matmul_gflops(tf.float32)
    host["gflops_bfloat16"] = matmul_gflops(tf.bfloat16)
    print(f"proof: host {host}", flush=True)
    backbone_names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    results = []
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for task in tasks:
        print(f"proof: {task}", flush=True)
        results.append(judge_task(task, [run_seed(task, args, backbone_names, seed) for seed in range(args.seeds)]))
        # Written after every task, so a long run that is stopped still leaves the finished tasks.
        host["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        text = document(results, host, command, time.time() - started)
        if len(results) < len(tasks):
            text += f"\n(unfinished: {len(tasks) - len(results)} more task(s) to go)\n"
        write(args, text, {"host": host, "command": command, "seconds": time.time() - started, "results": results,
                           "date": now()})
    if args.label_free:
        print(f"proof: no labels, {args.label_free}", flush=True)
        label_free = label_free_result(args.label_free, args.work_dir)
        text = document(results, host, command, time.time() - started, label_free=label_free)
        write(args, text, {"host": host, "command": command, "seconds": time.time() - started, "results": results,
                           "label_free": label_free, "date": now()})
    print(text)
    return 0


def label_free_only(args) -> int:
    """--label_free_only: runs --label_free and adds it to the stored measurements (``stored_results``), then
    renders them."""
    if not args.label_free:
        raise SystemExit("error: --label_free_only needs --label_free=<a no-labels flagfile>")
    path = stored_results(args)
    with open(path) as f:
        stored = json.load(f)
    stored["label_free"] = label_free_result(args.label_free, args.work_dir)
    stored["label_free_command"] = "PYTHONPATH=. .venv/bin/python benchmarks/rank_proof.py " + shlex.join(sys.argv[1:])
    with open(path, "w") as f:
        json.dump(stored, f, indent=1, default=float)
    return render_only(args, [stored])


def render_only(args, runs: Optional[list] = None) -> int:
    """--render_only: the document from the stored measurements (``stored_results``, then each --merge
    folder's tasks), or from ``runs`` (those measurements, already read); the rows, runs and timings are as
    measured."""
    if runs is None:
        runs = []
        for path in [stored_results(args)] + [os.path.join(m, "results.json") for m in args.merge.split(",") if m]:
            with open(path) as f:
                runs.append(json.load(f))
    stored, results, seen = runs[0], [], set()
    for result in [r for run in runs for r in run["results"]]:
        if result["task"] in seen:  # a task in two runs: the first one's
            continue
        seen.add(result["task"])
        seeds = [{**seed, "auto": auto_pick(seed, seed["recipe"]["epochs"])} for seed in result["seeds"]]
        results.append(judge_task(result["task"], seeds))
    note = ("Rendered again from its results.json by the same command with `--render_only`: the measurements are "
            "that run's; `--mode=auto`'s picks are made again by the current `tfl.auto.choose`.")
    for run in runs:
        named = next((a.split("=", 1)[1].split(",") for a in shlex.split(run["command"]) if a.startswith("--tasks=")),
                     [])
        missing = [t for t in named if t not in {r["task"] for r in run["results"]}]
        if missing:
            note += (f" `{run['command']}` ended before {', '.join(missing)} (the kernel's out-of-memory killer: "
                     "that run kept every fine-tune's models in memory; the script now clears them after each).")
    for other in runs[1:]:
        note += (f" The tasks {', '.join(r['task'] for r in other['results'])} come from a second run on the same "
                 f"host, `{other['command']}` ({other['seconds'] / 60:.1f} min; matmul peak then float32 "
                 f"{other['host']['gflops_float32']:.0f} GFLOP/s), merged with `--merge`.")
    label_free = stored.get("label_free")
    if label_free and stored.get("label_free_command"):
        note += (f" The no-labels section was measured afterwards by `{stored['label_free_command']}` "
                 f"({label_free['seconds'] / 60:.1f} min).")
    date = stored.get("date") or f"a date its results.json does not hold (rendered again on {now()})"
    text = document(results, stored["host"], stored["command"], sum(r["seconds"] for r in runs), note, label_free,
                    date)
    write(args, text, None)  # the document only: each run's results.json stays as that run wrote it
    print(text)
    return 0


def results_beside(out: str) -> str:
    """Where a run's measurements go beside its document (docs/transferability.md -> .json), so that the
    committed document can be rendered again from committed data."""
    return os.path.splitext(out)[0] + ".json"


def stored_results(args) -> str:
    """The measurements that --render_only renders and --label_free_only adds to, one order for both: the copy
    beside --out (e.g. docs/transferability.json, committed with its document), else <work_dir>/results.json
    (a run with no --out). A full run writes both alike."""
    beside = results_beside(args.out) if args.out else ""
    return beside if beside and os.path.exists(beside) else os.path.join(args.work_dir, "results.json")


def write(args, text: str, results) -> None:
    os.makedirs(args.work_dir, exist_ok=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if results is not None:
        for path in [os.path.join(args.work_dir, "results.json")] + ([results_beside(args.out)] if args.out else []):
            with open(path, "w") as f:
                json.dump(results, f, indent=1, default=float)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
