"""Is the transferability ranking right? Rank the offline zoo, then fine-tune every candidate and compare.

    PYTHONPATH=. .venv/bin/python benchmarks/rank_proof.py \
        [--tasks=asset:rotten_tomatoes,asset:spam_assassin] [--examples=1000] [--test_examples=1000] \
        [--backbones=asset:minilm,asset:minilm_l3] [--epochs=1] [--out=docs/transferability.md] [--quick]

Per task, on the same ``--examples`` stratified training examples (the training split of one
``tfl.load_data`` call, capped with --max_examples and sized with --validation/--test_fraction):

1. **rank**: ``tfl.ranking`` as ``--mode=rank`` does (candidates -> extract_features -> score_candidates
   -> ranking_rows): every (backbone, depth) of the zoo and a randomly initialised control per backbone;
2. **ground truth**: every candidate with depth >= 1 is fine-tuned end to end by
   ``tfl.runner.train_and_evaluate`` with the recipe of ``--recipe`` (a flagfile; --epochs replaces its
   epochs). A candidate (backbone, depth k) is the backbone *truncated* after block k: a preset folder
   under --work_dir whose ``config.json`` says ``num_hidden_layers=k`` beside the asset's own weights
   file, so keras-hub loads the first k blocks' weights (checked: its mean-pooled output equals the
   ranking's depth-k features). The random controls are ``--pretrained=false`` runs of the full depth;
3. **report**: per task, the scores beside the test accuracy, Kendall's tau and weighted tau between
   each estimator and the accuracy (``transferability.kendall_tau``), whether the top-ranked candidate is
   the best or within 1 point of it, and seconds to rank vs seconds to fine-tune every candidate; the
   host with its float32/bfloat16 matmul peak measured in the same run (``benchmarks/run.py``).

Everything in --out is written by this script; a rerun replaces it. ``--quick``: tiny caps (one small
task, MiniLM-L3 only, 96 examples, two steps per fine-tune) for a smoke test in a few minutes.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.run import matmul_gflops  # noqa: E402
from tfl import assets, ranking, transferability  # noqa: E402
from tfl.backbones import build_backbone  # noqa: E402
from tfl.demo import config_from_flagfile  # noqa: E402
from tfl.runner import load_data_for, train_and_evaluate  # noqa: E402

ESTIMATORS = (("logme", "LogME"), ("h_score", "H-score"), ("leep", "LEEP"), ("nce", "NCE"))
HIT_POINTS = 1.0  # the top-ranked candidate "hits" if its accuracy is within this many points of the best

INTRO = """\
Each task below is ranked and then fine-tuned on the same labelled training examples. The ranking is
tfl's `--mode=rank`: frozen features of every candidate (a pretrained text encoder cut after one of its
transformer blocks, mean-pooled), scored by LogME and H-score without any training; each backbone also
has a randomly initialised copy as a control. The ground truth is what tfl's own training path reaches
with each candidate: the encoder truncated after that block (the first blocks' pretrained weights, the
later ones dropped) plus a fresh head, every weight trained, with the recipe named in the generated
section, scored on held-out test examples. The random controls are fine-tuned the same way. A good
estimator orders the candidates as the fine-tuned accuracies do (Kendall's tau near one; the weighted
tau stresses the top of the order) and its first choice is the best candidate or close to it. The
pretrained-only columns leave the random controls out, since telling those apart from pretrained
encoders is the easy part. Held-out accuracies carry sampling noise (one standard error is given) and
come from a single seed and a short schedule: read small differences between neighbouring depths as
ties."""


# ---- candidates as training runs ------------------------------------------------------------

def truncated_preset(backbone: str, depth: int, work_dir: str) -> str:
    """A Hugging Face BERT folder for ``backbone`` (an ``asset:`` name or a folder) with only its first
    ``depth`` transformer blocks: the same files (linked), ``num_hidden_layers`` set to ``depth``."""
    source = assets.asset_path(backbone[len("asset:"):]) if backbone.startswith("asset:") else backbone
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    if "num_hidden_layers" not in config:
        raise ValueError(f"{backbone}: config.json has no num_hidden_layers; expected a Hugging Face BERT folder")
    folder = os.path.join(work_dir, "presets", f"{backbone.replace(':', '_').replace('/', '_')}_L{depth}")
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(source):
        link = os.path.join(folder, name)
        if name != "config.json" and not os.path.lexists(link):
            os.symlink(os.path.join(source, name), link)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, "num_hidden_layers": depth}, f, indent=2)
    return folder


def full_depths(rows: list) -> dict:
    """backbone -> its deepest ranked depth."""
    depths = {}
    for row in rows:
        depths[row["backbone"]] = max(depths.get(row["backbone"], 0), row["depth"])
    return depths


def training_target(row: dict, full_depth: int, work_dir: str) -> tuple:
    """(--backbone, --pretrained) that fine-tunes the ranking's candidate ``row``."""
    if not row["pretrained"] or row["depth"] == full_depth:
        return row["backbone"], row["pretrained"]
    return truncated_preset(row["backbone"], row["depth"], work_dir), True


def truncation_error(folder: str, features: np.ndarray, texts: list, sequence_length: int) -> float:
    """Max |difference| between the truncated backbone's output (as tfl builds it for training, float32)
    and the ranking's features of the same texts at that depth."""
    backbone = build_backbone(folder, sequence_length=sequence_length, pooling="mean")
    outputs = backbone.model(backbone.preprocess(tf.constant(texts)), training=False)
    return float(np.abs(np.asarray(outputs, np.float32) - features).max())


# ---- one task -------------------------------------------------------------------------------

def task_config(recipe: str, task: str, examples: int, validation_examples: int, test_examples: int,
                epochs: int, bucket_shapes: int, quick: bool):
    """The recipe for ``task`` with a pool of exactly train + validation + test examples (scaled down
    together when the data set holds fewer)."""
    pool = sum(load_data_for(config_from_flagfile(recipe, source=task)).sizes.values())
    want = examples + validation_examples + test_examples
    scale = min(1.0, pool / want)
    sizes = [max(2, int(n * scale)) for n in (examples, validation_examples, test_examples)]
    overrides = dict(source=task, epochs=epochs, max_examples=sum(sizes), export=False, bucket_shapes=bucket_shapes,
                     validation_fraction=sizes[1] / sum(sizes), test_fraction=sizes[2] / sum(sizes))
    if quick:
        overrides["max_steps_per_epoch"] = 2
    return config_from_flagfile(recipe, **overrides)


def run_task(task: str, args, backbone_names: list) -> dict:
    print(f"proof: {task}", flush=True)
    base = task_config(args.recipe, task, args.examples, args.validation_examples, args.test_examples,
                       args.epochs, args.bucket_shapes, args.quick)
    splits = load_data_for(base)
    inputs, labels = ranking.training_examples(splits, 0, base.seed)  # the whole training split
    texts = [x.decode("utf-8") if isinstance(x, bytes) else x for x in inputs]

    started = time.perf_counter()
    zoo = ranking.candidates(splits.modality, backbone_names, sequence_length=base.model.sequence_length,
                             seed=base.seed)
    features = ranking.extract_features(zoo, inputs, modality=splits.modality)
    rows = ranking.ranking_rows(features, ranking.score_candidates(features, labels, base.model.task))
    rank_seconds = time.perf_counter() - started
    print(ranking.format_table(rows), flush=True)

    deepest = full_depths(rows)
    runs = []
    for row in rows:
        if row["depth"] < 1:  # the embeddings alone: ranked, not a BERT one can fine-tune
            continue
        name = row["candidate"]
        backbone, pretrained = training_target(row, deepest[row["backbone"]], args.work_dir)
        check = None
        if backbone != row["backbone"]:
            check = truncation_error(backbone, features[name]["features"][:8], texts[:8], base.model.sequence_length)
        config = dataclasses.replace(base, model=dataclasses.replace(base.model, backbone=backbone,
                                                                     pretrained=pretrained))
        metrics = train_and_evaluate(config, verbose=0)
        run = {"candidate": name, "backbone": backbone, "pretrained": pretrained,
               "test_accuracy": metrics["test"]["accuracy"], "validation_accuracy": metrics["validation"]["accuracy"],
               "train_seconds": metrics["train_seconds"], "wall_seconds": metrics["wall_seconds"],
               "trainable_params": metrics["trainable_params"], "optimizer_steps": metrics["optimizer_steps"],
               "precision": metrics["precision"], "truncation_error": check}
        runs.append(run)
        print(f"proof: {task} {name}: test accuracy {run['test_accuracy']:.4f} in {run['wall_seconds']:.0f} s",
              flush=True)
    values, counts = np.unique(labels, return_counts=True)
    return {"task": task, "rows": rows, "runs": runs, "rank_seconds": rank_seconds,
            "sizes": metrics["data"]["sizes"], "label_counts": {splits.label_names[v]: int(n)
                                                                  for v, n in zip(values, counts)},
            "recipe": {"flagfile": args.recipe, "epochs": base.train.epochs, "learning_rate": base.train.learning_rate,
                       "batch_size": base.data.batch_size, "sequence_length": base.model.sequence_length,
                       "warmup_fraction": base.train.warmup_fraction, "lr_schedule": base.train.lr_schedule,
                       "bucket_shapes": base.data.bucket_shapes,
                       "precision": runs[0]["precision"], "seed": base.seed,
                       "max_steps_per_epoch": base.train.max_steps_per_epoch}}


# ---- judging the ranking --------------------------------------------------------------------

def judge(result: dict) -> list:
    """Per estimator present for every fine-tuned candidate: taus (all candidates, pretrained only) and the
    top-1 check."""
    rows = {row["candidate"]: row for row in result["rows"]}
    accuracy = {run["candidate"]: run["test_accuracy"] for run in result["runs"]}
    pretrained = [name for name in accuracy if rows[name]["pretrained"]]
    verdicts = []
    for key, title in ESTIMATORS:
        scores = {name: rows[name].get(key, float("nan")) for name in accuracy}
        if not all(math.isfinite(v) for v in scores.values()):
            continue
        verdict = {"estimator": title}
        for group, names in (("all", list(accuracy)), ("pretrained", pretrained)):
            sub_scores = {n: scores[n] for n in names}
            sub_accuracy = {n: accuracy[n] for n in names}
            for weighted in (True, False):
                try:
                    tau = transferability.rank_correlation(sub_scores, sub_accuracy, weighted=weighted)
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


def task_markdown(result: dict) -> list:
    runs = {run["candidate"]: run for run in result["runs"]}
    present = [(k, t) for k, t in ESTIMATORS if any(k in row for row in result["rows"])]
    sizes, recipe = result["sizes"], result["recipe"]
    best = max(run["test_accuracy"] for run in result["runs"])
    lines = [f"## {result['task']}", "",
             f"Training examples {sizes['train']} ({', '.join(f'{k} {v}' for k, v in result['label_counts'].items())}),"
             f" validation {sizes['validation']}, test {sizes['test']}. Fine-tune recipe: `{recipe['flagfile']}` with "
             f"epochs {recipe['epochs']}" + (f" (at most {recipe['max_steps_per_epoch']} steps)"
                                             if recipe["max_steps_per_epoch"] else "") +
             f", learning rate {recipe['learning_rate']:g} ({recipe['lr_schedule']}, warm-up "
             f"{recipe['warmup_fraction']:g}), batch {recipe['batch_size']}, sequence {recipe['sequence_length']} "
             f"({recipe['bucket_shapes']} length buckets), "
             f"precision {recipe['precision']}, seed {recipe['seed']}, every weight trained. One standard error of "
             f"the best test accuracy: {100 * standard_error(best, sizes['test']):.1f} points.", ""]
    header = ["rank", "candidate"] + [t for _, t in present] + ["test acc", "val acc", "steps", "fine-tune s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in enumerate(result["rows"], 1):
        run = runs.get(row["candidate"])
        cells = [str(index), f"`{row['candidate']}`"] + [_f(row.get(k), 4) for k, _ in present]
        cells += ([_f(run["test_accuracy"]), _f(run["validation_accuracy"]), str(run["optimizer_steps"]),
                   _f(run["wall_seconds"], 0)] if run else ["not fine-tuned (embeddings only)", "", "", ""])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Rank = order by LogME (what `--mode=rank` reports first). The taus and the top-1 check below "
              "are over the fine-tuned candidates.", ""]
    lines += ["| estimator | τ_w all | τ all | τ_w pretrained | τ pretrained | top-ranked (test acc) | "
              "best (test acc) | gap, points | top-1 within 1 point |", "|---|---|---|---|---|---|---|---|---|"]
    for v in result["verdicts"]:
        lines.append(f"| {v['estimator']} | {_f(v['tau_w_all'])} | {_f(v['tau_all'])} | {_f(v['tau_w_pretrained'])} | "
                     f"{_f(v['tau_pretrained'])} | `{v['top']}` ({_f(v['top_accuracy'])}) | `{v['best']}` "
                     f"({_f(v['best_accuracy'])}) | {v['gap_points']:.1f} | {'yes' if v['hit'] else 'no'} |")
    fine_tune = sum(run["wall_seconds"] for run in result["runs"])
    fit = sum(run["train_seconds"] for run in result["runs"])
    checks = [run["truncation_error"] for run in result["runs"] if run["truncation_error"] is not None]
    lines += ["", f"Compute: ranking all {len(result['rows'])} candidates took {result['rank_seconds']:.0f} s "
              f"(building the models, one feature pass per backbone, the scores); fine-tuning the "
              f"{len(result['runs'])} candidates took {fine_tune:.0f} s ({fit:.0f} s of it in `fit`, the rest data, "
              f"model building and evaluation): {fine_tune / result['rank_seconds']:.1f}x the ranking's time."]
    if checks:
        lines[-1] += (f" Truncated backbones vs. the ranking's features at the same depth (8 texts, float32): "
                      f"max |difference| {max(checks):.1e}.")
    return lines + [""]


def summary_markdown(results: list) -> list:
    lines = ["## Summary", "",
             "| task | estimator | τ_w all | τ_w pretrained | τ all | τ pretrained | top-1 within 1 point | "
             "rank s | fine-tune s |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        fine_tune = sum(run["wall_seconds"] for run in result["runs"])
        for v in result["verdicts"]:
            lines.append(f"| {result['task']} | {v['estimator']} | {_f(v['tau_w_all'])} | {_f(v['tau_w_pretrained'])} | "
                         f"{_f(v['tau_all'])} | {_f(v['tau_pretrained'])} | {'yes' if v['hit'] else 'no'} "
                         f"({v['gap_points']:.1f}) | {result['rank_seconds']:.0f} | {fine_tune:.0f} |")
    for _, title in ESTIMATORS:
        taus = [v["tau_w_all"] for r in results for v in r["verdicts"] if v["estimator"] == title]
        pretrained = [v["tau_w_pretrained"] for r in results for v in r["verdicts"] if v["estimator"] == title]
        if taus:
            lines.append(f"| mean over {len(taus)} task(s) | {title} | {_f(float(np.nanmean(taus)))} | "
                         f"{_f(float(np.nanmean(pretrained)))} | | | | | |")
    return lines + [""]


def document(results: list, host: dict, command: str, seconds: float) -> str:
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    flags = ", ".join(host["flags"]) or "none of avx512f/avx512_bf16/amx_bf16"
    lines = ["# Transferability ranking vs. fine-tuned accuracy", "",
             f"Written by `{command}` on {date}, in {seconds / 60:.1f} min. Do not edit: rerun the command.", "",
             f"Host: {host['node']}, {host['cpus']} CPUs ({host['model'] or 'model unknown'}; {flags}); 2048² matmul "
             f"peak measured at the start of this run: float32 {host['gflops_float32']:.0f} GFLOP/s, bfloat16 "
             f"{host['gflops_bfloat16']:.0f} GFLOP/s; load average (1, 5, 15 min) {host['load_average']} at the start, "
             f"{host['load_average_end']} at the end (the machine was shared).", "",
             INTRO, "", "<!-- generated by benchmarks/rank_proof.py -->", ""]
    lines += summary_markdown(results)
    for result in results:
        lines += task_markdown(result)
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="asset:rotten_tomatoes,asset:spam_assassin")
    parser.add_argument("--examples", type=int, default=1000, help="labelled training examples per task")
    parser.add_argument("--validation_examples", type=int, default=32,
                        help="only fit's end-of-epoch validation uses them (no early stopping, no selection)")
    parser.add_argument("--test_examples", type=int, default=1000)
    parser.add_argument("--backbones", default="asset:minilm,asset:minilm_l3")
    parser.add_argument("--recipe", default="configs/minilm_rotten_tomatoes.flags",
                        help="the flagfile whose training recipe every candidate gets (its --source is replaced)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--bucket_shapes", type=int, default=2)
    parser.add_argument("--out", default="docs/transferability.md")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "rank_proof"))
    parser.add_argument("--quick", action="store_true", help="tiny caps: a smoke test in a few minutes")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.backbones = args.tasks.split(",")[0], "asset:minilm_l3"
        args.examples, args.validation_examples, args.test_examples = 96, 32, 64
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
        result = run_task(task, args, backbone_names)
        result["verdicts"] = judge(result)
        results.append(result)
        # Written after every task, so a long run that is stopped still leaves the finished tasks.
        host["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        text = document(results, host, command, time.time() - started)
        if len(results) < len(tasks):
            text += f"\n(unfinished: {len(tasks) - len(results)} more task(s) to go)\n"
        write(args, text, {"host": host, "command": command, "seconds": time.time() - started, "results": results})
    print(text)
    return 0


def write(args, text: str, results: dict) -> None:
    os.makedirs(args.work_dir, exist_ok=True)
    with open(os.path.join(args.work_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
