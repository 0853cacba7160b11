"""tfl.costs: stage timers, per-epoch wall times and the peak resident memory that go into metrics.json."""

import sys
import time

import keras
import numpy as np
import pytest

from tfl.costs import EpochTimes, peak_rss_mb, reset_peak_rss, timed


def test_timed_adds_up_each_stage_also_when_it_raises():
    timings = {}
    with timed(timings, "load"):
        time.sleep(0.05)
    with timed(timings, "load"):  # a stage entered twice counts both times
        time.sleep(0.05)
    with pytest.raises(ZeroDivisionError), timed(timings, "broken"):
        1 / 0
    assert timings["load"] >= 0.1 and timings["load"] < 5
    assert set(timings) == {"load", "broken"} and 0 <= timings["broken"] < timings["load"]  # recorded, and short
    with timed(None, "nowhere"):  # a caller that keeps no timings
        pass


def test_epoch_times_has_one_entry_per_epoch_within_the_fit():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((16, 4), np.float32), np.zeros((16, 2), np.float32)
    epochs = EpochTimes()
    started = time.perf_counter()
    model.fit(x, y, epochs=3, batch_size=4, verbose=0, callbacks=[epochs])
    fit_seconds = time.perf_counter() - started
    assert len(epochs.seconds) == 3 and all(s > 0 for s in epochs.seconds)
    assert sum(epochs.seconds) <= fit_seconds


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_is_in_mib_and_covers_what_the_process_holds():
    held = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
    with open("/proc/self/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open("/proc/meminfo") as f:
        total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    # The peak is at least the memory held now, and (in MiB, not KiB or bytes) below the machine's.
    assert rss_kib / 1024 - 1 <= peak_rss_mb() <= total_kib / 1024
    assert held.sum() == held.size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resets through /proc/self/clear_refs")
def test_reset_peak_rss_forgets_memory_freed_before_it():
    spike = np.ones(256 * 1024 * 1024 // 8)  # 256 MiB, touched, then freed
    assert spike.sum() == spike.size
    before = peak_rss_mb()
    del spike
    assert reset_peak_rss()
    after = peak_rss_mb()
    assert after <= before - 200  # the freed 256 MiB no longer counts
    # A new peak after a reset is seen. Measured from a reset just before it: in a busy test worker the resident
    # memory can fall below the first reset's level in between (a fresh clone's suite once saw no growth at all).
    assert reset_peak_rss()
    base = peak_rss_mb()
    held = np.ones(64 * 1024 * 1024 // 8)
    assert peak_rss_mb() >= base + 60 and held.sum() == held.size


def test_release_memory_drops_keras_state_of_finished_runs_and_keeps_the_dtype_policy():
    import keras

    from tfl.costs import release_memory

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.layers.Dense(2)
        assert keras.layers.Dense(2).name != "dense"  # the name counter counts the layers before
        release_memory()
        assert keras.layers.Dense(2).name == "dense"  # Keras's global state is fresh
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    finally:
        keras.config.set_dtype_policy("float32")


def test_release_traced_functions_frees_the_traces_and_keras_traces_again_when_the_model_trains_again():
    import weakref

    import keras
    import tensorflow as tf

    from tfl.costs import release_traced_functions

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.ones((8, 3), "float32"), np.zeros((8, 1), "float32")
    model.fit(x, y, epochs=1, verbose=0)
    model.evaluate(x, y, verbose=0)
    model.predict(x, verbose=0)

    def tf_functions(function) -> list:  # Keras's train/test functions are closures over a tf.function
        cells = [c.cell_contents for c in (getattr(function, "__closure__", None) or ())]
        return [f for f in [function, *cells] if isinstance(f, tf.types.experimental.PolymorphicFunction)]

    functions = [model.train_function, model.test_function, model.predict_function]
    traced = [weakref.ref(f) for function in functions for f in tf_functions(function)]
    assert len(traced) == 3
    del functions
    release_traced_functions(model)
    assert [t() for t in traced] == [None, None, None]  # the tf.functions freed, not merely dropped by the model
    before = model.get_weights()[0].copy()
    model.fit(x, y, epochs=1, verbose=0)
    assert model.train_function is not None and not np.array_equal(model.get_weights()[0], before)


TRIM_CHILD = """
import platform
from tfl.costs import trim_heap

def resident_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

del_me = b"x" * (16 << 20)  # freeing a 16 MiB block raises glibc's mmap threshold: 1 MiB blocks go on the heap
del del_me
blocks = [b"x" * (1 << 20) for _ in range(400)]  # 400 MiB, touched
kept = blocks[::20]  # one in 20 stays alive, so the free space between them cannot shrink from the heap's top
del blocks
before = resident_mib()
assert trim_heap() == (platform.libc_ver()[0] == "glibc")
print(before, resident_mib(), len(kept))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_trim_heap_gives_freed_memory_inside_the_heap_back():
    import platform
    import subprocess

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    # A fresh process: glibc's thresholds depend on what the process freed before.
    done = subprocess.run([sys.executable, "-c", TRIM_CHILD], capture_output=True, text=True, check=True)
    before, after, kept = done.stdout.split()
    assert float(before) - float(after) > 250  # of the 380 MiB freed between the kept blocks


EXIT_CHILD = """
import atexit, gc, sys
from tfl.costs import skip_exit_collection

# Registered first, so it runs last: it sees what the interpreter's final collection would see.
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))
if sys.argv[1] == "skip":
    skip_exit_collection()
atexit.register(lambda: print("later handler ran", flush=True))  # registered after: runs before the freeze
keep = [[i] for i in range(1000)]
"""


@pytest.mark.parametrize("mode, frozen", [("skip", True), ("plain", False)])
def test_skip_exit_collection_freezes_what_is_left_at_exit_and_other_handlers_still_run(mode, frozen):
    import subprocess

    out = subprocess.run([sys.executable, "-c", EXIT_CHILD, mode], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert "later handler ran" in out
    assert f"frozen at exit: {frozen}" in out
