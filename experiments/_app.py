"""Shared scaffolding for the absl binaries: what a user sees when something goes wrong.

The contract (README, "Command line"), the same for every binary:
- stdout carries everything a run says while it works (logs of every level, progress bars,
  Python warnings) and its result (the last lines); stderr carries only the final error line.
  So a failing run's stderr is exactly one line, whatever it logged before failing.
- Exit status 0: done; 2: bad input (a flag, a file, a folder: `FinextractError`), or a file
  system error (`OSError`: a path that cannot be read or written, a full disk); 130:
  interrupted (Ctrl-C / SIGINT); a rerun of the same command continues. Anything else is a bug
  and keeps its traceback (status 1).
"""
import logging
import math
import os
import shlex
import signal
import sys
import threading

from absl import app, flags
from absl import logging as absl_logging

from finextract_jax import logs
from finextract_jax.errors import FinextractError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

_error_stream = None  # the real stderr while `run` has redirected sys.stderr to stdout
_in_main = False  # Ctrl-C before main (imports, flag parsing) has nothing to clean up: exit at once


def _on_sigint(signum, frame):
    if _in_main:
        raise KeyboardInterrupt  # main's cleanup runs (temp files removed, run.json marked interrupted)
    (_error_stream or sys.stderr).write("error: interrupted\n")
    (_error_stream or sys.stderr).flush()
    os._exit(EXIT_INTERRUPTED)


if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _on_sigint)


def _error_line(message: str, status: int):
    stream = _error_stream or sys.stderr
    stream.write("error: " + " ".join(str(message).split()) + "\n")  # one line, even for multi-line causes
    stream.flush()
    sys.exit(status)


def fail(message: str):
    """Print one line to stderr and exit 2 (bad input the user can fix)."""
    _error_line(message, EXIT_BAD_INPUT)


def define_allow_pickle():
    """--allow_pickle, for the binaries that load checkpoints (README, "Checkpoints we read")."""
    flags.DEFINE_boolean("allow_pickle", False, "Read pickled checkpoints (.ckpt, .pt, .pth), weights-only "
                         "(torch.load(weights_only=True), no code runs); refused without it. Needs torch.")


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        fail(f"{err} (see --helpfull)")


def check_finite_flags(flag_values=flags.FLAGS):
    """No float flag may be NaN or infinite: such a value only fails later, blaming something else."""
    for name in sorted(flag_values):
        flag = flag_values[name]
        if isinstance(flag.value, float) and not math.isfinite(flag.value):
            fail(f"--{name} must be a finite number, got {flag.value}")


def _os_error_message(err: OSError) -> str:
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    return f"{paths + ': ' if paths else ''}{err.strerror or err}"


def _chatter_to_stdout():
    """Logs, progress bars and warnings go to stdout, so that stderr holds only the error line."""
    global _error_stream
    _error_stream = sys.stderr
    sys.stderr = sys.stdout
    absl_logging.get_absl_handler().python_handler.stream = logs.ThroughProgressBars()
    logging.captureWarnings(True)
    logs.quiet_orbax()


def _restore_stderr():
    global _error_stream
    if _error_stream is not None:
        sys.stderr, _error_stream = _error_stream, None


def run(main):
    """Run an absl main under the contract above."""

    def guarded(argv):
        global _in_main
        _chatter_to_stdout()
        _in_main = True
        try:
            if len(argv) > 1:
                fail(f"unexpected positional arguments {argv[1:]}; use --flag=value")
            check_finite_flags()
            absl_logging.info("command: %s", " ".join(shlex.quote(a) for a in sys.argv))  # in the log, to rerun it
            return main(argv)
        except FinextractError as err:
            fail(str(err))
        except OSError as err:
            fail(_os_error_message(err))
        except KeyboardInterrupt:
            _error_line("interrupted; rerun the same command to continue", EXIT_INTERRUPTED)
        finally:
            _in_main = False
            sys.stdout.flush()
            _restore_stderr()

    # JAX logs its backend probing (e.g. "Unable to initialize backend 'tpu'") at INFO; keep
    # stderr for what the user must read.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    app.run(guarded, flags_parser=_parse_flags)
