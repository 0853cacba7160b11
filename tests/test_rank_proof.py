"""The pure helpers of benchmarks/rank_proof.py (the script itself is a benchmark, run by hand)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rank_proof():
    spec = importlib.util.spec_from_file_location("rank_proof", os.path.join(ROOT, "benchmarks", "rank_proof.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_candidate_trains_as_the_backbone_cut_at_its_depth(rank_proof):
    from tfl.config import Config, ModelConfig

    base = Config(model=ModelConfig(backbone="lstm", sequence_length=64))
    model = rank_proof.training_model(base, {"backbone": "asset:minilm", "depth": 3, "pretrained": True}, 6)
    assert (model.backbone, model.backbone_depth, model.pretrained, model.sequence_length) == ("asset:minilm", 3,
                                                                                               True, 64)
    whole = rank_proof.training_model(base, {"backbone": "asset:minilm", "depth": 6, "pretrained": True}, 6)
    control = rank_proof.training_model(base, {"backbone": "asset:minilm", "depth": 6, "pretrained": False}, 6)
    assert (whole.backbone_depth, control.backbone_depth, control.pretrained) == (0, 0, False)


def _seed(seed, accuracy, logme):
    rows = [{"candidate": name, "backbone": name.split("@")[0], "depth": int(name.split("@")[1][0]),
             "pretrained": "random" not in name, "logme": logme[name], "h_score": -logme[name]} for name in accuracy]
    rows.append({"candidate": "a@0", "backbone": "a", "depth": 0, "pretrained": True, "logme": 9.0, "h_score": 9.0})
    runs = {name: {"test_accuracy": value, "wall_seconds": 10.0 * int(name.split("@")[1][0]), "optimizer_steps": 5}
            for name, value in accuracy.items()}
    return {"seed": seed, "rows": rows, "runs": runs, "rank_seconds": 6.0, "auto": {"candidate": "a@2"}}


def test_judge_scores_an_estimator_against_the_accuracies(rank_proof):
    accuracy = {"a@1": 0.70, "a@2": 0.80, "a@3": 0.805, "a@3 (random init)": 0.55}
    logme = {"a@1": 1.0, "a@2": 2.0, "a@3": 3.0, "a@3 (random init)": 0.0}
    rows = rank_proof.mean_rows([_seed(0, accuracy, logme)])
    assert [r["candidate"] for r in rows] == ["a@3", "a@2", "a@1", "a@3 (random init)"]  # a@0 was not fine-tuned
    logme_verdict, h_score = rank_proof.judge(rows)
    assert logme_verdict["estimator"] == "LogME" and logme_verdict["tau_all"] == pytest.approx(1.0)
    assert logme_verdict["tau_w_pretrained"] == pytest.approx(1.0) and logme_verdict["hit"]
    assert logme_verdict["gap_points"] == 0.0
    assert h_score["tau_w_all"] == pytest.approx(-1.0)
    assert h_score["top"] == "a@3 (random init)" and not h_score["hit"]
    assert h_score["gap_points"] == pytest.approx(25.5)


def test_seeds_are_averaged_and_autos_pick_is_measured_against_the_best(rank_proof):
    logme = {"a@1": 1.0, "a@2": 2.0, "a@3": 3.0, "a@3 (random init)": 0.0}
    seeds = [_seed(0, {"a@1": 0.70, "a@2": 0.80, "a@3": 0.78, "a@3 (random init)": 0.5}, logme),
             _seed(1, {"a@1": 0.72, "a@2": 0.76, "a@3": 0.84, "a@3 (random init)": 0.6}, logme)]
    result = rank_proof.judge_task("t", seeds)
    by_name = {r["candidate"]: r for r in result["rows"]}
    assert by_name["a@3"]["test_accuracy"] == pytest.approx(0.81) and by_name["a@3"]["test_std"] == pytest.approx(0.03)
    # auto picked a@2 in both seeds: 0 points below seed 0's best, 8 below seed 1's; 78 vs 81 on the means.
    assert [round(p["gap_points"], 6) for p in result["picks"]] == [0.0, 8.0]
    assert result["auto_gap_of_means"] == pytest.approx(3.0)
    # Ranking 6 s + a@2's 20 s, of fine-tuning all four: 10 + 20 + 30 + 30 s.
    assert result["picks"][0]["compute_share"] == pytest.approx(26 / 90)
    assert len(result["per_seed"]) == 2 and result["fine_tune_seconds"] == pytest.approx(90)


def test_measurements_are_written_beside_the_document_and_read_back_from_there(rank_proof, tmp_path):
    import argparse
    import json

    args = argparse.Namespace(work_dir=str(tmp_path / "work"), out=str(tmp_path / "docs" / "transferability.md"))
    rank_proof.write(args, "# doc\n", {"results": [{"task": "t"}]})
    assert (tmp_path / "docs" / "transferability.md").read_text() == "# doc\n"
    beside = tmp_path / "docs" / "transferability.json"
    assert json.loads(beside.read_text()) == json.loads((tmp_path / "work" / "results.json").read_text())
    # One order for --render_only and --label_free_only: the copy beside the document first (the committed one),
    # whether or not a work_dir holds a run; without it (no --out, or none written yet) the work_dir's
    assert rank_proof.stored_results(args) == str(beside)
    fresh = argparse.Namespace(work_dir=str(tmp_path / "elsewhere"), out=args.out)  # a clone: no work_dir
    assert rank_proof.stored_results(fresh) == str(beside)
    no_out = argparse.Namespace(work_dir=args.work_dir, out="")
    assert rank_proof.stored_results(no_out) == str(tmp_path / "work" / "results.json")
    beside.unlink()
    assert rank_proof.stored_results(args) == str(tmp_path / "work" / "results.json")


def _stored_seed(seed, accuracy, logme):
    """A seed as a run of the script stores it in results.json (what --render_only reads)."""
    stored = _seed(seed, accuracy, logme)
    for row in stored["rows"]:
        row["feature_seconds"] = 1.0
    stored.update(sizes={"train": 100, "validation": 20, "test": 50}, label_counts={"neg": 50, "pos": 50},
                  recipe={"flagfile": "configs/minilm_rotten_tomatoes.flags", "epochs": 1, "max_steps_per_epoch": 0,
                          "learning_rate": 1e-4, "lr_schedule": "linear", "warmup_fraction": 0.1, "batch_size": 16,
                          "sequence_length": 64, "bucket_shapes": 2, "precision": "float32"})
    return stored


def test_render_only_writes_the_document_from_the_stored_measurements(rank_proof, tmp_path):
    import argparse
    import json

    logme = {"a@1": 1.0, "a@2": 2.0, "a@3": 3.0, "a@3 (random init)": 0.0}
    seeds = [_stored_seed(0, {"a@1": 0.70, "a@2": 0.80, "a@3": 0.78, "a@3 (random init)": 0.5}, logme),
             _stored_seed(1, {"a@1": 0.72, "a@2": 0.76, "a@3": 0.84, "a@3 (random init)": 0.6}, logme)]
    host = {"node": "h", "cpus": 2, "model": "m", "flags": [], "gflops_float32": 100.0, "gflops_bfloat16": 200.0,
            "load_average": [0.0, 0.0, 0.0], "load_average_end": [0.0, 0.0, 0.0]}
    stored = {"host": host, "command": "benchmarks/rank_proof.py --tasks=t", "seconds": 60.0,
              "results": [rank_proof.judge_task("t", seeds)]}
    work = tmp_path / "work"
    work.mkdir()
    (work / "results.json").write_text(json.dumps(stored, default=float))
    args = argparse.Namespace(work_dir=str(work), out=str(tmp_path / "docs" / "transferability.md"), merge="")
    assert rank_proof.render_only(args) == 0
    text = (tmp_path / "docs" / "transferability.md").read_text()
    assert "Rendered again from its results.json" in text and "## t" in text
    assert "on a date its results.json does not hold (rendered again on" in text  # not the rendering's date
    # The stored accuracies (means over the seeds) are the document's; auto's picks are made again by the current
    # rule, not copied: the stored seeds say a@2, and tfl.auto.choose fine-tunes the best LogME's whole backbone.
    assert "| `a@3` | 3.0000 |" in text and "0.810 ± 0.030" in text
    repicked = rank_proof.auto_pick(seeds[0], 1)["candidate"]
    assert f"seed 0: `{repicked}`" in text and f"seed 1: `{repicked}`" in text and repicked != "a@2"
    assert json.loads((work / "results.json").read_text()) == json.loads(json.dumps(stored, default=float))


def test_the_linear_probes_are_a_second_ground_truth_judged_apart(rank_proof):
    logme = {"a@1": 1.0, "a@2": 2.0, "a@3": 3.0, "a@3 (random init)": 0.0}
    # Fine-tuning reverses LogME's pretrained order; the frozen probes follow it.
    seeds = [_stored_seed(s, {"a@1": 0.90, "a@2": 0.80, "a@3": 0.70, "a@3 (random init)": 0.5}, logme) for s in (0, 1)]
    for s, shift in zip(seeds, (0.0, 0.02)):
        s["probes"] = {"a@0": 0.99, "a@1": 0.60 + shift, "a@2": 0.70 + shift, "a@3": 0.75 + shift,
                       "a@3 (random init)": 0.5}
    result = rank_proof.judge_task("t", seeds)
    assert {r["candidate"]: r["probe_accuracy"] for r in result["rows"]}["a@2"] == pytest.approx(0.71)
    fine_tuned, probed = result["verdicts"][0], result["probe_verdicts"][0]
    assert fine_tuned["tau_pretrained"] == pytest.approx(-1.0) and not fine_tuned["hit"]
    assert probed["tau_pretrained"] == pytest.approx(1.0) and probed["top"] == probed["best"] == "a@3"
    assert len(result["per_seed_probe"]) == 2
    summary = [line for line in rank_proof.summary_markdown([result]) if line.startswith("| t | LogME | ")]
    assert len(summary) == 1 and summary[0].endswith(f"| {probed['tau_w_all']:.3f} | 1.000 |")  # the probe columns
    task = "\n".join(rank_proof.task_markdown(result))
    assert "Against the linear probes' accuracies" in task and "| 0.760 |" in task  # a@3's mean probe accuracy
    # Results stored before the probes existed are judged on the fine-tunes alone.
    for s in seeds:
        del s["probes"]
    old = rank_proof.judge_task("t", seeds)
    assert old["probe_verdicts"] == [] and old["verdicts"] == result["verdicts"]
    assert "linear probes'" not in "\n".join(rank_proof.task_markdown(old))


def test_probe_accuracies_fit_on_the_training_features_and_score_the_test_split(rank_proof, monkeypatch):
    import types

    import numpy as np
    import tensorflow as tf

    rng = np.random.RandomState(0)
    test_labels = np.array([0, 1] * 20)
    test_inputs = np.arange(40)  # stand-ins for texts: extract_features below maps them to features

    def features_of(labels, signal):
        return {"good": {"features": np.c_[labels * signal + 0.1 * rng.normal(size=len(labels)),
                                            rng.normal(size=len(labels))]},
                "noise": {"features": rng.normal(size=(len(labels), 2))}}

    train_labels = np.array([0, 1] * 30)
    train = features_of(train_labels, 1.0)
    monkeypatch.setattr(rank_proof.ranking, "extract_features",
                        lambda zoo, inputs, modality: features_of(test_labels[np.asarray(inputs)], 1.0))
    monkeypatch.setattr(rank_proof.ranking, "select_depths", lambda features, depths: features)
    splits = types.SimpleNamespace(test=tf.data.Dataset.from_tensor_slices((test_inputs, test_labels)),
                                   modality="text", label_names=["a", "b"])
    accuracies = rank_proof.probe_accuracies([], train, train_labels, splits, "all")
    assert accuracies["good"] == 1.0 and accuracies["noise"] < 0.8


def test_the_label_free_section_runs_the_no_labels_command_as_a_user_does(rank_proof, tmp_path, text_csv,
                                                                        tiny_bert_preset):
    import json

    descriptions = tmp_path / "descriptions.json"
    descriptions.write_text(json.dumps({"neg": ["an awful film"], "pos": ["a great film"]}))
    flagfile = tmp_path / "self_train.flags"
    flagfile.write_text(f"--flagfile={ROOT}/configs/base.flags\n--mode=self_train\n--source=csv:{text_csv}\n"
                        f"--backbone={tiny_bert_preset}\n--pooling=mean\n--sequence_length=16\n--batch_size=8\n"
                        f"--label_descriptions={descriptions}\n--pseudo_label_share=0.5\n--epochs=1\n")
    result = rank_proof.label_free_result(str(flagfile), str(tmp_path / "work"))
    with open(tmp_path / "work" / "label_free" / "metrics.json") as f:
        metrics = json.load(f)
    assert result["zero_shot"]["test"] == metrics["zero_shot"]["test"]
    assert result["fine_tune"]["test"] == metrics["test"]
    text = "\n".join(rank_proof.label_free_markdown(result))
    test = lambda m: f"{100 * m['accuracy']:.1f}%"  # noqa: E731
    assert f"| plain zero-shot (label descriptions) | {test(metrics['zero_shot']['validation'])} | " \
           f"{test(metrics['zero_shot']['test'])} |" in text
    assert f"| {test(metrics['fine_tune']['validation'])} | {test(metrics['test'])} |" in text
    assert f"test accuracy ≥ 75%: {test(metrics['test'])}, " in text
    assert ("**not met**" in text) == (metrics["test"]["accuracy"] < 0.75)


def test_the_label_free_result_is_kept_with_the_stored_measurements_and_rendered(rank_proof, tmp_path, monkeypatch):
    import argparse
    import json

    accuracy = lambda a: {"accuracy": a}  # noqa: E731
    made = {"flagfile": "f.flags", "seconds": 120.0, "sizes": {"train": 80, "validation": 10, "test": 10},
            "source": "csv:x", "backbone": "b", "zero_shot": {"validation": accuracy(0.7), "test": accuracy(0.69)},
            "probe_test": accuracy(0.7), "probe_validation": accuracy(0.71), "pseudo_label_share": 0.4,
            "fine_tune": {"validation": accuracy(0.76), "test": accuracy(0.755), "examples": 32}, "date": "d"}
    monkeypatch.setattr(rank_proof, "label_free_result", lambda flagfile, work_dir: made)
    logme = {"a@1": 1.0, "a@2": 2.0}
    host = {"node": "h", "cpus": 2, "model": "m", "flags": [], "gflops_float32": 100.0, "gflops_bfloat16": 200.0,
            "load_average": [0.0] * 3, "load_average_end": [0.0] * 3}
    stored = {"host": host, "command": "rank_proof.py --tasks=t", "seconds": 60.0, "date": "2026-01-02 03:04 UTC",
              "results": [rank_proof.judge_task("t", [_stored_seed(0, {"a@1": 0.7, "a@2": 0.8}, logme)])]}
    work = tmp_path / "work"
    work.mkdir()
    (work / "results.json").write_text(json.dumps(stored, default=float))
    args = argparse.Namespace(work_dir=str(work), out=str(tmp_path / "docs" / "transferability.md"), merge="",
                              label_free="f.flags")
    assert rank_proof.label_free_only(args) == 0
    kept = json.loads((work / "results.json").read_text())  # no copy beside --out yet: the work_dir's is updated
    assert kept["label_free"] == made and kept["results"] == json.loads(json.dumps(stored["results"], default=float))
    text = (tmp_path / "docs" / "transferability.md").read_text()
    assert "| plain zero-shot (label descriptions) | 70.0% | 69.0% |" in text
    assert "(32 texts) | 76.0% | 75.5% |" in text and "≥ 75%: 75.5%, met (+6.5 points over plain zero-shot)" in text
    assert "The no-labels section was measured afterwards by" in text
    assert "Written by `rank_proof.py --tasks=t` on 2026-01-02 03:04 UTC, in 1.0 min." in text  # the run's date
    # With measurements beside --out (the committed ones), those are updated and the work_dir's left alone; and
    # --render_only then reads the same copy, so the no-labels section stays in the document
    beside = tmp_path / "docs" / "transferability.json"
    beside.write_text(json.dumps(stored, default=float))
    (work / "results.json").write_text(json.dumps(stored, default=float))
    assert rank_proof.label_free_only(args) == 0
    assert json.loads(beside.read_text())["label_free"] == made
    assert "label_free" not in json.loads((work / "results.json").read_text())
    assert rank_proof.render_only(args) == 0
    assert "The no-labels section was measured afterwards by" in (tmp_path / "docs" / "transferability.md").read_text()


def test_a_missing_no_labels_flagfile_is_a_one_line_error(rank_proof, tmp_path):
    import argparse

    with pytest.raises(SystemExit, match=r"^error: --label_free=.*missing\.flags is not a file; name a no-labels"):
        rank_proof.label_free_result(str(tmp_path / "missing.flags"), str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()  # nothing run, nothing written
    args = argparse.Namespace(work_dir=str(tmp_path / "work"), out="", merge="", label_free="")
    with pytest.raises(SystemExit, match=r"^error: --label_free_only needs --label_free=<a no-labels flagfile>$"):
        rank_proof.label_free_only(args)
