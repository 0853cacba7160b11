"""tfl.devices: --jit_compile=auto's measurement (cpu_xla_speedup.json in the tfl cache) is keyed to the device
kind, CPU model and TensorFlow version, written atomically, and ignored with one stderr line when it is corrupt
or from another machine."""

import json
import os

import pytest
import tensorflow as tf

from tfl import devices, storage


def _lines_about_the_file(capsys) -> list:
    return [line for line in capsys.readouterr().err.splitlines() if devices.JIT_MEASUREMENT in line]


def test_a_measurement_round_trips_and_decides_auto(tfl_home, capsys):
    assert devices.measured_cpu_xla_speedup() is None
    assert devices.resolve_jit_compile("auto", "cpu") is False  # not measured here: off
    for speedup, expected in [(0.89, False), (1.2, True)]:
        path = devices.record_xla_speedup(speedup, "a test step", kind="cpu")
        assert devices.measured_cpu_xla_speedup() == speedup
        assert devices.resolve_jit_compile("auto", "cpu") is expected
    # however fast, never across CPU replicas: XLA cannot reach a mirrored variable on another logical device
    assert devices.resolve_jit_compile("auto", "cpu", replicas=2) is False
    assert devices.resolve_jit_compile("true", "cpu", replicas=2) is True  # asked for explicitly: the user's call
    assert path == str(tfl_home / devices.JIT_MEASUREMENT)
    key = json.loads((tfl_home / devices.JIT_MEASUREMENT).read_text())["key"]
    assert key == {"device": "cpu", "cpu": devices.processor_model(), "tensorflow": tf.__version__}
    assert key["cpu"]  # /proc/cpuinfo's model name, or platform.processor()
    assert _lines_about_the_file(capsys) == []


@pytest.mark.parametrize("content", [
    '{"speedup": 1.5, "key": {"device": "c',  # half a file, as the old non-atomic write could leave
    "",
    '["a list"]',
    '{"speedup": "fast", "key": {}}',
    '{"measured": "no speedup"}',
])
def test_a_corrupt_file_is_ignored_with_one_line(tfl_home, capsys, content):
    tfl_home.mkdir()
    (tfl_home / devices.JIT_MEASUREMENT).write_text(content)
    assert devices.resolve_jit_compile("auto", "cpu") is False
    assert devices.resolve_jit_compile("auto", "cpu") is False  # asked again, as each run of a compare does
    lines = _lines_about_the_file(capsys)
    assert len(lines) == 1 and "unreadable" in lines[0], lines


@pytest.mark.parametrize("change", ["cpu", "tensorflow"])
def test_another_machines_measurement_is_ignored_with_one_line(tfl_home, capsys, monkeypatch, change):
    devices.record_xla_speedup(1.5, "a test step", kind="cpu")  # 1.5x: auto would turn XLA on here
    assert devices.resolve_jit_compile("auto", "cpu") is True
    # The same key function on the reading side now sees another CPU or TensorFlow version.
    if change == "cpu":
        monkeypatch.setattr(devices, "processor_model", lambda: "Another CPU @ 1.0GHz")
    else:
        monkeypatch.setattr(devices.tf, "__version__", "9.9.9")
    assert devices.resolve_jit_compile("auto", "cpu") is False
    assert devices.resolve_jit_compile("auto", "cpu") is False
    lines = _lines_about_the_file(capsys)
    assert len(lines) == 1 and f"another {change}" in lines[0], lines


@pytest.mark.parametrize("record", [
    {"speedup": 1.5, "key": {"device": "gpu", "cpu": "same", "tensorflow": "same", "gpu": "NVIDIA H100"}},
    {"speedup": 1.5, "model": "MiniLM fine-tune, batch 32, seq 128, float32"},  # an older tfl's file: no key
])
def test_a_gpu_or_unkeyed_measurement_does_not_decide_the_cpu(tfl_home, capsys, record):
    tfl_home.mkdir()
    if "key" in record:
        record["key"].update(cpu=devices.processor_model(), tensorflow=tf.__version__)
    (tfl_home / devices.JIT_MEASUREMENT).write_text(json.dumps(record))
    assert devices.resolve_jit_compile("auto", "cpu") is False
    lines = _lines_about_the_file(capsys)
    assert len(lines) == 1, lines
    assert ("another device (gpu; here cpu), gpu (NVIDIA H100; here none)" in lines[0]) if "key" in record else ("does not say which machine" in lines[0])


def test_a_failed_write_leaves_the_previous_measurement_whole(tfl_home, monkeypatch):
    devices.record_xla_speedup(1.2, "first", kind="cpu")
    assert os.listdir(tfl_home) == [devices.JIT_MEASUREMENT]  # no staging file left after a write

    def fail_to_move(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage.gfile, "rename", fail_to_move)
    with pytest.raises(OSError, match="disk full"):
        devices.record_xla_speedup(0.5, "second", kind="cpu")
    assert os.listdir(tfl_home) == [devices.JIT_MEASUREMENT]
    assert devices.measured_cpu_xla_speedup() == 1.2


def test_xla_pays_off_only_when_the_steps_it_speeds_outweigh_its_compiles(tfl_home):
    assert devices.xla_pays_off(shapes=1, steps=100, tokens_per_step=100)[0] is False  # nothing measured
    devices.record_xla_speedup(1.25, "old file", kind="cpu")  # no compile time: only a single shape pays
    assert devices.xla_pays_off(shapes=1, steps=10, tokens_per_step=100)[0] is True
    assert devices.xla_pays_off(shapes=2, steps=10**6, tokens_per_step=100)[0] is False
    # An XLA step of 1,000 tokens takes 2 s at the measured 4 s per 2,000 tokens; without XLA it takes 1.25x
    # as long, so XLA saves 0.5 s a step.
    devices.record_xla_speedup(1.25, "a step", kind="cpu", compile_seconds=20.0, step_seconds=4.0, step_tokens=2000)
    pays, why = devices.xla_pays_off(shapes=24, steps=1000, tokens_per_step=1000)  # saves 500 s, costs 480 s
    assert pays is True and "save about 500 s over 1000 steps" in why and "cost about 480 s" in why
    pays, why = devices.xla_pays_off(shapes=24, steps=325, tokens_per_step=1000)  # one epoch: saves 162 s
    assert pays is False and "compile 24 batch shapes (20 s each)" in why
    with pytest.raises(ValueError, match="recorded together"):
        devices.record_xla_speedup(1.25, "a step", kind="cpu", compile_seconds=20.0)


@pytest.mark.parametrize("fields", [{"step_tokens": 0}, {"step_seconds": "slow"}, {"step_tokens": None}])
def test_a_damaged_compile_measurement_is_ignored_with_one_line(tfl_home, capsys, fields):
    devices.record_xla_speedup(1.5, "a step", kind="cpu", compile_seconds=20.0, step_seconds=4.0, step_tokens=2000)
    path = tfl_home / devices.JIT_MEASUREMENT
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    assert devices.xla_pays_off(shapes=2, steps=100, tokens_per_step=100)[0] is False
    assert devices.resolve_jit_compile("auto", "cpu") is False
    lines = _lines_about_the_file(capsys)
    assert len(lines) == 1 and "unreadable" in lines[0], lines


def test_a_bucketed_run_keeps_xla_off_when_its_compiles_cost_more_than_it_saves(tfl_home, tmp_path, capsys, monkeypatch,
                                                                                tiny_bert_preset):
    import tfl
    from tfl import train
    from tfl.config import Config, DataConfig, ModelConfig, TrainConfig

    monkeypatch.setattr(devices, "device_kind", lambda strategy=None: "cpu")  # the rule is the CPU's
    fits = []
    real_fit = train.fit
    monkeypatch.setattr(train, "fit", lambda *a, **k: fits.append(k["jit_compile"]) or real_fit(*a, **k))

    devices.record_xla_speedup(1.5, "a step", kind="cpu", compile_seconds=30.0, step_seconds=1.0, step_tokens=4096)
    assert devices.resolve_jit_compile("auto", "cpu") is True  # one fixed shape: XLA would pay
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"{'word ' * (1 + i % 7)}{i},{'ab'[i % 2]}\n" for i in range(40)))
    config = Config(data=DataConfig(source=f"csv:{path}", batch_size=4, bucket_shapes=3),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=12),
                    train=TrainConfig(epochs=1, precision="float32", jit_compile="auto"), export=False)
    metrics = tfl.run(config, verbose=0)
    assert metrics["jit_compile"] is False and fits == [False]  # what training really compiled with
    assert "tfl: jit_compile=False: XLA would save about" in capsys.readouterr().out
