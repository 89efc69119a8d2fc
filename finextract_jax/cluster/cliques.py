"""Exact maximum cliques and the peel (branch and bound, compiled kernels in ``mcq.py``).

No timeout. ``max clique = max over v of (best clique whose smallest member is v)``; the
subproblem of v lives on v's later live neighbours N+(v), whose induced sub-graph is read
out of the CSR graph. Comparing (size, then smaller v) across subproblems is exactly the
lexicographic tie-break, because a clique with a smaller first member is lexicographically
smaller. Each subproblem is solved in two steps (``mcq.solve``):
1. its clique number, by Tomita's MCQ (greedy colouring bounds, branching on the highest
   colours first, never on vertices whose colour cannot beat the incumbent), started from a
   greedy clique, with the candidates renumbered by decreasing degree when there are at most
   ``LOCAL_MAX`` of them (in index order above: renumbering a large set costs more than it
   saves) -- this is the expensive, proving part;
2. the lexicographically smallest clique of that size: take candidates in increasing index
   order whenever an MCQ decision ("is a clique of the remaining size still there?", a
   tight target that prunes hard) says yes, or the clique found so far says so.
The subproblems sit in a lazy priority queue keyed by an upper bound (1 + |N+(v)| at first,
then the bound a failed search proves) and are solved only on reaching the top, down to the
size of the best clique still available (anything smaller cannot be the next clique).
After a clique is removed, a solved subproblem whose clique does not meet it stays exact (its
graph only lost nodes: the same clique is still the lexicographically smallest maximum one),
so only the few that meet it are solved again. Isolated nodes never enter the queue. A
subproblem never leaves its connected component, so the search is per component by
construction; the queue and the budget stay global because which thresholds are over budget
depends on the order in which the work is done.

Work budget (deterministic, replaces the reference's 30 s timeout). Work is counted in
"units": one unit per vertex coloured, per colouring, per candidate a greedy clique scans, per
CSR entry read to build a subproblem, and SUBPROBLEM_UNITS per subproblem (about 10-50 ns
each on a 2-core CI machine; the count, not the clock, decides), so that a threshold's
search, overheads included, is bounded by its budget. One subproblem may use at most
``subproblem_budget`` units and one threshold at most ``threshold_budget`` units; and the
graph of one threshold may have at most ``edge_budget`` edges (building the graph is part
of what the reference's timeout covers; networkx needs minutes for 50M edges). In the
threshold schedule, a threshold that exceeds any of them is abandoned and the schedule moves
on to the next, as the reference does when its 30 s run out (logged, and recorded in
``skipped_thresholds``); this happens on the dense graphs of low thresholds, where the exact
partition is not computable in reasonable time by any method, and where a large group of
copies is a near-clique with a noisy fringe (docs/method.md §4). The edge budget is decided
from edge counts alone, without building or searching such a graph; with the default
(50M edges) it can only act when N > 10,000 (N (N - 1) / 2 < 50M below), so smaller runs
are decided by the search budgets alone. With a fixed threshold there is no next threshold
to go to: the over-budget subproblems are answered by a greedy clique instead (logged;
``exact`` is then False), and a graph over the edge budget is refused (InputError).
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Optional

import numpy as np

from finextract_jax.cluster import mcq
from finextract_jax.cluster.graph import Graph

DEFAULT_SUBPROBLEM_BUDGET = 200_000
# Subproblems with more candidates than this are proved in index order (no renumbering).
LOCAL_MAX = 1024
DEFAULT_THRESHOLD_BUDGET = 50_000_000
# Work charged per subproblem on top of its search: the Python side of one solve (heap,
# bounds, the kernel call) costs about as much as this many units.
SUBPROBLEM_UNITS = 500

class BudgetExceeded(Exception):
    """Raised inside the search when the deterministic work budget is used up."""


class _Work:
    __slots__ = ("used", "threshold_limit", "subproblem_limit", "sub_start")

    def __init__(self, subproblem_limit: int, threshold_limit: int):
        self.used = 0
        self.subproblem_limit = subproblem_limit
        self.threshold_limit = threshold_limit
        self.sub_start = 0

    def limit(self) -> int:
        return min(self.sub_start + self.subproblem_limit, self.threshold_limit)


def max_clique(graph: Graph, budget: int = 10**12) -> list[int]:
    """The lexicographically smallest maximum clique of the graph."""
    cliques = peel_cliques(graph, max_cliques=1, subproblem_budget=budget,
                           threshold_budget=budget)
    return cliques.cliques[0] if cliques.cliques else []


@dataclasses.dataclass
class PeelResult:
    cliques: list[list[int]]   # in peel order: larger first, then lexicographically smaller
    complete: bool             # False if stopped early (max_cliques or count bound)
    exact: bool                # False if a greedy fallback answered some subproblem
    work: int


def peel_cliques(graph: Graph, *, max_cliques: Optional[int] = None,
                 min_count: Optional[int] = None,
                 subproblem_budget: int = DEFAULT_SUBPROBLEM_BUDGET,
                 threshold_budget: int = DEFAULT_THRESHOLD_BUDGET,
                 on_budget: str = "raise", min_size: int = 1) -> PeelResult:
    """Peel maximum cliques off the graph until it is empty.

    max_cliques: stop after this many cliques (they are the largest ones).
    min_count: stop (complete=False) as soon as the count can no longer reach it.
    min_size: stop (complete=False) once no clique of this size is left: the cliques returned
      are then exactly the prefix of the full peel whose cliques have at least min_size
      members, and every subproblem is searched against that floor (a tighter cut-off).
    on_budget: "raise" (BudgetExceeded) or "greedy" (answer over-budget subproblems greedily).
    """
    work = _Work(subproblem_budget, threshold_budget)
    exact = True
    cliques: list[list[int]] = []
    # Isolated nodes are singletons; handled without the queue. With min_size > 2 only the
    # (min_size - 1)-core can hold the cliques sought (exact: the same cliques, same order).
    has_edges = np.diff(graph.indptr) > 0
    if min_size > 2:
        has_edges &= graph.core(min_size - 1)
        later = graph.later_degrees(has_edges)
    else:
        later = graph.later_degrees()
    isolated = np.flatnonzero(~has_edges).tolist() if min_size <= 1 else []
    heap = [(-(1 + int(later[v])), int(v), 0, None) for v in np.flatnonzero(has_edges)]
    heapq.heapify(heap)
    live = has_edges.copy()
    pos = np.full(graph.n, -1, np.int32)  # scratch of mcq.induced
    num_live = len(heap)
    SOLVED = 1
    solved: list = []   # (-size, v, version, members): exact cliques, for the lower bound
    version: dict = {}

    def _valid(entry) -> bool:
        _, u, ver, members = entry
        return version.get(u) == ver and live[members].all()

    def finished() -> bool:
        return max_cliques is not None and len(cliques) >= max_cliques

    while heap and not finished() and -heap[0][0] >= min_size:  # keys are upper bounds
        if (min_count is not None and len(cliques) + len(heap) + len(isolated) < min_count
                and len(cliques) + num_live + len(isolated) < min_count):
            # Even if every remaining node were a singleton the count stays below min_count.
            return PeelResult(cliques, False, exact, work.used)
        negb, v, state, payload = heapq.heappop(heap)
        if not live[v]:
            continue
        if state == SOLVED and live[payload[0]].all():
            members, found = payload
            cliques.append(found)
            live[members] = False
            num_live -= len(found)
            continue
        upper = -negb
        # Solve v exactly down to the best clique size still available (lower bound). A
        # smaller cut-off would only re-rank v; a larger one (e.g. the runner-up's bound)
        # makes vertices fail by one, again and again, as bounds decrease.
        while solved and not _valid(solved[0]):
            heapq.heappop(solved)
        lower = max(-solved[0][0] if solved else 1, min_size)
        m = int(np.count_nonzero(live[graph.indices[graph.upper[v]:graph.indptr[v + 1]]]))
        if m + 1 < lower:  # cannot reach the incumbent: the degree is a good enough bound
            heapq.heappush(heap, (-(m + 1), v, 0, None))
            continue
        work.sub_start = work.used
        idx, sub, scanned = mcq.induced(graph.indptr, graph.upper, graph.indices, live, v, pos)
        work.used += scanned + SUBPROBLEM_UNITS
        limit = work.limit()
        size, members, used = (mcq.solve(sub, lower, upper, work.used, limit, LOCAL_MAX)
                               if work.used <= limit else (0, None, -1))
        if used >= 0:
            work.used = used
            found = [v] + idx[members].tolist() if size >= lower else None
            bound = size
        else:
            work.used = limit + 1
            if on_budget != "greedy":
                raise BudgetExceeded
            exact = False
            if work.used > work.threshold_limit:
                work.threshold_limit = 10**18  # from now on: greedy everywhere
                work.subproblem_limit = 0
            found = [v] + idx[mcq.greedy_clique(sub)].tolist()
        if found is None:
            heapq.heappush(heap, (-bound, v, 0, None))
        else:
            members = np.asarray(found)
            heapq.heappush(heap, (-len(found), v, SOLVED, (members, found)))
            version[v] = version.get(v, 0) + 1
            heapq.heappush(solved, (-len(found), v, version[v], members))
    # Isolated nodes are the last cliques (size 1) in index order; merged in by the sort.
    cliques.extend([v] for v in isolated)
    complete = num_live == 0
    cliques.sort(key=lambda c: (-len(c), c))
    if max_cliques is not None:
        complete = complete and len(cliques) <= max_cliques
        cliques = cliques[:max_cliques]
    return PeelResult(cliques, complete, exact, work.used)
