"""Log lines are written around live progress bars, never glued onto them; orbax's INFO is dropped."""
import io
import logging
import sys

from tqdm import tqdm

from finextract_jax import logs


def test_log_lines_go_out_between_progress_bar_redraws(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    handler = logging.StreamHandler(logs.ThroughProgressBars())
    log = logging.getLogger("test_logs")
    log.addHandler(handler)
    try:
        with tqdm(total=3, file=sys.stdout, desc="work", ascii=True) as bar:
            bar.update(1)
            log.warning("first line\nsecond line")
            bar.update(1)
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().replace("\r", "\n").split("\n")
    assert "first line" in lines and "second line" in lines  # whole lines of their own
    assert not any("work" in line and "line" in line for line in lines)  # not glued onto a bar


def test_quiet_orbax_drops_its_info_keeps_its_warnings():
    logs.quiet_orbax()
    logs.quiet_orbax()  # idempotent
    absl_logger = logging.getLogger("absl")
    assert sum(isinstance(f, logs._DropOrbaxInfo) for f in absl_logger.filters) == 1

    def record(level, path):
        return logging.LogRecord("absl", level, path, 1, "msg", None, None)

    assert not absl_logger.filter(record(logging.INFO, "/site-packages/orbax/checkpoint/x.py"))
    assert absl_logger.filter(record(logging.WARNING, "/site-packages/orbax/checkpoint/x.py"))
    assert absl_logger.filter(record(logging.INFO, "/work/finextract_jax/sampling/run.py"))
