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
import dataclasses
import logging
import math
import os
import shlex
import signal
import sys
import threading
import types
import typing

from absl import app, flags
from absl import logging as absl_logging

from finextract_jax import logs, options
from finextract_jax.errors import FinextractError, InputError

FLAGS = flags.FLAGS
flags.disclaim_key_flags()  # the flags declared below belong to the binary that calls define_* (its --helpshort)
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


# ---- flags declared from the jobs' config dataclasses (finextract_jax/options.py) ------------------


def _base_type(hint):
    """`X | None` -> X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def _item_type(field) -> type:
    default = field.default if field.default is not dataclasses.MISSING else ()
    return type(default[0]) if default else str


def define_flags(config_cls, only=(), skip=(), defaults=None, helps=None, flag_values=FLAGS):
    """One flag per field of `config_cls` made with `options.option`: its type, default, help and
    choices come from the field (`defaults`/`helps` override them for this binary). A field
    without a default is a required flag. `only` limits the flags to those names."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if not options.is_flag(field) or field.name in skip or (only and field.name not in only):
            continue
        kind = _base_type(hints[field.name])
        default = (defaults or {}).get(field.name, None if field.default is dataclasses.MISSING else field.default)
        text = (helps or {}).get(field.name, options.help_of(field))
        common = dict(flag_values=flag_values, required=field.default is dataclasses.MISSING and default is None)
        choices = options.choices_of(field)
        if kind is bool:
            flags.DEFINE_boolean(field.name, default, text, **common)
        elif kind is int:
            flags.DEFINE_integer(field.name, default, text, **common)
        elif kind is float:
            flags.DEFINE_float(field.name, default, text, **common)
        elif kind is tuple:
            text += f" From: {', '.join(choices)}." if choices else ""
            flags.DEFINE_list(field.name, None if default is None else [str(v) for v in default], text, **common)
        elif choices is not None:
            flags.DEFINE_enum(field.name, default, list(choices), text, **common)
        else:
            flags.DEFINE_string(field.name, default, text, **common)


def values_from_flags(config_cls, flag_values=FLAGS) -> dict:
    """The values of the flags `define_flags` declared for `config_cls` (lists as typed tuples)."""
    values = {}
    for field in dataclasses.fields(config_cls):
        if not options.is_flag(field) or field.name not in flag_values:
            continue
        value = flag_values[field.name].value
        if isinstance(value, list):
            item = _item_type(field)
            try:
                value = tuple(item(v) for v in value)
            except ValueError:
                raise InputError(f"--{field.name} takes {item.__name__} values, got {','.join(value)}") from None
        values[field.name] = value
    return values


def config_from_flags(config_cls, flag_values=FLAGS, **given):
    """`config_cls` built from its flags; `given` sets the fields a binary computes itself."""
    return config_cls(**{**values_from_flags(config_cls, flag_values), **given})


def define_allow_pickle():
    """--allow_pickle, for the binaries that load checkpoints (README, "Checkpoints we read")."""
    from finextract_jax.models.weights import ALLOW_PICKLE_HELP

    flags.DEFINE_boolean("allow_pickle", False, ALLOW_PICKLE_HELP)


def define_distributed_flags(what: str):
    """--coordinator_address/--num_processes/--process_id of a multi-process run; `what` says
    how the processes share the work."""
    flags.DEFINE_string("coordinator_address", None, f"HOST:PORT of process 0, for a multi-process run ({what}).")
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def is_multi_process() -> bool:
    return bool(FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None)


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


def check_no_empty_paths(flag_values=flags.FLAGS):
    """A flag that names a file or folder (a string flag without a default) may not be given empty:
    `--workdir=` would otherwise mean the current folder, `--feature_weights=` "none"."""
    for name in sorted(flag_values):
        flag = flag_values[name]
        if flag.present and flag.default is None and flag.value == "":
            fail(f"--{name} is empty; give a value or leave the flag out")


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
            check_no_empty_paths()
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
