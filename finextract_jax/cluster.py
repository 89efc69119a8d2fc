"""Which generated images are copies of training images: similarity graph, clique peeling.

METHOD.md §4, with the reference's wall-clock timeout replaced by an exact, deterministic
search. Everything below is a pure function of its inputs (no clock, no machine speed).

Semantics (the reference's, made exact):

* Similarity = cosine, diagonal set to 0. Thresholds live on the 0.01 grid:
  ``tau_k = float32(k / 100)`` for integer k, and i~j is an edge iff
  ``float32(sim_ij) >= tau_k`` (i != j). Working with the integer k avoids the reference's
  float drift from repeated ``+= 0.01``.
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

Maximum clique search (no timeout). Branch and bound over Python-int bitsets.
``max clique = max over v of (best clique whose smallest member is v)``; the subproblem of v
lives on v's later neighbours N+(v). Comparing (size, then smaller v) across subproblems is
exactly the lexicographic tie-break, because a clique with a smaller first member is
lexicographically smaller. Each subproblem is solved in two steps:
1. its clique number, by Tomita's MCQ (greedy colouring bounds, branching on the highest
   colours first, never on vertices whose colour cannot beat the incumbent), with the
   candidates renumbered by decreasing degree -- this is the expensive, proving part;
2. the lexicographically smallest clique of that size: take candidates in increasing index
   order whenever an MCQ decision ("is a clique of the remaining size still there?", a
   tight target that prunes hard) says yes.
The subproblems sit in a lazy priority queue keyed by an upper bound (1 + |N+(v)| at first,
then the bound a failed search proves) and are solved only on reaching the top, down to the
size of the best clique still available (anything smaller cannot be the next clique).
After a clique is removed, a solved subproblem whose clique does not meet it stays exact (its
graph only lost nodes: the same clique is still the lexicographically smallest maximum one),
so only the few that meet it are solved again. Isolated nodes never enter the queue. The
graphs of all thresholds come from one int8 "levels" matrix (the largest k with
sim >= tau_k), computed once, blockwise.

Work budget (deterministic, replaces the reference's 30 s timeout). Work is counted in
"units": one unit per vertex coloured and per search node (about 0.3-1 microsecond each on
a 2-core CI machine; the count, not the clock, decides). One subproblem may use at most
``subproblem_budget`` units and one threshold at most ``threshold_budget`` units. In the
threshold schedule, a threshold that exceeds either is abandoned and the schedule moves on to
the next, as the reference does when its 30 s run out (logged, and recorded in
``skipped_thresholds``); this happens on the dense graphs of low thresholds, where the exact
partition is not computable in reasonable time by any method. With a fixed threshold there is
no next threshold to go to: the over-budget subproblems are answered by a greedy clique
instead (logged; ``exact`` is then False).
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
# Subproblems with more candidates than this are searched on the global bitsets.
LOCAL_MAX = 1024
DEFAULT_THRESHOLD_BUDGET = 50_000_000
# Levels are int8: -101 .. 100 for sims in [-1.01, 1]; the diagonal gets NO_EDGE.
NO_EDGE = -128
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
# Similarity, blockwise.


def _check_features(features) -> np.ndarray:
    feats = np.asarray(features)
    if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] == 0:
        raise InputError(f"features must be a non-empty [N, D] array, got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.number):
        raise InputError(f"features must be numeric, got dtype {feats.dtype}")
    feats = feats.astype(np.float32)
    if not np.all(np.isfinite(feats)):
        raise InputError("features contain NaN or Inf; recompute them (a broken image?)")
    norms = np.linalg.norm(feats, axis=1)
    if np.any(norms == 0):
        bad = np.flatnonzero(norms == 0)[:5].tolist()
        raise InputError(f"features rows {bad} are all zero; cosine similarity is undefined")
    return feats


def check_similarity(similarity, atol: float = 1e-4) -> np.ndarray:
    """Validate an [N, N] similarity matrix; return it as float32 with the diagonal set to 0."""
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
    sim = np.array(sim, copy=True)
    np.fill_diagonal(sim, 0.0)
    return sim


_SIM_BLOCK_FN = None


def _sim_block_fn():
    """One jitted [B, D] x [Np, D]^T matmul, shared by every caller (compiled per shape)."""
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


def cosine_similarity_blocks(features, block_rows: int = 512) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, S[start:start+b])`` of the cosine similarity matrix (diagonal 0).

    Computed in JAX one row block at a time, so device memory is O(block_rows * N).
    Shapes are padded (rows to block_rows, columns to a multiple of 256) to limit recompiles.
    """
    import jax.numpy as jnp

    feats = _check_features(features)
    n, d = feats.shape
    normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    block_rows = max(1, min(block_rows, _round_up(n, 8)))
    n_cols = _round_up(n, 256)
    cols = np.zeros((n_cols, d), np.float32)
    cols[:n] = normed
    cols_dev = jnp.asarray(cols)
    fn = _sim_block_fn()
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        rows = np.zeros((block_rows, d), np.float32)
        rows[: stop - start] = normed[start:stop]
        block = np.asarray(fn(jnp.asarray(rows), cols_dev))[: stop - start, :n]
        block = np.array(block, copy=True)
        idx = np.arange(start, stop)
        block[idx - start, idx] = 0.0
        yield start, block


def cosine_similarity(features, block_rows: int = 512) -> np.ndarray:
    """The full [N, N] cosine similarity (diagonal 0); for small N or tests."""
    feats = _check_features(features)
    out = np.empty((feats.shape[0], feats.shape[0]), np.float32)
    for start, block in cosine_similarity_blocks(feats, block_rows):
        out[start:start + block.shape[0]] = block
    return out


@dataclasses.dataclass
class SimilarityLevels:
    """The similarity graph family on the 0.01 grid, plus what the schedule needs.

    ``levels[i, j]`` = largest k with sim_ij >= tau(k) (int8; NO_EDGE on the diagonal).
    ``samples`` = the seeded 1000 entries for the start threshold. ``similarity`` is kept only
    when the input was a matrix (used for representatives when there are no features).
    """
    levels: np.ndarray
    samples: np.ndarray
    features: Optional[np.ndarray] = None
    similarity: Optional[np.ndarray] = None

    @property
    def n(self) -> int:
        return self.levels.shape[0]


def _sample_indices(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    total = n * n
    return np.sort(rng.choice(total, size=min(NUM_THRESHOLD_SAMPLES, total), replace=False))


def _levels_block(block: np.ndarray, start: int) -> np.ndarray:
    lv = level_of(block).astype(np.int8)
    idx = np.arange(start, start + block.shape[0])
    lv[idx - start, idx] = NO_EDGE
    return lv


def levels_from_similarity(similarity, seed: int = 0) -> SimilarityLevels:
    sim = check_similarity(similarity)
    n = sim.shape[0]
    levels = np.empty((n, n), np.int8)
    for start in range(0, n, 1024):
        levels[start:start + 1024] = _levels_block(sim[start:start + 1024], start)
    samples = sim.reshape(-1)[_sample_indices(n, seed)]
    return SimilarityLevels(levels=levels, samples=samples, similarity=sim)


def levels_from_features(features, seed: int = 0, block_rows: int = 512) -> SimilarityLevels:
    feats = _check_features(features)
    n = feats.shape[0]
    flat = _sample_indices(n, seed)
    rows, cols = np.divmod(flat, n)
    samples = np.empty(flat.shape[0], np.float32)
    levels = np.empty((n, n), np.int8)
    for start, block in cosine_similarity_blocks(feats, block_rows):
        stop = start + block.shape[0]
        levels[start:stop] = _levels_block(block, start)
        sel = (rows >= start) & (rows < stop)
        samples[sel] = block[rows[sel] - start, cols[sel]]
    return SimilarityLevels(levels=levels, samples=samples, features=feats)


def start_level(samples) -> int:
    """Largest k with tau(k) <= the 25th percentile of the sampled entries."""
    q = np.float32(np.quantile(np.asarray(samples, np.float32), THRESHOLD_QUANTILE))
    return int(level_of(np.array([q]))[0])


# --------------------------------------------------------------------------------------------
# Graph at one threshold, as bitsets.


def adjacency_bitsets(levels: np.ndarray, k: int) -> list[int]:
    """Row i -> Python int whose bit j is set iff i~j at tau(k)."""
    n = levels.shape[0]
    out = []
    for start in range(0, n, 2048):
        out.extend(pack_rows(levels[start:start + 2048] >= k))
    return out


def adjacency_bitsets_from_similarity(similarity: np.ndarray, threshold: float) -> list[int]:
    """Bitsets for an arbitrary (off-grid) threshold: edge iff float32(sim) >= float32(t)."""
    thr = np.float32(threshold)
    n = similarity.shape[0]
    out = []
    for start in range(0, n, 2048):
        mask = similarity[start:start + 2048] >= thr
        idx = np.arange(start, min(n, start + 2048))
        mask[idx - start, idx] = False
        out.extend(pack_rows(mask))
    return out


def adjacency_bitsets_from_features(features, threshold: float, block_rows: int = 512) -> list[int]:
    thr = np.float32(threshold)
    out = []
    for start, block in cosine_similarity_blocks(features, block_rows):
        mask = block >= thr
        idx = np.arange(start, start + block.shape[0])
        mask[idx - start, idx] = False
        out.extend(pack_rows(mask))
    return out


def _bits(mask: int) -> list[int]:
    """Indices of the set bits, ascending."""
    if mask.bit_length() > 512:
        nbytes = (mask.bit_length() + 7) // 8
        bits = np.unpackbits(np.frombuffer(mask.to_bytes(nbytes, "little"), np.uint8),
                             bitorder="little")
        return np.flatnonzero(bits).tolist()
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


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


def _solve_from(v: int, idx: list[int], sub: np.ndarray, lower: int, upper: int,
                work: _Work) -> tuple[Optional[list[int]], int]:
    """The lexicographically smallest maximum clique with smallest member v, if its size is
    >= lower; else (None, an upper bound < lower).

    ``idx`` = v's later neighbours (ascending), ``sub`` their adjacency matrix (bool). The
    bound proof runs on them renumbered by decreasing degree (better greedy colourings, as
    in MCQ); the clique itself is then picked in index order (small ints make the bitset
    operations cheap)."""
    m = len(idx)
    full = (1 << m) - 1
    order = np.argsort(-sub.sum(axis=1), kind="stable")
    size = _clique_number(full, pack_rows(sub[order][:, order]), 1, lower, upper, work)
    if size < lower:
        return None, size
    local_adj = pack_rows(sub)
    return [v] + [idx[i] for i in _lex_clique(full, local_adj, size - 1, work)], size


def _solve_global(v: int, P: int, adj: Sequence[int], lower: int, upper: int,
                  work: _Work) -> tuple[Optional[list[int]], int]:
    """As _solve_from, on the global bitsets (index-order colouring)."""
    size = _clique_number(P, adj, 1, lower, upper, work)
    if size < lower:
        return None, size
    return [v] + _lex_clique(P, adj, size - 1, work), size


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


def max_clique(adj: Sequence[int], nodes: Optional[int] = None,
               budget: int = 10**12) -> list[int]:
    """The lexicographically smallest maximum clique of the graph (bitset rows) on ``nodes``."""
    n = len(adj)
    if nodes is None:
        nodes = (1 << n) - 1
    cliques = peel_cliques(adj, nodes, max_cliques=1, subproblem_budget=budget,
                           threshold_budget=budget)
    return cliques.cliques[0] if cliques.cliques else []


def pack_rows(mask2d: np.ndarray) -> list[int]:
    """Rows of a boolean matrix -> Python ints (bit j of row i = mask2d[i, j])."""
    if mask2d.shape[0] == 0:
        return []
    bits = np.packbits(mask2d, axis=1, bitorder="little")
    width = bits.shape[1]
    buf = bits.tobytes()
    from_bytes = int.from_bytes
    return [from_bytes(buf[i:i + width], "little") for i in range(0, len(buf), width)]


def _local_from_bitsets(adj: Sequence[int]):
    n = len(adj)
    nbytes = (n + 7) // 8
    dense = np.unpackbits(
        np.frombuffer(b"".join(a.to_bytes(nbytes, "little") for a in adj), np.uint8)
        .reshape(n, nbytes), axis=1, bitorder="little")[:, :n].astype(bool) if n else None

    def local(idx):
        ix = np.asarray(idx, np.intp)
        return dense[np.ix_(ix, ix)]
    return local


def _local_from_levels(levels: np.ndarray, k: int):
    flat = levels.reshape(-1)
    n = levels.shape[0]

    def local(idx):
        ix = np.asarray(idx, np.intp)
        return flat.take(ix[:, None] * n + ix[None, :]) >= k
    return local


def _greedy_clique(v: int, P: int, adj: Sequence[int]) -> list[int]:
    """Deterministic fallback: grow {v} by the candidate with most candidate neighbours."""
    R = [v]
    while P:
        best_u, best_d = -1, -1
        for u in _bits(P):
            d = (adj[u] & P).bit_count()
            if d > best_d:
                best_u, best_d = u, d
        R.append(best_u)
        P &= adj[best_u]
    return sorted(R)


@dataclasses.dataclass
class PeelResult:
    cliques: list[list[int]]   # in peel order: larger first, then lexicographically smaller
    complete: bool             # False if stopped early (max_cliques or count bound)
    exact: bool                # False if a greedy fallback answered some subproblem
    work: int


def peel_cliques(adj: Sequence[int], nodes: int, *, max_cliques: Optional[int] = None,
                 min_count: Optional[int] = None,
                 subproblem_budget: int = DEFAULT_SUBPROBLEM_BUDGET,
                 threshold_budget: int = DEFAULT_THRESHOLD_BUDGET,
                 on_budget: str = "raise", local_adjacency=None) -> PeelResult:
    """Peel maximum cliques off the graph on ``nodes`` until it is empty.

    local_adjacency: idx (ascending node list) -> boolean adjacency matrix of the induced
    subgraph; by default derived from ``adj``.

    max_cliques: stop after this many cliques (they are the largest ones).
    min_count: stop (complete=False) as soon as the count can no longer reach it.
    on_budget: "raise" (BudgetExceeded) or "greedy" (answer over-budget subproblems greedily).
    """
    work = _Work(subproblem_budget, threshold_budget)
    if local_adjacency is None:
        local_adjacency = _local_from_bitsets(adj)
    exact = True
    live = nodes
    cliques: list[list[int]] = []
    # Isolated nodes are singletons; handled without the queue.
    isolated = []
    heap = []
    for v in _bits(nodes):
        if adj[v] & live == 0:
            isolated.append(v)
        else:
            heap.append((-(1 + (adj[v] & live & _above(v)).bit_count()), v, 0, None))
    heapq.heapify(heap)
    for v in isolated:
        live ^= 1 << v
    SOLVED = 1
    solved: list = []   # (-size, v, version, mask): exact cliques, for the lower bound
    version: dict = {}

    def _valid(entry) -> bool:
        _, u, ver, mask = entry
        return version.get(u) == ver and mask & live == mask

    def finished() -> bool:
        return max_cliques is not None and len(cliques) >= max_cliques

    while heap and not finished():
        if (min_count is not None and len(cliques) + len(heap) + len(isolated) < min_count
                and len(cliques) + live.bit_count() + len(isolated) < min_count):
            # Even if every remaining node were a singleton the count stays below min_count.
            return PeelResult(cliques, False, exact, work.used)
        negb, v, state, payload = heapq.heappop(heap)
        if not (live >> v) & 1:
            continue
        if state == SOLVED and payload[0] & live == payload[0]:
            mask, members = payload
            cliques.append(members)
            live &= ~mask
            continue
        upper = -negb
        # Solve v exactly down to the best clique size still available (lower bound). A
        # smaller cut-off would only re-rank v; a larger one (e.g. the runner-up's bound)
        # makes vertices fail by one, again and again, as bounds decrease.
        while solved and not _valid(solved[0]):
            heapq.heappop(solved)
        lower = -solved[0][0] if solved else 1
        P = adj[v] & live & _above(v)
        m = P.bit_count()
        if m + 1 < lower:  # cannot reach the incumbent: the degree is a good enough bound
            heapq.heappush(heap, (-(m + 1), v, 0, None))
            continue
        work.sub_start = work.used
        try:
            if m > LOCAL_MAX:
                # Too big to copy out (and, in practice, only on dense graphs): search the
                # global bitsets directly; same answer, different work count.
                found, bound = _solve_global(v, P, adj, lower, upper, work)
            else:
                idx = _bits(P)
                found, bound = _solve_from(v, idx, local_adjacency(idx), lower, upper, work)
        except BudgetExceeded:
            if on_budget != "greedy":
                raise
            exact = False
            if work.used > work.threshold_limit:
                work.threshold_limit = 10**18  # from now on: greedy everywhere
                work.subproblem_limit = 0
            found = _greedy_clique(v, P, adj)
        if found is None:
            heapq.heappush(heap, (-bound, v, 0, None))
        else:
            mask = 0
            for u in found:
                mask |= 1 << u
            heapq.heappush(heap, (-len(found), v, SOLVED, (mask, found)))
            version[v] = version.get(v, 0) + 1
            heapq.heappush(solved, (-len(found), v, version[v], mask))
    # Isolated nodes are the last cliques (size 1) in index order; merged in by the sort.
    cliques.extend([v] for v in isolated)
    complete = live == 0
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


def cluster_levels(sl: SimilarityLevels, num_train: int, *, select: str = "reference",
                   threshold: Optional[float] = None,
                   subproblem_budget: int = DEFAULT_SUBPROBLEM_BUDGET,
                   threshold_budget: int = DEFAULT_THRESHOLD_BUDGET,
                   progress=None) -> ClusterResult:
    """Run the threshold schedule (or one fixed threshold) on precomputed levels."""
    n = sl.n
    _check_common(n, num_train, select)
    all_nodes = (1 << n) - 1
    skipped: list[float] = []
    t0 = time.perf_counter()
    if threshold is not None:
        if not math.isfinite(threshold):
            raise InputError(f"--threshold must be a finite number, got {threshold}")
        k_fixed = level_of(np.array([threshold]))[0]
        if tau(k_fixed) == np.float32(threshold):
            adj = adjacency_bitsets(sl.levels, int(k_fixed))
        elif sl.similarity is not None:
            adj = adjacency_bitsets_from_similarity(sl.similarity, threshold)
        else:
            adj = adjacency_bitsets_from_features(sl.features, threshold)
        res = peel_cliques(adj, all_nodes,
                           max_cliques=num_train if select == "topk" else None,
                           subproblem_budget=subproblem_budget,
                           threshold_budget=threshold_budget, on_budget="greedy")
        if not res.exact:
            logging.warning(
                "threshold %.4f: the exact clique search exceeded its work budget "
                "(subproblem %d, threshold %d units); some cliques were found greedily and "
                "may not be maximum", threshold, subproblem_budget, threshold_budget)
        final_k, final_thr, final = None, float(np.float32(threshold)), res
    else:
        k = start_level(sl.samples)
        final = None
        while True:
            thr = float(tau(k))
            adj = adjacency_bitsets(sl.levels, k)
            try:
                res = peel_cliques(adj, all_nodes, local_adjacency=_local_from_levels(sl.levels, k),
                                   max_cliques=num_train if select == "topk" else None,
                                   min_count=num_train,
                                   subproblem_budget=subproblem_budget,
                                   threshold_budget=threshold_budget, on_budget="raise")
            except BudgetExceeded:
                logging.info(
                    "threshold %.2f: exact clique search exceeded the deterministic work budget "
                    "(subproblem %d / threshold %d units); skipping it as the reference skips a "
                    "threshold after its 30 s timeout", thr, subproblem_budget, threshold_budget)
                skipped.append(round(thr, 2))
                if progress is not None:
                    progress(thr, None)
                k += 1
                continue
            count = len(res.cliques)
            if progress is not None:
                progress(thr, count)
            logging.info("threshold %.2f: %s cliques", thr,
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
    reps = representatives(cliques, features=sl.features, similarity=sl.similarity)
    return ClusterResult(threshold=round(final_thr, 6), level=final_k, cliques=cliques,
                         representatives=reps, skipped_thresholds=skipped, exact=final.exact,
                         cliques_s=cliques_s)


def cluster(*, num_train: int, features=None, similarity=None, select: str = "reference",
            threshold: Optional[float] = None, seed: int = 0,
            subproblem_budget: int = DEFAULT_SUBPROBLEM_BUDGET,
            threshold_budget: int = DEFAULT_THRESHOLD_BUDGET, progress=None) -> ClusterResult:
    """Cluster N images given their features [N, D] or a similarity matrix [N, N]."""
    if (features is None) == (similarity is None):
        raise InputError("give exactly one of features or similarity")
    t0 = time.perf_counter()
    if features is not None:
        sl = levels_from_features(features, seed=seed)
    else:
        sl = levels_from_similarity(similarity, seed=seed)
    sim_s = time.perf_counter() - t0
    res = cluster_levels(sl, num_train, select=select, threshold=threshold,
                         subproblem_budget=subproblem_budget, threshold_budget=threshold_budget,
                         progress=progress)
    res.similarity_s = sim_s
    return res
