"""main.py and the flags -> Config path: parsing, flagfiles, and one-line errors with exit code 2."""

import os
import subprocess
import sys

import pytest
from absl import flags

from tfl import cli
from tfl.config import Config, ConfigError, DataConfig, FreezeConfig, config_from_dict

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


@pytest.mark.parametrize("config,needle", [
    (Config(data=DataConfig(batch_size=0)), "--batch_size must be a positive number"),
    (Config(data=DataConfig(source="rotten_tomatoes")), "expected <kind>:<name>"),
    (Config(freeze=FreezeConfig(freeze_all=True, lora_rank=4)), "conflicts with --lora_rank"),
    (Config(freeze=FreezeConfig(trainable="(")), "not a valid regular expression"),
    (Config(freeze=FreezeConfig(layer_lr_decay=1.5)), "--layer_lr_decay must be in"),
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
