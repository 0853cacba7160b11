"""--mode=tune: a budgeted Hyperband search (KerasTuner) over learning rate, epochs, freeze depth and LoRA rank
for one backbone. Every trial is a whole tfl run (``runner.train_and_evaluate``), its model rebuilt from the
preset, under ``<model_dir>/trials/<id>``; trials are compared on the validation split only, and the test split
is scored once, after the search, for the chosen trial alone.

    result = tfl.tuning.tune(config)     # config.mode == "tune"; writes report.md / report.json
    result["best"]["values"]             # {"learning_rate": ..., "freeze_blocks": ..., "tuner/epochs": ...}

The space: learning rate log-uniform in [--learning_rate / 10, --learning_rate * 10]; then, for keras-hub
backbones, either frozen blocks (0 .. all but the last) or LoRA (rank 4 or 8) on the frozen backbone; for
others, frozen blocks alone. Hyperband (factor 3) hands each trial its epochs, up to --epochs. The search
stops at --budget_minutes: a trial starts only when the seconds per epoch measured so far say it ends in time
(the first trial always runs).
"""

from __future__ import annotations

import dataclasses
import os
import time

from tfl import data as data_lib
from tfl import devices as devices_lib
from tfl import runner, storage
from tfl.batches import image_file_decoder
from tfl.config import Config
from tfl.costs import release_memory
from tfl.data import TEXT
from tfl.train import NonFiniteLossError, evaluate

# The validation metric a trial is judged by, per task: (name in metrics["validation"], direction).
OBJECTIVES = {"classification": ("accuracy", "max"), "multilabel": ("macro_f1", "max"), "regression": ("mae", "min")}
LORA_RANKS = (4, 8)


def search_space(learning_rate: float, blocks: int, lora: bool, learning_rate_only: bool = False):
    """The KerasTuner HyperParameters of the module docstring, for a backbone of ``blocks`` blocks;
    ``learning_rate_only``: the learning rate alone (--mode=auto's search, its freezing already chosen)."""
    import keras_tuner

    hp = keras_tuner.HyperParameters()
    hp.Float("learning_rate", learning_rate / 10, learning_rate * 10, sampling="log")
    if learning_rate_only:
        return hp
    if not lora:
        hp.Int("freeze_blocks", 0, max(blocks - 1, 0))
        return hp
    hp.Choice("adaptation", ["blocks", "lora"])
    with hp.conditional_scope("adaptation", ["blocks"]):
        hp.Int("freeze_blocks", 0, max(blocks - 1, 0))
    with hp.conditional_scope("adaptation", ["lora"]):
        hp.Choice("lora_rank", list(LORA_RANKS))
    return hp


def trial_config(config: Config, values: dict, model_dir: str, learning_rate_only: bool = False) -> Config:
    """The --mode=train run of one trial's values (the search owns freezing: the user's freezing flags do not
    apply, unless ``learning_rate_only``, where the config's freezing is the one to keep)."""
    freeze = config.freeze if learning_rate_only else dataclasses.replace(
        config.freeze, freeze_blocks=int(values.get("freeze_blocks", 0)), trainable="",
        lora_rank=int(values.get("lora_rank", 0)), freeze_all=False, unfreeze_every_epochs=0)
    train = dataclasses.replace(config.train, learning_rate=float(values["learning_rate"]),
                                epochs=int(values.get("tuner/epochs", config.train.epochs)))
    return dataclasses.replace(config, mode="train", freeze=freeze, train=train, model_dir=model_dir,
                               export=False).validate()


def _tuner_classes():
    """The oracle and tuner, defined when keras_tuner is first needed (it is imported only by --mode=tune)."""
    import keras_tuner

    class BudgetedHyperband(keras_tuner.oracles.HyperbandOracle):
        """Hyperband that stops when the next trial, and ``reserve_epochs`` more epochs after it (a final run
        the caller makes), would not end before ``deadline``."""

        def __init__(self, deadline: float, reserve_epochs: int = 0, **kwargs):
            super().__init__(**kwargs)
            self.deadline, self.reserve_epochs, self.seconds_per_epoch = deadline, reserve_epochs, None

        def populate_space(self, trial_id):
            response = super().populate_space(trial_id)
            if response.get("status") == "RUNNING" and self.seconds_per_epoch is not None:
                epochs = response["values"].get("tuner/epochs", 1)
                if time.time() + self.seconds_per_epoch * (epochs + self.reserve_epochs) > self.deadline:
                    return {"status": "STOPPED"}
            return response

    class RunTuner(keras_tuner.Tuner):
        """Each trial is a tfl run; its validation metric is the objective."""

        failure = None  # the error that stopped the search, raised again after it

        def run_trial(self, trial, config: Config, rows: list, learning_rate_only: bool = False, **unused):
            values = dict(trial.hyperparameters.values)
            if learning_rate_only:  # the freezing is the config's: the trial table says which
                values.update(freeze_blocks=config.freeze.freeze_blocks, freeze_all=config.freeze.freeze_all)
            name, direction = OBJECTIVES[config.model.task]
            started = time.time()
            try:
                metrics = runner.train_and_evaluate(trial_config(config, values, trial_dir(config, trial.trial_id),
                                                                 learning_rate_only), verbose=0, score_test=False)
            except NonFiniteLossError as e:  # a learning rate too high for this model: the worst score, reported
                rows.append({"trial": trial.trial_id, "values": values, "diverged": str(e).splitlines()[0],
                             "seconds": round(time.time() - started, 1)})
                print(f"tfl: tune trial {trial.trial_id}: {_describe(values)}: diverged")
                return {f"val_{name}": float("-inf") if direction == "max" else float("inf")}
            except Exception as e:  # a user mistake or a bug: stop the search and raise it as it is
                self.failure = e
                raise keras_tuner.errors.FatalError(str(e)) from e
            finally:
                release_memory()  # the next trial rebuilds its model from the preset
            seconds = time.time() - started
            epochs = max(int(values.get("tuner/epochs", 1)), 1)
            measured = self.oracle.seconds_per_epoch or 0.0
            self.oracle.seconds_per_epoch = max(measured, seconds / epochs)  # the slowest so far, per epoch
            rows.append({"trial": trial.trial_id, "values": values, "validation": metrics["validation"],
                         "seconds": round(seconds, 1)})
            print(f"tfl: tune trial {trial.trial_id}: {_describe(values)}: validation {name} "
                  f"{metrics['validation'][name]:.4f} in {seconds:.0f} s")
            return {f"val_{name}": metrics["validation"][name]}

    return BudgetedHyperband, RunTuner


def _adaptation(values: dict) -> str:
    if values.get("freeze_all"):
        return "linear probe (backbone frozen)"
    return (f"LoRA rank {values['lora_rank']}" if values.get("lora_rank")
            else f"{values.get('freeze_blocks', 0)} block(s) frozen")


def _describe(values: dict) -> str:
    return f"lr {values['learning_rate']:.2e}, {values.get('tuner/epochs', '-')} epoch(s), {_adaptation(values)}"


def _blocks_and_lora(config: Config) -> tuple:
    """(block count, whether LoRA applies) of --backbone: what the full search space needs. In a function of
    its own so the backbone built to count them is not kept alive through the search."""
    splits = runner.load_data_for(config)
    backbone = runner.backbone_for(config, splits, devices_lib.resolve_precision(config.train.precision))
    # LoRA adapts attention's query/value projections: text encoders (a convolutional backbone has none).
    return len(backbone.blocks), backbone.modality == TEXT and hasattr(backbone.keras_hub_backbone, "enable_lora")


def tune(config: Config, verbose: int = 1, *, learning_rate_only: bool = False, reserve_epochs: int = 0) -> dict:
    """--mode=tune: the search, then report.md / report.json under model_dir (trials print one line each
    whatever ``verbose``). ``learning_rate_only``: search the learning rate (and Hyperband's epochs) with the
    config's own freezing (--mode=auto's final learning rate); ``reserve_epochs``: keep that many epochs, at
    the measured seconds per epoch, of the budget for a run after the search."""
    import keras_tuner

    started = time.time()
    blocks, lora = (0, False) if learning_rate_only else _blocks_and_lora(config)
    name, direction = OBJECTIVES[config.model.task]
    oracle_class, tuner_class = _tuner_classes()
    oracle = oracle_class(started + config.auto.budget_minutes * 60.0, reserve_epochs,
                          objective=keras_tuner.Objective(f"val_{name}", direction),
                          max_epochs=config.train.epochs, factor=3, hyperband_iterations=1, seed=config.seed,
                          hyperparameters=search_space(config.train.learning_rate, blocks, lora, learning_rate_only),
                          tune_new_entries=False)
    tuner = tuner_class(oracle=oracle, directory=os.path.join(config.model_dir, "tuner"), project_name="hyperband",
                        overwrite=True)
    rows: list = []
    try:
        tuner.search(config, rows, learning_rate_only, verbose=0)  # tfl prints one line per trial
    except keras_tuner.errors.FatalError:
        if tuner.failure is not None:
            raise tuner.failure from None
        raise
    finished = [r for r in rows if "validation" in r]
    if not finished:
        raise NonFiniteLossError(f"--mode=tune: every trial diverged ({rows[0]['diverged'] if rows else 'none ran'}); "
                                 "lower --learning_rate (the search spans it / 10 to x 10)")
    best = max(finished, key=lambda r: r["validation"][name] * (1 if direction == "max" else -1))
    searched = "learning rate and epochs" if learning_rate_only else (
        "learning rate, epochs, frozen blocks" + (" and LoRA rank" if lora else ""))
    # The test split, once, for the chosen trial only (--mode=auto's search has a final run that scores it).
    search_seconds = time.time() - started
    test = None if learning_rate_only else trial_test_metrics(trial_config(
        config, best["values"], trial_dir(config, best["trial"])))
    result = {"mode": "tune", "objective": f"validation {name} ({direction})", "trials": rows, "best": best,
              "searched": searched, "test": test, "budget_minutes": config.auto.budget_minutes,
              "search_seconds": round(search_seconds, 2), "wall_seconds": round(time.time() - started, 2)}
    print(f"tfl: tune: best trial {best['trial']} ({_describe(best['values'])}): validation {name} "
          f"{best['validation'][name]:.4f}; {len(rows)} trial(s) in {result['search_seconds']:.0f} s")
    storage.write_json_atomically(os.path.join(config.model_dir, "report.json"), result)
    storage.write_text_atomically(os.path.join(config.model_dir, "report.md"), format_report(config, result))
    return result


def trial_dir(config: Config, trial_id: str) -> str:
    return os.path.join(config.model_dir, "trials", trial_id)


def trial_metrics(config: Config, split: str) -> dict:
    """The metrics on ``split`` ("validation" or "test") of a finished trial: its model rebuilt as the trial
    built it (``config``, the trial's run config), with the weights the trial saved (model.keras)."""
    splits = runner.load_data_for(config)
    devices = runner.set_up_devices(config)
    backbone, model, _ = runner.build(config, splits, devices)
    model.load_weights(os.path.join(config.model_dir, "model.keras"))
    batches = data_lib.make_batches(getattr(splits, split), batch_size=config.data.eval_batch_size or
                                    config.data.batch_size, preprocess=backbone.preprocess, modality=splits.modality,
                                    decode_image=image_file_decoder(splits, backbone))
    return evaluate(model, batches, task=config.model.task, num_labels=len(splits.label_names))


def trial_test_metrics(config: Config) -> dict:
    """``trial_metrics`` on the test split, or {"error": why} when the trial's model cannot be scored (the
    search's report is still written)."""
    try:
        return trial_metrics(config, "test")
    except (OSError, ValueError) as e:
        print(f"tfl: tune: the chosen trial's test split could not be scored: {e}")
        return {"error": str(e).splitlines()[0][:200]}
    finally:
        release_memory()  # trial_metrics has returned: the model it rebuilt is no longer referenced


def format_report(config: Config, result: dict) -> str:
    name = result["objective"].split()[1]
    lines = [f"# Tune: {config.model.backbone} on {config.data.source}", "",
             f"Hyperband (KerasTuner) over {result['searched']} (epochs up to {config.train.epochs}); judged by "
             f"{result['objective']}. {len(result['trials'])} trial(s) in "
             f"{result['search_seconds'] / 60:.1f} min of a {result['budget_minutes']:g} min budget.", "",
             "| trial | learning rate | epochs | adaptation | validation " + name + " | seconds |",
             "|---|---|---|---|---|---|"]
    for row in sorted(result["trials"], key=lambda r: r["trial"]):
        values = row["values"]
        score = f"{row['validation'][name]:.4f}" if "validation" in row else "diverged"
        lines.append(f"| {row['trial']} | {values['learning_rate']:.2e} | {values.get('tuner/epochs', '-')} | "
                     f"{_adaptation(values)} | {score} | {row['seconds']:.0f} |")
    best = result["best"]
    if result["test"] is None:
        test = "The test split is not scored here: the run after this search scores it."
    elif "error" in result["test"]:
        test = f"Its test split could not be scored after the search: {result['test']['error']}."
    else:
        test = ("Its test split, scored once after the search: "
                + ", ".join(f"{k} {v:.4f}" for k, v in result["test"].items()) + ".")
    lines += ["", f"Best: trial {best['trial']} ({_describe(best['values'])}); its run is `trials/{best['trial']}/`. "
              + test]
    return "\n".join(lines) + "\n"
