"""Shared scaffolding for the absl binaries: one-line errors and exit status 2 on bad input."""
import logging
import sys

from absl import app, flags

from finextract_jax.errors import FinextractError


def fail(message: str):
    """Print one line to stderr and exit 2 (bad input the user can fix)."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(2)


def quiet_orbax():
    """orbax logs every array transfer at INFO; keep its warnings, drop the chatter."""
    import os

    from absl import logging as absl_logging

    marker = f"{os.sep}orbax{os.sep}"

    class Filter(logging.Filter):
        def filter(self, record):
            return record.levelno >= logging.WARNING or marker not in record.pathname

    absl_logging.get_absl_handler().addFilter(Filter())


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        fail(f"{err} (see --helpfull)")


def run(main):
    """Run an absl main; a FinextractError or a bad flag becomes one stderr line and exit status 2."""

    def guarded(argv):
        if len(argv) > 1:
            fail(f"unexpected positional arguments {argv[1:]}; use --flag=value")
        try:
            return main(argv)
        except FinextractError as err:
            fail(str(err))

    # JAX logs its backend probing (e.g. "Unable to initialize backend 'tpu'") at INFO; keep
    # stderr for what the user must read.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    app.run(guarded, flags_parser=_parse_flags)
