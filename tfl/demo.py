"""The offline demo (`make demo`): real packaged data and weights, on this CPU, in about 20 minutes.

1. Loads every offline data set and prints its size and labels.
2. MiniLM on Rotten Tomatoes: zero-shot vs. linear probe vs. fine-tune (configs/demo_minilm_rt.flags).
3. LSTM transfer: trains the seed IMDB LSTM on Rotten Tomatoes (configs/rt_lstm.flags), then compares
   scratch vs. parameter transfer on SpamAssassin at 5% and 20% labels, 3 seeds (configs/rt_to_spam.flags).
Reports go to runs/demo/*/report.md; ``--refresh-docs`` also copies them, with their plots, to the
committed docs/demo/ (``make docs-demo``), so a plain ``make demo`` leaves a clone's tracked files alone.

    python -m tfl.demo [--quick] [--refresh-docs]     # --quick: tiny caps, for a smoke test
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from absl import flags

from tfl import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_from_flagfile(flagfile: str, **overrides):
    values = flags.FlagValues()
    cli.define_flags(values)
    values(["demo", f"--flagfile={os.path.join(ROOT, flagfile)}"] + [f"--{k}={v}" for k, v in overrides.items()])
    return cli.config_from_flags(values).validate()


def summarise_data() -> None:
    from tfl.data import load_data

    for source in ("asset:rotten_tomatoes", "asset:spam_assassin", "asset:political_speeches",
                   "asset:fashion_mnist", "asset:mnist5k"):
        splits = load_data(source, seed=0)
        counts = {name: sum(c.get(name, 0) for c in splits.label_counts.values()) for name in splits.label_names}
        print(f"demo: {source:26s} {splits.modality:5s} {sum(splits.sizes.values()):6,d} examples {counts}")


def main(argv: list) -> int:
    os.chdir(ROOT)
    quick = "--quick" in argv
    refresh_docs = "--refresh-docs" in argv and not quick
    unknown = [a for a in argv if a not in ("--quick", "--refresh-docs")]
    if unknown:
        print(f"error: unknown argument {unknown[0]}; expected --quick and/or --refresh-docs", file=sys.stderr)
        return 2
    caps = {"max_examples": 400, "seeds": 1} if quick else {}
    started = time.time()
    summarise_data()
    from tfl.job import run

    out = os.path.join(ROOT, "runs", "demo")
    jobs = [
        ("minilm_rt", config_from_flagfile("configs/demo_minilm_rt.flags", model_dir=f"{out}/minilm_rt",
                                           overwrite=True, **caps)),
        ("rt_lstm", config_from_flagfile("configs/rt_lstm.flags", model_dir=f"{out}/rt_lstm", overwrite=True,
                                         export=False, **({"max_examples": 400} if quick else {}))),
        ("rt_to_spam", config_from_flagfile("configs/rt_to_spam.flags", model_dir=f"{out}/rt_to_spam",
                                            source_model=f"{out}/rt_lstm", overwrite=True, **caps)),
    ]
    for name, config in jobs:
        print(f"demo: === {name} ({time.time() - started:.0f} s so far) ===")
        shutil.rmtree(config.model_dir, ignore_errors=True)
        run(config, verbose=2)
        if config.mode == "compare" and refresh_docs:
            docs = os.path.join(ROOT, "docs", "demo", name)
            os.makedirs(docs, exist_ok=True)
            for file in os.listdir(config.model_dir):
                if file.endswith((".md", ".png", ".json")) and file != "config.json":
                    shutil.copy(os.path.join(config.model_dir, file), docs)
    print(f"demo: done in {time.time() - started:.0f} s; reports in runs/demo/*/report.md"
          + (" and docs/demo/" if refresh_docs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
