"""Which generated images are copies of training images: similarity graph, clique peeling.

docs/method.md §4, with the reference's wall-clock timeout replaced by an exact, deterministic
search. Everything below is a pure function of its inputs (no clock, no machine speed).

Semantics (the reference's, made exact):

* Similarity = cosine, diagonal set to 0. Thresholds live on the 0.01 grid:
  ``tau_k = float32(k / 100)`` for integer k, and i~j is an edge iff
  ``float32(sim_ij) >= tau_k`` (i != j). Working with the integer k avoids the reference's
  float drift from repeated ``+= 0.01``. A similarity matrix given as input must be
  symmetric up to 1e-4; it is used as ``(S + S^T) / 2`` so that the graph is undirected.
* Start: ``rng = np.random.default_rng(seed)`` draws 1000 distinct flat indices of the N x N
  matrix (diagonal included, as the reference samples the flattened matrix whose diagonal is
  0); ``q`` = their 25th percentile (linear interpolation, like ``torch.quantile``); the start
  is the largest k with ``tau_k <= q`` ("floored to 0.01").
* Peel: repeatedly take a maximum clique of the remaining graph and remove it, until no node
  is left (isolated nodes are cliques of size 1). Tie-break, so a run is reproducible: among
  the maximum cliques the one whose sorted index list is lexicographically smallest. (The
  reference takes whichever ``networkx.find_cliques`` yields first; that order depends on
  networkx internals.) With this rule the peel order equals the order
  "larger first, then lexicographically smaller"; that is the order of ``cliques`` in the
  output.
* Schedule: k = start, start+1, ... until the number of cliques is >= N0.
* Representative of a clique: the member nearest (L2) to the mean of the members' features
  (L2-normalised, as the similarity is cosine; SSCD's already are unit vectors); ties go to
  the smaller index. For unit vectors the member nearest to the mean is the one with the
  largest summed similarity to the other members, which is what is used when only a
  similarity matrix is given, so both inputs pick the same member.
* ``select="reference"`` keeps every clique of the final threshold; ``"topk"`` the N0 largest
  (the first N0 peeled).

Scale (N = 100,000 on one host). Nothing of size N x N is ever held. The similarity is
computed once, in JAX, tile by tile over the upper triangle (each pair once, so the graph is
symmetric by construction); a tile is dropped as soon as the pairs at or above the current
cut-off are taken out of it. The kept pairs, with their int8 level (the largest k with
sim >= tau_k), form one CSR graph; the graph of threshold k is its sub-graph of levels >= k.
The cut-off is the lowest level whose graph has at most ``edge_budget`` edges (found while
streaming: a level whose running edge count already exceeds the budget can never come back
under it), so memory is O(edge_budget), about 10 bytes an edge, whatever N is.

Maximum clique search (no timeout). Branch and bound over Python-int bitsets of small local
graphs. ``max clique = max over v of (best clique whose smallest member is v)``; the
subproblem of v lives on v's later live neighbours N+(v), whose induced sub-graph is read
out of the CSR graph. Comparing (size, then smaller v) across subproblems is exactly the
lexicographic tie-break, because a clique with a smaller first member is lexicographically
smaller. Each subproblem is solved in two steps:
1. its clique number, by Tomita's MCQ (greedy colouring bounds, branching on the highest
   colours first, never on vertices whose colour cannot beat the incumbent), with the
   candidates renumbered by decreasing degree when there are at most ``LOCAL_MAX`` of them
   (in index order above: renumbering a large set costs more than it saves) -- this is the
   expensive, proving part;
2. the lexicographically smallest clique of that size: take candidates in increasing index
   order whenever an MCQ decision ("is a clique of the remaining size still there?", a
   tight target that prunes hard) says yes.
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
"units": one unit per vertex coloured and per search node (about 0.3-1 microsecond each on
a 2-core CI machine; the count, not the clock, decides). One subproblem may use at most
``subproblem_budget`` units and one threshold at most ``threshold_budget`` units; and the
graph of one threshold may have at most ``edge_budget`` edges (building the graph is part
of what the reference's timeout covers; networkx needs minutes for 50M edges). In the
threshold schedule, a threshold that exceeds any of them is abandoned and the schedule moves
on to the next, as the reference does when its 30 s run out (logged, and recorded in
``skipped_thresholds``); this happens on the dense graphs of low thresholds, where the exact
partition is not computable in reasonable time by any method. The edge budget is decided
from edge counts alone, without building or searching such a graph; with the default
(50M edges) it can only act when N > 10,000 (N (N - 1) / 2 < 50M below), so smaller runs
are decided by the search budgets alone. With a fixed threshold there is no next threshold
to go to: the over-budget subproblems are answered by a greedy clique instead (logged;
``exact`` is then False), and a graph over the edge budget is refused (InputError).
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import time
from typing import Iterator, Optional, Sequence

import numpy as np
from absl import logging

from finextract_jax.errors import InputError

NUM_THRESHOLD_SAMPLES = 1000
THRESHOLD_QUANTILE = 0.25
DEFAULT_SUBPROBLEM_BUDGET = 200_000
# Subproblems with more candidates than this are proved in index order (no renumbering).
LOCAL_MAX = 1024
DEFAULT_THRESHOLD_BUDGET = 50_000_000
DEFAULT_EDGE_BUDGET = 50_000_000
# Similarity tiles: rows x columns. Up to COL_CHUNK images a tile spans all columns, so the
# similarity is computed exactly as by one [rows, N] product.
ROW_BLOCK = 512
COL_CHUNK = 8192
# Levels are int8: -101 .. 100 for sims in [-1.01, 1].
_MIN_LEVEL, _MAX_LEVEL = -101, 100
_TAU = np.array([np.float32(k / 100) for k in range(_MIN_LEVEL - 1, _MAX_LEVEL + 3)], np.float32)


def tau(k: int) -> np.float32:
    """The threshold of grid level k: float32(k / 100)."""
    return np.float32(k / 100)


def level_of(values) -> np.ndarray:
    """For each similarity s, the largest integer k with float32(s) >= tau(k), as int."""
    s = np.asarray(values, np.float32)
    k = np.clip(np.floor(s.astype(np.float64) * 100), _MIN_LEVEL, _MAX_LEVEL).astype(np.int64)
    off = -(_MIN_LEVEL - 1)
    k = k + (s >= _TAU[k + 1 + off])
    k = k - (s < _TAU[k + off])
    return np.clip(k, _MIN_LEVEL, _MAX_LEVEL)


# --------------------------------------------------------------------------------------------
# Inputs.


def _check_features(features) -> np.ndarray:
    feats = np.asarray(features)
    if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] == 0:
        raise InputError(f"features must be a non-empty [N, D] array, got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.number):
        raise InputError(f"features must be numeric, got dtype {feats.dtype}")
    feats = feats.astype(np.float32, copy=False)
    if not np.all(np.isfinite(feats)):
        raise InputError("features contain NaN or Inf; recompute them (a broken image?)")
    norms = np.linalg.norm(feats, axis=1)
    if np.any(norms == 0):
        bad = np.flatnonzero(norms == 0)[:5].tolist()
        raise InputError(f"features rows {bad} are all zero; cosine similarity is undefined")
    return feats


def check_similarity(similarity, atol: float = 1e-4) -> np.ndarray:
    """Validate an [N, N] similarity matrix; return (S + S^T) / 2 as float32, diagonal 0."""
    sim = np.asarray(similarity)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise InputError(f"the similarity matrix must be square [N, N], got shape {sim.shape}")
    if sim.shape[0] == 0:
        raise InputError("the similarity matrix is empty")
    if not np.issubdtype(sim.dtype, np.number):
        raise InputError(f"the similarity matrix must be numeric, got dtype {sim.dtype}")
    sim = sim.astype(np.float32)
    if not np.all(np.isfinite(sim)):
        raise InputError("the similarity matrix contains NaN or Inf")
    asym = float(np.max(np.abs(sim - sim.T)))
    if asym > atol:
        raise InputError(
            f"the similarity matrix is not symmetric (max |S - S^T| = {asym:.3g}); "
            "pass a symmetric matrix, e.g. (S + S.T) / 2")
    sim = (sim + sim.T) / np.float32(2)  # exact (a copy) when S is already symmetric
    np.fill_diagonal(sim, 0.0)
    return sim


# --------------------------------------------------------------------------------------------
# Similarity, tile by tile over the upper triangle.


_SIM_BLOCK_FN = None


def _sim_block_fn():
    """One jitted [B, D] x [C, D]^T matmul, shared by every caller (compiled per shape)."""
    global _SIM_BLOCK_FN
    if _SIM_BLOCK_FN is None:
        import jax
        import jax.numpy as jnp

        def block(rows, cols):
            return jnp.dot(rows, cols.T, precision=jax.lax.Precision.HIGHEST)

        _SIM_BLOCK_FN = jax.jit(block)
    return _SIM_BLOCK_FN


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tile_grid(n: int, row_block: int, col_chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) of the tiles that hold the pairs i < j, row block by row block.

    Column chunks sit on a fixed grid, so that every tile has one shape (one compilation)."""
    for r0 in range(0, n, row_block):
        r1 = min(n, r0 + row_block)
        for c0 in range(r0 // col_chunk * col_chunk, n, col_chunk):
            c1 = min(n, c0 + col_chunk)
            if c1 - 1 > r0:
                yield r0, r1, c0, c1


def _tile_shape(n: int, row_block: int, col_chunk: int) -> tuple[int, int]:
    """Padded tile shape. Up to col_chunk images this is the [rows, N] block of a plain
    row-block product (rows padded to 8, columns to 256): the same matmul, the same floats."""
    return max(1, min(row_block, _round_up(n, 8))), min(col_chunk, _round_up(n, 256))


def feature_tiles(features, row_block: int = ROW_BLOCK, col_chunk: int = COL_CHUNK
                  ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(r0, c0, S[r0:r1, c0:c1])`` of the cosine similarity, upper-triangle tiles.

    Computed in JAX, one padded tile at a time (the next one is dispatched before the
    current one is handed out, so the matmul overlaps the caller's work). Entries on and
    below the diagonal are whatever the product gives; callers use only j > i.
    """
    import jax.numpy as jnp

    feats = _check_features(features)
    n, d = feats.shape
    normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    rb, cc = _tile_shape(n, row_block, col_chunk)

    def padded(a, b, rows):
        out = np.zeros((rows, d), np.float32)
        out[: b - a] = normed[a:b]
        return jnp.asarray(out)

    cols = {c0: padded(c0, min(n, c0 + cc), cc) for c0 in range(0, n, cc)}
    fn = _sim_block_fn()

    def dispatched():
        rows_at, rows = -1, None
        for r0, r1, c0, c1 in _tile_grid(n, rb, cc):
            if rows_at != r0:
                rows_at, rows = r0, padded(r0, r1, rb)
            yield r0, c0, fn(rows, cols[c0]), r1 - r0, c1 - c0

    tiles = dispatched()
    ahead = next(tiles, None)
    while ahead is not None:
        (r0, c0, tile, rows, width), ahead = ahead, next(tiles, None)
        yield r0, c0, np.asarray(tile)[:rows, :width]


def matrix_tiles(similarity: np.ndarray, row_block: int = ROW_BLOCK,
                 col_chunk: int = COL_CHUNK) -> Iterator[tuple[int, int, np.ndarray]]:
    """The same tiles, read from a (checked) similarity matrix."""
    n = similarity.shape[0]
    for r0, r1, c0, c1 in _tile_grid(n, row_block, col_chunk):
        yield r0, c0, similarity[r0:r1, c0:c1]


def cosine_similarity(features, block_rows: int = ROW_BLOCK) -> np.ndarray:
    """The full [N, N] cosine similarity (diagonal 0), from the same tiles; for small N."""
    n = _check_features(features).shape[0]
    out = np.zeros((n, n), np.float32)
    for r0, c0, tile in feature_tiles(features, row_block=block_rows):
        out[r0:r0 + tile.shape[0], c0:c0 + tile.shape[1]] = tile
    out = np.triu(out, 1)
    return out + out.T


# --------------------------------------------------------------------------------------------
# The sparse threshold graph.


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
    _pos: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, compare=False)

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
                rows, nbrs, lv = chunk[own], chunk[other], chunk[2]
                order = np.argsort(rows, kind="stable")
                rows_sorted = rows[order]
                rank = np.arange(rows.shape[0]) - np.searchsorted(rows_sorted, rows_sorted)
                pos = fill[rows_sorted] + rank
                indices[pos] = nbrs[order]
                levels[pos] = lv[order]
                fill += np.bincount(rows, minlength=n)
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

    def later_degrees(self) -> np.ndarray:
        """|N+(v)| = the number of neighbours after v, for every v."""
        return self.indptr[1:] - self.upper

    def later_live(self, v: int, live: np.ndarray) -> np.ndarray:
        """N+(v) among the live nodes, ascending."""
        row = self.indices[self.upper[v]:self.indptr[v + 1]]
        return row[live[row]]

    def induced(self, idx: np.ndarray, max_entries: int = 1 << 22) -> np.ndarray:
        """Boolean adjacency matrix of the sub-graph induced by ``idx`` (ascending).

        Gathers the later halves of the rows of ``idx`` (about ``max_entries`` at a time),
        keeps the entries inside ``idx`` through a position map (a scratch array of the
        graph, reset before returning) and sets both (i, j) and (j, i)."""
        if self._pos is None:
            self._pos = np.full(self.n, -1, np.int32)
        m = idx.shape[0]
        sub = np.zeros((m, m), bool)
        starts = self.upper[idx]
        lens = self.indptr[idx + 1] - starts
        ends = np.cumsum(lens)
        self._pos[idx] = np.arange(m, dtype=np.int32)
        r0 = 0
        while r0 < m:
            base = ends[r0] - lens[r0]
            r1 = max(r0 + 1, int(np.searchsorted(ends, base + max_entries, "right")))
            n_r = lens[r0:r1]
            flat = np.arange(ends[r1 - 1] - base) + np.repeat(starts[r0:r1] - ends[r0:r1] + n_r
                                                              + base, n_r)
            cols = self._pos[self.indices[flat]]
            keep = cols >= 0
            rows, cols = np.repeat(np.arange(r0, r1), n_r)[keep], cols[keep]
            sub[rows, cols] = True
            sub[cols, rows] = True
            r0 = r1
        self._pos[idx] = -1
        return sub


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
        sel = tile >= self.cut_value
        if c0 < r0 + rows:  # the tile reaches the diagonal: keep j > i only
            sel &= (c0 + np.arange(cols))[None, :] > (r0 + np.arange(rows))[:, None]
        ii, jj = np.nonzero(sel)
        lv = level_of(tile[ii, jj]).astype(np.int8)
        self.counts += np.bincount(lv.astype(np.int64) - _MIN_LEVEL,
                                   minlength=self.counts.shape[0])
        self.kept += ii.shape[0]
        self.chunks.append(((ii + r0).astype(np.int32), (jj + c0).astype(np.int32), lv))
        if self.kept > self.budget:
            if not self.adaptive:
                raise InputError(
                    f"the graph at this threshold has more than {self.budget:,} edges (the edge "
                    f"budget, ~{10 * self.budget / 2**30:.1f} GiB); use a higher --threshold or "
                    "raise --edge_budget")
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
    if threshold is None:
        collector = _EdgeCollector(n, seed, edge_budget)
    else:
        collector = _EdgeCollector(n, seed, edge_budget, cut_value=threshold, adaptive=False)
    for r0, c0, tile in tiles:
        collector.add(r0, c0, tile)
    return collector.finish(features=feats, similarity=sim)


def start_level(samples) -> int:
    """Largest k with tau(k) <= the 25th percentile of the sampled entries."""
    q = np.float32(np.quantile(np.asarray(samples, np.float32), THRESHOLD_QUANTILE))
    return int(level_of(np.array([q]))[0])


# --------------------------------------------------------------------------------------------
# Exact maximum clique (branch and bound, colouring bounds, bitsets).


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


def _clique_number(P: int, adj: Sequence[int], r: int, lower: int, upper: int,
                   work: _Work) -> int:
    """max(lower - 1, r + clique number of P), stopping early once it reaches ``upper``.

    Tomita's MCQ over bitsets: colour classes in index order, branch on the vertices of the
    highest colours first, never branch on a vertex whose colour cannot lead past the
    incumbent. Used to prove bounds (the expensive part); the lexicographically smallest
    clique of the proven size is then found by ``_lex_clique``.
    """
    best = lower - 1
    limit = work.limit()
    frames = []

    def colour(Q0: int, kmin: int):
        us, cs = [], []
        U = Q0
        c = 0
        n = 0
        while U:
            c += 1
            Q = U
            while Q:
                low = Q & -Q
                u = low.bit_length() - 1
                U ^= low
                Q ^= low
                Q &= ~adj[u]
                n += 1
                if c >= kmin:
                    us.append(u)
                    cs.append(c)
        return us, cs, c, n

    if P == 0:
        return max(best, r)
    us, cs, ncol, m = colour(P, best - r + 1)
    work.used += m + 1
    if r + ncol <= best:
        return best
    if ncol == m:
        return r + ncol
    frames.append([us, cs, len(us) - 1, P, r])
    while frames:
        fr = frames[-1]
        us, cs, i, Prem, depth = fr
        if i < 0 or depth + cs[i] <= best:
            frames.pop()
            continue
        u = us[i]
        fr[2] = i - 1
        fr[3] = Prem ^ (1 << u)
        newP = Prem & adj[u]
        if newP == 0:
            if depth + 1 > best:
                best = depth + 1
                if best >= upper:
                    return best
            continue
        nus, ncs, ncol, m = colour(newP, best - depth)
        work.used += m + 1
        if work.used > limit:
            raise BudgetExceeded
        if depth + 1 + ncol <= best:
            continue
        if ncol == m:
            best = depth + 1 + ncol
            if best >= upper:
                return best
            continue
        frames.append([nus, ncs, len(nus) - 1, newP, depth + 1])
    return best


def _solve(v: int, idx: np.ndarray, sub: np.ndarray, lower: int, upper: int,
           work: _Work) -> tuple[Optional[list[int]], int]:
    """The lexicographically smallest maximum clique with smallest member v, if its size is
    >= lower; else (None, an upper bound < lower).

    ``idx`` = v's later live neighbours (ascending), ``sub`` their adjacency matrix (bool).
    Up to LOCAL_MAX candidates the bound proof runs on them renumbered by decreasing degree
    (better greedy colourings, as in MCQ); the clique itself is then picked in index order
    (small ints make the bitset operations cheap)."""
    m = len(idx)
    full = (1 << m) - 1
    if m <= LOCAL_MAX:
        order = np.argsort(-sub.sum(axis=1), kind="stable")
        size = _clique_number(full, pack_rows(sub[order][:, order]), 1, lower, upper, work)
        local_adj = pack_rows(sub) if size >= lower else None
    else:
        local_adj = pack_rows(sub)
        size = _clique_number(full, local_adj, 1, lower, upper, work)
    if size < lower:
        return None, size
    return [v] + [int(idx[i]) for i in _lex_clique(full, local_adj, size - 1, work)], size


def _lex_clique(P: int, adj: Sequence[int], size: int, work: _Work) -> list[int]:
    """The lexicographically smallest clique of ``size`` (the clique number) in P: take each
    candidate in increasing order if a clique of that size still fits with it (an MCQ
    decision with a tight target), else drop it."""
    R: list[int] = []
    while len(R) < size:
        need = size - len(R)  # vertices still to add, from P
        cands = P
        while True:
            low = cands & -cands
            u = low.bit_length() - 1
            cands ^= low
            newP = P & adj[u] & _above(u)
            if newP.bit_count() >= need - 1 and (
                    need == 1 or _clique_number(newP, adj, 1, need, need, work) >= need):
                R.append(u)
                P = newP
                break
            P ^= low
    return R


def _above(v: int) -> int:
    return ~((2 << v) - 1)


def pack_rows(mask2d: np.ndarray) -> list[int]:
    """Rows of a boolean matrix -> Python ints (bit j of row i = mask2d[i, j])."""
    if mask2d.shape[0] == 0:
        return []
    bits = np.packbits(mask2d, axis=1, bitorder="little")
    width = bits.shape[1]
    buf = bits.tobytes()
    from_bytes = int.from_bytes
    return [from_bytes(buf[i:i + width], "little") for i in range(0, len(buf), width)]


def _greedy_clique(sub: np.ndarray) -> list[int]:
    """Deterministic fallback (local indices): grow the clique by the candidate with most
    candidate neighbours, the first one on ties."""
    adj = pack_rows(sub)
    P = (1 << len(adj)) - 1
    R = []
    while P:
        best_u, best_d = -1, -1
        Q = P
        while Q:
            low = Q & -Q
            u = low.bit_length() - 1
            Q ^= low
            d = (adj[u] & P).bit_count()
            if d > best_d:
                best_u, best_d = u, d
        R.append(best_u)
        P &= adj[best_u]
    return sorted(R)


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
                 on_budget: str = "raise") -> PeelResult:
    """Peel maximum cliques off the graph until it is empty.

    max_cliques: stop after this many cliques (they are the largest ones).
    min_count: stop (complete=False) as soon as the count can no longer reach it.
    on_budget: "raise" (BudgetExceeded) or "greedy" (answer over-budget subproblems greedily).
    """
    work = _Work(subproblem_budget, threshold_budget)
    exact = True
    n = graph.n
    cliques: list[list[int]] = []
    # Isolated nodes are singletons; handled without the queue.
    later = graph.later_degrees()
    has_edges = np.diff(graph.indptr) > 0
    isolated = np.flatnonzero(~has_edges).tolist()
    heap = [(-(1 + int(later[v])), int(v), 0, None) for v in np.flatnonzero(has_edges)]
    heapq.heapify(heap)
    live = has_edges.copy()
    num_live = len(heap)
    SOLVED = 1
    solved: list = []   # (-size, v, version, members): exact cliques, for the lower bound
    version: dict = {}

    def _valid(entry) -> bool:
        _, u, ver, members = entry
        return version.get(u) == ver and live[members].all()

    def finished() -> bool:
        return max_cliques is not None and len(cliques) >= max_cliques

    while heap and not finished():
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
        lower = -solved[0][0] if solved else 1
        idx = graph.later_live(v, live)
        m = idx.shape[0]
        if m + 1 < lower:  # cannot reach the incumbent: the degree is a good enough bound
            heapq.heappush(heap, (-(m + 1), v, 0, None))
            continue
        work.sub_start = work.used
        sub = graph.induced(idx)
        try:
            found, bound = _solve(v, idx, sub, lower, upper, work)
        except BudgetExceeded:
            if on_budget != "greedy":
                raise
            exact = False
            if work.used > work.threshold_limit:
                work.threshold_limit = 10**18  # from now on: greedy everywhere
                work.subproblem_limit = 0
            found = [v] + [int(idx[i]) for i in _greedy_clique(sub)]
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


# --------------------------------------------------------------------------------------------
# Schedule and representatives.


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


def _check_common(n: int, num_train: int, select: str) -> None:
    if select not in ("reference", "topk"):
        raise InputError(f"--select must be 'reference' or 'topk', got {select!r}")
    if not isinstance(num_train, (int, np.integer)) or num_train < 1:
        raise InputError(f"--num_train must be a positive integer, got {num_train!r}")
    if num_train > n:
        raise InputError(
            f"--num_train={num_train} is larger than the number of images ({n}); "
            "generate more images or lower --num_train")


def _check_threshold(threshold: Optional[float]) -> None:
    if threshold is not None and not math.isfinite(threshold):
        raise InputError(f"--threshold must be a finite number, got {threshold}")


def cluster_graph(sg: SimilarityGraph, num_train: int, *, select: str = "reference",
                  threshold: Optional[float] = None,
                  subproblem_budget: int = DEFAULT_SUBPROBLEM_BUDGET,
                  threshold_budget: int = DEFAULT_THRESHOLD_BUDGET,
                  progress=None) -> ClusterResult:
    """Run the threshold schedule, or peel the one graph that ``sg`` was built for with
    ``threshold``."""
    _check_common(sg.n, num_train, select)
    _check_threshold(threshold)
    skipped: list[float] = []
    max_cliques = num_train if select == "topk" else None
    t0 = time.perf_counter()
    if threshold is not None:
        res = peel_cliques(sg.graph, max_cliques=max_cliques,
                           subproblem_budget=subproblem_budget,
                           threshold_budget=threshold_budget, on_budget="greedy")
        if not res.exact:
            logging.warning(
                "threshold %.4f: the exact clique search exceeded its work budget "
                "(subproblem %d, threshold %d units); some cliques were found greedily and "
                "may not be maximum", threshold, subproblem_budget, threshold_budget)
        final_k, final_thr, final = None, float(np.float32(threshold)), res
    else:
        k = start_level(sg.samples)
        graph = sg.graph
        while True:
            thr = float(tau(k))
            if k < sg.min_level:
                logging.info(
                    "threshold %.2f: its graph has more edges than the edge budget; skipping "
                    "it as the reference skips a threshold after its 30 s timeout", thr)
                skipped.append(round(thr, 2))
                if progress is not None:
                    progress(thr, None)
                k += 1
                continue
            graph = graph.at_least(k)
            try:
                res = peel_cliques(graph, max_cliques=max_cliques, min_count=num_train,
                                   subproblem_budget=subproblem_budget,
                                   threshold_budget=threshold_budget, on_budget="raise")
            except BudgetExceeded:
                logging.info(
                    "threshold %.2f (%d edges): exact clique search exceeded the deterministic "
                    "work budget (subproblem %d / threshold %d units); skipping it as the "
                    "reference skips a threshold after its 30 s timeout", thr, graph.num_edges,
                    subproblem_budget, threshold_budget)
                skipped.append(round(thr, 2))
                if progress is not None:
                    progress(thr, None)
                k += 1
                continue
            count = len(res.cliques)
            if progress is not None:
                progress(thr, count)
            logging.info("threshold %.2f (%d edges, %d work units): %s cliques", thr,
                         graph.num_edges, res.work,
                         count if res.complete or select == "topk" else f"< {num_train}")
            if count >= num_train:
                final_k, final_thr, final = k, thr, res
                break
            if k > _MAX_LEVEL:  # pragma: no cover - empty graph gives n >= num_train cliques
                raise InputError("no threshold gives enough cliques")
            k += 1
    cliques_s = time.perf_counter() - t0
    cliques = final.cliques
    if select == "topk":
        cliques = cliques[:num_train]
    reps = representatives(cliques, features=sg.features, similarity=sg.similarity)
    return ClusterResult(threshold=round(final_thr, 6), level=final_k, cliques=cliques,
                         representatives=reps, skipped_thresholds=skipped, exact=final.exact,
                         cliques_s=cliques_s)


def cluster(*, num_train: int, features=None, similarity=None, select: str = "reference",
            threshold: Optional[float] = None, seed: int = 0,
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
    _check_common((features if features is not None else similarity).shape[0], num_train, select)
    sg = similarity_graph(features=features, similarity=similarity, seed=seed,
                          edge_budget=edge_budget, threshold=threshold)
    sim_s = time.perf_counter() - t0
    res = cluster_graph(sg, num_train, select=select, threshold=threshold,
                        subproblem_budget=subproblem_budget, threshold_budget=threshold_budget,
                        progress=progress)
    res.similarity_s = sim_s
    return res
