"""--mode=predict: a finished run's latest export applied to new inputs, one CSV row per input."""

import csv
import io
import json

import numpy as np
import pytest

import tfl
from test_cli import run_main
from test_export import reload_in_fresh_process


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from conftest import write_sentiment_csv

    folder = tmp_path_factory.mktemp("predict")
    data = write_sentiment_csv(folder / "d.csv", rows=200)
    model_dir = folder / "run"
    result = run_main(f"--source=csv:{data}", "--backbone=lstm", "--maxlen=8", "--num_words=20", "--lstm_units=8",
                      "--epochs=3", "--batch_size=8", "--precision=float32", "--learning_rate=1e-2",
                      f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return model_dir


def test_predict_on_a_csv_matches_the_export(trained_run, tmp_path):
    texts = ["good fine great good", "bad poor dull bad", "fine, \"quoted\" text"]
    new = tmp_path / "new.csv"
    with open(new, "w", newline="") as f:
        csv.writer(f).writerows([["review"]] + [[t] for t in texts])
    output = tmp_path / "predictions.csv"
    before = sorted(p.name for p in trained_run.iterdir())
    result = run_main("--mode=predict", f"--model_dir={trained_run}", f"--input=csv:{new}", "--text_column=review",
                      f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in trained_run.iterdir()) == before  # predict reads the run, writes nothing there
    rows = list(csv.DictReader(open(output, newline="")))
    assert [r["input"] for r in rows] == texts
    served = reload_in_fresh_process(str(trained_run / "export" / "1"), "text", texts)
    for row, probabilities, label in zip(rows, served["probabilities"], served["label"]):
        assert row["label"] == label
        assert [float(row[f"p({n})"]) for n in served["label_names"]] == pytest.approx(probabilities, abs=1e-6)
    assert rows[0]["label"] == "1" and rows[1]["label"] == "0"  # the words give the label away


def test_predict_one_text_to_stdout_and_library_call(trained_run):
    result = run_main("--mode=predict", f"--model_dir={trained_run}", "--input=great good fine")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 1 and rows[0]["input"] == "great good fine" and set(rows[0]) == {"input", "label", "p(0)",
                                                                                         "p(1)"}
    library = tfl.predict(str(trained_run), ["great good fine"])
    assert library[0]["label"] == rows[0]["label"]
    assert library[0]["p(1)"] == pytest.approx(float(rows[0]["p(1)"]), abs=1e-6)
    assert np.isclose(library[0]["p(0)"] + library[0]["p(1)"], 1.0)


@pytest.mark.parametrize("args,needle", [
    (["--input=csv:/nonexistent.csv"], "does not exist"),
    (["--input=csv:{data}", "--text_column=missing"], "no column 'missing'"),
    ([], "--mode=predict needs --model_dir"),
])
def test_predict_mistakes_are_one_line(trained_run, args, needle, tmp_path):
    data = tmp_path / "x.csv"
    data.write_text("text\nhello\n")
    result = run_main("--mode=predict", f"--model_dir={trained_run}", *[a.format(data=data) for a in args])
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in result.stderr


def test_predict_needs_a_run_with_an_export(tmp_path):
    result = run_main("--mode=predict", f"--model_dir={tmp_path}", "--input=hello")
    assert result.returncode == 2 and "has no export" in result.stderr
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == "[]"


def test_predict_with_a_keras_hub_text_export_in_a_fresh_process(tiny_bert_preset, tmp_path):
    """The command line's predict loads a keras-hub (BERT) export, whose graph tokenizes with TensorFlow Text's
    ops, in a process that has imported neither keras-hub nor tensorflow_text before (main.py --mode=predict)."""
    import tensorflow as tf

    from tfl import export as export_lib
    from tfl.backbones import build_backbone
    from tfl.runner import build_model

    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    model = build_model(backbone, ["neg", "pos"], head_dropout=0.0)
    texts = ["the great film", "an awful plot"]
    positive = model.predict(backbone.preprocess.preprocessor(tf.constant(texts)), verbose=0)[:, 0]  # one sigmoid
    export_lib.export_serving_model(model, backbone, ["neg", "pos"], "classification", str(tmp_path / "export"))
    new = tmp_path / "new.csv"
    new.write_text("text\n" + "\n".join(texts) + "\n")
    result = run_main("--mode=predict", f"--model_dir={tmp_path}", f"--input=csv:{new}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["input"] for r in rows] == texts
    assert [r["label"] for r in rows] == ["pos" if p > 0.5 else "neg" for p in positive]
    assert [float(r["p(pos)"]) for r in rows] == pytest.approx(positive, abs=1e-5)
    assert [float(r["p(neg)"]) for r in rows] == pytest.approx(1 - positive, abs=1e-5)


def test_an_export_that_does_not_load_is_a_one_line_error(tmp_path):
    (tmp_path / "export" / "1").mkdir(parents=True)
    (tmp_path / "export" / "1" / "saved_model.pb").write_bytes(b"not a saved model")
    result = run_main("--mode=predict", f"--model_dir={tmp_path}", "--input=hello")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Cannot load the export" in errors[0]


def test_predictions_never_overwrite_the_input_file(trained_run, tmp_path):
    data = tmp_path / "x.csv"
    data.write_text("text\nhello\n")
    result = run_main("--mode=predict", f"--model_dir={trained_run}", f"--input=csv:{data}", f"--output={data}")
    assert result.returncode == 2 and "is the --input file itself" in result.stderr
    assert data.read_text() == "text\nhello\n"
