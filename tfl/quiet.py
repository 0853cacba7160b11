"""Quiet output by default: the command line shows tfl's own lines, one line per epoch and errors; absl's
``--verbosity`` (``-v``) brings TensorFlow's logs back.

    with quiet.tensorflow_start(quiet=True):
        from tfl import job        # imports TensorFlow, Keras, keras-hub

TensorFlow 2.21 writes C++ log lines while it is imported and while it first looks for devices
("cudart_stub.cc ... Could not find cuda drivers", "WARNING: All log messages before absl::InitializeLog()",
"cuda_platform.cc ... failed call to cuInit"), and those ignore TF_CPP_MIN_LOG_LEVEL
(https://github.com/tensorflow/tensorflow/issues/100442). So stderr's file descriptor goes to a temporary
file for just that start, and comes back right after: a start that fails writes everything it captured back
before its traceback, and every later ``error:`` line or traceback reaches stderr as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

from absl import logging as absl_logging


@contextlib.contextmanager
def tensorflow_start(quiet: bool):
    """Runs the body (the imports that load TensorFlow) and TensorFlow's device scan with stderr captured
    when ``quiet``; then quiets TensorFlow's Python logging (see quiet_python_logging)."""
    if not quiet:
        yield
        return
    # C++ log lines after the start too, ERROR included: TF logs warnings at that level ("oneDNN supports
    # DT_BOOL only on platforms with AVX-512. Falling back to ... Eigen", on some AVX-512 hosts at export);
    # failures still reach the user as Python exceptions, and -v shows every line.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _stderr_captured():
        yield
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe logs on first use: let it happen in here
    quiet_python_logging()


@contextlib.contextmanager
def _stderr_captured():
    """fd 2 into a temporary file; on an exception, what was captured is written back before it propagates."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            captured.seek(0)
            os.write(2, captured.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class _KerasRetracingFilter(logging.Filter):
    """Drops TensorFlow's retracing warning about Keras' own train/test/predict functions.

    TF counts traces per Python code object, so the first trace of each new model's ``fit`` (every run of a
    --mode=compare, every stage of gradual unfreezing) counts against the same Keras function, and after five
    models it warns although each model is traced once (Keras builds them with reduce_retracing). tfl's own
    tf.functions are traced once per model and never match, so a real retracing problem there still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message and "TensorFlowTrainer._make_function" in message)


def quiet_python_logging() -> None:
    """INFO lines off, warnings stay: TF's SavedModel writer logs 'Assets written to', 'Sharding callback
    duration', 'Writing fingerprint' at INFO, and absl's app.run turns --verbosity's default into INFO. It is
    absl's verbosity that must change, not only the root logger's level: TF's trackable code saves absl's
    verbosity and sets it back while exporting, which resets the root logger to it."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    tf_logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _KerasRetracingFilter) for f in tf_logger.filters):
        tf_logger.addFilter(_KerasRetracingFilter())


def keras_verbose() -> int:
    """Keras' fit verbosity: a progress bar on a terminal, one line per epoch in a log (a bar in a file is one
    long line of carriage returns)."""
    return 1 if sys.stdout.isatty() else 2
