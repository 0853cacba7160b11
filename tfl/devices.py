"""Devices, precision, XLA, distribution strategies, and the cluster: which process is the chief.

    strategy = tfl.devices.make_strategy("auto")
    precision = tfl.devices.resolve_precision("auto")          # mixed_bfloat16 on a bf16-native CPU
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import tempfile
from typing import Optional

import keras
import tensorflow as tf

from tfl import storage


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX: the CPU computes bfloat16 matmuls natively (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_kind(strategy: Optional[tf.distribute.Strategy] = None) -> str:
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


def resolve_precision(precision: str, kind: Optional[str] = None) -> str:
    """auto: bf16 on TPUs and bf16-native CPUs; on GPUs bf16 from Ampere (8.0), fp16 from Volta (7.0)."""
    if precision != "auto":
        return precision
    kind = kind or device_kind()
    if kind == "tpu":
        return "mixed_bfloat16"
    if kind == "gpu":
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        major, _ = details.get("compute_capability", (0, 0))
        return "mixed_bfloat16" if major >= 8 else ("mixed_float16" if major >= 7 else "float32")
    return "mixed_bfloat16" if cpu_has_native_bf16() else "float32"


JIT_MEASUREMENT = "cpu_xla_speedup.json"  # written by benchmarks/run.py into the tfl cache


def processor_model() -> str:
    """The CPU's model name: /proc/cpuinfo's "model name" (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measurement_key(kind: str) -> dict:
    """What a speed measurement holds for: the device kind, the CPU model (and the GPU's, on a GPU) and the
    TensorFlow version. cpu_xla_speedup.json's writer and reader both use it, so a measurement never applies
    to another machine or TensorFlow version."""
    key = {"device": kind, "cpu": processor_model(), "tensorflow": tf.__version__}
    if kind == "gpu":
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        key["gpu"] = details.get("device_name", "unknown")
    return key


def record_xla_speedup(speedup: float, measured: str, kind: Optional[str] = None, *,
                       compile_seconds: Optional[float] = None, step_seconds: Optional[float] = None,
                       step_tokens: Optional[int] = None) -> str:
    """Writes XLA's measured speed-up of a training step into the tfl cache (atomically), keyed by
    measurement_key; ``measured`` says what was timed; ``compile_seconds`` (what a new batch shape's first
    XLA step costs beyond a steady one, once the step's trace no longer changes), ``step_seconds`` (the steady
    XLA step) and ``step_tokens`` (its batch x sequence) let a run weigh compiles against what XLA saves
    (``xla_pays_off``). Returns the path."""
    from tfl.assets import cache_dir

    path = os.path.join(cache_dir(), JIT_MEASUREMENT)
    record = {"speedup": round(speedup, 3), "measured": measured, "key": measurement_key(kind or device_kind())}
    timed = [compile_seconds, step_seconds, step_tokens]
    if any(value is not None for value in timed) and not all(value is not None for value in timed):
        raise ValueError("compile_seconds, step_seconds and step_tokens are recorded together")
    if compile_seconds is not None:
        record.update(compile_seconds=round(compile_seconds, 3), step_seconds=round(step_seconds, 4),
                      step_tokens=int(step_tokens))
    storage.write_json_atomically(path, record)
    return path


def measured_cpu_xla() -> Optional[dict]:
    """The XLA measurement benchmarks/run.py made on this machine's CPU with this TensorFlow ({"speedup", and
    where measured "compile_seconds", "step_seconds", "step_tokens"}), if any. A file that cannot be read, or
    that holds another machine's or version's measurement, counts as none, with one line on stderr saying why."""
    from tfl.assets import cache_dir

    path = os.path.join(cache_dir(), JIT_MEASUREMENT)
    if not os.path.exists(path):
        return None
    try:
        record = json.loads(storage.read_bytes(path))
        record["speedup"], key = float(record["speedup"]), record.get("key")
        if "compile_seconds" in record:
            record.update(compile_seconds=float(record["compile_seconds"]), step_seconds=float(record["step_seconds"]),
                          step_tokens=int(record["step_tokens"]))
            if record["step_tokens"] <= 0 or record["step_seconds"] <= 0:
                raise ValueError(f"a step of {record['step_tokens']} tokens in {record['step_seconds']} s")
    # unreadable, or not a measurement
    except (ValueError, TypeError, KeyError, AttributeError, OSError, tf.errors.OpError) as e:
        return _ignore_measurement(path, f"unreadable ({type(e).__name__}: {e})")
    here = measurement_key("cpu")
    if not isinstance(key, dict):
        return _ignore_measurement(path, "it does not say which machine and TensorFlow it was measured on")
    if key != here:
        differs = sorted(k for k in set(here) | set(key) if key.get(k) != here.get(k))
        return _ignore_measurement(path, "measured with another " + ", ".join(
            f"{k} ({key.get(k, 'none')}; here {here.get(k, 'none')})" for k in differs))
    return record


def measured_cpu_xla_speedup() -> Optional[float]:
    """XLA's measured speed-up of a fine-tune step on this machine's CPU (``measured_cpu_xla``), if any."""
    record = measured_cpu_xla()
    return None if record is None else record["speedup"]


def xla_pays_off(*, shapes: int, steps: int, tokens_per_step: float) -> tuple:
    """(whether, why): on this CPU, whether XLA's measured speed-up over ``steps`` training steps of about
    ``tokens_per_step`` tokens saves more time than compiling ``shapes`` batch shapes costs: each new shape
    is a compile of its own (docs/benchmarks.md gives this host's), and a bucketed run has many, so a short
    run can lose more to compiling than XLA saves. The XLA step's time scales with its tokens from the
    measured step; without XLA a step takes ``speedup`` times as long. Without a compile measurement (an
    older benchmark's file), only a single shape pays."""
    record = measured_cpu_xla()
    if record is None:
        return False, "no XLA measurement on this CPU"
    if "compile_seconds" not in record:
        return shapes <= 1, f"{shapes} batch shapes and no measured compile time on this CPU (rerun benchmarks/run.py)"
    xla_step = record["step_seconds"] * tokens_per_step / record["step_tokens"]
    saved = steps * xla_step * (record["speedup"] - 1.0)
    cost = shapes * record["compile_seconds"]
    return saved > cost, (f"XLA would save about {saved:.0f} s over {steps} steps ({record['speedup']:.2f}x, measured "
                          f"here) and cost about {cost:.0f} s to compile {shapes} batch shapes "
                          f"({record['compile_seconds']:.0f} s each)")


@functools.lru_cache(maxsize=None)
def _ignore_measurement(path: str, why: str) -> None:
    """One stderr line, once per reason and process (a --mode=compare process resolves --jit_compile per run)."""
    print(f"tfl: ignoring {path}: {why}; --jit_compile=auto keeps XLA off on this CPU until benchmarks/run.py "
          "measures here", file=sys.stderr)


def resolve_jit_compile(jit_compile: str, kind: Optional[str] = None, replicas: int = 1) -> bool:
    """auto: XLA on GPU/TPU; on CPU only where benchmarks/run.py measured it at least 5% faster here (the
    same CPU model and TensorFlow version; measured 0.89x to 1.35x on 2-core hosts), and never across several
    CPU replicas (XLA cannot reach a mirrored variable on another logical CPU device: the step fails)."""
    if jit_compile != "auto":
        return jit_compile == "true"
    if (kind or device_kind()) in ("gpu", "tpu"):
        return True
    if replicas > 1:
        return False
    speedup = measured_cpu_xla_speedup()
    return speedup is not None and speedup >= 1.05  # a run with many batch shapes asks xla_pays_off too


_multi_worker_strategy: Optional[tf.distribute.Strategy] = None


def make_strategy(strategy: str = "auto", tpu: str = "") -> tf.distribute.Strategy:
    """default / mirrored (all local GPUs, or CPU) / multi_worker (TF_CONFIG) / tpu.

    auto picks tpu if --tpu is set, multi_worker if TF_CONFIG names a cluster, mirrored for >1 GPU.
    A multi-worker strategy must be made before TensorFlow runs any op in the process.
    """
    if strategy == "auto":
        strategy = ("tpu" if tpu else "multi_worker" if cluster_from_tf_config()
                    else "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default")
    if strategy == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="" if tpu == "local" else tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if strategy == "multi_worker":
        if not cluster_from_tf_config():
            raise ValueError(MISSING_TF_CONFIG)
        global _multi_worker_strategy
        # A process can set up its collective ops once: later runs (e.g. --mode=compare) reuse the strategy.
        _multi_worker_strategy = _multi_worker_strategy or tf.distribute.MultiWorkerMirroredStrategy()
        return _multi_worker_strategy
    if strategy == "mirrored":
        # All local GPUs; without GPUs, the logical CPU devices (tests split the CPU in two this way).
        gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=gpus or (cpus if len(cpus) > 1 else None))
    return tf.distribute.get_strategy()


MISSING_TF_CONFIG = ("--strategy=multi_worker needs the TF_CONFIG environment variable naming the cluster and "
                     "this task, e.g. {\"cluster\": {\"worker\": [\"host1:2222\", \"host2:2222\"]}, "
                     "\"task\": {\"type\": \"worker\", \"index\": 0}}")


def _tf_config() -> dict:
    return json.loads(os.environ.get("TF_CONFIG") or "{}")


def cluster_from_tf_config() -> dict:
    """The cluster TF_CONFIG names ({"worker": [...], ...}), or {} outside a multi-worker job."""
    return _tf_config().get("cluster") or {}


def is_chief() -> bool:
    """Whether this process writes the run: the "chief" task, or worker 0 when the cluster has no chief.
    Outside a multi-worker job every process is its own chief. Read from TF_CONFIG, so it can be asked
    before any strategy exists (e.g. before the resolved config is written)."""
    tf_config = _tf_config()
    cluster = tf_config.get("cluster")
    if not cluster:
        return True
    task = tf_config.get("task") or {}
    if "chief" in cluster:
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def tpu_compatibility_problems(model: keras.Model, dataset: tf.data.Dataset) -> list:
    """What would break on a TPU, found without one: string tensors reaching the model (tokenize in
    tf.data on the host instead), a batch dimension that is not static (use drop_remainder=True),
    and string ops inside the traced model. An empty list means the model and its inputs look TPU-shaped."""
    problems = []
    inputs_spec = dataset.element_spec[0]
    for spec in tf.nest.flatten(inputs_spec):
        if spec.dtype == tf.string:
            problems.append(f"string input {spec.name or ''} reaches the model")
        elif spec.shape.rank and spec.shape[0] is None:
            problems.append("the batch dimension is not static (batch with drop_remainder=True)")
    if problems:
        return sorted(set(problems))
    graph = tf.function(lambda x: model(x, training=True)).get_concrete_function(inputs_spec).graph
    for op in graph.get_operations():
        if any(t.dtype == tf.string for t in list(op.inputs) + list(op.outputs)):
            problems.append(f"string op {op.type} inside the model")
    return sorted(set(problems))


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """In-memory and tfds pipelines cannot be sharded by file: shard them by element, explicitly."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def worker_scratch_dir(model_dir: str) -> str:
    """A local scratch folder for a non-chief worker's callback files (backup, logs, checkpoints).

    It starts with a copy of the chief's backup in ``model_dir``, so after a restart every worker
    resumes at the same epoch; that needs ``model_dir`` on storage all workers share (e.g. gs://).
    """
    scratch = tempfile.mkdtemp(prefix="tfl-worker-")
    backup = os.path.join(model_dir, "backup")
    if tf.io.gfile.isdir(backup):
        os.makedirs(os.path.join(scratch, "backup"))
        for name in storage.list_folder(backup):
            if storage.is_file(os.path.join(backup, name)):
                tf.io.gfile.copy(os.path.join(backup, name), os.path.join(scratch, "backup", name))
    return scratch
