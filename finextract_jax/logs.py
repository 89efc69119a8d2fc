"""Log output a person can read: orbax's per-array chatter dropped, and log lines written around
the progress bars instead of glued onto them.

Both are idempotent and affect only how records are shown, never which results are computed.
"""
from __future__ import annotations

import io
import logging
import os
import sys

_ORBAX = f"{os.sep}orbax{os.sep}"


class _DropOrbaxInfo(logging.Filter):
    """orbax logs every array transfer at INFO through absl; keep its warnings and errors."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or _ORBAX not in record.pathname


def quiet_orbax():
    """Drop orbax's INFO records, whoever logs them (absl's logger carries all of them)."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxInfo) for f in logger.filters):
        logger.addFilter(_DropOrbaxInfo())


class ThroughProgressBars(io.TextIOBase):
    """A stream for log handlers: each line goes out through `tqdm.write`, which clears the live
    progress bars on stdout, writes the line, and redraws them (so ~350 log lines no longer end
    up glued onto bars). Writes to whatever `sys.stdout` is at the time."""

    def write(self, text: str) -> int:
        from tqdm import tqdm

        for line in text.rstrip("\n").split("\n") if text.strip() else ():
            tqdm.write(line, file=sys.stdout)
        return len(text)

    def flush(self):
        sys.stdout.flush()
