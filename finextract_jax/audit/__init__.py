"""One command from a checkpoint to a report: recover the caption, extract, cluster, score, and
write DIR/report.html (experiments/audit.py is its command line).

`job.py` composes the stages (the same functions `reproduce` runs, resumable the same way);
`report.py` renders what they wrote as one self-contained HTML page.
"""
from finextract_jax.audit.job import DEFAULT_NUM_TRAIN, REPORT, Settings, audit

__all__ = ["DEFAULT_NUM_TRAIN", "REPORT", "Settings", "audit"]
