"""The pure helpers of benchmarks/rank_proof.py (the script itself is a benchmark, run by hand)."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rank_proof():
    spec = importlib.util.spec_from_file_location("rank_proof", os.path.join(ROOT, "benchmarks", "rank_proof.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_truncated_preset_keeps_the_weights_and_cuts_the_layers(rank_proof, tmp_path):
    source = tmp_path / "encoder"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 6}))
    (source / "model.safetensors").write_bytes(b"weights")
    work = tmp_path / "work"
    folder = rank_proof.truncated_preset(str(source), 2, str(work))
    assert json.loads(open(os.path.join(folder, "config.json")).read()) == {"model_type": "bert",
                                                                             "num_hidden_layers": 2}
    assert os.path.realpath(os.path.join(folder, "model.safetensors")) == str(source / "model.safetensors")
    assert rank_proof.truncated_preset(str(source), 2, str(work)) == folder  # a second call reuses it
    assert json.loads((source / "config.json").read_text())["num_hidden_layers"] == 6  # the source is untouched


def test_truncated_preset_refuses_a_folder_without_layers(rank_proof, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="num_hidden_layers"):
        rank_proof.truncated_preset(str(tmp_path), 1, str(tmp_path / "work"))


def test_judge_scores_an_estimator_against_the_accuracies(rank_proof):
    accuracy = {"a@1": 0.70, "a@2": 0.80, "a@3": 0.805, "a@3 (random init)": 0.55}
    rows = [{"candidate": name, "pretrained": "random" not in name, "logme": value, "h_score": -value}
            for name, value in accuracy.items()]
    rows.append({"candidate": "a@0", "pretrained": True, "logme": 9.0, "h_score": 9.0})  # ranked, not fine-tuned
    runs = [{"candidate": name, "test_accuracy": value} for name, value in accuracy.items()]
    logme, h_score = rank_proof.judge({"rows": rows, "runs": runs})
    assert logme["estimator"] == "LogME" and logme["tau_all"] == pytest.approx(1.0)
    assert logme["tau_w_pretrained"] == pytest.approx(1.0) and logme["hit"] and logme["gap_points"] == 0.0
    assert h_score["tau_w_all"] == pytest.approx(-1.0)
    assert h_score["top"] == "a@3 (random init)" and not h_score["hit"]
    assert h_score["gap_points"] == pytest.approx(25.5)
