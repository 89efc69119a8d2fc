"""The clustering's settings in one object: the single source of their defaults and flags.

`cluster(features=..., **dataclasses.asdict(config))` runs it; the cluster binary declares one flag
per field (experiments/_app.py), and the audit and reproduce jobs take the fields they share
with `options.same_as`, so help texts, choices and defaults are written once.
"""
from __future__ import annotations

import dataclasses

from finextract_jax.cluster.cliques import DEFAULT_SUBPROBLEM_BUDGET, DEFAULT_THRESHOLD_BUDGET
from finextract_jax.cluster.graph import DEFAULT_EDGE_BUDGET
from finextract_jax.cluster.schedule import DEFAULT_SCHEDULE, SCHEDULES
from finextract_jax.errors import InputError
from finextract_jax.options import check_choices, option

SELECTS = ("reference", "topk")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """How the generated images are clustered (docs/method.md §4)."""

    num_train: int = option(help="N0: the number of fine-tuning images sought.")
    select: str = option("reference", "reference: keep every clique at the final threshold; topk: the N0 largest.",
                         choices=SELECTS)
    schedule: str = option(DEFAULT_SCHEDULE, "chance: stop where the groups of cliques larger than chance at the "
                           "threshold's edge density persist over 3 grid steps (else: the threshold with the most "
                           "groups), keep one clique per group; reference: stop at the first threshold with >= N0 "
                           "cliques, keep all (the reference implementation).",
                           choices=SCHEDULES)
    threshold: float | None = option(None, "Use this similarity threshold instead of the schedule.")
    seed: int = option(0, "Seed of the 1000 sampled entries for the start threshold.")
    subproblem_budget: int = option(DEFAULT_SUBPROBLEM_BUDGET,
                                    "Deterministic work budget of one maximum-clique subproblem.")
    threshold_budget: int = option(DEFAULT_THRESHOLD_BUDGET, "Deterministic work budget of one threshold.")
    edge_budget: int = option(DEFAULT_EDGE_BUDGET, "Most edges a threshold's graph may have (about 10 bytes each "
                              "in memory); denser thresholds are skipped by the schedule.")

    def __post_init__(self):
        check_choices(self)
        if self.num_train < 1:
            raise InputError(f"--num_train must be >= 1, got {self.num_train}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise InputError(f"--threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        for name in ("subproblem_budget", "threshold_budget", "edge_budget"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must be >= 0, got {getattr(self, name)}")
