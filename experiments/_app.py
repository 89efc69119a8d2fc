"""Shared scaffolding for the absl binaries: one-line errors and exit status 2 on bad input."""
import sys

from absl import app

from finextract_jax.errors import FinextractError


def run(main):
    """Run an absl main; a FinextractError becomes one stderr line and exit status 2."""

    def guarded(argv):
        if len(argv) > 1:
            _fail(f"unexpected positional arguments {argv[1:]}; use --flag=value")
        try:
            return main(argv)
        except FinextractError as err:
            _fail(str(err))

    try:
        app.run(guarded)
    except app.UsageError as err:  # pragma: no cover - absl handles most of these itself
        _fail(str(err))


def _fail(message):
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(2)
