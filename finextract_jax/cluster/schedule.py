"""The threshold schedule and the representatives: from a similarity graph to clusters.json's
content (docs/method.md §4).

Two stopping rules, both over the same grid k = start, start + 1, ... (the start is the
reference's: the 25th percentile of 1000 seeded entries, floored to 0.01):

* ``"reference"``: stop at the first threshold whose peel has >= N0 cliques, and keep every
  clique of it (the reference implementation's rule). At low thresholds the graph is so dense
  that chance cliques are as large as real copy groups; this rule stops there as soon as the
  count is reached, so most of its cliques are chance mixtures.
* ``"chance"`` (the default): a clique counts only if it is larger than chance at that edge
  density. With p_k = edges_k / C(N, 2), the chance size s_k is the largest s for which the
  expected number of s-cliques of the random graph G(N, p_k), C(N, s) p_k^(s(s-1)/2), is at
  least 1 (the clique number of G(n, p) concentrates on that value). The significant cliques
  of threshold k are the peel's cliques of more than s_k members -- a prefix of the exact
  peel, found by peeling only down to s_k + 1 (``peel_cliques(min_size=...)``), so the rest
  of a dense graph is never searched. Stop at the first threshold k with at least one
  significant clique where their number is the same at k, k + 1 and k + 2: copy groups
  persist over grid steps, while chance cliques (topic clusters, coincidences) appear and
  vanish as the density changes. The count is of *groups*, not cliques: one copied image can
  give several significant cliques (a large group of copies splits into pieces at a high
  threshold), so cliques joined by more edges than chance allows are one group
  (``Graph.joined_groups``: at least a quarter of their pairs, and 5 standard deviations above
  the count at edge density p_k), and each group keeps its first, largest clique. Keep those
  cliques (``select="topk"``: the N0 first of them and, if there are fewer than N0, the next
  largest of the peel). If no window passes, the threshold with the most groups is taken (the
  lower on ties, logged; a blob of thousands of copies keeps every count changing); if no
  threshold has a group, the reference rule decides (logged).

Both rules skip a threshold that is over a budget (edges, work: ``cliques.py``), as the
reference skips one after its 30 s timeout.

Time, by design (counts, no clock): the similarity is one pass, N^2 D / 2 multiply-adds. Each
threshold is searched at most once (peels are memoised), and only those from max(start,
``min_level``) up: V <= 101 - min_level of them. A search costs O(E_k) array passes over its
graph (filter, core, groups; E_k <= ``edge_budget`` and known from the edge counts before any
search) plus at most ``threshold_budget`` work units, which count the subproblems' construction
and overheads too (``cliques.py``). So T <= T_similarity + a sum_k E_k + b V threshold_budget,
with a ~ 10-50 ns and b ~ 10-50 ns on a 2-core CPU; ``cluster_graph`` logs V, sum_k E_k and
V threshold_budget. A dense or hard threshold usually fails at its first hard subproblem
(``subproblem_budget`` units), so the actual time is far below the bound
(benchmarks/RESULTS.md).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import numpy as np
from absl import logging

from finextract_jax.cluster.cliques import (
    DEFAULT_SUBPROBLEM_BUDGET, DEFAULT_THRESHOLD_BUDGET, BudgetExceeded, peel_cliques)
from finextract_jax.cluster.graph import (
    DEFAULT_EDGE_BUDGET, SimilarityGraph, similarity_graph, start_level)
from finextract_jax.cluster.similarity import (
    _MAX_LEVEL, _MIN_LEVEL, _check_features, check_similarity, tau)
from finextract_jax.errors import InputError

def representatives(cliques: Sequence[Sequence[int]], features: Optional[np.ndarray] = None,
                    similarity: Optional[np.ndarray] = None) -> list[int]:
    """Member nearest (L2) to the clique's mean feature; ties to the smaller index.

    Features are L2-normalised first (the similarity is cosine; SSCD's already are unit
    vectors, so for them this is the reference rule unchanged). Without features: the member
    with the largest summed similarity to the other members, which is the same member.
    """
    reps = []
    for clique in cliques:
        members = np.asarray(sorted(clique))
        if len(members) <= 2 and features is None:
            reps.append(int(members[0]))
            continue
        if features is not None:
            f = np.asarray(features[members], np.float64)
            f /= np.linalg.norm(f, axis=1, keepdims=True)
            dist = np.linalg.norm(f - f.mean(axis=0), axis=1)
            reps.append(int(members[int(np.argmin(dist))]))
        elif similarity is not None:
            sub = np.asarray(similarity, np.float64)[np.ix_(members, members)]
            np.fill_diagonal(sub, 0.0)
            reps.append(int(members[int(np.argmax(sub.sum(axis=1)))]))
        else:
            raise InputError("representatives need features or a similarity matrix")
    return reps


SCHEDULES = ("chance", "reference")
DEFAULT_SCHEDULE = "chance"
# Grid steps over which the number of significant cliques must stay the same.
STABLE_STEPS = 3


def chance_clique_size(n: int, edges: int) -> int:
    """The largest s with C(n, s) p^(s(s-1)/2) >= 1 for p = edges / C(n, 2): the clique size a
    random graph of this edge density reaches by chance (at least 1)."""
    pairs = n * (n - 1) / 2
    if edges <= 0 or n < 2:
        return 1
    if edges >= pairs:
        return n
    log_p = math.log(edges / pairs)
    s = 1
    # log C(n, s+1) + (s+1) s / 2 log p is concave in s: the first negative value ends it.
    while s < n and (math.lgamma(n + 1) - math.lgamma(s + 2) - math.lgamma(n - s)
                     + (s + 1) * s / 2 * log_p) >= 0:
        s += 1
    return s


@dataclasses.dataclass
class ClusterResult:
    threshold: float
    level: int
    cliques: list[list[int]]
    representatives: list[int]
    skipped_thresholds: list[float]
    exact: bool
    similarity_s: float = 0.0
    cliques_s: float = 0.0
    schedule: Optional[str] = None  # the rule that chose the threshold (None: a fixed one)
    chance_size: Optional[int] = None  # s_k of the final threshold (chance schedule)


def _check_common(n: int, num_train: int, select: str, schedule: str = DEFAULT_SCHEDULE) -> None:
    if select not in ("reference", "topk"):
        raise InputError(f"--select must be 'reference' or 'topk', got {select!r}")
    if schedule not in SCHEDULES:
        raise InputError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not isinstance(num_train, (int, np.integer)) or num_train < 1:
        raise InputError(f"--num_train must be a positive integer, got {num_train!r}")
    if num_train > n:
        raise InputError(
            f"--num_train={num_train} is larger than the number of images ({n}); "
            "generate more images or lower --num_train")


def _check_threshold(threshold: Optional[float]) -> None:
    if threshold is not None and not math.isfinite(threshold):
        raise InputError(f"--threshold must be a finite number, got {threshold}")


class _Thresholds:
    """The peels of the schedule's thresholds, each computed at most once (None: skipped as
    over a budget, logged and reported to ``progress``)."""

    def __init__(self, sg: SimilarityGraph, progress, **peel_options):
        self.sg, self.progress, self.options = sg, progress, peel_options
        self.graphs: dict = {}
        self.peels: dict = {}

    def graph(self, k: int):
        if k not in self.graphs:
            below = [j for j in self.graphs if j < k]
            self.graphs[k] = (self.graphs[max(below)] if below else self.sg.graph).at_least(k)
            for j in [j for j in self.graphs if j < k - STABLE_STEPS]:
                del self.graphs[j]  # memory: the schedule only moves up
        return self.graphs[k]

    def peel(self, k: int, *, min_size: int = 1, **extra):
        key = (k, min_size, tuple(sorted(extra.items())))
        if key in self.peels:
            return self.peels[key]
        thr = float(tau(k))
        res = None
        if k < self.sg.min_level:
            logging.info(
                "threshold %.2f: its graph has more edges than the edge budget; skipping "
                "it as the reference skips a threshold after its 30 s timeout", thr)
        else:
            graph = self.graph(k)
            try:
                res = peel_cliques(graph, min_size=min_size, on_budget="raise",
                                   **self.options, **extra)
            except BudgetExceeded:
                logging.info(
                    "threshold %.2f (%d edges): exact clique search exceeded the deterministic "
                    "work budget (subproblem %d / threshold %d units); skipping it as the "
                    "reference skips a threshold after its 30 s timeout", thr, graph.num_edges,
                    self.options["subproblem_budget"], self.options["threshold_budget"])
        self.peels[key] = res
        if self.progress is not None:
            self.progress(thr, None if res is None else len(res.cliques))
        return res


def _reference_schedule(thresholds: _Thresholds, start: int, num_train: int, max_cliques):
    """(k, peel, skipped): the first threshold with >= num_train cliques."""
    skipped = []
    for k in range(start, _MAX_LEVEL + 2):
        res = thresholds.peel(k, max_cliques=max_cliques, min_count=num_train)
        if res is None:
            skipped.append(k)
            continue
        logging.info("threshold %.2f (%d edges, %d work units): %s cliques", tau(k),
                     thresholds.graph(k).num_edges, res.work, len(res.cliques)
                     if res.complete or max_cliques else f"< {num_train}")
        if len(res.cliques) >= num_train:
            return k, res, skipped
    raise InputError("no threshold gives enough cliques")  # pragma: no cover - n >= num_train


def _chance_schedule(thresholds: _Thresholds, start: int):
    """(k, kept cliques, significant peel, chance size, skipped) or None: the first threshold
    whose groups of cliques larger than chance number the same (at least one) over
    STABLE_STEPS grid steps; failing that, the threshold with the most such groups."""
    n = thresholds.sg.n
    memo: dict = {}

    def significant(k):
        if k not in memo:
            size = n
            if k >= thresholds.sg.min_level:
                size = chance_clique_size(n, int(thresholds.graph(k).num_edges))
            res = thresholds.peel(k, min_size=size + 1)
            groups = None
            if res is not None:
                groups = thresholds.graph(k).joined_groups(res.cliques)
                logging.info("threshold %.2f (%d edges, %d work units): %d cliques larger "
                             "than chance (%d), in %d groups", tau(k),
                             thresholds.graph(k).num_edges, res.work, len(res.cliques), size,
                             len(groups))
            memo[k] = (res, size, groups)
        return memo[k]

    def count(k):
        groups = significant(k)[2]
        return None if groups is None else len(groups)

    def result(k):
        res, size, groups = memo[k]
        skipped = sorted(i for i, (r, _, _) in memo.items() if r is None and i < k)
        return k, [res.cliques[i] for i in groups], res, size, skipped

    # Each window [k, k + STABLE_STEPS) is checked from its top (the sparser, cheaper graphs)
    # down. Where it fails at j (no significant clique, or over budget), no window holding j
    # passes: the next starts at j + 1; where the counts of j - 1 and j differ, the next
    # starts at j. So the answer is the first k whose window passes, as a plain upward scan
    # would find it, and the dense thresholds below a failure are never searched.
    k = start
    while k <= _MAX_LEVEL:
        j = k + STABLE_STEPS - 1
        if not count(j):
            k = j + 1
            continue
        while j > k and count(j - 1) == count(j):
            j -= 1
        if j == k:
            return result(k)
        k = j
    # No window: the threshold with the most groups (the lower one on ties), over every
    # threshold from the start up (those the window scan jumped over are searched now).
    counts = {k: count(k) or 0 for k in range(start, _MAX_LEVEL + 1)}
    best = max(counts, key=lambda k: (counts[k], -k))
    if not counts[best]:
        return None
    logging.warning("no threshold's groups of cliques larger than chance persist over %d grid "
                    "steps; taking the threshold with the most groups, %.2f (%d)",
                    STABLE_STEPS, tau(best), counts[best])
    return result(best)


def cluster_graph(sg: SimilarityGraph, num_train: int, *, select: str = "reference",
                  threshold: Optional[float] = None, schedule: str = DEFAULT_SCHEDULE,
                  subproblem_budget: int = DEFAULT_SUBPROBLEM_BUDGET,
                  threshold_budget: int = DEFAULT_THRESHOLD_BUDGET,
                  progress=None) -> ClusterResult:
    """Run the threshold schedule, or peel the one graph that ``sg`` was built for with
    ``threshold`` (every clique: a fixed threshold does not use the chance rule)."""
    _check_common(sg.n, num_train, select, schedule)
    _check_threshold(threshold)
    budgets = dict(subproblem_budget=subproblem_budget, threshold_budget=threshold_budget)
    max_cliques = num_train if select == "topk" else None
    t0 = time.perf_counter()
    skipped, size = [], None
    if threshold is not None:
        res = peel_cliques(sg.graph, max_cliques=max_cliques, on_budget="greedy", **budgets)
        if not res.exact:
            logging.warning(
                "threshold %.4f: the exact clique search exceeded its work budget "
                "(subproblem %d, threshold %d units); some cliques were found greedily and "
                "may not be maximum", threshold, subproblem_budget, threshold_budget)
        final_k, final_thr = None, float(np.float32(threshold))
    else:
        thresholds = _Thresholds(sg, progress, **budgets)
        start = start_level(sg.samples)
        searchable = range(max(start, sg.min_level), _MAX_LEVEL + 1)
        logging.info(
            "bound by design: at most %d thresholds searched, %d edges in their graphs in all, "
            "%d work units each (%d in all)", len(searchable),
            sum(int(sg.edge_counts[k - _MIN_LEVEL]) for k in searchable), threshold_budget,
            len(searchable) * threshold_budget)
        found = _chance_schedule(thresholds, start) if schedule == "chance" else None
        if found is not None:
            final_k, kept, res, size, skipped = found
            if select == "topk" and len(kept) < num_train:
                # topk's contract is N0 guesses: the groups' cliques, then the next largest
                # cliques of the threshold's peel (those no larger than chance).
                full = thresholds.peel(final_k, max_cliques=num_train + len(res.cliques))
                kept = kept + full.cliques[len(res.cliques):]
                res = dataclasses.replace(full, exact=full.exact and res.exact)
            res = dataclasses.replace(res, cliques=kept)
        else:
            if schedule == "chance":
                logging.warning("no threshold has cliques larger than chance that persist over "
                                "%d grid steps; using the reference schedule", STABLE_STEPS)
            final_k, res, skipped = _reference_schedule(thresholds, start, num_train,
                                                         max_cliques)
        final_thr = float(tau(final_k))
    cliques_s = time.perf_counter() - t0
    cliques = res.cliques[:num_train] if select == "topk" else res.cliques
    reps = representatives(cliques, features=sg.features, similarity=sg.similarity)
    return ClusterResult(threshold=round(final_thr, 6), level=final_k, cliques=cliques,
                         representatives=reps,
                         skipped_thresholds=[round(float(tau(k)), 2) for k in skipped],
                         exact=res.exact, cliques_s=cliques_s,
                         schedule=None if threshold is not None else (
                             "chance" if size is not None else "reference"),
                         chance_size=size)


def cluster(*, num_train: int, features=None, similarity=None, select: str = "reference",
            threshold: Optional[float] = None, seed: int = 0,
            schedule: str = DEFAULT_SCHEDULE,
            subproblem_budget: int = DEFAULT_SUBPROBLEM_BUDGET,
            threshold_budget: int = DEFAULT_THRESHOLD_BUDGET,
            edge_budget: int = DEFAULT_EDGE_BUDGET, progress=None) -> ClusterResult:
    """Cluster N images given their features [N, D] or a similarity matrix [N, N]."""
    if (features is None) == (similarity is None):
        raise InputError("give exactly one of features or similarity")
    _check_threshold(threshold)
    t0 = time.perf_counter()
    if features is not None:
        features = _check_features(features)
    else:
        similarity = check_similarity(similarity)
    _check_common((features if features is not None else similarity).shape[0], num_train, select,
                  schedule)
    sg = similarity_graph(features=features, similarity=similarity, seed=seed,
                          edge_budget=edge_budget, threshold=threshold)
    sim_s = time.perf_counter() - t0
    res = cluster_graph(sg, num_train, select=select, threshold=threshold, schedule=schedule,
                        subproblem_budget=subproblem_budget, threshold_budget=threshold_budget,
                        progress=progress)
    res.similarity_s = sim_s
    return res
