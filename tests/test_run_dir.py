"""The run folder: --overwrite clears only tfl runs, one live writer at a time, unwritable folders refused early."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from conftest import write_sentiment_csv
from test_cli import ROOT, run_main
from tfl import run_dir
from tfl.config import ConfigError

def the_error(result) -> str:
    """The one `error:` line a user mistake prints (TensorFlow's own start-up lines aside), and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


QUICK = ["--backbone=lstm", "--maxlen=8", "--num_words=50", "--lstm_units=8", "--epochs=1", "--batch_size=8",
         "--precision=float32", "--noexport"]


def test_overwrite_refuses_a_folder_that_is_not_a_tfl_run(text_csv, tmp_path):
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "notes.txt").write_text("precious")
    (home / "config.json").write_text("{}")  # model folders have one too: not enough to count as a tfl run
    result = run_main(f"--source=csv:{text_csv}", *QUICK, f"--model_dir={home}", "--overwrite")
    assert result.returncode == 2
    assert "clears only a folder that holds a tfl run" in the_error(result)
    assert sorted(os.listdir(home)) == ["config.json", "notes.txt", "photos"]
    assert (home / "notes.txt").read_text() == "precious" and (home / "config.json").read_text() == "{}"


def test_overwrite_clears_a_tfl_run_and_library_runs_are_marked(text_csv, tmp_path):
    import tfl
    from tfl.config import Config, DataConfig, ModelConfig, TrainConfig

    model_dir = tmp_path / "run"
    tfl.run(Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=8, maxlen=8, num_words=50),
                   model=ModelConfig(backbone="lstm", lstm_units=8), train=TrainConfig(epochs=1, precision="float32"),
                   model_dir=str(model_dir), export=False), verbose=0)
    assert run_dir.is_tfl_run(str(model_dir)) and (model_dir / "metrics.json").exists()
    assert not (model_dir / run_dir.LOCK).exists()  # released when the run ended
    (model_dir / "backup").mkdir()
    (model_dir / "backup" / "stale.txt").write_text("the old run's resume state")
    (model_dir / "notes.txt").write_text("the user's own")
    # Without --overwrite, a different config is refused; with it, the old run's files go, the user's stay.
    refused = run_main(f"--source=csv:{text_csv}", *QUICK, "--epochs=2", f"--model_dir={model_dir}")
    assert refused.returncode == 2 and "holds a run with a different config" in the_error(refused)
    result = run_main(f"--source=csv:{text_csv}", *QUICK, "--epochs=2", f"--model_dir={model_dir}", "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (model_dir / "backup").exists() and (model_dir / "metrics.json").exists()
    assert (model_dir / "notes.txt").read_text() == "the user's own" and "kept 1 file(s)" in result.stderr
    assert json.loads((model_dir / "config.json").read_text())["train"]["epochs"] == 2


def test_a_run_never_starts_among_other_files(text_csv, tmp_path):
    """Else a later --overwrite of that folder could delete them."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    result = run_main(f"--source=csv:{text_csv}", *QUICK, f"--model_dir={home}")
    assert result.returncode == 2 and "holds other files" in the_error(result)
    assert sorted(os.listdir(home)) == ["thesis.tex"]


def test_a_run_from_before_markers_can_be_resumed_and_overwritten(tmp_path):
    from tfl.config import Config

    old = tmp_path / "old"
    old.mkdir()
    legacy = Config().to_dict()
    legacy.pop("predict")  # written before that section existed
    (old / "config.json").write_text(json.dumps(legacy))
    (old / "metrics.json").write_text("{}")
    assert run_dir.looks_like_a_tfl_run(str(old)) and not run_dir.is_tfl_run(str(old))
    run_dir.check_starts_cleanly(str(old))  # resumable: no error
    run_dir.clear_for_overwrite(str(old))
    assert os.listdir(old) == []


@pytest.mark.parametrize("config_json", ["{}", '{"data": {}, "model": {}, "train": {}, "mode": "train"}', "[]",
                                         '{"data": [], "model": {}, "train": {}, "mode": "train"}'])
def test_someone_elses_config_and_metrics_are_not_taken_for_a_run(tmp_path, config_json):
    (tmp_path / "config.json").write_text(config_json)  # every Config field has a default: {} alone would parse
    (tmp_path / "metrics.json").write_text("{}")
    assert not run_dir.looks_like_a_tfl_run(str(tmp_path))
    with pytest.raises(ConfigError, match="holds other files"):
        run_dir.check_starts_cleanly(str(tmp_path))
    with pytest.raises(ConfigError, match="nothing was deleted"):
        run_dir.clear_for_overwrite(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "metrics.json"]


def test_lock_takeover_says_so_and_nested_acquire_is_a_no_op(tmp_path, capsys):
    lock_path = tmp_path / run_dir.LOCK
    lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 12345, "heartbeat": "x"}))
    lock = run_dir.acquire(str(tmp_path))
    assert "taking over the lock" in capsys.readouterr().err
    assert run_dir.acquire(str(tmp_path)) is None
    lock.release()
    assert not lock_path.exists() and not list(tmp_path.iterdir())



def test_marker_with_other_content_does_not_count(tmp_path):
    (tmp_path / run_dir.MARKER).write_text('{"written_by": "someone else"}')
    (tmp_path / "data.bin").write_text("x")
    with pytest.raises(ConfigError, match="without tfl's run marker"):
        run_dir.clear_for_overwrite(str(tmp_path))
    assert (tmp_path / "data.bin").exists()


def test_a_second_run_into_a_live_model_dir_is_refused(tmp_path):
    path = write_sentiment_csv(tmp_path / "d.csv", rows=2000)
    model_dir = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "main.py"), f"--source=csv:{path}", "--backbone=lstm", "--maxlen=8",
               "--num_words=20", "--lstm_units=16", "--epochs=30", "--batch_size=4", "--precision=float32",
               "--noexport", f"--model_dir={model_dir}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (model_dir / run_dir.LOCK).exists():
            time.sleep(0.1)
        assert first.poll() is None and (model_dir / run_dir.LOCK).exists()
        second = run_main(f"--source=csv:{path}", "--backbone=lstm", "--maxlen=8", "--num_words=20",
                          "--lstm_units=16", "--epochs=30", "--batch_size=4", "--precision=float32", "--noexport",
                          f"--model_dir={model_dir}")
        assert second.returncode == 2
        assert f"pid {first.pid}" in the_error(second) and socket.gethostname() in the_error(second)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed run's lock is left behind; the next run takes it over and says so.
    assert (model_dir / run_dir.LOCK).exists()
    lock = run_dir.acquire(str(model_dir))
    assert lock is not None
    lock.release()
    assert not (model_dir / run_dir.LOCK).exists()


def test_a_stale_remote_lock_is_taken_over_and_a_fresh_one_is_not(tmp_path, capsys):
    folder = str(tmp_path)
    lock_path = tmp_path / run_dir.LOCK
    lock_path.write_text(json.dumps({"host": "another-host", "pid": 1, "heartbeat": time.time(), "token": "t"}))
    with pytest.raises(ConfigError, match="another-host"):
        run_dir.acquire(folder)
    lock_path.write_text(json.dumps({"host": "another-host", "pid": 1, "heartbeat": time.time() - 3600,
                                     "token": "t"}))
    lock = run_dir.acquire(folder)
    assert "heartbeat is 3600 s old" in capsys.readouterr().err
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert run_dir.acquire(folder) is None  # the holder asking again: no second lock
    lock.release()
    assert not lock_path.exists()


def test_unwritable_model_dir_is_one_line_before_any_work(text_csv, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_main(f"--source=csv:{text_csv}", *QUICK, f"--model_dir={blocker}/run")
    assert result.returncode == 2 and "cannot be created or written" in the_error(result)
    result = run_main(f"--source=csv:{text_csv}", *QUICK, f"--model_dir={blocker}")
    assert result.returncode == 2 and "is a file" in the_error(result)
    if os.geteuid() != 0:  # root can write anywhere (CI runs as root: the file cases above cover it there)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = run_main(f"--source=csv:{text_csv}", *QUICK, f"--model_dir={locked}/run")
        assert result.returncode == 2 and "cannot be created or written" in the_error(result)


H5PY_DISK_FULL = ("Unable to synchronously create file (file write failed: time = Fri Nov 27 08:10:02 2026, "
                  "filename = 'run/checkpoint.weights.h5', file descriptor = 5, errno = 28, error message = 'No space "
                  "left on device', buf = 0x5, total write size = 96, bytes this sub-write = 96, offset = 0)")


@pytest.mark.parametrize("error,where", [
    (OSError(H5PY_DISK_FULL), "while writing run/checkpoint.weights.h5"),
    (OSError(28, "No space left on device", "/data/features.npy"), "while writing /data/features.npy"),
    (OSError(122, "Disk quota exceeded"), "while the run in {run} wrote its files"),
    (tf.errors.ResourceExhaustedError(None, None, "write: No space left on device"), "while the run in {run} wrote"),
])
def test_a_full_disk_is_one_line_naming_the_file_and_the_run_folder_is_kept_for_resuming(tmp_path, monkeypatch,
                                                                                           error, where):
    from tfl import job
    from tfl.config import Config, ModelConfig

    def fills_the_disk(config, verbose, **_):
        (tmp_path / "run" / "backup").mkdir()
        raise error

    monkeypatch.setitem(job.MODE_FUNCTIONS, "train", fills_the_disk)
    config = Config(model=ModelConfig(backbone="lstm"), model_dir=str(tmp_path / "run"))
    with pytest.raises(job.USER_ERRORS + job.TRAINING_ERRORS) as caught:  # main.py: one error: line, exit 2
        job.run_checked(config, verbose=0)
    message = str(caught.value)
    assert isinstance(caught.value, job.DiskFullError) and "\n" not in message
    assert message.startswith("no space left on the disk " + where.format(run=tmp_path / "run")), message
    assert f"the run folder {tmp_path / 'run'} is kept" in message
    assert (tmp_path / "run" / "backup").is_dir()  # a run that filled the disk hours in can resume


def test_other_os_errors_pass_through(tmp_path, monkeypatch):
    from tfl import job
    from tfl.config import Config, ModelConfig

    for error, expected in ((PermissionError(13, "Permission denied"), PermissionError),
                            (OSError(28, "No space left on device"), job.DiskFullError)):
        def fails(config, verbose, error=error, **_):
            raise error

        monkeypatch.setitem(job.MODE_FUNCTIONS, "train", fails)
        with pytest.raises(expected):
            job.run_checked(Config(model=ModelConfig(backbone="lstm"), model_dir=str(tmp_path / "run")), verbose=0)
    with pytest.raises(job.DiskFullError):  # a library run says so too
        job.run(Config(model=ModelConfig(backbone="lstm"), model_dir=str(tmp_path / "run")), verbose=0)


def test_a_library_run_refuses_a_folder_with_another_config_and_overwrite_starts_over(text_csv, tmp_path):
    import tfl
    from tfl.config import Config, DataConfig, ModelConfig, TrainConfig

    def config(epochs, **kwargs):
        return Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=8, maxlen=8, num_words=50),
                      model=ModelConfig(backbone="lstm", lstm_units=8),
                      train=TrainConfig(epochs=epochs, precision="float32"), model_dir=str(tmp_path / "run"),
                      export=False, **kwargs)

    tfl.run(config(1), verbose=0)
    (tmp_path / "run" / "backup").mkdir()
    (tmp_path / "run" / "backup" / "stale.txt").write_text("the first run's resume state")
    with pytest.raises(ConfigError, match="holds a run with a different config"):
        tfl.run(config(2), verbose=0)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["epochs"] == 1  # untouched
    metrics = tfl.run(config(2, overwrite=True), verbose=0)
    assert len(metrics["history"]["loss"]) == 2 and not (tmp_path / "run" / "backup" / "stale.txt").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["epochs"] == 2


@pytest.mark.parametrize("error, kept", [(run_dir.FolderBusyError("held by another run"), True),
                                         (ConfigError("a user mistake"), False)])
def test_a_failed_start_removes_the_folder_it_created_but_never_one_another_run_holds(tmp_path, monkeypatch,
                                                                                        error, kept):
    from tfl import job
    from tfl.config import Config

    model_dir = tmp_path / "run"

    def fail_after_the_folder_appears(config, verbose, process_started=None):
        model_dir.mkdir()  # e.g. another run created it and took its lock between the check and ours
        (model_dir / "its_file.txt").write_text("another run's")
        raise error

    monkeypatch.setattr(job, "_run_in_folder", fail_after_the_folder_appears)
    with pytest.raises(ConfigError):
        job.run_checked(Config(model_dir=str(model_dir)))
    assert model_dir.exists() == kept


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_an_unreadable_config_json_in_the_model_dir_is_one_line(text_csv, tmp_path, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(content)
    result = run_main(f"--source=csv:{text_csv}", *QUICK, f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "holds a config.json that is not a tfl config" in the_error(result)
    assert (tmp_path / "run" / "config.json").read_text() == content


def test_a_run_that_finds_another_config_under_the_lock_stops_and_leaves_the_folder(text_csv, tmp_path):
    """Another run wrote its run into the folder after this one's first check: checked again under the lock."""
    from tfl import job
    from tfl.config import Config, DataConfig, ModelConfig

    model_dir = tmp_path / "run"
    model_dir.mkdir()
    run_dir.mark(str(model_dir))
    other = Config(data=DataConfig(source=f"csv:{text_csv}"), model=ModelConfig(backbone="lstm", lstm_units=9),
                   model_dir=str(model_dir))
    (model_dir / "config.json").write_text(other.to_json())
    ours = Config(data=DataConfig(source=f"csv:{text_csv}"), model=ModelConfig(backbone="lstm", lstm_units=8),
                  model_dir=str(model_dir))
    with pytest.raises(run_dir.FolderBusyError, match="holds a run with a different config"):
        job._run_in_folder(ours, verbose=0)  # past run_checked's first check, as in the race
    assert json.loads((model_dir / "config.json").read_text())["model"]["lstm_units"] == 9
