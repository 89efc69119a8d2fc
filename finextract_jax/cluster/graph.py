"""The sparse threshold graph: every kept pair once, in CSR form with an int8 level per edge.

The kept pairs, with their level (the largest k with sim >= tau_k), form one CSR graph; the
graph of threshold k is its sub-graph of levels >= k. The cut-off is the lowest level whose
graph has at most ``edge_budget`` edges (found while streaming: a level whose running edge
count already exceeds the budget can never come back under it), so memory is
O(edge_budget), about 10 bytes an edge, whatever N is.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numba
import numpy as np

from finextract_jax.cluster.similarity import (
    COL_CHUNK, NUM_THRESHOLD_SAMPLES, ROW_BLOCK, THRESHOLD_QUANTILE, _MAX_LEVEL, _MIN_LEVEL,
    _TAU, _check_features, _tile_shape, check_similarity, feature_tiles, level_of, matrix_tiles,
    tau, tile_share)
from finextract_jax.errors import InputError

DEFAULT_EDGE_BUDGET = 50_000_000

@dataclasses.dataclass
class Graph:
    """Undirected graph in CSR form (rows sorted), with an int8 level per edge.

    ``indices[indptr[v]:indptr[v + 1]]`` are v's neighbours, ascending, and the later ones
    (> v) start at ``upper[v]``; ``levels`` holds the level of each of these edges (the
    largest k with sim >= tau(k)), so that the graph of every higher threshold is a filter
    away. The search only ever needs later neighbours, so ``upper`` saves it every lookup.
    """
    indptr: np.ndarray
    upper: np.ndarray
    indices: np.ndarray
    levels: np.ndarray

    @property
    def n(self) -> int:
        return self.indptr.shape[0] - 1

    @property
    def num_edges(self) -> int:
        return self.indices.shape[0] // 2

    @classmethod
    def from_pairs(cls, n: int, chunks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
                   ) -> "Graph":
        """Build from chunks of (i, j, level) with i < j, in row-major order overall (for a
        fixed i the j ascend, for a fixed j the i ascend), as the tiles produce them.

        A counting sort, chunk by chunk: first every pair fills its larger end's row (the
        smaller neighbours, ascending), then its smaller end's row (the larger ones), so the
        rows come out sorted with no global sort and no temporary of the graph's size."""
        deg = np.zeros(n, np.int64)
        for i, j, _ in chunks:
            deg += np.bincount(i, minlength=n) + np.bincount(j, minlength=n)
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(deg, out=indptr[1:])
        indices = np.empty(int(indptr[-1]), np.int32)
        levels = np.empty(int(indptr[-1]), np.int8)
        fill = indptr[:-1].copy()
        upper = None
        for own, other in ((1, 0), (0, 1)):
            for chunk in chunks:
                _fill_rows(chunk[own], chunk[other], chunk[2], fill, indices, levels)
            if upper is None:
                upper = fill.copy()  # the smaller neighbours are in: later ones start here
        return cls(indptr, upper, indices, levels)

    @classmethod
    def from_edges(cls, n: int, edges, level: int = 0) -> "Graph":
        """From (i, j) pairs in any order (duplicates and self-loops dropped); for tests."""
        e = np.asarray(list(edges), np.int64).reshape(-1, 2)
        e = np.unique(np.sort(e[e[:, 0] != e[:, 1]], axis=1), axis=0)
        return cls.from_pairs(n, [(e[:, 0].astype(np.int32), e[:, 1].astype(np.int32),
                                   np.full(e.shape[0], level, np.int8))])

    def at_least(self, k: int) -> "Graph":
        """The sub-graph of the edges with level >= k (self if that is all of them)."""
        keep = self.levels >= k
        if keep.all():
            return self
        bounds = np.empty(2 * self.n + 1, np.int64)  # indptr[0], upper[0], indptr[1], ...
        bounds[0::2], bounds[1::2] = self.indptr, self.upper
        kept = _count_before(keep, bounds)
        return Graph(kept[0::2], kept[1::2], self.indices[keep], self.levels[keep])

    def later_degrees(self, nodes: Optional[np.ndarray] = None) -> np.ndarray:
        """|N+(v)| = the number of neighbours after v, for every v (among ``nodes``, a bool
        mask, when given)."""
        if nodes is None:
            return self.indptr[1:] - self.upper
        rows = np.repeat(np.arange(self.n, dtype=np.int32), self.indptr[1:] - self.upper)
        cols = self.indices[_upper_positions(self)]
        return np.bincount(rows[nodes[cols]], minlength=self.n) * nodes

    def core(self, min_degree: int) -> np.ndarray:
        """Bool mask of the ``min_degree``-core: the largest sub-graph in which every node has
        at least ``min_degree`` neighbours (nodes of fewer are removed until none is left).
        Every clique of more than ``min_degree`` nodes lies inside it. O(edges), compiled."""
        return _core(self.indptr, self.indices, min_degree)

    def joined_groups(self, cliques, z: float = 5.0, min_density: float = 0.25) -> list[int]:
        """Group the cliques that more edges join than chance would: cliques a and b are in
        one group when the edges between them number at least ``min_density`` |a||b| and
        more than z standard deviations above the count expected at this graph's edge
        density p, L > p |a||b| + z sqrt(p (1 - p) |a||b|) (transitively: through a chain of
        such cliques). The index of each group's first clique, ascending. O(edges)."""
        count = len(cliques)
        label = np.full(self.n, -1, np.int64)
        sizes = np.zeros(count, np.int64)
        for i, members in enumerate(cliques):
            label[np.asarray(members, np.int64)] = i
            sizes[i] = len(members)
        pairs = _label_pairs(self.indptr, self.upper, self.indices, label)
        keys, links = np.unique(pairs, return_counts=True)
        a, b = np.divmod(keys, max(count, 1))
        p = self.num_edges / max(1, self.n * (self.n - 1) // 2)
        ab = sizes[a] * sizes[b]
        joined = (links > p * ab + z * np.sqrt(p * (1 - p) * ab)) & (links >= min_density * ab)
        return _first_of_groups(a[joined], b[joined], count).tolist()

@numba.njit(cache=True, nogil=True)
def _fill_rows(rows, nbrs, lv, fill, indices, levels):
    """Append each pair, in order, to its row: a stable counting sort's placement."""
    for t in range(rows.shape[0]):
        p = fill[rows[t]]
        indices[p] = nbrs[t]
        levels[p] = lv[t]
        fill[rows[t]] = p + 1


@numba.njit(cache=True, nogil=True)
def _tile_edges(tile, r0, c0, cut, tau_table, off):
    """(i, j, level) of the tile's pairs j > i with sim >= cut, row-major; the level as
    ``similarity.level_of`` computes it (the float64 floor, then the float32 grid's
    corrections). One pass to count, one to fill."""
    rows, cols = tile.shape
    count = 0
    for a in range(rows):
        for b in range(max(0, r0 + a + 1 - c0), cols):
            if tile[a, b] >= cut:
                count += 1
    ii = np.empty(count, np.int32)
    jj = np.empty(count, np.int32)
    lv = np.empty(count, np.int8)
    count = 0
    for a in range(rows):
        for b in range(max(0, r0 + a + 1 - c0), cols):
            x = tile[a, b]
            if x >= cut:
                k = min(max(np.int64(np.floor(np.float64(x) * 100)), _MIN_LEVEL), _MAX_LEVEL)
                if x >= tau_table[k + 1 + off]:
                    k += 1
                if x < tau_table[k + off]:
                    k -= 1
                ii[count] = a
                jj[count] = b
                lv[count] = min(max(k, _MIN_LEVEL), _MAX_LEVEL)
                count += 1
    return ii, jj, lv


@numba.njit(cache=True, nogil=True)
def _core(indptr, indices, min_degree):
    n = indptr.shape[0] - 1
    deg = np.empty(n, np.int64)
    alive = np.ones(n, np.bool_)
    stack = np.empty(n, np.int64)
    top = 0
    for v in range(n):
        deg[v] = indptr[v + 1] - indptr[v]
        if deg[v] < min_degree:
            alive[v] = False
            stack[top] = v
            top += 1
    while top > 0:
        top -= 1
        v = stack[top]
        for p in range(indptr[v], indptr[v + 1]):
            u = indices[p]
            if alive[u]:
                deg[u] -= 1
                if deg[u] < min_degree:
                    alive[u] = False
                    stack[top] = u
                    top += 1
    return alive


@numba.njit(cache=True, nogil=True)
def _root(parent, a):
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


@numba.njit(cache=True, nogil=True)
def _label_pairs(indptr, upper, indices, label):
    """a * count + b for every edge (u < v) joining label a = label[u] to b = label[v] != a,
    with a < b; count = label.max() + 1."""
    count = label.max() + 1
    total = 0
    for u in range(indptr.shape[0] - 1):
        if label[u] >= 0:
            for p in range(upper[u], indptr[u + 1]):
                lv = label[indices[p]]
                if lv >= 0 and lv != label[u]:
                    total += 1
    out = np.empty(total, np.int64)
    total = 0
    for u in range(indptr.shape[0] - 1):
        lu = label[u]
        if lu >= 0:
            for p in range(upper[u], indptr[u + 1]):
                lv = label[indices[p]]
                if lv >= 0 and lv != lu:
                    out[total] = min(lu, lv) * count + max(lu, lv)
                    total += 1
    return out


@numba.njit(cache=True, nogil=True)
def _first_of_groups(a, b, count):
    """Union-find over the joined pairs (a[i], b[i]); each group's root is its smallest
    index; the roots, ascending."""
    parent = np.arange(count)
    for i in range(a.shape[0]):
        ra, rb = _root(parent, a[i]), _root(parent, b[i])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    keep = np.zeros(count, np.bool_)
    for i in range(count):
        keep[_root(parent, i)] = True
    return np.flatnonzero(keep)


def _upper_positions(graph: "Graph") -> np.ndarray:
    """Positions in ``indices`` of every node's later neighbours, row by row."""
    lens = graph.indptr[1:] - graph.upper
    ends = np.cumsum(lens)
    return np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(graph.upper - ends + lens,
                                                                     lens)


def _count_before(mask: np.ndarray, positions: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """For ascending positions p: the number of True entries of mask[:p]. A running sum in
    chunks, so that no temporary is as long as the mask."""
    out = np.empty(positions.shape[0], np.int64)
    total, lo = 0, 0
    for a in range(0, mask.shape[0] + 1, chunk):
        b = min(mask.shape[0], a + chunk)
        cs = np.zeros(b - a + 1, np.int64)
        np.cumsum(mask[a:b], out=cs[1:])
        hi = int(np.searchsorted(positions, b, "right")) if b < mask.shape[0] else len(positions)
        out[lo:hi] = total + cs[positions[lo:hi] - a]
        total += int(cs[-1])
        lo = hi
    return out


@dataclasses.dataclass
class SimilarityGraph:
    """The thresholds' graphs, as far as they can be searched, plus what the schedule needs.

    ``graph`` holds every pair with level >= ``min_level`` (with a fixed threshold t: every
    pair with sim >= float32(t)); each level below ``min_level`` has more than the edge
    budget of edges (so ``min_level`` may be _MAX_LEVEL + 1: nothing searchable).
    ``edge_counts[k - _MIN_LEVEL]`` = the number of edges of level >= k, for k >= min_level.
    ``samples`` = the seeded 1000 entries for the start threshold. ``similarity`` is kept
    only when the input was a matrix (representatives without features).
    """
    graph: Graph
    min_level: int
    edge_counts: np.ndarray
    samples: np.ndarray
    features: Optional[np.ndarray] = None
    similarity: Optional[np.ndarray] = None

    @property
    def n(self) -> int:
        return self.graph.n


def _sample_indices(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    total = n * n
    return np.sort(rng.choice(total, size=min(NUM_THRESHOLD_SAMPLES, total), replace=False))


def _edges_at_or_above(per_level: np.ndarray) -> np.ndarray:
    """[k - _MIN_LEVEL] -> the number of edges of level >= k, for k up to _MAX_LEVEL + 1."""
    return np.append(np.cumsum(per_level[::-1])[::-1], 0)


def _at_least(chunks: list, level: int) -> list:
    """The (i, j, level) chunks without their pairs below ``level``, in the same order."""
    out = []
    for i, j, lv in chunks:
        keep = lv >= level
        out.append((i[keep], j[keep], lv[keep]))
    return out


class _EdgeCollector:
    """Takes the pairs at or above a cut-off out of the tiles, and the seeded samples.

    ``budget`` edges at most are kept. With ``adaptive`` the cut-off rises instead: after
    each tile it moves to the lowest level whose running edge count is within the budget (a
    level whose running count is over it will be over at the end too); the kept chunks are
    compacted when they hold 25% more than the budget. Without it (a fixed threshold) going
    over the budget is an InputError.
    """

    def __init__(self, n: int, seed: int, budget: int, cut_value=-np.inf, adaptive=True):
        self.n, self.budget, self.adaptive = n, budget, adaptive
        self.cut_level, self.cut_value = _MIN_LEVEL, np.float32(cut_value)
        self.counts = np.zeros(_MAX_LEVEL - _MIN_LEVEL + 1, np.int64)  # kept edges per level
        self.kept = 0
        self.chunks: list = []
        flat = _sample_indices(n, seed)
        r, c = np.divmod(flat, n)
        self.sample_a, self.sample_b = np.minimum(r, c), np.maximum(r, c)
        self.samples = np.zeros(flat.shape[0], np.float32)  # diagonal entries stay 0

    def add(self, r0: int, c0: int, tile: np.ndarray) -> None:
        rows, cols = tile.shape
        a, b = self.sample_a, self.sample_b
        hit = (a >= r0) & (a < r0 + rows) & (b >= c0) & (b < c0 + cols) & (a < b)
        self.samples[hit] = tile[a[hit] - r0, b[hit] - c0]
        ii, jj, lv = _tile_edges(np.asarray(tile, np.float32), r0, c0,
                                 np.float32(self.cut_value), _TAU, -(_MIN_LEVEL - 1))
        self.counts += np.bincount(lv.astype(np.int64) - _MIN_LEVEL,
                                   minlength=self.counts.shape[0])
        self.kept += ii.shape[0]
        self.chunks.append(((ii + r0).astype(np.int32), (jj + c0).astype(np.int32), lv))
        if self.kept > self.budget:
            if not self.adaptive:
                raise _over_budget(self.budget)
            self._raise_cut()

    def _raise_cut(self) -> None:
        above = _edges_at_or_above(self.counts)
        new = int(np.argmax(above <= self.budget)) + _MIN_LEVEL  # the last entry is 0
        self.counts[: new - _MIN_LEVEL] = 0
        self.cut_level, self.cut_value = new, max(self.cut_value, tau(new))
        self.kept = int(above[new - _MIN_LEVEL])
        if sum(c[0].shape[0] for c in self.chunks) > 1.25 * self.budget:
            self.chunks = _at_least(self.chunks, new)

    def finish(self, features=None, similarity=None) -> SimilarityGraph:
        chunks, self.chunks = _at_least(self.chunks, self.cut_level), []
        return SimilarityGraph(graph=Graph.from_pairs(self.n, chunks), min_level=self.cut_level,
                               edge_counts=_edges_at_or_above(self.counts),
                               samples=self.samples, features=features, similarity=similarity)


def similarity_graph(*, features=None, similarity=None, seed: int = 0,
                     edge_budget: int = DEFAULT_EDGE_BUDGET,
                     threshold: Optional[float] = None,
                     row_block: int = ROW_BLOCK, col_chunk: int = COL_CHUNK) -> SimilarityGraph:
    """One pass over the similarity (features [N, D] or a matrix [N, N]): the searchable
    thresholds' graph (or, with ``threshold``, the graph of sim >= float32(threshold))."""
    if (features is None) == (similarity is None):
        raise InputError("give exactly one of features or similarity")
    if features is not None:
        feats = _check_features(features)
        n, tiles, sim = feats.shape[0], feature_tiles(feats, row_block, col_chunk), None
    else:
        sim, feats = check_similarity(similarity), None
        n, tiles = sim.shape[0], matrix_tiles(sim, row_block, col_chunk)
    share = tile_share() if features is not None else (0, 1)
    # A share of a multi-process run checks the budget of a fixed threshold only on the
    # merged edges (every process must reach the merge).
    local_budget = edge_budget if threshold is None or share[1] == 1 else np.iinfo(np.int64).max
    collector = _EdgeCollector(n, seed, local_budget, adaptive=threshold is None,
                               cut_value=-np.inf if threshold is None else threshold)
    if share[1] > 1:
        tiles = feature_tiles(feats, row_block, col_chunk, share=share)
    for r0, c0, tile in tiles:
        collector.add(r0, c0, tile)
    if share[1] > 1:
        _merge_processes(collector, edge_budget, _tile_shape(n, row_block, col_chunk))
    return collector.finish(features=feats, similarity=sim)


def _merge_processes(collector: _EdgeCollector, budget: int, tile_shape: tuple[int, int]
                     ) -> None:
    """Every process's share of the tiles -> the edges of all of them, on every process.

    The cut-off of the merged graph is at least every process's own (a level over the budget
    in one share is over it in the sum); the per-level counts above the highest of them are
    summed, the merged cut-off taken from the sums, and the edges at or above it gathered and
    put back in row-major tile order, so that every process builds the same graph as one
    process computing all tiles. The samples are filled in by exactly one process each."""
    from jax.experimental import multihost_utils

    def gather(x):
        return np.asarray(multihost_utils.process_allgather(np.asarray(x)))

    cut = int(gather(np.array([collector.cut_level])).max())
    collector.counts[: cut - _MIN_LEVEL] = 0
    collector.counts = gather(collector.counts).sum(axis=0)
    above = _edges_at_or_above(collector.counts)
    if collector.adaptive:
        cut = max(cut, int(np.argmax(above <= budget)) + _MIN_LEVEL)
        collector.counts[: cut - _MIN_LEVEL] = 0
    collector.cut_level = cut
    chunks = _at_least(collector.chunks, cut)
    parts = [np.concatenate([c[a] for c in chunks]) if chunks else np.zeros(0, dt)
             for a, dt in enumerate((np.int32, np.int32, np.int8))]
    sizes = gather(np.array([parts[0].shape[0]]))[:, 0]
    if not collector.adaptive and sizes.sum() > budget:
        raise _over_budget(budget)  # on every process alike
    width = max(1, int(sizes.max()))
    merged = []
    for part in parts:
        padded = np.zeros(width, part.dtype)
        padded[: part.shape[0]] = part
        every = gather(padded)
        merged.append(np.concatenate([every[p, :size] for p, size in enumerate(sizes)]))
    rb, cc = tile_shape
    key = (merged[0] // rb).astype(np.int64) * (-(-collector.n // cc)) + merged[1] // cc
    order = np.argsort(key, kind="stable")
    collector.chunks = [tuple(m[order] for m in merged)]
    collector.samples = gather(collector.samples).sum(axis=0, dtype=np.float32)


def _over_budget(budget: int) -> InputError:
    return InputError(
        f"the graph at this threshold has more than {budget:,} edges (the edge budget, "
        f"~{10 * budget / 2**30:.1f} GiB); use a higher --threshold or raise --edge_budget")


def start_level(samples) -> int:
    """Largest k with tau(k) <= the 25th percentile of the sampled entries."""
    q = np.float32(np.quantile(np.asarray(samples, np.float32), THRESHOLD_QUANTILE))
    return int(level_of(np.array([q]))[0])
