"""--mode=auto: rank the zoo, choose (backbone, depth, strategy) within a compute budget, run the choice, and
write why in report.md.

    choice = tfl.auto.choose(rows, train_examples=800, smallest_class=400, epochs=3, budget_seconds=600,
                             ranked_examples=800)
    choice.strategy, choice.backbone, choice.depth, choice.reasons

The rule (``choose``; the README repeats it):

1. No labels (``--nolabels``): nothing can be ranked, so zero-shot by label descriptions, then self-training
   on the unlabelled training texts (``tfl.self_training``), with the text encoder of ``--backbone``; its
   fine-tune on pseudo-labels (``--pseudo_label_share``) only when the estimate fits the budget.
2. Otherwise rank every candidate of the zoo by LogME on at most ``--rank_examples`` training examples and
   take the best pretrained (backbone, depth) with at least one transformer block.
3. Strategy, from the rarest class's labelled examples and the budget left after ranking (costs estimated
   from the ranking's own forward pass: a trained block costs about three forward passes, a frozen one one):
   * fewer than ``FINE_TUNE_MIN_PER_CLASS``: a linear probe on the frozen features LogME scored best, the
     backbone cut after that block (``--backbone_depth``; fine-tuning every weight on so few examples
     mostly fits noise);
   * else the whole backbone is fine-tuned when its estimate fits the budget (LogME scores frozen features,
     and fine-tuning changes them: on the first task of docs/transferability.md the deepest fine-tune beat
     the best-scored cut); else partial fine-tuning with the fewest frozen blocks that fit; else the probe.
   LoRA is not chosen: on a CPU its backward pass still runs through every block, so it saves memory,
   not time, and this rule budgets time.
4. Learning rate: when the budget left after ranking holds the chosen run and ``LR_SEARCH_RUNS`` more of
   it, and --epochs is at least ``TUNE_MIN_EPOCHS`` (Hyperband's brackets need it), a KerasTuner
   Hyperband search over the learning rate alone (``tfl.tuning``, the choice's freezing fixed, trials judged
   on the validation split) spends the budget but the final run's epochs, at the seconds per epoch it
   measures; the final run then uses the best trial's learning rate. Otherwise it keeps --learning_rate (or
   --probe_learning_rate for a probe).
The report shows the ranking, the choice with these reasons and the estimate, and the run's result.
"""

from __future__ import annotations

import dataclasses
import os
import time

from tfl import ranking, runner, self_training, storage, tuning
from tfl.config import TUNE_MIN_EPOCHS, Config, ConfigError
from tfl.costs import training_seconds
from tfl.data import TEXT
from tfl.train import NonFiniteLossError
from tfl.zoo import is_source_model_folder

FINE_TUNE_MIN_PER_CLASS = 32  # below this many labelled examples per class: a linear probe
LR_SEARCH_RUNS = 2  # a learning-rate search needs the budget of this many runs of the choice, beside the final one


@dataclasses.dataclass
class Choice:
    """What auto runs, and why."""

    strategy: str  # linear_probe | partial | fine_tune
    backbone: str
    depth: int
    freeze_blocks: int = 0
    estimated_seconds: float = 0.0
    reasons: list = dataclasses.field(default_factory=list)
    cut: bool = True  # False: depth is the backbone's full depth (nothing cut, --backbone_depth=0)


def choose(rows: list, *, train_examples: int, smallest_class: int, epochs: int, budget_seconds: float,
           ranked_examples: int, eval_examples: int = 0, can_cut: bool = True) -> Choice:
    """The rule of this module's docstring, applied to ``ranking.ranking_rows`` output (best first).
    ``smallest_class``: labelled training examples of the rarest class; ``eval_examples``: examples evaluated
    over the whole run (validation after every epoch, then test); ``can_cut=False`` (image backbones): a
    probe reads each backbone's full depth."""
    deepest = ranking.deepest_depths(rows)
    pretrained = [r for r in rows if r["pretrained"] and (r["depth"] or 0) >= 1 and not is_source_model_folder(
        r["backbone"]) and (can_cut or r["depth"] == deepest[r["backbone"]])]
    if not pretrained:
        raise ConfigError("--mode=auto found no pretrained candidate it can run in the ranking (a backbone after at "
                          "least one block); add a pretrained backbone to --backbones, or a depth >= 1 to --depths")
    best = pretrained[0]
    full = deepest[best["backbone"]]
    # The ranking's shared pass ran every depth of the backbone: a model cut at depth k costs k / full of it.
    forward = best["feature_seconds"] / max(ranked_examples, 1)
    reasons = [f"`{best['candidate']}` has the highest LogME of the pretrained candidates "
               + ("" if can_cut else "at each backbone's full depth ") + f"({best['logme']:.4f})"]
    control = [r for r in rows if not r["pretrained"] and r["backbone"] == best["backbone"]]
    if control and not best["logme"] > control[0]["logme"]:
        reasons.append(f"warning: it does not beat its own random-init control ({control[0]['logme']:.4f}): "
                       "its pretrained weights carry nothing LogME can see for this task")

    def cost(share: float, depth: int) -> float:
        return training_seconds(forward * depth / full, train_examples=train_examples, eval_examples=eval_examples,
                                epochs=epochs, trained_share=share)

    # A probe reads the frozen features LogME scored best: the backbone cut after that block.
    probe = Choice("linear_probe", best["backbone"], best["depth"], 0, cost(0.0, best["depth"]), reasons,
                   cut=best["depth"] < full)
    if smallest_class < FINE_TUNE_MIN_PER_CLASS:
        reasons.append(f"the rarest class has {smallest_class} labelled examples (< {FINE_TUNE_MIN_PER_CLASS}): a "
                       "linear probe on the frozen features; fine-tuning every weight on so few mostly fits noise")
        return probe
    if budget_seconds <= 0:
        reasons.append(f"the ranking used up the budget: a linear probe, the cheapest run (about "
                       f"{probe.estimated_seconds:.0f} s)")
        return probe
    # Fine-tuning keeps the whole backbone: LogME scores frozen features, and fine-tuning changes them (on
    # docs/transferability.md's first task the deepest fine-tune beat the best-scored cut by several points).
    blocks = full + 1  # the embeddings, then one per transformer block
    for frozen in range(blocks):
        seconds = cost((blocks - frozen) / blocks, full)
        if seconds <= budget_seconds:
            reasons.append(f"{smallest_class} or more labelled examples per class; the whole backbone is fine-tuned "
                           "(LogME scores frozen features; fine-tuning changes them) and "
                           + (f"fine-tuning every weight fits the budget (estimate {seconds:.0f} s of "
                              f"{budget_seconds:.0f} s)" if frozen == 0 else
                              f"full fine-tuning would take about {cost(1.0, full):.0f} s, over the budget of "
                              f"{budget_seconds:.0f} s; the first {frozen} of {blocks} blocks frozen fits "
                              f"({seconds:.0f} s)"))
            return Choice("fine_tune" if frozen == 0 else "partial", best["backbone"], full, frozen, seconds, reasons,
                          cut=False)
    reasons.append(f"even the top block alone would take about {cost(1.0 / blocks, full):.0f} s, over the budget "
                   f"of {budget_seconds:.0f} s: a linear probe ({probe.estimated_seconds:.0f} s)")
    return probe


def chosen_config(config: Config, choice: Choice, model_dir: str) -> Config:
    """The --mode=train run of ``choice``: what the ranking scored (mean pooling, no transfer from a source
    model) and only the freezing the choice names; the user's other freezing flags do not apply."""
    model = dataclasses.replace(config.model, backbone=choice.backbone, backbone_depth=choice.depth if choice.cut else 0,
                                pretrained=True,
                                pooling="mean", transfer="", source_model="", transfer_head="new")
    freeze = dataclasses.replace(config.freeze, freeze_all=choice.strategy == "linear_probe", trainable="",
                                 freeze_blocks=choice.freeze_blocks if choice.strategy == "partial" else 0,
                                 lora_rank=0, unfreeze_every_epochs=0)
    train = config.train
    if choice.strategy == "linear_probe":  # a head alone needs a larger step (as --mode=compare's probe)
        train = dataclasses.replace(train, learning_rate=config.compare.probe_learning_rate)
    return dataclasses.replace(config, mode="train", model=model, freeze=freeze, train=train,
                               model_dir=model_dir).validate()


def run_auto(config: Config, verbose: int = 1) -> dict:
    """--mode=auto: ranks, chooses, runs the choice under ``<model_dir>/chosen``, writes report.md/json."""
    started = time.time()
    sub_dir = lambda name: os.path.join(config.model_dir, name) if config.model_dir else ""  # noqa: E731
    if not config.data.labels:
        metrics = self_training.run_self_training(dataclasses.replace(config, mode="self_train",
                                                                      model_dir=sub_dir("chosen")), verbose,
                                                  budget_seconds=config.auto.budget_minutes * 60.0, started=started)
        reasons = ["--nolabels: nothing to rank; zero-shot by label descriptions, then self-training on the "
                   "unlabelled training texts"] + ([metrics["fine_tune_budget"]] if metrics["fine_tune_budget"]
                                                   else [])
        return _finish(config, {"strategy": "self_training", "backbone": config.model.backbone, "reasons": reasons},
                       None, metrics, started)
    ranking.check_backbones(config.rank.backbones, None)  # unknown names fail before the data loads
    splits = runner.load_data_for(config)
    ranked = ranking.rank(config, splits)  # writes rank.md / rank.json beside the report
    budget = config.auto.budget_minutes * 60.0 - (time.time() - started)
    sizes, epochs = splits.sizes, config.train.epochs
    counts = splits.label_counts.get("train") or {"all": sizes["train"]}  # regression: no classes
    choice = choose(ranked["rows"], train_examples=sizes["train"], smallest_class=min(counts.values()), epochs=epochs,
                    budget_seconds=budget, ranked_examples=ranked["examples"], can_cut=splits.modality == TEXT,
                    eval_examples=sizes["validation"] * epochs + sizes["test"])
    print(f"tfl: auto chose {choice.strategy} of {choice.backbone}"
          + (f" cut after block {choice.depth}" if choice.cut else "") + ": " + "; ".join(choice.reasons))
    chosen = chosen_config(config, choice, sub_dir("chosen"))
    left = config.auto.budget_minutes * 60.0 - (time.time() - started)
    chosen = tuned_learning_rate(chosen, choice, left, sub_dir("learning_rate"), verbose)
    print(f"tfl: auto: {choice.reasons[-1]}")
    metrics = runner.train_and_evaluate(chosen, verbose)
    return _finish(config, dataclasses.asdict(choice), ranked, metrics, started)


def tuned_learning_rate(chosen: Config, choice: Choice, seconds_left: float, search_dir: str,
                        verbose: int) -> Config:
    """``chosen`` with the learning rate a Hyperband search finds in ``seconds_left`` (rule 4 of the module
    docstring; the search keeps the final run's epochs of it, at the seconds per epoch it measures), or
    unchanged when the budget is short of the final run and LR_SEARCH_RUNS more; adds the reason to
    ``choice.reasons``."""
    rate, runs = chosen.train.learning_rate, LR_SEARCH_RUNS + 1
    if not search_dir:
        short = "a learning-rate search needs --model_dir"
    elif chosen.train.epochs < TUNE_MIN_EPOCHS:
        short = f"a Hyperband search needs --epochs >= {TUNE_MIN_EPOCHS}"
    elif seconds_left < runs * max(choice.estimated_seconds, 1.0):
        short = (f"the {max(seconds_left, 0):.0f} s left do not hold the final run and {LR_SEARCH_RUNS} more of "
                 f"about {choice.estimated_seconds:.0f} s each for a search")
    else:
        short = ""
    if short:
        choice.reasons.append(f"learning rate {rate:g} as given: {short}")
        return chosen
    search = dataclasses.replace(chosen, mode="tune", model_dir=search_dir,
                                 auto=dataclasses.replace(chosen.auto, budget_minutes=seconds_left / 60.0)).validate()
    try:
        best = tuning.tune(search, verbose, learning_rate_only=True, reserve_epochs=chosen.train.epochs)["best"]
    except NonFiniteLossError:  # every trial diverged: the given rate is still a fair choice
        choice.reasons.append(f"learning rate {rate:g} as given: every trial of the search diverged "
                              "(`learning_rate/`)")
        return chosen
    rate = float(best["values"]["learning_rate"])
    choice.reasons.append(f"learning rate {rate:.2e}: the best on the validation split of a Hyperband search around "
                          f"{chosen.train.learning_rate:g} within the {seconds_left:.0f} s left, keeping the final "
                          "run's share (`learning_rate/report.md`)")
    return dataclasses.replace(chosen, train=dataclasses.replace(chosen.train, learning_rate=rate)).validate()


def _finish(config: Config, choice: dict, ranked, metrics: dict, started: float) -> dict:
    result = {"mode": "auto", "choice": choice, "test": metrics["test"], "budget_minutes": config.auto.budget_minutes,
              "wall_seconds": round(time.time() - started, 2), "chosen_run": metrics,
              "ranking_seconds": ranked["seconds"] if ranked else 0.0}
    if config.model_dir:
        storage.write_json_atomically(os.path.join(config.model_dir, "report.json"), result)
        storage.write_text_atomically(os.path.join(config.model_dir, "report.md"),
                                      format_report(config, choice, ranked, metrics, result["wall_seconds"]))
    return result


def format_report(config: Config, choice: dict, ranked, metrics: dict, wall_seconds: float) -> str:
    test = ", ".join(f"{k} {v:.4f}" for k, v in metrics["test"].items())
    lines = [f"# Auto: {config.data.source}", "",
             f"Budget {config.auto.budget_minutes:g} min; the whole run took {wall_seconds / 60:.1f} min.", "",
             "## Choice", "", f"**{choice['strategy']}** of `{choice['backbone']}`"
             + (f" cut after block {choice['depth']}" if choice.get("cut") else "")
             + (f", first {choice['freeze_blocks']} blocks frozen" if choice.get("freeze_blocks") else "")
             + (f" (estimated {choice['estimated_seconds']:.0f} s)" if choice.get("estimated_seconds") else "") + ".",
             ""] + [f"- {reason}" for reason in choice["reasons"]]
    lines += ["", "## Result", "", f"Test split: {test}."]
    if "zero_shot" in metrics:
        lines.append(f"Plain zero-shot on the same test split: accuracy {metrics['zero_shot']['test']['accuracy']:.4f}.")
        if metrics.get("fine_tune"):  # --pseudo_label_share: the result above is the fine-tuned encoder's
            lines.append(f"The result is the encoder fine-tuned on {metrics['fine_tune']['examples']:,d} zero-shot "
                         f"pseudo-labels (the probe alone: accuracy {metrics['probe_test']['accuracy']:.4f}); "
                         "the run, with its export, is in `chosen/fine_tune/`.")
    else:
        lines.append(f"Training took {metrics['train_seconds']:.0f} s of {metrics['wall_seconds']:.0f} s; the "
                     "run, with its export, is in `chosen/`.")
    if ranked:
        lines += ["", "## Ranking", "", f"{ranked['examples']} training examples, in {ranked['seconds']:.0f} s; "
                  "best LogME first (`rank.md` has every estimator).", "", ranking.format_table(ranked["rows"])]
    return "\n".join(lines) + "\n"
