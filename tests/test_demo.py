"""The demo's plumbing: its jobs are real configs, and the README's results come from the committed reports."""

import json
import os
import shutil
import sys

import pytest

from test_cli import ROOT
from tfl import demo


def test_every_demo_job_is_a_config_and_sources_come_first():
    seen = set()
    for name, flagfile, source_job in demo.DEMO_JOBS + demo.DOCS_JOBS:
        assert os.path.exists(os.path.join(ROOT, flagfile)), flagfile
        assert source_job is None or source_job in seen, f"{name} needs {source_job} to run first"
        seen.add(name)


def test_quick_jobs_are_capped_and_sources_skip_the_export(tmp_path):
    source = demo.job_config("imdb_quick", "configs/imdb_quick.flags", None, str(tmp_path), quick=True)
    assert source.mode == "train" and not source.export and source.data.max_examples == 400
    target = demo.job_config("imdb_to_rt", "configs/imdb_to_rt.flags", "imdb_quick", str(tmp_path), quick=True)
    assert target.model.source_model == f"{tmp_path}/imdb_quick" and target.compare.seeds == 1
    assert target.train.max_steps_per_epoch == 4 and target.model_dir == f"{tmp_path}/imdb_to_rt"
    assert target.compare.strategies == ("scratch", "parameter")  # make demo's cut
    docs = demo.job_config("imdb_to_rt", "configs/imdb_to_rt.flags", "imdb_quick", str(tmp_path), quick=False,
                           refresh_docs=True)
    assert docs.compare.strategies == ("scratch", "structure", "parameter") and docs.compare.seeds == 3


def test_the_readme_results_are_the_committed_reports():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    begin, end = readme.index(demo.README_BEGIN), readme.index(demo.README_END)
    assert readme[begin + len(demo.README_BEGIN):end].strip() == demo.results_markdown().strip(), (
        "README results differ from docs/demo/*/report.json: run `make docs-demo`")


def test_refresh_readme_fills_the_block_from_reports(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(os.path.join(ROOT, "docs", "demo", "fmnist_transfer"), docs / "fmnist_transfer")
    report = json.loads((docs / "fmnist_transfer" / "report.json").read_text())
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{demo.README_BEGIN}\nstale 0.123\n{demo.README_END}\nafter\n")
    demo.refresh_readme(str(readme), str(docs))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "stale" not in text
    mean = report["rows"][0]["accuracy"]["mean"]
    assert f"{mean:.3f}" in text and "docs/demo/fmnist_transfer/report.md" in text
    readme.write_text("no block")
    with pytest.raises(SystemExit, match="no <!-- demo results"):
        demo.refresh_readme(str(readme), str(docs))


def test_bad_arguments_and_a_missing_source_run_are_one_line_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(os.getcwd())  # demo.main changes directory to its ROOT: restore it afterwards
    assert demo.main(["--only=nope"]) == 2
    assert "unknown argument nope" in capsys.readouterr().err
    monkeypatch.setattr(demo, "ROOT", str(tmp_path))  # no runs/demo there
    assert demo.main(["--only=imdb_to_rt"]) == 2
    err = capsys.readouterr().err
    assert "--only needs the run" in err and "runs/demo/imdb_quick" in err


def test_quick_and_refresh_docs_together_are_refused(capsys, monkeypatch):
    monkeypatch.chdir(os.getcwd())
    assert demo.main(["--quick", "--refresh-docs"]) == 2
    assert "drop one of --quick, --refresh-docs" in capsys.readouterr().err


def test_a_quick_demo_job_runs_and_reports_its_seconds_and_peak_memory(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(os.getcwd())
    assert demo.main(["--quick", "--only=imdb_quick"], out=str(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "demo: asset:spam_assassin" in printed and "demo: data summary peak resident memory" in printed
    took = [line for line in printed.splitlines() if line.startswith("demo: imdb_quick took ")]
    assert len(took) == 1 and took[0].endswith(" MiB"), printed[-2000:]
    peak_mib = float(took[0].split("peak resident memory ")[1].split()[0])
    assert 100 < peak_mib < 24 * 1024  # TensorFlow alone holds more than 100 MiB
    done = [line for line in printed.splitlines() if line.startswith("demo: done in ")]
    assert len(done) == 1 and float(done[0].split("peak resident memory ")[1].split()[0]) >= peak_mib
    metrics = json.load(open(tmp_path / "imdb_quick" / "metrics.json", encoding="utf-8"))
    assert metrics["data"]["sizes"]["train"] <= 400


def test_copy_report_takes_the_report_not_the_run_folders_markers(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("report.md", "report.json", "learning_curves.png", "config.json", ".tfl-run.json", ".tfl-lock.json",
                 "x.txt", "notes.md", "photo.png"):  # the last two: a user's files in a reused folder
        (run / name).write_text("{}")
    demo.copy_report(str(run), str(tmp_path / "docs"))
    assert sorted(os.listdir(tmp_path / "docs")) == ["learning_curves.png", "report.json", "report.md"]


def test_a_full_disk_stops_the_demo_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from tfl import job

    def full_disk(config, verbose=1):
        raise job.DiskFullError("the disk is full while writing model.keras: free space and rerun the same command")

    monkeypatch.setattr(job, "run", full_disk)
    assert demo.main(["--job=minilm_rt", f"--out={tmp_path}"]) == 2  # what the job's child process runs
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the disk is full while writing model.keras: free space and rerun the same command"]

    started = []

    def child(args):  # the data summary succeeds, the first job's child exits 2 after its error line
        started.append(args[0])
        return (2 if args[0] == "--job=minilm_rt" else 0), 500.0

    monkeypatch.setattr(demo, "run_in_child", child)
    assert demo.main([], out=str(tmp_path)) == 2
    assert started == ["--job=data_summary", "--job=minilm_rt"]  # it stopped at the first job
    assert "took" not in capsys.readouterr().out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_child_process_gives_its_exit_code_its_output_and_its_own_peak(capsys):
    code = ("import numpy as np, sys; a = np.ones(300 * 2**20 // 8); a += 1; print('child', a.size); "
            "print('to stderr', file=sys.stderr); "
            "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024; "
            f"print('{demo.PEAK_LINE}' + str(hwm)); sys.exit(3)")  # as demo.report_peak prints it
    rc, peak = demo.run_process([sys.executable, "-c", code])
    assert rc == 3
    assert 300 < peak < 300 + 150, peak  # its 300 MiB array, Python and numpy; not this process's memory
    assert capsys.readouterr().out == "child 39321600\n"  # its output came through, the peak line did not


def test_a_child_killed_by_a_signal_is_one_error_line(capsys):
    rc, _ = demo.run_process([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert rc == 1 and "was killed by signal 9 (out of memory?)" in capsys.readouterr().err


def test_a_demo_job_never_deletes_a_folder_that_is_not_a_tfl_run(tmp_path, capsys):
    """The demo writes each job to <out>/<job> and starts it over there (overwrite=True): a tfl run there is
    cleared, any other folder is refused with one line and left as it was."""
    mine = tmp_path / "imdb_quick"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own")
    assert demo.main(["--job=imdb_quick", "--quick", f"--out={tmp_path}"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: --overwrite clears only a folder that holds a tfl run")
    assert sorted(os.listdir(mine)) == ["notes.txt"] and (mine / "notes.txt").read_text() == "the user's own"
