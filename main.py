"""tfl command line: python main.py --flagfile=configs/<name>.flags [--flag=value ...]

Reads flags into one Config, checks it before any heavy work, writes it to <model_dir>/config.json
and calls tfl.run. A user mistake prints one line naming the fix and exits 2. Quiet by default (tfl's
lines, one line per epoch in a log or a progress bar on a terminal); absl's --verbosity=0 (or -v=0, 1 for
debug) shows TensorFlow's own log lines too.
"""

import time

PROCESS_STARTED = time.time()  # before the heavy imports: metrics.json's timings count the imports from here

import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402

from tfl import quiet, text_ops  # noqa: E402

text_ops.load_on_demand()  # before keras-hub's import: TensorFlow Text's op libraries load as used (-84 MiB)

# The flag tables live next to what they register (backbones, data sources), so defining the flags loads
# TensorFlow: quietly, unless --verbosity/-v is on the command line (a flagfile's is read too late for this).
_VERBOSE = any(a in ("-v", "--verbosity") or a.startswith(("--verbosity=", "-v=")) for a in sys.argv[1:])
with quiet.tensorflow_start(quiet=not _VERBOSE):
    from tfl import cli

FLAGS = flags.FLAGS
cli.define_flags(FLAGS)


def main(argv):
    if len(argv) > 1:
        return fail(f"unexpected arguments {argv[1:]}; every option is a --flag (see --helpfull)")
    from tfl import job

    if not FLAGS["verbosity"].present:
        quiet.quiet_python_logging()  # again: absl's app.run turned its logging up to INFO after parsing
    try:
        config = cli.config_from_flags(FLAGS)
        job.check_before_run(config)
        metrics = job.run_checked(config, verbose=quiet.keras_verbose(), process_started=PROCESS_STARTED)
    except job.USER_ERRORS + job.TRAINING_ERRORS as e:
        return fail(str(e).splitlines()[0])
    if config.mode == "predict":  # stdout may be the predictions CSV: keep it clean
        print(f"tfl: {metrics['predictions']} predictions" + (f" in {config.predict.output}"
                                                               if config.predict.output else ""), file=sys.stderr)
        return 0
    print(f"tfl: done; metrics in {os.path.join(config.model_dir, 'metrics.json')}" if config.model_dir
          else "tfl: done")
    return 0 if metrics else 1


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    from tfl.costs import skip_exit_collection

    skip_exit_collection()
    app.run(main, flags_parser=lambda argv: cli.parse_flags_or_exit(argv, FLAGS))
