"""One table per extension point: an entry added to BACKBONES, DATA_SOURCES or STRATEGIES shows up in
--helpfull, passes the name checks and is what the loader, builder or report uses; nothing else to edit."""

import dataclasses

import numpy as np
import pytest
from absl import flags

from tfl import backbones, cli, report, strategies
from tfl.config import CompareConfig, Config, ConfigError, DataConfig
from tfl.data import sources


def helpfull_text() -> dict:
    values = flags.FlagValues()
    cli.define_flags(values)
    return {name: values[name].help for name in ("source", "backbone", "strategies")}


def test_a_new_strategy_is_one_table_entry(monkeypatch):
    gradual = strategies.Strategy("gradual unfreezing, one block every epoch",
                                  lambda base: {"freeze": {"unfreeze_every_epochs": base.freeze.unfreeze_every_epochs or 1}})
    monkeypatch.setitem(strategies.STRATEGIES, "gradual", gradual)
    assert "gradual: gradual unfreezing, one block every epoch" in helpfull_text()["strategies"]
    config = Config(compare=CompareConfig(strategies=("fine_tune", "gradual"))).validate()
    child = report.strategy_config(config, "gradual", seed=3, fraction=0.5, model_dir="d")
    assert child.freeze.unfreeze_every_epochs == 1 and child.mode == "train" and child.seed == 3
    assert "- `gradual`: gradual unfreezing" in report.format_markdown([], config, [])
    assert report.strategy_descriptions()["gradual"] == gradual.description
    monkeypatch.delitem(strategies.STRATEGIES, "gradual")
    with pytest.raises(ConfigError, match=r"Unknown strategy 'gradual' in --strategies; expected some of \['scratch'"):
        config.validate()


def test_a_new_data_source_is_one_table_entry(monkeypatch):
    def load_toy(name, options):
        count = int(name)
        return sources.SourceData(sources.TEXT, ["even", "odd"], pool=sources.Examples(
            np.array([f"text {i}" for i in range(count)], dtype=object), np.arange(count) % 2))

    monkeypatch.setitem(sources.DATA_SOURCES, "toy", sources.DataSource("toy:<count>", "generated texts", load_toy))
    assert "toy:<count>: generated texts" in helpfull_text()["source"]
    Config(data=DataConfig(source="toy:40")).validate()
    import tfl.data

    splits = tfl.data.load_data("toy:40", seed=0)
    assert splits.label_names == ["even", "odd"] and sum(splits.sizes.values()) == 40
    monkeypatch.delitem(sources.DATA_SOURCES, "toy")
    with pytest.raises(ConfigError, match=r"kind one of \['tfds', 'keras', 'csv', 'jsonl', 'images', 'asset'\]"):
        Config(data=DataConfig(source="toy:40")).validate()


def test_a_new_backbone_family_is_one_table_entry(monkeypatch):
    family = backbones.BackboneFamily("tiny_<width>", "a test family", lambda name: name.startswith("tiny_"),
                                      lambda name, o: ("built", name, o.seed))
    monkeypatch.setitem(backbones.BACKBONES, "tiny", family)
    assert "tiny_<width>: a test family" in helpfull_text()["backbone"]
    backbones.check_backbone_name("tiny_8")
    assert backbones.build_backbone("tiny_8", seed=5) == ("built", "tiny_8", 5)
    with pytest.raises(backbones.BackboneError, match=r"Unknown backbone 'huge_8'; expected lstm, small_cnn, .*tiny_<width>$"):
        backbones.check_backbone_name("huge_8")


def test_compare_report_names_the_batches_it_trained_on():
    fixed = Config(compare=CompareConfig(strategies=("fine_tune",))).validate()
    assert ", batch 32," in report.format_markdown([], fixed, [])
    budget = dataclasses.replace(fixed, data=dataclasses.replace(fixed.data, tokens_per_batch=512)).validate()
    text = report.format_markdown([], budget, [])
    assert ", batches of about 512 tokens," in text and "batch 32" not in text
