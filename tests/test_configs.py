"""Offline rehearsal of every flagfile in configs/: its own documented command, parsed as main.py parses it,
run end to end for a few steps (train, evaluate, export, reload the export in a process without tfl, predict).

Stand-ins only for what needs the internet: tiny keras-hub presets of the same classes (BERT with its
WordPiece tokenizer, ViT with its image converter), keras.applications with --weights=none, tfds mock data
with the real feature names and splits, keras.datasets stand-in files. The real offline assets (MiniLM,
EfficientNet-Lite0, Rotten Tomatoes, ...) are used as they are: `make test` fetches them. A config that
cannot run fails here; a new file in configs/ is covered the day it is added.
"""

import contextlib
import glob
import json
import os
import re
import shlex

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from test_cli import ROOT
from test_export import reload_in_fresh_process
from tfl import cli, job
from tfl.config import config_from_dict

CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.flags")))
REHEARSED = [c for c in CONFIGS if c != "base.flags"]  # base.flags is covered through the others
QUICK = ["--max_steps_per_epoch=2", "--batch_size=8"]
# Internet-only names and the stand-in each gets (same classes, tiny and random).
HUB_STAND_INS = {"bert_base_en_uncased": "tiny_bert", "vit_base_patch16_224_imagenet": "tiny_vit"}


def documented_command(config_name: str) -> list:
    """The flags of the `# python main.py ...` command that opens the flagfile."""
    first = open(os.path.join(ROOT, "configs", config_name), encoding="utf-8").readline()
    match = re.match(r"#\s*(?:\.venv/bin/)?python main\.py (.+)$", first.strip())
    assert match, f"configs/{config_name} must open with the command that runs it"
    args = shlex.split(match.group(1))
    assert f"--flagfile=configs/{config_name}" in args, first
    return args


def model_dir_of(args: list) -> str:
    return next((a.split("=", 1)[1] for a in args if a.startswith("--model_dir=")), "")


def source_config_of(config_name: str):
    """The flagfile whose documented --model_dir this one's --source_model names, if any."""
    wanted = next((a.split("=", 1)[1] for a in documented_command(config_name) if a.startswith("--source_model=")),
                  None)
    if wanted is None:
        return None
    for other in REHEARSED:
        if model_dir_of(documented_command(other)) == wanted:
            return other
    raise AssertionError(f"configs/{config_name} names --source_model={wanted}, which no config's command writes")


def included_flagfiles(config_name: str) -> set:
    """The flagfiles a config includes, directly or through the configs it includes."""
    text = open(os.path.join(ROOT, "configs", config_name), encoding="utf-8").read()
    direct = set(re.findall(r"^--flagfile=configs/(\S+)$", text, re.MULTILINE))
    return direct.union(*(included_flagfiles(n) for n in direct))


def test_every_flagfile_builds_on_base_and_is_rehearsed():
    assert "base.flags" in CONFIGS and len(REHEARSED) >= 10
    for name in REHEARSED:
        assert "base.flags" in included_flagfiles(name), f"configs/{name} must build on configs/base.flags"
        documented_command(name)
        source_config_of(name)


def parse(args: list):
    values = flags.FlagValues()
    cli.define_flags(values)
    cli.parse_flags_or_exit(["main.py", *args], values)
    return cli.config_from_flags(values)


def write_keras_stand_ins(folder: str) -> dict:
    """Small files in the formats keras.datasets reads (imdb ids + word index) and arrays for CIFAR."""
    rng = np.random.RandomState(0)
    seqs = lambda n: np.array([[int(v) for v in rng.randint(1, 9999, rng.randint(5, 60))] for _ in range(n)],  # noqa
                              dtype=object)
    npz = os.path.join(folder, "imdb.npz")
    np.savez(npz, x_train=seqs(120), y_train=np.arange(120) % 2, x_test=seqs(60), y_test=np.arange(60) % 2)
    index = os.path.join(folder, "imdb_word_index.json")
    with open(index, "w") as f:
        json.dump({f"word{i}": i for i in range(1, 12000)}, f)
    return {"imdb.npz": npz, "imdb_word_index.json": index}


def cifar_stand_in(classes: int):
    """keras.datasets.cifar10/100's arrays (32x32x3 uint8, (n, 1) labels): 10 train and 3 test images a class."""
    rng = np.random.RandomState(classes)

    def load_data(*args, **kwargs):
        split = lambda per_class: (rng.randint(0, 256, (per_class * classes, 32, 32, 3), np.uint8),  # noqa: E731
                                   (np.arange(per_class * classes) % classes).reshape(-1, 1).astype(np.uint8))
        return split(10), split(3)

    return load_data


@contextlib.contextmanager
def internet_stand_ins(config, monkeypatch, tmp_path):
    """Patches what would download, for this config only."""
    import keras
    from keras.src.datasets import imdb as keras_imdb

    files = write_keras_stand_ins(str(tmp_path))
    monkeypatch.setattr(keras_imdb, "get_file", lambda fname=None, *a, **k: files[os.path.basename(fname)])
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", cifar_stand_in(10))
    monkeypatch.setattr(keras.datasets.cifar100, "load_data", cifar_stand_in(100))
    if config.data.source.startswith("tfds:"):
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=100):
            yield
    else:
        yield


def stand_in_args(config, presets: dict) -> list:
    args = []
    # The offline encoders run for real where one run shows them (minilm_rotten_tomatoes, rank_rotten_tomatoes,
    # self_train_rt); configs that train them several times over (compare, auto, tune) get the tiny BERT.
    if config.mode in ("compare", "auto", "tune") and config.model.backbone.startswith("asset:minilm"):
        args.append(f"--backbone={presets['tiny_bert']}")
    if config.mode == "auto" and not config.rank.backbones:
        args.append(f"--backbones={presets['tiny_bert']}")
    if config.model.backbone in HUB_STAND_INS:
        args.append(f"--backbone={presets[HUB_STAND_INS[config.model.backbone]]}")
    if config.model.backbone == "ResNet50":
        args += ["--weights=none", "--image_size=32"]
    return args


def under(tmp_root, flag: str) -> str:
    """--model_dir=runs/x (or any path) -> the same path under the test's temporary folder."""
    name, _, path = flag.partition("=")
    return f"{name}={os.path.join(str(tmp_root), path.lstrip('/'))}"


def rehearse(name: str, tmp_root, monkeypatch, presets: dict, done: dict) -> dict:
    """Runs the config's own command (runs/ under tmp) after the config it transfers from."""
    if name in done:
        return done[name]
    dependency = source_config_of(name)
    if dependency:
        rehearse(dependency, tmp_root, monkeypatch, presets, done)
    args = [under(tmp_root, a) if a.startswith(("--model_dir=", "--source_model=")) else a
            for a in documented_command(name)]
    config = parse(args)
    epochs = 2 if config.freeze.unfreeze_every_epochs else 1  # a second epoch only where a schedule needs it
    if config.mode == "tune":  # Hyperband needs its first bracket's epochs (TUNE_MIN_EPOCHS); a budget of
        # seconds stops the search after its first trial (the search itself is tested in tests/test_auto.py)
        from tfl.config import TUNE_MIN_EPOCHS

        epochs = TUNE_MIN_EPOCHS
        args.append("--budget_minutes=0.05")
    args += QUICK + [f"--epochs={epochs}"] + stand_in_args(config, presets)
    if config.mode == "compare":  # one seed per strategy (other modes refuse --seeds: they do not read it)
        args.append("--seeds=1")
    if len(config.compare.label_fractions) > 1:  # the smallest (the riskiest: a handful of labels) stands for all;
        # several fractions in one report are tested in tests/test_transfer.py
        args.append(f"--label_fractions={config.compare.label_fractions[0]}")
    if not config.data.source.startswith("keras:"):  # the keras.datasets stand-ins are small already
        args.append("--max_examples=160")
    config = parse(args)
    monkeypatch.chdir(ROOT)  # flagfiles name each other relative to the repository root
    with internet_stand_ins(config, monkeypatch, tmp_root):
        job.check_before_run(config)
        metrics = job.run_checked(config)
    done[name] = {"config": config, "metrics": metrics}
    return done[name]


def served_inputs(metrics: dict, config) -> tuple:
    """(kind, raw inputs) the export takes: strings, encoded images, or token ids."""
    modality = metrics["data"]["modality"]
    if config.data.source in ("keras:imdb", "keras:reuters"):
        return "ids", [[1, 14, 22, 16] + [0] * (config.data.maxlen - 4)]
    if modality in ("image", "image_file"):
        png = tf.io.encode_png(np.random.RandomState(0).randint(0, 256, (40, 30, 3), np.uint8)).numpy()
        return "image", [png.hex()]
    return "text", ["a gripping, beautifully shot film", "two hours I will never get back"]


def check_served(export_path: str, kind: str, inputs: list, label_names: list) -> None:
    """The export, reloaded in a process that never imported tfl, predicts a distribution over the run's labels."""
    served = reload_in_fresh_process(export_path, kind, inputs)
    assert served["label_names"] == label_names
    probabilities = np.array(served["probabilities"])
    assert probabilities.shape == (len(inputs), max(len(label_names), 2))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4) and set(served["label"]) <= set(label_names)


@pytest.fixture(scope="module")
def hub_stand_ins(tmp_path_factory, tiny_vit_preset):
    """A tiny BERT with BERT-base's 512 positions (the configs ask for up to 128 tokens), and the tiny ViT."""
    from conftest import save_tiny_bert_preset

    folder = save_tiny_bert_preset(tmp_path_factory.mktemp("tiny_bert_512"), dropout=0.1, max_sequence_length=512)
    return {"tiny_bert": folder, "tiny_vit": tiny_vit_preset}


@pytest.fixture(scope="module")
def rehearsals(tmp_path_factory):
    return {"root": tmp_path_factory.mktemp("configs"), "done": {}}


@pytest.mark.parametrize("name", REHEARSED)
def test_config_runs_end_to_end_offline(name, rehearsals, monkeypatch, hub_stand_ins):
    result = rehearse(name, rehearsals["root"], monkeypatch, hub_stand_ins, rehearsals["done"])
    config, metrics = result["config"], result["metrics"]
    model_dir = config.model_dir
    assert json.loads(open(os.path.join(model_dir, "config.json")).read()) == json.loads(config.to_json())
    if config.mode == "rank":  # no training: the ranking of every candidate, best LogME first
        ranking = json.loads(open(os.path.join(model_dir, "rank.json")).read())
        markdown = open(os.path.join(model_dir, "rank.md")).read()
        names = [row["candidate"] for row in ranking["rows"]]
        assert any(n.endswith("(random init)") for n in names) and len(names) >= 3, names
        assert all(name in markdown for name in names)
        assert [r["logme"] for r in ranking["rows"]] == sorted((r["logme"] for r in ranking["rows"]), reverse=True)
        return
    if config.mode == "self_train":  # no labels: zero-shot, the probe rounds, then (a share) the encoder fine-tuned
        assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
        assert all(0 <= r["validation"]["accuracy"] <= 1 for r in metrics["rounds"])
        assert metrics["data"]["sizes"]["train"] > 0 and "accuracy" in metrics["probe_test"]
        assert json.loads(open(os.path.join(model_dir, "metrics.json")).read())["test"] == metrics["test"]
        if config.train.pseudo_label_share > 0:
            tuned = json.loads(open(os.path.join(model_dir, "fine_tune", "metrics.json")).read())
            assert metrics["fine_tune"]["examples"] == tuned["data"]["sizes"]["train"] > 0
            assert metrics["trainable_params"] == tuned["trainable_params"] > 384 * 2 + 2 == 770  # the encoder trained
        else:
            assert metrics["trainable_params"] == 384 * 2 + 2  # a probe on MiniLM's embeddings, 2 classes
        return
    if config.mode == "auto":  # the ranking, the choice with its reasons, and the chosen run, exported
        report = open(os.path.join(model_dir, "report.md")).read()
        assert all(part in report for part in ("## Choice", "## Result", "## Ranking")), report
        assert metrics["choice"]["reasons"] and metrics["test"] == metrics["chosen_run"]["test"]
        metrics, config = metrics["chosen_run"], config_from_dict(metrics["chosen_run"]["config"])
        model_dir = config.model_dir
        assert model_dir == os.path.join(result["config"].model_dir, "chosen")
    if config.mode == "tune":  # every trial a run of its own, and the report's table of them
        report = open(os.path.join(model_dir, "report.md")).read()
        assert metrics["trials"] and all(f"| {t['trial']} |" in report for t in metrics["trials"])
        assert all(os.path.exists(os.path.join(model_dir, "trials", t["trial"], "metrics.json")) for t in metrics["trials"])
        return
    if config.mode == "compare":
        report = json.loads(open(os.path.join(model_dir, "report.json")).read())
        assert os.path.exists(os.path.join(model_dir, "report.md"))
        ran = sorted((run["strategy"], run["fraction"]) for run in report["runs"])
        fractions = list(config.compare.label_fractions) or [config.data.label_fraction]
        assert ran == sorted((s, f) for s in config.compare.strategies for f in fractions), ran
        assert len(report["rows"]) == len(ran) and all(0 <= row["accuracy"]["mean"] <= 1 for row in report["rows"])
        return
    assert metrics["test"] and os.path.exists(os.path.join(model_dir, "metrics.json"))
    assert metrics["optimizer_steps"] == metrics["epochs_run"] * metrics["steps_per_epoch"] > 0
    kind, inputs = served_inputs(metrics, config)
    check_served(metrics["export_path"], kind, inputs, metrics["data"]["label_names"])


def test_the_notebooks_library_cell_runs_with_the_default_strategy(tmp_path, hub_stand_ins):
    import dataclasses

    import tensorflow_datasets as tfds

    notebook = json.load(open(os.path.join(ROOT, "examples", "colab_tpu.ipynb"), encoding="utf-8"))
    cell = next("".join(c["source"]) for c in notebook["cells"] if "config = Config(" in "".join(c["source"]))
    namespace = {}
    exec(cell.split("metrics = tfl.run")[0], namespace)
    config = namespace["config"]
    config = dataclasses.replace(
        config, model_dir=str(tmp_path / "run"),
        model=dataclasses.replace(config.model, backbone=hub_stand_ins["tiny_bert"]),
        data=dataclasses.replace(config.data, max_examples=100),
        train=dataclasses.replace(config.train, strategy="default", tpu="", max_steps_per_epoch=2))
    with tfds.testing.mock_data(num_examples=100):
        namespace.update(config=config)
        exec("metrics = tfl.run(config)\nresult = (metrics['test'], metrics['replicas'], metrics['precision'])",
             namespace)
    _, replicas, precision = namespace["result"]
    assert replicas == 1 and precision in ("float32", "mixed_bfloat16")
    check_served(namespace["metrics"]["export_path"], "text", ["a gripping film"], ["negative", "positive"])
