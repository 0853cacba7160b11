"""Which parameter-transfer settings win on a related pair: the runs behind tfl's transfer defaults.

    .venv/bin/python benchmarks/transfer_variants.py --flagfile=configs/imdb_to_rt.flags \
        --source_model=runs/imdb [--fractions=0.01,0.05] [--seeds=3] [--out=docs/imdb_to_rt_variants.md]

Trains the flagfile's target task once per (variant, label fraction, seed), everything else equal
(data, epochs, batch, learning rate, seeds), and writes the test accuracy table, mean ± std over seeds,
to --out. Variants: scratch; parameter transfer with the target's own vocabulary (embedding rows
copied for shared words) or the source's word index; with the embedding frozen
(--freeze_blocks=1); with every transferred layer frozen (head only); starting from the source's own head
(--transfer_head=source: same classes, same order); at a lower learning rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (strategy for report.strategy_config, ModelConfig changes, FreezeConfig changes[, TrainConfig changes])
VARIANTS = {
    "scratch": ("scratch", {}, {}),
    "parameter/target-vocabulary": ("parameter", {"transfer_vocabulary": "target"}, {}),
    "parameter/source-vocabulary": ("parameter", {"transfer_vocabulary": "source"}, {}),
    "parameter/source-vocabulary/embedding-frozen": ("parameter", {"transfer_vocabulary": "source"},
                                                     {"freeze_blocks": 1}),
    "parameter/source-vocabulary/head-only": ("parameter", {"transfer_vocabulary": "source"}, {"freeze_all": True}),
    "parameter/target-vocabulary/embedding-frozen": ("parameter", {"transfer_vocabulary": "target"},
                                                     {"freeze_blocks": 1}),
    "parameter/source-vocabulary/source-head": ("parameter", {"transfer_vocabulary": "source",
                                                              "transfer_head": "source"}, {}),
    "parameter/source-vocabulary/source-head/embedding-frozen": (
        "parameter", {"transfer_vocabulary": "source", "transfer_head": "source"}, {"freeze_blocks": 1}),
    "parameter/source-vocabulary/source-head/lr-3e-4": (
        "parameter", {"transfer_vocabulary": "source", "transfer_head": "source"}, {}, {"learning_rate": 3e-4}),
    "parameter/source-vocabulary/source-head/lr-1e-4": (
        "parameter", {"transfer_vocabulary": "source", "transfer_head": "source"}, {}, {"learning_rate": 1e-4}),
    "parameter/source-vocabulary/lr-3e-4": ("parameter", {"transfer_vocabulary": "source"}, {},
                                            {"learning_rate": 3e-4}),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flagfile", required=True)
    parser.add_argument("--source_model", required=True)
    parser.add_argument("--fractions", default="0.01,0.05")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--out", default="")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "transfer_variants"))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tfl.demo import config_from_flagfile
    from tfl.report import strategy_config
    from tfl.runner import train_and_evaluate

    base = config_from_flagfile(args.flagfile, source_model=args.source_model, model_dir=args.work_dir)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variant {unknown[0]!r}; expected one of {list(VARIANTS)}", file=sys.stderr)
        return 2
    fractions = [float(f) for f in args.fractions.split(",")]
    started = time.time()
    results = {}
    for name in names:
        strategy, model_changes, freeze_changes, *train_changes = VARIANTS[name]
        for fraction in fractions:
            for seed in range(base.seed, base.seed + args.seeds):
                run_dir = os.path.join(args.work_dir, f"{names.index(name)}-f{fraction:g}-s{seed}")
                config = strategy_config(base, strategy, seed, fraction, run_dir)
                config = dataclasses.replace(config, model=dataclasses.replace(config.model, **model_changes),
                                             freeze=dataclasses.replace(config.freeze, **freeze_changes),
                                             train=dataclasses.replace(config.train, **(train_changes or [{}])[0]))
                metrics = train_and_evaluate(config, verbose=0)
                results.setdefault((name, fraction), []).append(metrics["test"]["accuracy"])
                print(f"variants: {name} fraction={fraction:g} seed={seed}: "
                      f"test accuracy {metrics['test']['accuracy']:.3f} ({time.time() - started:.0f} s)", flush=True)
    header = "| variant | " + " | ".join(f"{f:g} labels" for f in fractions) + " |"
    lines = [header, "|---|" + "---|" * len(fractions)]
    for name in names:
        cells = []
        for fraction in fractions:
            values = np.array(results[(name, fraction)])
            cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        text = (f"# Parameter-transfer variants: {os.path.basename(args.flagfile)} from {args.source_model}\n\n"
                f"Written by `benchmarks/transfer_variants.py --flagfile={args.flagfile} "
                f"--source_model={args.source_model} --fractions={args.fractions} --seeds={args.seeds} "
                f"--variants={','.join(names)}`; "
                f"test accuracy, mean ± std over {args.seeds} seeds; {platform.node()}, "
                f"{os.cpu_count()} CPUs, {time.time() - started:.0f} s in all.\n"
                f"Everything but the variant is the flagfile's: {base.train.epochs} epochs, batch "
                f"{base.data.batch_size}, learning rate {base.train.learning_rate:g} (unless the variant names one), "
                f"maxlen {base.data.maxlen}.\n\n"
                + table + "\n")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
