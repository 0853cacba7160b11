"""What a run costs: wall seconds per stage and per epoch, and the process's peak resident memory, for
metrics.json's ``timings`` and ``peak_rss_mb``; giving memory back between runs (``release_memory``,
``trim_heap``) and within a run once training is over (``release_traced_functions``); a quicker exit
(``skip_exit_collection``); and the estimate of a run's seconds that auto's budget uses (``training_seconds``).

    timings = {}
    with timed(timings, "data_load"):
        splits = tfl.load_data("csv:reviews.csv")
    timings                                        # {"data_load": 0.412}
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import platform
import sys
import time
from typing import Optional

import keras


FORWARD_PASSES_PER_STEP = 3.0  # forward + backward through a trained block, in forward passes


@contextlib.contextmanager
def timed(timings: Optional[dict], name: str):
    """Adds the body's wall seconds to ``timings[name]`` (also when it raises); ``timings=None`` records nothing."""
    started = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - started, 3)


class EpochTimes(keras.callbacks.Callback):
    """Wall seconds of each epoch fit() runs, in ``seconds``: its training steps, its validation and the
    callbacks before this one at its end (checkpoints, backups). The first epoch also traces the step
    functions and makes the input pipeline's first pass (tokenisation; cached afterwards with --cache)."""

    def __init__(self):
        super().__init__()
        self.seconds: list = []
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(round(time.perf_counter() - self._started, 3))


def peak_rss_mb() -> Optional[float]:
    """The process's peak resident memory in MiB since it started or since the last ``reset_peak_rss()``
    (Linux's VmHWM); elsewhere the peak since the start (every run before it in this process counts too);
    None where the platform does not report it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:  # not Linux
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def reset_peak_rss() -> bool:
    """Starts ``peak_rss_mb()`` again from the memory resident now, so that each of several stages or jobs in one
    process (benchmarks/memory.py's stages) reports its own peak, counted from what earlier ones still hold;
    False where the platform cannot (not Linux). The kernel forgets the earlier peak for everyone:
    ``/usr/bin/time`` and getrusage then report the peak since the last reset, so a caller that resets keeps
    the largest of its peaks itself."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Frees what a finished run leaves behind in this process (Keras's global state, traced functions, kernel
    caches), for loops of runs: compare, tune, the demo. Without it the process grows with every run (a script
    of 17 fine-tunes in one process reached 16.8 GB and was killed). The global dtype policy is kept. Then
    gives the C library's free memory back to the system (``trim_heap``)."""
    policy = keras.config.dtype_policy()
    keras.backend.clear_session(free_memory=True)
    keras.config.set_dtype_policy(policy)
    trim_heap()


def release_traced_functions(model: keras.Model) -> None:
    """Frees ``model``'s traced train, test and predict functions (their graphs and kernels: ~50-75 MiB for a
    MiniLM fine-tune) once its training is over, so that the traces still to come (the final validation's,
    the export's) reuse that memory instead of adding to the peak. Keras traces them again if the model is
    trained or scored through Keras again."""
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(model, name, None) is not None:
            delattr(model, name)  # not only set to None: TensorFlow's tracking of the model keeps a traced
            setattr(model, name, None)  # predict function as a dependency until the attribute is deleted
    gc.collect()  # a tf.function's objects hold cycles
    trim_heap()


def trim_heap() -> bool:
    """Gives the free memory inside glibc's heap back to the system (malloc_trim): after a run, glibc keeps
    what the run's tensors freed, for reuse, and the next run's peak would count it. Called between runs, and
    within a run once training is over (``release_traced_functions``), never between steps: having glibc give
    each step's activations back as the step frees them (its mmap threshold fixed) makes every step slower,
    which benchmarks/memory.py measures in docs/memory.md. False where the C library is not glibc (nothing
    done)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def training_seconds(forward_seconds: float, *, train_examples: int, eval_examples: int, epochs: int,
                     trained_share: float) -> float:
    """Estimated seconds of one run: ``forward_seconds`` per example through the whole (cut) backbone;
    ``trained_share`` of it trains (0 = a linear probe: one pass over every example, features cached)."""
    if trained_share == 0:
        return forward_seconds * (train_examples + eval_examples)
    step = 1.0 + (FORWARD_PASSES_PER_STEP - 1.0) * trained_share
    return forward_seconds * (epochs * train_examples * step + eval_examples)


def skip_exit_collection() -> None:
    """At exit Python's last garbage collection walks every object a run leaves (TensorFlow's graphs, Keras's
    layers): 1.7 s of a one-epoch MiniLM command, after everything is written. This freezes them when the
    interpreter begins to exit, so that collection skips them; atexit's other handlers (log flushes) still run.
    For a command's entry point only: unreachable cycles are no longer finalised at exit."""
    atexit.register(gc.freeze)
