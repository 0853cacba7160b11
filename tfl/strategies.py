"""--mode=compare strategies (``--strategies``, not the distribution ``--strategy``): one table, name -> Strategy.

    STRATEGIES["partial"].settings(config)   # {"freeze": {"freeze_blocks": 2}}: what the run changes

The CLI help (``--strategies``), Config.validate (the accepted names) and the compare report (each
strategy's description) all read ``STRATEGIES``; adding a strategy is one entry here (CONTRIBUTING.md).
``tfl.report.strategy_config`` starts every strategy from the same base (backbone frozen nowhere, no
transfer, ``--mode=train``) and applies ``settings``; everything else stays equal across strategies.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One compare strategy."""

    description: str  # one line, for --helpfull and report.md
    # The base Config -> the changes this strategy makes: {"mode": str, "model"/"freeze"/"train": {field: value}}.
    settings: Callable[[object], dict]
    needs: str = ""  # what it needs beyond a backbone and data, for --helpfull ("" = nothing)
    uses_labels: bool = True  # False: the same run at every --label_fractions (compare runs it once per seed)


STRATEGIES = {
    "scratch": Strategy("same architecture, random initialisation",
                        lambda base: {"model": {"pretrained": False}}),
    "linear_probe": Strategy("frozen pretrained backbone, head only (cached features)",
                             lambda base: {"freeze": {"freeze_all": True},
                                           "train": {"learning_rate": base.compare.probe_learning_rate}}),
    "partial": Strategy("first --freeze_blocks blocks frozen",
                        lambda base: {"freeze": {"freeze_blocks": base.freeze.freeze_blocks or 2}}),
    "fine_tune": Strategy("everything trains", lambda base: {}),
    "lora": Strategy("low-rank adapters on the frozen backbone",
                     lambda base: {"freeze": {"lora_rank": base.freeze.lora_rank or 4}},
                     needs="a keras-hub backbone"),
    "structure": Strategy("source model's architecture, fresh weights",
                          lambda base: {"model": {"transfer": "structure"}}, needs="--source_model"),
    "parameter": Strategy("source model's weights and vocabulary; a new head, or the source's (--transfer_head)",
                          lambda base: {"model": {"transfer": "parameter", "transfer_head": base.model.transfer_head}},
                          needs="--source_model"),
    "zero_shot": Strategy("no training: similarity to label descriptions", lambda base: {"mode": "zero_shot"},
                          needs="a text encoder backbone", uses_labels=False),
    "self_training": Strategy("no labels: zero-shot pseudo-labels on the training texts, then a linear probe in "
                              "rounds (and a fine-tune with --pseudo_label_share)",
                              lambda base: {"mode": "self_train"}, needs="a text encoder backbone", uses_labels=False),
}


def strategies_help() -> str:
    """The --strategies help line, from the table."""
    entries = [f"{name}: {s.description}{' (needs ' + s.needs + ')' if s.needs else ''}"
               for name, s in STRATEGIES.items()]
    return "--mode=compare: strategies to run, comma-separated, from " + "; ".join(entries) + "."
