"""--mode=compare: one target task under several transfer strategies, and the report that compares them.

    report = tfl.report.compare(config, tfl.job.run_mode)   # writes <model_dir>/report.md, report.json, *.png

Every strategy sees the same data, budget (epochs, batch size, learning rate) and seeds; each
(strategy, label fraction, seed) is a normal tfl run under ``<model_dir>/runs/``, run by the function
the caller passes (tfl.job.run_mode), so this module never imports the runner. The report gives
mean ± std over seeds of the test metrics, train time, trainable parameters and examples/s.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import numpy as np

from tfl import storage
from tfl.costs import release_memory
from tfl.config import Config
from tfl.devices import is_chief
from tfl.strategies import STRATEGIES

def strategy_config(base: Config, strategy: str, seed: int, fraction: float, model_dir: str) -> Config:
    """The base config changed as one strategy needs (its STRATEGIES entry); everything else stays equal."""
    sections = {"model": dataclasses.replace(base.model, transfer="", transfer_head="new"), "train": base.train,
                "freeze": dataclasses.replace(base.freeze, freeze_all=False, freeze_blocks=0, lora_rank=0,
                                              trainable="")}
    changes = dict(STRATEGIES[strategy].settings(base))
    mode = changes.pop("mode", "train")
    for section, fields in changes.items():
        sections[section] = dataclasses.replace(sections[section], **fields)
    # A strategy that uses no labels (zero-shot, self-training) reads the whole training split, unlabelled.
    data = dataclasses.replace(base.data, label_fraction=fraction if STRATEGIES[strategy].uses_labels else 1.0)
    return dataclasses.replace(base, mode=mode, data=data, seed=seed, model_dir=model_dir, export=False,
                               overwrite=True, **sections)


def strategy_descriptions(names=None) -> dict:
    """name -> description, from the STRATEGIES table (all of them, or ``names``)."""
    return {name: STRATEGIES[name].description for name in (STRATEGIES if names is None else names)}


def compare(config: Config, run: Callable[[Config, int], dict], verbose: int = 0) -> dict:
    """Runs every (strategy, fraction, seed) with ``run(config, verbose)``; writes report.md/json and plots
    under config.model_dir."""

    fractions = list(config.compare.label_fractions) or [config.data.label_fraction]
    seeds = [config.seed + i for i in range(config.compare.seeds)]
    runs = []
    total = sum(len(fractions) if STRATEGIES[s].uses_labels else 1 for s in config.compare.strategies) * len(seeds)
    started_runs = 0
    for strategy in config.compare.strategies:
        for fraction in fractions:
            for seed in seeds:
                if not STRATEGIES[strategy].uses_labels and fraction != fractions[0]:
                    # No labels are used: the score is the same at every fraction.
                    previous = next(r for r in runs if r["strategy"] == strategy and r["seed"] == seed)
                    runs.append({**previous, "fraction": fraction})
                    continue
                run_dir = os.path.join(config.model_dir, "runs", f"{strategy}-f{fraction:g}-s{seed}")
                child = strategy_config(config, strategy, seed, fraction, run_dir)
                started_runs += 1
                print(f"tfl: compare run {started_runs} of {total}: {strategy} fraction={fraction:g} seed={seed}")
                started = time.time()
                metrics = run(child, verbose)
                release_memory()  # the next run builds its own model
                runs.append({"strategy": strategy, "fraction": fraction, "seed": seed, "test": metrics["test"],
                             "train_seconds": metrics.get("train_seconds", 0.0),
                             "wall_seconds": round(time.time() - started, 2),
                             "trainable_params": metrics.get("trainable_params", 0),
                             "examples_per_second": metrics.get("train_examples_per_second"),
                             "train_examples": (metrics.get("data", {}).get("sizes") or {}).get("train"),
                             "history": metrics.get("history", {})})
    rows = summarise(runs)
    report = {"rows": rows, "runs": runs, "config": config.to_dict(), "strategies": strategy_descriptions()}
    if is_chief():  # in a multi-worker job only the chief writes
        storage.write_json_atomically(os.path.join(config.model_dir, "report.json"), report)
        plots = write_plots(runs, fractions, config.model_dir)
        storage.write_text_atomically(os.path.join(config.model_dir, "report.md"),
                                      format_markdown(rows, config, plots))
    print(format_table(rows))
    return report


def _main_metric(test: dict) -> str:
    return "accuracy" if "accuracy" in test else "mae"


def summarise(runs: list) -> list:
    """One row per (strategy, fraction): mean and std over seeds."""
    rows = []
    keys = []
    for r in runs:
        if (r["strategy"], r["fraction"]) not in keys:
            keys.append((r["strategy"], r["fraction"]))
    for strategy, fraction in keys:
        group = [r for r in runs if r["strategy"] == strategy and r["fraction"] == fraction]
        row = {"strategy": strategy, "fraction": fraction, "seeds": len(group),
               "train_examples": group[0].get("train_examples")}
        for metric in group[0]["test"]:
            values = np.array([g["test"][metric] for g in group], np.float64)
            row[metric] = {"mean": float(values.mean()), "std": float(values.std())}
        for field in ("train_seconds", "trainable_params", "examples_per_second"):
            values = [g[field] for g in group if g.get(field) is not None]
            row[field] = float(np.mean(values)) if values else None
        rows.append(row)
    return rows


def format_table(rows: list) -> str:
    metrics = [m for m in ("accuracy", "macro_f1", "auc", "mae") if rows and m in rows[0]]
    header = ["strategy", "labels", *metrics, "train s", "trainable", "ex/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["strategy"], f"{row['fraction']:g} ({row.get('train_examples') or '-'})"]
        cells += [f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}" if m in row else "-" for m in metrics]
        cells += [f"{row['train_seconds']:.0f}" if row["train_seconds"] else "0",
                  f"{int(row['trainable_params'] or 0):,}",
                  f"{row['examples_per_second']:.0f}" if row.get("examples_per_second") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(rows: list, config: Config, plots: list) -> str:
    tokens = config.data.tokens_per_batch
    batches = f"batches of about {tokens} tokens" if tokens else f"batch {config.data.batch_size}"
    lines = [f"# Transfer report: {config.data.source}", "",
             f"Backbone `{config.model.backbone}`; {config.train.epochs} epoch(s), {batches}, "
             f"learning rate {config.train.learning_rate:g}; {config.compare.seeds} seed(s) from {config.seed}; "
             "mean ± std over seeds of the test split.", "", format_table(rows), "", "Strategies:", ""]
    lines += [f"- `{s}`: {d}" for s, d in strategy_descriptions(config.compare.strategies).items()]
    lines += [""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_plots(runs: list, fractions: list, out_dir: str) -> list:
    """learning_curves.png (validation metric per epoch, first seed) and, with several label fractions,
    label_fractions.png (test metric vs. labelled examples). Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    trained = [r for r in runs if r["history"].get("val_loss") and r["fraction"] == fractions[-1]]
    if trained:
        fig, ax = plt.subplots(figsize=(6, 4))
        seen = set()
        for r in trained:
            if r["strategy"] in seen:
                continue
            seen.add(r["strategy"])
            key = "val_accuracy" if "val_accuracy" in r["history"] else "val_loss"
            values = r["history"][key]
            ax.plot(range(1, len(values) + 1), values, marker="o", label=r["strategy"])
        ax.set_xlabel("epoch"), ax.set_ylabel(key), ax.legend(), ax.grid(alpha=0.3)
        ax.set_title(f"Learning curves (label fraction {fractions[-1]:g}, seed {trained[0]['seed']})")
        fig.tight_layout(), storage.save_figure(fig, os.path.join(out_dir, "learning_curves.png")), plt.close(fig)
        written.append("learning_curves.png")
    if len(fractions) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for strategy in dict.fromkeys(r["strategy"] for r in runs):
            metric = _main_metric(runs[0]["test"])
            xs, means, stds = [], [], []
            for fraction in fractions:
                values = [r["test"][metric] for r in runs if r["strategy"] == strategy and r["fraction"] == fraction]
                xs.append(fraction), means.append(np.mean(values)), stds.append(np.std(values))
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=strategy)
        ax.set_xscale("log"), ax.set_xlabel("share of labelled training examples"), ax.set_ylabel(f"test {metric}")
        ax.legend(), ax.grid(alpha=0.3), ax.set_title("Test metric vs. labelled examples")
        fig.tight_layout(), storage.save_figure(fig, os.path.join(out_dir, "label_fractions.png")), plt.close(fig)
        written.append("label_fractions.png")
    return written
