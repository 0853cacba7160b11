"""tfl.auto: the choice rule on ranking rows, --backbone_depth (the cut it runs), and --mode=auto end to end."""

import json

import numpy as np
import pytest

import tfl
from tfl import auto, tuning
from tfl.backbones import BackboneError, build_backbone
from tfl.config import AutoConfig, Config, ConfigError, DataConfig, ModelConfig, RankConfig, TrainConfig


def _row(candidate, logme, depth, pretrained=True, backbone="enc", feature_seconds=60.0):
    return {"candidate": candidate, "backbone": backbone, "depth": depth, "pretrained": pretrained,
            "logme": logme, "feature_seconds": feature_seconds}


# The ranking of one 6-block encoder: depth 4 scores best; 1,000 ranked examples took 60 s for all depths.
ROWS = [_row("enc@4", -0.5, 4), _row("enc@6", -0.6, 6), _row("enc@0", -0.65, 0),
        _row("enc@6 (random init)", -0.7, 6, pretrained=False)]
ARGS = dict(epochs=2, ranked_examples=1000, eval_examples=0)


def test_few_labels_per_class_get_a_linear_probe_on_the_best_depth():
    choice = auto.choose(ROWS, train_examples=40, smallest_class=20, budget_seconds=1e9, **ARGS)
    assert (choice.strategy, choice.backbone, choice.depth) == ("linear_probe", "enc", 4)
    assert "rarest class has 20" in choice.reasons[-1] and "enc@4" in choice.reasons[0]
    # Many examples, but one class rare: still a probe (the rarest class decides, not the mean).
    assert auto.choose(ROWS, train_examples=1000, smallest_class=10, budget_seconds=1e9, **ARGS).strategy == \
        "linear_probe"
    # One forward pass per example, at 4/6 of the full backbone's 0.06 s.
    assert choice.estimated_seconds == pytest.approx(40 * 0.06 * 4 / 6)


def test_the_budget_decides_between_fine_tune_partial_and_probe():
    # Fine-tuning keeps the whole backbone (depth 6: 0.06 s a forward pass per example), 2 epochs of 1,000.
    full = auto.training_seconds(0.06, train_examples=1000, eval_examples=0, epochs=2, trained_share=1.0)
    assert full == pytest.approx(0.06 * 2 * 1000 * 3)
    whole = auto.choose(ROWS, train_examples=1000, smallest_class=500, budget_seconds=full * 1.01, **ARGS)
    assert (whole.strategy, whole.depth, whole.cut) == ("fine_tune", 6, False)
    partial = auto.choose(ROWS, train_examples=1000, smallest_class=500, budget_seconds=full * 0.8, **ARGS)
    assert partial.strategy == "partial" and partial.freeze_blocks >= 1 and not partial.cut
    assert partial.estimated_seconds <= full * 0.8 and "over the budget" in partial.reasons[-1]
    # One block fewer frozen would not have fitted (7 blocks: the embeddings and 6 transformer blocks).
    one_less = auto.training_seconds(0.06, train_examples=1000, eval_examples=0, epochs=2,
                                     trained_share=(7 - partial.freeze_blocks + 1) / 7)
    assert one_less > full * 0.8
    tighter = auto.choose(ROWS, train_examples=1000, smallest_class=500, budget_seconds=full * 0.5, **ARGS)
    assert tighter.freeze_blocks > partial.freeze_blocks
    probe = auto.choose(ROWS, train_examples=1000, smallest_class=500, budget_seconds=1.0, **ARGS)
    assert (probe.strategy, probe.depth, probe.cut) == ("linear_probe", 4, True)  # the best-scored frozen features
    spent = auto.choose(ROWS, train_examples=1000, smallest_class=500, budget_seconds=-35.0, **ARGS)
    assert spent.strategy == "linear_probe" and "ranking used up the budget" in spent.reasons[-1]


def test_controls_are_never_chosen_and_a_best_that_does_not_beat_its_control_is_flagged():
    rows = [_row("enc@6 (random init)", 0.0, 6, pretrained=False)] + ROWS[:2]
    choice = auto.choose(rows, train_examples=1000, smallest_class=500, budget_seconds=1e9, **ARGS)
    assert choice.backbone == "enc" and "enc@4" in choice.reasons[0]
    assert any("does not beat its own random-init control" in r for r in choice.reasons)
    with pytest.raises(ConfigError, match="no pretrained candidate"):
        auto.choose(rows[:1], train_examples=1000, smallest_class=500, budget_seconds=1e9, **ARGS)
    # Images are not cut: only each backbone's full depth is a candidate, and a probe reads it whole.
    image = auto.choose(ROWS, train_examples=40, smallest_class=20, budget_seconds=1e9, can_cut=False, **ARGS)
    assert (image.strategy, image.depth, image.cut) == ("linear_probe", 6, False)
    assert "full depth" in image.reasons[0]


def test_backbone_depth_is_the_rankings_depth_k_and_leaves_later_blocks_out(tiny_bert_preset):
    from tfl import freezing, ranking

    texts = ["the great film", "a awful movie the plot the film", "great"]
    cut = build_backbone(tiny_bert_preset, sequence_length=16, depth=1)
    features = ranking.extract_features(ranking.candidates("text", [tiny_bert_preset], sequence_length=16,
                                                           controls=False), texts, modality="text")
    import tensorflow as tf
    np.testing.assert_allclose(cut.model(cut.preprocess(tf.constant(texts))),
                               features[f"{tiny_bert_preset}@1"]["features"], atol=1e-5)
    assert [b.name for b in cut.blocks] == ["embeddings", "transformer_layer_0"]
    rows = freezing.freeze(cut)
    assert rows[-1]["block"] == "transformer_layer_1, pooled_dense (unused)" and rows[-1]["trainable_params"] == 0
    layer_1 = {id(w) for w in cut.keras_hub_backbone.get_layer("transformer_layer_1").weights}
    assert cut.model.trainable_weights and not layer_1 & {id(w) for w in cut.model.trainable_weights}
    with pytest.raises(BackboneError, match="has 2 transformer blocks"):
        build_backbone(tiny_bert_preset, sequence_length=16, depth=3)
    with pytest.raises(BackboneError, match="cuts a keras-hub text encoder"):
        build_backbone("lstm", depth=1)


def _sentences(tmp_path, rows=48):
    words = {1: ["great", "film"], 0: ["awful", "plot"]}
    lines = [f"the {words[i % 2][0]} {words[i % 2][1]} {'a' * (1 + i % 3)}" for i in range(rows)]
    path = tmp_path / "s.csv"
    path.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(lines)))
    return f"csv:{path}"


def test_auto_mode_ranks_chooses_runs_and_reports(tmp_path, tiny_bert_preset):
    from tfl import job

    config = Config(mode="auto", data=DataConfig(source=_sentences(tmp_path), batch_size=8),
                    model=ModelConfig(sequence_length=8), train=TrainConfig(precision="float32", epochs=1),
                    rank=RankConfig(backbones=(tiny_bert_preset,), rank_examples=24), auto=AutoConfig(5.0),
                    model_dir=str(tmp_path / "auto"), export=False)
    job.check_before_run(config)
    result = job.run_checked(config, verbose=0)
    report = (tmp_path / "auto" / "report.md").read_text()
    rank = json.loads((tmp_path / "auto" / "rank.json").read_text())
    chosen = json.loads((tmp_path / "auto" / "chosen" / "metrics.json").read_text())
    choice = result["choice"]
    # 38 training examples, 19 per class: under 32 per class, so a probe on the top-ranked pretrained depth.
    top = next(r for r in rank["rows"] if r["pretrained"] and r["depth"] >= 1)
    assert (choice["strategy"], choice["depth"]) == ("linear_probe", top["depth"])
    cut = top["depth"] if top["depth"] < 2 else 0  # the tiny BERT has 2 blocks: depth 2 is the whole of it
    assert chosen["config"]["model"]["backbone_depth"] == cut and chosen["config"]["freeze"]["freeze_all"]
    assert result["test"] == chosen["test"]
    for text in ("## Choice", "**linear_probe**", "## Result", "## Ranking", top["candidate"],
                 f"accuracy {chosen['test']['accuracy']:.4f}"):
        assert text in report, text


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_nolabels_runs_zero_shot_then_self_training(tmp_path, tiny_bert_preset, share):
    from tfl import job

    config = Config(mode="auto", data=DataConfig(source=_sentences(tmp_path), batch_size=8, labels=False),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=8,
                                      label_descriptions="0=awful|bad;1=great|good"),
                    train=TrainConfig(precision="float32", epochs=1, pseudo_label_share=share),
                    model_dir=str(tmp_path / "auto"), export=False)
    result = job.run_checked(config, verbose=0)
    assert result["choice"]["strategy"] == "self_training"
    report = (tmp_path / "auto" / "report.md").read_text()
    assert "Plain zero-shot on the same test split" in report and "**self_training**" in report
    # With a share, the result is the fine-tuned encoder's, and the report says where that run is.
    assert ("`chosen/fine_tune/`" in report) == bool(share) == (tmp_path / "auto" / "chosen" / "fine_tune").is_dir()
    with pytest.raises(ConfigError, match="--nolabels needs --mode=auto"):
        Config(data=DataConfig(labels=False)).validate()


def test_nolabels_skips_the_fine_tune_that_does_not_fit_the_budget(tmp_path, tiny_bert_preset):
    from tfl import job

    config = Config(mode="auto", data=DataConfig(source=_sentences(tmp_path), batch_size=8, labels=False),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=8,
                                      label_descriptions="0=awful|bad;1=great|good"),
                    train=TrainConfig(precision="float32", epochs=1, pseudo_label_share=0.5),
                    auto=AutoConfig(budget_minutes=1e-4), model_dir=str(tmp_path / "auto"), export=False)
    result = job.run_checked(config, verbose=0)
    assert result["chosen_run"]["fine_tune"] == {} and not (tmp_path / "auto" / "chosen" / "fine_tune").exists()
    assert result["test"] == result["chosen_run"]["probe_test"]
    report = (tmp_path / "auto" / "report.md").read_text()
    assert "would take about" in report and "over the 0 s left of --budget_minutes" in report
    assert result["chosen_run"]["fine_tune_budget"] in report


def test_the_label_free_fine_tune_estimate_counts_its_share_epochs_and_evaluation():
    from tfl.self_training import fine_tune_budget

    config = Config(train=TrainConfig(pseudo_label_share=0.5, epochs=2))
    sizes = {"train": 1000, "validation": 100, "test": 100}
    # 2 epochs x 500 texts x 3 passes + 2 x 100 validation + 100 test = 3,300 passes at 0.01 s.
    runs, reason = fine_tune_budget(config, sizes, 0.01, 33.5)
    assert runs and "its estimate, 33 s with every weight trained, fits the 34 s left" in reason
    runs, reason = fine_tune_budget(config, sizes, 0.01, 32.0)
    assert not runs and "about 33 s with every weight trained, over the 32 s left" in reason
    assert fine_tune_budget(config, sizes, 0.01, None) == (True, "")  # no budget: --mode=self_train
    assert fine_tune_budget(Config(), sizes, 0.01, 5.0) == (False, "")  # no share: no fine-tune


def test_the_encoders_seconds_per_text_leave_out_each_passs_fixed_cost():
    from tfl.self_training import encoding_seconds_per_text

    # 2 s of tracing per pass, then 0.01 s a text.
    assert encoding_seconds_per_text({"train": 12.0, "validation": 3.0}, {"train": 1000, "validation": 100}) == \
        pytest.approx(0.01)
    # Splits of one size: the plain average.
    assert encoding_seconds_per_text({"train": 3.0, "validation": 3.0}, {"train": 100, "validation": 100}) == 0.03


def test_tune_searches_within_its_budget_and_reports_every_trial(tmp_path, tiny_bert_preset):
    from tfl import job

    config = Config(mode="tune", data=DataConfig(source=_sentences(tmp_path), batch_size=8),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=8),
                    train=TrainConfig(precision="float32", epochs=3, learning_rate=1e-3),
                    auto=AutoConfig(budget_minutes=0.05), model_dir=str(tmp_path / "tune"), export=False)
    started = __import__("time").time()
    result = job.run_checked(config, verbose=0)
    elapsed = __import__("time").time() - started
    # The budget bounds the search; scoring the chosen trial's test split comes after it.
    assert 0 < result["search_seconds"] <= result["wall_seconds"] <= elapsed
    searched = elapsed - (result["wall_seconds"] - result["search_seconds"])
    trials = result["trials"]
    assert trials and result["best"] in trials
    for trial in trials:
        values = trial["values"]
        assert 1e-4 <= values["learning_rate"] <= 1e-2 and 1 <= values["tuner/epochs"] <= 3
        assert values["adaptation"] in ("blocks", "lora")
        assert ("lora_rank" in values) == (values["adaptation"] == "lora")
        run = json.loads((tmp_path / "tune" / "trials" / trial["trial"] / "metrics.json").read_text())
        assert run["epochs_run"] == values["tuner/epochs"]  # each trial is a whole tfl run with its own epochs
        assert run["config"]["freeze"]["lora_rank"] == values.get("lora_rank", 0)
        assert run["test"] is None  # trials never look at the test split
    best = max(t["validation"]["accuracy"] for t in trials)
    assert result["best"]["validation"]["accuracy"] == best
    # The test split is scored once, after the search, on the chosen trial's model rebuilt with its weights:
    # the same rebuild gives that trial's own validation scores back.
    chosen = tuning.trial_config(config, result["best"]["values"], str(tmp_path / "tune" / "trials" /
                                                                      result["best"]["trial"]))
    assert tuning.trial_metrics(chosen, "validation") == pytest.approx(result["best"]["validation"], abs=1e-6)
    assert set(result["test"]) == {"accuracy", "macro_f1", "auc"}
    report = (tmp_path / "tune" / "report.md").read_text()
    assert all(f"| {t['trial']} |" in report for t in trials) and "Best: trial" in report
    # 3 s of budget: the first trial always runs, then the measured seconds per epoch stop the search before a
    # trial that would end late; Hyperband alone would run 6 trials here.
    assert len(trials) < 6 and searched < 3 + 2 * max(t["seconds"] for t in trials)


def test_a_user_mistake_inside_a_trial_stops_the_search_as_itself(tmp_path, tiny_bert_preset):
    from tfl import job

    config = Config(mode="tune", data=DataConfig(source=_sentences(tmp_path), batch_size=8),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=64),  # longer than its 16 positions
                    train=TrainConfig(precision="float32", epochs=3), model_dir=str(tmp_path / "tune"), export=False)
    with pytest.raises(BackboneError, match="--sequence_length=64 is longer"):
        job.run_checked(config, verbose=0)
    with pytest.raises(ConfigError, match="--mode=tune needs --model_dir"):
        Config(mode="tune").validate()
    with pytest.raises(ConfigError, match="needs --epochs >= 3"):  # Hyperband would run a single trial
        Config(mode="tune", train=TrainConfig(epochs=2), model_dir=str(tmp_path / "t2")).validate()


def test_auto_runs_what_was_chosen_not_the_users_other_freezing_flags():
    from tfl.config import FreezeConfig

    config = Config(mode="auto", model=ModelConfig(pooling="cls"), freeze=FreezeConfig(trainable="pooler",
                                                                                       lora_rank=4))
    probe = auto.chosen_config(config, auto.Choice("linear_probe", "asset:minilm", 3), "/tmp/x")
    assert probe.freeze.freeze_all and not probe.freeze.trainable and probe.freeze.lora_rank == 0
    assert (probe.model.backbone_depth, probe.model.pooling, probe.mode) == (3, "mean", "train")
    partial = auto.chosen_config(config, auto.Choice("partial", "asset:minilm", 4, freeze_blocks=2), "/tmp/x")
    assert (partial.freeze.freeze_blocks, partial.freeze.freeze_all, partial.train.learning_rate) == (2, False, 5e-5)


def test_the_budgeted_oracle_starts_a_trial_only_if_it_ends_in_time():
    import time

    import keras_tuner

    from tfl import tuning

    oracle_class, _ = tuning._tuner_classes()
    oracle = oracle_class(time.time() + 60, objective=keras_tuner.Objective("val_accuracy", "max"), max_epochs=3,
                          hyperparameters=tuning.search_space(1e-3, 3, lora=False), tune_new_entries=False, seed=0)
    assert oracle.populate_space("0")["status"] == "RUNNING"  # nothing measured yet: the first trial runs
    oracle.seconds_per_epoch = 100.0
    assert oracle.populate_space("1")["status"] == "STOPPED"
    oracle.seconds_per_epoch = 1.0
    assert oracle.populate_space("2")["status"] == "RUNNING"
    # A run kept for after the search (auto's final run) counts too: 1 s per epoch, but 100 epochs reserved.
    reserving = oracle_class(time.time() + 60, 100, objective=keras_tuner.Objective("val_accuracy", "max"),
                             max_epochs=3, hyperparameters=tuning.search_space(1e-3, 3, lora=False),
                             tune_new_entries=False, seed=0)
    reserving.seconds_per_epoch = 1.0
    assert reserving.populate_space("0")["status"] == "STOPPED"


def test_a_learning_rate_search_runs_only_when_the_budget_holds_more_runs_of_the_choice(tmp_path):
    config = Config(mode="auto", train=TrainConfig(epochs=3), model_dir=str(tmp_path))
    choice = auto.Choice("fine_tune", "asset:minilm", 6, estimated_seconds=100.0, cut=False)
    chosen = auto.chosen_config(config, choice, str(tmp_path / "chosen"))
    kept = auto.tuned_learning_rate(chosen, choice, 150.0, str(tmp_path / "learning_rate"), verbose=0)
    assert kept is chosen and "do not hold the final run and 2 more" in choice.reasons[-1]
    one_epoch = auto.chosen_config(Config(mode="auto", train=TrainConfig(epochs=1), model_dir=str(tmp_path)), choice,
                                   str(tmp_path / "chosen"))
    assert auto.tuned_learning_rate(one_epoch, choice, 1e6, str(tmp_path / "learning_rate"), 0) is one_epoch
    assert "needs --epochs >= 3" in choice.reasons[-1]
    assert not (tmp_path / "learning_rate").exists()


def test_autos_learning_rate_search_keeps_the_chosen_freezing_and_uses_the_best_trial(tmp_path, tiny_bert_preset):
    config = Config(mode="auto", data=DataConfig(source=_sentences(tmp_path), batch_size=8),
                    model=ModelConfig(sequence_length=8), train=TrainConfig(precision="float32", epochs=3,
                                                                            learning_rate=1e-3),
                    model_dir=str(tmp_path / "auto"), export=False)
    choice = auto.Choice("partial", tiny_bert_preset, 2, freeze_blocks=1, estimated_seconds=1.0, cut=False)
    chosen = auto.chosen_config(config, choice, str(tmp_path / "auto" / "chosen"))
    tuned = auto.tuned_learning_rate(chosen, choice, 3.0, str(tmp_path / "auto" / "learning_rate"), verbose=0)
    report = json.loads((tmp_path / "auto" / "learning_rate" / "report.json").read_text())
    assert report["searched"] == "learning rate and epochs"
    assert tuned.train.learning_rate == report["best"]["values"]["learning_rate"]
    assert tuned.freeze == chosen.freeze and tuned.model_dir == chosen.model_dir
    for trial in report["trials"]:
        run = json.loads((tmp_path / "auto" / "learning_rate" / "trials" / trial["trial"] / "metrics.json").read_text())
        assert run["config"]["freeze"]["freeze_blocks"] == 1 and set(trial["values"]) <= {
            "learning_rate", "tuner/epochs", "tuner/initial_epoch", "tuner/bracket", "tuner/round", "tuner/trial_id",
            "freeze_blocks", "freeze_all"}  # the last two: the choice's own, recorded for the table
    assert "| 1 block(s) frozen |" in (tmp_path / "auto" / "learning_rate" / "report.md").read_text()
    assert "learning rate" in choice.reasons[-1] and "Hyperband" in choice.reasons[-1]


def test_a_search_whose_trials_all_diverge_keeps_the_given_learning_rate(tmp_path, monkeypatch):
    from tfl import tuning
    from tfl.train import NonFiniteLossError

    def diverging(*args, **kwargs):
        raise NonFiniteLossError("loss is nan")

    monkeypatch.setattr(tuning, "tune", diverging)
    config = Config(mode="auto", train=TrainConfig(epochs=3), model_dir=str(tmp_path))
    choice = auto.Choice("fine_tune", "asset:minilm", 6, estimated_seconds=10.0, cut=False)
    chosen = auto.chosen_config(config, choice, str(tmp_path / "chosen"))
    assert auto.tuned_learning_rate(chosen, choice, 1000.0, str(tmp_path / "lr"), verbose=0) is chosen
    assert "every trial of the search diverged" in choice.reasons[-1]


def test_a_lora_trials_model_is_rebuilt_with_its_saved_weights(tmp_path, tiny_bert_preset):
    """tune's test split is scored on the chosen trial's model rebuilt from its config and model.keras: for a
    LoRA trial too (Keras saves the merged kernel and zeroes the adapters on loading)."""
    from tfl.config import FreezeConfig

    config = Config(data=DataConfig(source=_sentences(tmp_path), batch_size=8),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=8), freeze=FreezeConfig(lora_rank=4),
                    train=TrainConfig(precision="float32", epochs=1, learning_rate=1e-2),
                    model_dir=str(tmp_path / "trial"), export=False)
    metrics = tfl.run(config, verbose=0)
    assert metrics["config"]["freeze"]["lora_rank"] == 4
    assert tuning.trial_metrics(config, "validation") == pytest.approx(metrics["validation"], abs=1e-6)
    assert tuning.trial_metrics(config, "test") == pytest.approx(metrics["test"], abs=1e-6)
