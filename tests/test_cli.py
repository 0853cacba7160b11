"""main.py and the flags -> Config path: parsing, flagfiles, and one-line errors with exit code 2."""

import os
import subprocess
import sys

import pytest
from absl import flags

from tfl import cli
from tfl.config import (CompareConfig, Config, ConfigError, DataConfig, FreezeConfig, ModelConfig, TrainConfig,
                        config_from_dict)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, cwd=ROOT):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def fresh_flags():
    values = flags.FlagValues()
    cli.define_flags(values)
    return values


def test_flagfile_builds_the_config(tmp_path):
    flagfile = tmp_path / "x.flags"
    flagfile.write_text(f"--flagfile={ROOT}/configs/base.flags\n--source=csv:/d.csv\n--backbone=small_cnn\n"
                        "--freeze_blocks=2\n--classes=0,1\n--epochs=7\n")
    values = fresh_flags()
    values(["main.py", f"--flagfile={flagfile}", "--epochs=9"])
    config = cli.config_from_flags(values)
    assert config.data.source == "csv:/d.csv" and config.model.backbone == "small_cnn"
    assert config.freeze.freeze_blocks == 2 and config.data.classes == (0, 1)
    assert config.train.epochs == 9  # the command line wins over the flagfile
    assert config_from_dict(config.to_dict()) == config


def test_every_config_field_has_a_flag_with_help():
    values = fresh_flags()
    for section in (config := Config()).__dataclass_fields__:
        value = getattr(config, section)
        names = value.__dataclass_fields__ if hasattr(value, "__dataclass_fields__") else [section]
        for name in names:
            assert values[name].help.strip()


@pytest.mark.parametrize("mode,labels,share,strategies", [
    ("train", True, 0.0, ("fine_tune",)), ("tune", True, 0.0, ("fine_tune",)),
    ("self_train", True, 0.4, ("fine_tune",)), ("auto", True, 0.0, ("fine_tune",)),
    ("auto", False, 0.4, ("fine_tune",)), ("compare", True, 0.0, ("zero_shot", "fine_tune")),
    ("compare", True, 0.4, ("self_training",))])
def test_a_token_budget_is_accepted_wherever_a_model_trains(mode, labels, share, strategies):
    Config(mode=mode, model_dir="runs/x", data=DataConfig(tokens_per_batch=512, labels=labels),
           train=TrainConfig(pseudo_label_share=share), compare=CompareConfig(strategies=strategies)).validate()


@pytest.mark.parametrize("config,needle", [
    (Config(data=DataConfig(batch_size=0)), "--batch_size must be a positive number"),
    (Config(data=DataConfig(source="rotten_tomatoes")), "expected <kind>:<name>"),
    (Config(freeze=FreezeConfig(freeze_all=True, lora_rank=4)), "conflicts with --lora_rank"),
    (Config(freeze=FreezeConfig(trainable="(")), "not a valid regular expression"),
    (Config(freeze=FreezeConfig(layer_lr_decay=1.5)), "--layer_lr_decay must be in"),
    (Config(data=DataConfig(tokens_per_batch=-1)), "--tokens_per_batch must be >= 0"),
    (Config(data=DataConfig(shuffle_buffer=0)), "--shuffle_buffer must be a positive number"),
    (Config(model=ModelConfig(head_hidden_units=-1)), "--head_hidden_units must be >= 0"),
    (Config(train=TrainConfig(steps_per_execution=0)), "--steps_per_execution must be a positive number"),
    (Config(train=TrainConfig(max_steps_per_epoch=-3)), "--max_steps_per_epoch must be >= 0"),
    (Config(train=TrainConfig(weight_decay=-0.1)), "--weight_decay must be >= 0"),
    (Config(data=DataConfig(maxlen=0)), "--maxlen must be a positive number"),
    (Config(data=DataConfig(classes=(0, 0, 1))), "names a class twice"),
    (Config(data=DataConfig(source="csv:x.csv", test_split="validation")), "name splits of a tfds: source"),
    (Config(freeze=FreezeConfig(lora_rank=4, unfreeze_every_epochs=1)), "--unfreeze_every_epochs would unfreeze"),
    (Config(model=ModelConfig(source_model="runs/src")), "--source_model is read only with --transfer"),
    (Config(mode="compare"), "--mode=compare needs --model_dir"),
    (Config(mode="compare", model_dir="x", freeze=FreezeConfig(unfreeze_every_epochs=1)),
     "sets each strategy's freezing itself"),
    (Config(mode="compare", model_dir="x", compare=CompareConfig(probe_learning_rate=-1.0)),
     "--probe_learning_rate must be > 0"),
    (Config(data=DataConfig(tokens_per_batch=512, bucket_shapes=0)), "it needs --bucket_shapes > 0"),
    (Config(data=DataConfig(tokens_per_batch=512), train=TrainConfig(max_steps_per_epoch=2)),
     "--max_steps_per_epoch cannot count"),
    (Config(data=DataConfig(tokens_per_batch=512), train=TrainConfig(gradient_accumulation_steps=2)),
     "would average batches of unequal sizes"),
    (Config(data=DataConfig(tokens_per_batch=512), train=TrainConfig(tpu="local")), "drop it on a TPU"),
    (Config(mode="zero_shot", data=DataConfig(tokens_per_batch=512)), "--mode=zero_shot trains nothing: drop it"),
    (Config(mode="self_train", data=DataConfig(tokens_per_batch=512)),
     "--mode=self_train without --pseudo_label_share trains nothing"),
    (Config(mode="auto", data=DataConfig(tokens_per_batch=512, labels=False)),
     "--mode=auto without --pseudo_label_share trains nothing"),
    (Config(mode="compare", data=DataConfig(tokens_per_batch=512), model_dir="x",
            compare=CompareConfig(strategies=("zero_shot", "self_training"))),
     "--mode=compare without --pseudo_label_share trains nothing"),
    (Config(mode="self_train", data=DataConfig(tokens_per_batch=512), train=TrainConfig(pseudo_label_share=-0.1)),
     "--pseudo_label_share must be in"),
])
def test_config_validation_names_the_problem(config, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        config.validate()


def test_helpfull_lists_flags():
    result = run_main("--helpfull")
    assert result.returncode == 0
    assert "--freeze_blocks" in result.stdout and "Freeze the first N blocks" in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["--no_such_flag=1"], "no_such_flag"),
    (["--flagfile=configs/does_not_exist.flags"], "does_not_exist.flags"),
    (["--batch_size=0", "--source=asset:rotten_tomatoes"], "--batch_size must be a positive number"),
    (["--backbone=resnet9000", "--source=asset:rotten_tomatoes"], "Unknown backbone 'resnet9000'"),
    (["--batch_size=abc"], "batch_size"),
    (["--task=ranking"], "Unknown --task='ranking'"),
])
def test_user_mistakes_give_one_line_and_exit_2(args, needle, tmp_path):
    model_dir = tmp_path / "run"
    result = run_main(*args, f"--model_dir={model_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and needle in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not model_dir.exists()  # nothing half-written


def test_missing_data_file_is_one_line(tmp_path):
    result = run_main("--source=csv:/nonexistent/x.csv", "--backbone=lstm", f"--model_dir={tmp_path}/r")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def _mistake_files(tmp):
    """Small bad inputs for the catalogue below, written once per test."""
    def write(name, content, binary=False):
        path = tmp / name
        path.write_bytes(content) if binary else path.write_text(content)
        return path

    good = "text,label\n" + "".join(f"w{i} film,{i % 2}\n" for i in range(30))
    files = {
        "good": write("good.csv", good),
        "no_label": write("no_label.csv", "text,other\nhello,1\n"),
        "ragged": write("ragged.csv", "text,label\nhello,1\nbad,row,extra\n"),
        "empty": write("empty.csv", ""),
        "latin1": write("latin1.csv", "text,label\ncaf\xe9,1\nb,0\n".encode("latin-1"), binary=True),
        "one_class": write("one.csv", "text,label\n" + "".join(f"x{i},same\n" for i in range(10))),
        "unseen": write("unseen.csv", "text,label\n" + "".join(f"x{i},{i % 2}\n" for i in range(20)) + "y,rare\n"),
        "words": write("words.csv", "text,label\n" + "".join(f"x{i},high\n" for i in range(10))),
    }
    os.makedirs(tmp / "no_images" / "cls")
    os.makedirs(tmp / "corrupt" / "cls")
    (tmp / "corrupt" / "cls" / "a.png").write_bytes(b"garbage")
    os.makedirs(tmp / "not_a_source")
    return files


MISTAKES = [
    (["--mode=explode"], "Unknown --mode='explode'"),
    (["--freeze_all", "--lora_rank=4"], "conflicts with --lora_rank"),
    (["--source=csv:{no_label}"], "no column 'label'"),
    (["--source=csv:{ragged}"], "line 3 has 3 fields"),
    (["--source=csv:{empty}"], "is empty"),
    (["--source=csv:{latin1}"], "not UTF-8"),
    (["--source=csv:{one_class}"], "single class"),
    (["--source=csv:{unseen}", "--validation_fraction=0.3", "--test_fraction=0.3", "--seed=1"], "never saw"),
    (["--source=images:{tmp}/no_images", "--backbone=small_cnn"], "No images"),
    (["--source=images:{tmp}/corrupt", "--backbone=small_cnn"], "None of the 1 image files"),
    (["--source=csv:{good}", "--backbone=small_cnn"], "takes image inputs but the data holds text"),
    (["--source=csv:{good}", "--transfer=parameter", "--source_model={tmp}/not_a_source"], "not a tfl source model"),
    (["--source=csv:{good}", "--transfer=structure"], "needs --source_model"),
    (["--source=csv:{good}", "--freeze_blocks=5"], "has 2 blocks"),
    (["--source=csv:{good}", "--lora_rank=2"], "needs a keras-hub backbone"),
    (["--source=csv:{good}", "--label_fraction=0"], "--label_fraction must be in (0, 1]"),
    (["--source=csv:{good}", "--pseudo_label_share=0.4"], "--pseudo_label_share is for --mode=self_train"),
    (["--source=csv:{good}", "--mode=self_train", "--pseudo_label_share=2"], "--pseudo_label_share must be in [0, 1]"),
    (["--strategy=tpu"], "needs --tpu"),
    (["--source=csv:{good}", "--strategy=multi_worker"], "needs the TF_CONFIG environment variable"),
    (["--source=csv:{words}", "--task=regression"], "needs numeric labels"),
    (["--source=asset:imagenet"], "Unknown data asset 'imagenet'"),
    (["--source=csv:{good}", "--classes=0,7"], "names label id 7"),
    (["--source=csv:{good}", "--trainable=("], "not a valid regular expression"),
    (["--mode=compare", "--strategies=magic"], "Unknown strategy 'magic'"),
]


@pytest.mark.parametrize("args,needle", MISTAKES, ids=[m[1][:30] for m in MISTAKES])
def test_catalogue_of_user_mistakes(args, needle, tmp_path):
    files = _mistake_files(tmp_path)
    model_dir = tmp_path / "run"
    formatted = [a.format(tmp=tmp_path, **files) for a in args]
    result = run_main("--backbone=lstm", "--epochs=1", *formatted, f"--model_dir={model_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and needle in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not model_dir.exists()


def _documented_commands():
    """Every `python main.py ...` command in the README and the Colab notebook (with its variables)."""
    import json
    import re
    import shlex

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    notebook = json.load(open(os.path.join(ROOT, "examples", "colab_tpu.ipynb"), encoding="utf-8"))
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    text = readme + "\n" + "\n".join(cells).replace("{MODEL_DIR}", "/content/runs/x")
    text = text.replace("\\\n", " ")
    pattern = r"^\s*!?(?:\.venv/bin/)?python main\.py (.+)$"
    commands = [shlex.split(m.group(1), comments=True) for m in re.finditer(pattern, text, re.M)]
    return [c for c in commands if c and c[0].startswith("--") and "--helpfull" not in c]


def test_a_flag_that_the_mode_does_not_read_is_refused_by_name(tmp_path):
    flagfile = tmp_path / "compare.flags"
    flagfile.write_text(f"--flagfile={ROOT}/configs/base.flags\n--mode=compare\n--seeds=2\n--strategies=fine_tune\n")
    values = fresh_flags()
    values(["main.py", f"--flagfile={flagfile}", "--mode=train"])  # a compare flagfile run as one training
    with pytest.raises(ConfigError, match=r"^--strategies \(--mode=compare\), --seeds \(--mode=compare\) would "
                                          r"change nothing with --mode=train: drop them, or use a mode that reads "
                                          r"them$"):
        cli.config_from_flags(values)
    values = fresh_flags()
    values(["main.py", "--mode=train", "--budget_minutes=5", "--input=x"])
    with pytest.raises(ConfigError, match=r"^--budget_minutes \(--mode=auto or tune\), --input \(--mode=predict\) "):
        cli.config_from_flags(values)
    values = fresh_flags()
    values(["main.py", "--mode=rank", "--label_descriptions=0=bad;1=good"])
    with pytest.raises(ConfigError,
                       match=r"^--label_descriptions \(--mode=zero_shot or self_train or auto or compare\)"):
        cli.config_from_flags(values)
    values = fresh_flags()
    values(["main.py", "--mode=trian", "--seeds=2"])  # a mistyped mode: validate() names it, not the flags
    with pytest.raises(ConfigError, match=r"mode"):
        cli.config_from_flags(values).validate()
    for mode in ("auto", "tune"):  # the modes that read it accept it; so does compare its own flags
        values = fresh_flags()
        values(["main.py", f"--mode={mode}", "--budget_minutes=5"])
        assert cli.config_from_flags(values).auto.budget_minutes == 5
    values = fresh_flags()
    values(["main.py", f"--flagfile={flagfile}"])
    assert cli.config_from_flags(values).compare.seeds == 2


def test_auto_without_labels_refuses_the_ranking_flags_it_would_ignore():
    values = fresh_flags()
    values(["main.py", "--mode=auto", "--nolabels", "--backbones=asset:minilm,asset:minilm_l3", "--depths=all"])
    with pytest.raises(ConfigError, match=r"^--backbones, --depths: --mode=auto --nolabels ranks nothing .*drop them, "
                                          r"or give labels$"):
        cli.config_from_flags(values)
    values = fresh_flags()  # with labels, auto ranks the same flags
    values(["main.py", "--mode=auto", "--backbones=asset:minilm,asset:minilm_l3", "--depths=1,3"])
    assert cli.config_from_flags(values).rank.depths == "1,3"
    values = fresh_flags()  # its --rank_examples is left alone: the flagfile serves both
    values(["main.py", f"--flagfile={ROOT}/configs/auto_rotten_tomatoes.flags", "--nolabels"])  # as its comment says
    assert not cli.config_from_flags(values).validate().data.labels


def test_every_documented_command_parses_into_a_valid_config():
    """The README's and the notebook's commands must keep working as flags and configs change."""
    commands = _documented_commands()
    assert len(commands) >= 6  # the usage examples, the multi-worker and TPU-VM commands, the notebook
    for args in commands:
        values = fresh_flags()
        values(["main.py"] + [a.replace("configs/", f"{ROOT}/configs/", 1) for a in args])
        cli.config_from_flags(values).validate()


def test_the_notebooks_library_call_builds_a_valid_config():
    import json

    notebook = json.load(open(os.path.join(ROOT, "examples", "colab_tpu.ipynb"), encoding="utf-8"))
    cell = next("".join(c["source"]) for c in notebook["cells"] if "config = Config(" in "".join(c["source"]))
    namespace = {}
    exec(cell.split("metrics = tfl.run")[0], namespace)  # the imports and the Config, not the run
    config = namespace["config"]
    config.validate()
    assert config.train.strategy == "tpu" and config.train.tpu == "local"


def test_the_readmes_library_example_runs_as_written():
    """The README's Python block (the packaged Rotten Tomatoes and MiniLM assets, which make test fetches), run
    verbatim; then one batch through the model it builds."""
    import re

    import keras

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"As a library.*?```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(block, namespace)
    model, train = namespace["model"], namespace["train"]
    assert isinstance(model, keras.Model)
    table = namespace["tfl"].freeze(namespace["backbone"], freeze_blocks=3)
    frozen = [row for row in table if row["status"] == "frozen"]
    assert [row["block"] for row in frozen] == ["embeddings", "transformer_layer_0", "transformer_layer_1"]
    inputs, labels = next(iter(train))
    probabilities = model(inputs, training=False)
    assert probabilities.shape[0] == labels.shape[0] == 32
