"""Clique finder vs brute force, vs a networkx implementation of the reference semantics, and
vs the output of the former dense (N x N levels) implementation at N = 2000."""
import hashlib
import itertools
import json
import math
import random

import networkx as nx
import numpy as np
import pytest

from finextract_jax import cluster as C
from finextract_jax.cluster import mcq
from finextract_jax.errors import InputError


# ---------------------------------------------------------------------------------------------
# Independent implementations, written from docs/method.md §4 and the documented tie-break.


def brute_force_max_clique(n, edges):
    """Largest clique, ties to the lexicographically smallest sorted list, by enumeration."""
    adj = [[False] * n for _ in range(n)]
    for i, j in edges:
        adj[i][j] = adj[j][i] = True
    best = []

    def extend(clique, candidates):  # every clique exactly once, no pruning
        nonlocal best
        if len(clique) > len(best) or (len(clique) == len(best) and clique < best):
            best = list(clique)
        for pos, u in enumerate(candidates):
            extend(clique + [u], [w for w in candidates[pos + 1:] if adj[u][w]])

    extend([], list(range(n)))
    return best


def nx_reference_peel(sim, thr):
    """The reference's peeling (networkx), with the lexicographic tie-break, no timeout."""
    n = sim.shape[0]
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    ii, jj = np.nonzero(np.triu(sim >= thr, 1))
    graph.add_edges_from(zip(ii.tolist(), jj.tolist()))
    out = []
    while graph.number_of_nodes():
        best = min((sorted(c) for c in nx.find_cliques(graph)), key=lambda c: (-len(c), c))
        out.append(best)
        graph.remove_nodes_from(best)
    return out


def nx_reference_cluster(sim, num_train, seed=0):
    """Threshold schedule of the reference: 25th percentile of 1000 seeded entries, floored to
    the 0.01 grid, +0.01 until there are >= num_train cliques."""
    n = sim.shape[0]
    sim = sim.astype(np.float32).copy()
    np.fill_diagonal(sim, 0)
    idx = np.random.default_rng(seed).choice(n * n, size=min(1000, n * n), replace=False)
    q = np.float32(np.quantile(sim.reshape(-1)[np.sort(idx)], 0.25))
    k = math.floor(float(q) * 100) + 1
    while np.float32(k / 100) > q:
        k -= 1
    while True:
        thr = np.float32(k / 100)
        cliques = nx_reference_peel(sim, thr)
        if len(cliques) >= num_train:
            return float(thr), cliques
        k += 1


def random_similarity(rng, n, d=None, clusters=0):
    d = d or int(rng.integers(2, 24))
    f = rng.normal(size=(n, d))
    for _ in range(clusters):
        members = rng.choice(n, size=int(rng.integers(2, max(3, n // 3))), replace=False)
        f[members] = f[members[0]] + 0.3 * rng.normal(size=(len(members), d))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = (f @ f.T).astype(np.float32)
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 0)
    return f.astype(np.float32), sim


def graph_at(sim, k):
    """The sparse graph of grid level k of a similarity matrix."""
    return C.similarity_graph(similarity=sim).graph.at_least(k)


def ternary_features(n, num_train=10, dim=512, copy_fraction=0.1, seed=0):
    """SSCD-like features in exact arithmetic: every row has 256 entries +-1 (norm 16), so
    every cosine is a multiple of 1/256, exact in float32 in any summation order (the same
    graph on every machine). A shared 'style' and 16 'topics' give the diverse images a
    realistic positive mean similarity; 10% of the rows are near-copies of num_train
    'training' rows (Zipf counts), with 8-119 of their 256 entries moved."""
    rng = np.random.default_rng(seed)
    style = rng.choice(dim, size=16, replace=False)
    free = np.setdiff1d(np.arange(dim), style)
    topics = [rng.choice(free, size=24, replace=False) for _ in range(16)]
    signs = rng.choice([-1.0, 1.0], size=dim)

    def image(topic):
        fixed = np.union1d(style, topics[topic])
        rest = rng.choice(np.setdiff1d(np.arange(dim), fixed), size=256 - fixed.size,
                          replace=False)
        v = np.zeros(dim, np.float32)
        v[fixed] = signs[fixed]
        v[rest] = rng.choice([-1.0, 1.0], size=rest.size)
        return v

    train = [image(int(rng.integers(16))) for _ in range(num_train)]
    w = 1.0 / np.arange(1, num_train + 1)
    rows = []
    for src in rng.choice(num_train, size=int(round(copy_fraction * n)), p=w / w.sum()):
        v = train[src].copy()
        r = int(rng.integers(8, 120))
        v[rng.choice(np.flatnonzero(v), size=r, replace=False)] = 0
        v[rng.choice(np.flatnonzero(v == 0), size=r, replace=False)] = rng.choice([-1.0, 1.0], r)
        rows.append(v)
    rows += [image(int(rng.integers(16))) for _ in range(n - len(rows))]
    return np.stack(rows)[rng.permutation(n)]


def assert_same_graph(a, b):
    for name in ("indptr", "upper", "indices", "levels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# ---------------------------------------------------------------------------------------------


def test_max_clique_equals_brute_force():
    rng = random.Random(1234)
    for _ in range(150):
        n = rng.randint(1, 25)
        p = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9, rng.random()])
        edges = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < p]
        got = C.max_clique(C.Graph.from_edges(n, edges))
        assert got == brute_force_max_clique(n, edges), (n, p)


def test_max_clique_ties_take_lexicographically_smallest():
    # Two disjoint triangles {4,5,6} and {1,2,3}, plus {0,7,8}: all size 3.
    edges = [(4, 5), (5, 6), (4, 6), (1, 2), (2, 3), (1, 3), (0, 7), (7, 8), (0, 8)]
    assert C.max_clique(C.Graph.from_edges(9, edges)) == [0, 7, 8]
    res = C.peel_cliques(C.Graph.from_edges(9, edges))
    assert res.cliques == [[0, 7, 8], [1, 2, 3], [4, 5, 6]]


def test_peel_equals_networkx_reference_semantics():
    rng = np.random.default_rng(7)
    for trial in range(60):
        n = int(rng.integers(2, 45))
        _, sim = random_similarity(rng, n, clusters=int(rng.integers(0, 4)))
        k = int(rng.integers(-30, 70))
        got = C.peel_cliques(graph_at(sim, k))
        assert got.complete and got.exact
        assert got.cliques == nx_reference_peel(sim, C.tau(k)), trial


def test_index_order_proofs_give_the_same_partition(monkeypatch):
    rng = np.random.default_rng(8)
    for trial in range(25):
        n = int(rng.integers(5, 40))
        _, sim = random_similarity(rng, n, clusters=int(rng.integers(0, 3)))
        k = int(rng.integers(-20, 50))
        graph = graph_at(sim, k)
        renumbered = C.peel_cliques(graph)
        monkeypatch.setattr(C.cliques, "LOCAL_MAX", 3)
        index_order = C.peel_cliques(graph)
        monkeypatch.setattr(C.cliques, "LOCAL_MAX", 1024)
        assert renumbered.cliques == index_order.cliques == nx_reference_peel(sim, C.tau(k))


def test_schedule_equals_networkx_reference_semantics():
    rng = np.random.default_rng(11)
    for trial in range(50):
        n = int(rng.integers(4, 40))
        feats, sim = random_similarity(rng, n, clusters=int(rng.integers(1, 4)))
        num_train = int(rng.integers(1, min(n, 12) + 1))
        seed = int(rng.integers(0, 3))
        thr, cliques = nx_reference_cluster(sim, num_train, seed)
        res = C.cluster(similarity=sim, num_train=num_train, seed=seed, schedule="reference")
        assert res.threshold == pytest.approx(thr, abs=1e-6), trial
        assert res.cliques == cliques, trial
        assert res.skipped_thresholds == [] and res.exact
        topk = C.cluster(similarity=sim, num_train=num_train, seed=seed, select="topk",
                         schedule="reference")
        assert topk.cliques == cliques[:num_train]
        assert topk.representatives == res.representatives[:num_train]


def test_threshold_schedule_on_hand_made_matrix():
    # 6 images: {0,1,2} near-copies (0.9), {3,4} copies (0.5), 5 alone; others 0.0 .. 0.12.
    s = np.zeros((6, 6), np.float32)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        s[i, j] = 0.9
    s[3, 4] = 0.5
    s[0, 3] = s[1, 4] = 0.12
    s[2, 5] = 0.05
    s = s + s.T
    sg = C.similarity_graph(similarity=s)
    # 36 entries, 1000 samples capped at all 36: 26 zeros (incl. the diagonal) -> q25 = 0.
    assert sorted(sg.samples.tolist()) == sorted(s.reshape(-1).tolist())
    assert C.start_level(sg.samples) == 0
    # At 0.00 everything is connected: [0,1,2,3,4,5] is not a clique ((3,5) missing? no:
    # sim 0 >= 0 is an edge), so one clique of 6 < N0 = 3; 0.01: edges > 0 only ->
    # {0,1,2}, {3,4}? no: 0-3 (0.12) and 1-4 (0.12) also edges; cliques {0,1,2},{3,4},{5}.
    res = C.cluster(similarity=s, num_train=3, schedule="reference")
    assert res.threshold == pytest.approx(0.01)
    assert res.cliques == [[0, 1, 2], [3, 4], [5]]
    # Representative of {0,1,2}: all tie (sums 1.8) -> smallest index; {3,4} -> 3.
    assert res.representatives == [0, 3, 5]
    res2 = C.cluster(similarity=s, num_train=1, schedule="reference")
    assert res2.threshold == pytest.approx(0.0) and res2.cliques == [list(range(6))]
    fixed = C.cluster(similarity=s, num_train=2, threshold=0.6)
    assert fixed.cliques == [[0, 1, 2], [3], [4], [5]] and fixed.threshold == pytest.approx(0.6)


def test_thresholds_are_exact_on_the_grid():
    # sim exactly float32(0.07) must be an edge at 0.07 (no 0.06 + 0.01 drift).
    s = np.zeros((3, 3), np.float32)
    s[0, 1] = s[1, 0] = np.float32(0.07)
    assert C.level_of(np.float32(0.07)) == 7
    assert C.level_of(np.float32(0.07) - np.float32(1e-8)) in (6, 7)
    assert C.level_of(np.nextafter(np.float32(0.07), np.float32(0))) == 6
    assert graph_at(s, 7).indices.tolist() == [1, 0] and graph_at(s, 8).num_edges == 0
    assert C.level_of(np.array([1.0, -1.0, 0.0])).tolist() == [100, -100, 0]


def test_representatives_features_and_similarity_agree():
    rng = np.random.default_rng(3)
    feats, sim = random_similarity(rng, 30, d=8, clusters=3)
    a = C.cluster(features=feats, num_train=5, threshold=0.3)
    b = C.cluster(similarity=sim, num_train=5, threshold=0.3)
    assert a.cliques == b.cliques
    assert a.representatives == b.representatives
    for clique, rep in zip(a.cliques, a.representatives):
        f = feats[clique].astype(np.float64)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        dist = np.linalg.norm(f - f.mean(0), axis=1)
        assert rep == clique[int(np.argmin(dist))]


def test_blockwise_similarity_matches_numpy():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(70, 9)).astype(np.float32)
    got = C.cosine_similarity(f, block_rows=16)
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    want = u @ u.T
    np.fill_diagonal(want, 0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got, got.T)
    a = C.similarity_graph(features=f, seed=4)
    b = C.similarity_graph(similarity=got, seed=4)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert_same_graph(a.graph, b.graph)
    flat = np.random.default_rng(4).choice(70 * 70, size=1000, replace=False)
    np.testing.assert_array_equal(a.samples, got.reshape(-1)[np.sort(flat)])


def test_budget_skips_dense_thresholds_deterministically():
    rng = np.random.default_rng(5)
    n = 120
    f = rng.normal(size=(n, 4)) + 2.5  # all similar: a dense graph at low thresholds
    sim = C.cosine_similarity(f)
    kw = dict(similarity=sim, num_train=10, subproblem_budget=300, threshold_budget=5000,
              schedule="reference")
    a = C.cluster(**kw)
    b = C.cluster(**kw)
    assert a.skipped_thresholds, "expected over-budget thresholds to be skipped"
    assert a.cliques == b.cliques and a.threshold == b.threshold
    assert a.skipped_thresholds == b.skipped_thresholds
    assert a.threshold > max(a.skipped_thresholds)
    assert a.exact
    # The accepted threshold's partition is exact: same as networkx there.
    assert a.cliques == nx_reference_peel(sim, np.float32(a.threshold))
    # A fixed threshold cannot be skipped: greedy fallback, flagged as not exact.
    fixed = C.cluster(similarity=sim, num_train=10, threshold=float(np.quantile(sim, 0.3)),
                      subproblem_budget=50, threshold_budget=200)
    assert not fixed.exact
    assert sorted(sum(fixed.cliques, [])) == list(range(n))
    for clique in fixed.cliques:
        assert all(sim[i, j] >= np.float32(fixed.threshold)
                   for i, j in itertools.combinations(clique, 2))


def test_large_graph_partition_is_valid_and_fast_enough():
    rng = np.random.default_rng(9)
    feats, sim = random_similarity(rng, 300, d=64, clusters=8)
    res = C.cluster(features=feats, num_train=10, schedule="reference")
    assert sorted(sum(res.cliques, [])) == list(range(300))
    sizes = [len(c) for c in res.cliques]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 4)), "square"),
    (np.array([[0, 0.5], [0.1, 0]]), "symmetric"),
    (np.array([[0, np.nan], [np.nan, 0]]), "NaN"),
    (np.zeros((0, 0)), "empty"),
])
def test_bad_similarity_matrices(bad, message):
    with pytest.raises(InputError, match=message):
        C.cluster(similarity=bad, num_train=1)


def test_bad_arguments():
    sim = np.zeros((4, 4), np.float32)
    with pytest.raises(InputError, match="larger than the number of images"):
        C.cluster(similarity=sim, num_train=5)
    with pytest.raises(InputError, match="select"):
        C.cluster(similarity=sim, num_train=2, select="best")
    with pytest.raises(InputError, match="positive"):
        C.cluster(similarity=sim, num_train=0)
    with pytest.raises(InputError, match="NaN"):
        C.cluster(features=np.array([[1.0, np.nan], [0.0, 1.0]]), num_train=1)
    with pytest.raises(InputError, match="all zero"):
        C.cluster(features=np.array([[0.0, 0.0], [0.0, 1.0]]), num_train=1)
    with pytest.raises(InputError, match="exactly one"):
        C.cluster(num_train=1)


# ---------------------------------------------------------------------------------------------
# The large-N path: tiles, sparse graph, edge budget, and the former dense implementation.


def test_sparse_graph_operations_match_a_dense_matrix():
    rng = np.random.default_rng(2)
    for n, p in [(120, 0.3), (40, 0.9), (7, 0.0), (1, 0.0)]:
        i, j = np.nonzero(np.triu(rng.random((n, n)) < p, 1))
        lv = rng.integers(-5, 5, size=i.size).astype(np.int8)
        dense = np.full((n, n), -128)
        dense[i, j] = dense[j, i] = lv
        cut = rng.integers(1, i.size + 2)  # two chunks, as the tiles give them
        g = C.Graph.from_pairs(n, [(i[:cut].astype(np.int32), j[:cut].astype(np.int32),
                                    lv[:cut]), (i[cut:].astype(np.int32),
                                                j[cut:].astype(np.int32), lv[cut:])])
        for k in (-99, 0, 4, 10):
            h, adj = g.at_least(k), dense >= k
            live = rng.random(n) < 0.7
            pos = np.full(n, -1, np.int32)
            for v in range(n):
                row = h.indices[h.indptr[v]:h.indptr[v + 1]]
                assert row.tolist() == np.flatnonzero(adj[v]).tolist()
                want = [u for u in range(v + 1, n) if adj[v, u] and live[u]]
                idx, bits, scanned = mcq.induced(h.indptr, h.upper, h.indices, live, v, pos)
                assert idx.tolist() == want and (pos == -1).all()
                assert scanned == (h.indptr[v + 1] - h.upper[v]) + sum(
                    h.indptr[u + 1] - h.upper[u] for u in want)
                unpacked = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")
                np.testing.assert_array_equal(unpacked[:, :len(want)].astype(bool),
                                              adj[np.ix_(want, want)])
            assert h.later_degrees().tolist() == np.triu(adj, 1).sum(axis=1).tolist()
            mask, pos = h.levels > 0, np.sort(rng.integers(0, h.levels.size + 1, size=20))
            assert C._count_before(mask, pos, chunk=7).tolist() == [mask[:q].sum() for q in pos]


def test_compiled_tile_edges_match_level_of():
    # Values on the 0.01 grid and one float32 step either side of it, cut-offs on and off it.
    rng = np.random.default_rng(8)
    from finextract_jax.cluster.graph import _TAU, _tile_edges
    for trial in range(100):
        rows, cols = (int(x) for x in rng.integers(1, 30, 2))
        tile = np.where(rng.random((rows, cols)) < 0.5,
                        np.float32(rng.integers(-101, 101, (rows, cols)) / 100),
                        rng.uniform(-1.01, 1, (rows, cols))).astype(np.float32)
        nudge = rng.random((rows, cols)) < 0.3
        tile[nudge] = np.nextafter(tile[nudge], np.float32(rng.choice([-2, 2])))
        r0, c0 = int(rng.integers(0, 40)), int(rng.integers(0, 50))
        cut = np.float32(rng.choice([-np.inf, rng.uniform(-1, 1), C.tau(int(rng.integers(-50, 90)))]))
        keep = (tile >= cut) & ((c0 + np.arange(cols))[None, :] > (r0 + np.arange(rows))[:, None])
        ii, jj = np.nonzero(keep)
        got = _tile_edges(tile, r0, c0, cut, _TAU, 1 - C._MIN_LEVEL)
        assert got[0].tolist() == ii.tolist() and got[1].tolist() == jj.tolist(), trial
        assert got[2].tolist() == C.level_of(tile[ii, jj]).tolist(), trial


def test_tiles_give_each_pair_once_at_its_level():
    f = ternary_features(300, seed=1)
    sim = C.cosine_similarity(f)
    np.testing.assert_array_equal(sim * 256, np.round(sim * 256))  # exact in any tiling
    one = C.similarity_graph(features=f, seed=2)
    tiled = C.similarity_graph(features=f, seed=2, row_block=24, col_chunk=256)
    assert_same_graph(one.graph, tiled.graph)
    np.testing.assert_array_equal(one.samples, tiled.samples)
    levels = C.level_of(sim)
    np.fill_diagonal(levels, -128)
    for k in (0, 10, 25):
        g = tiled.graph.at_least(k)
        for v in range(0, 300, 7):
            row = g.indices[g.indptr[v]:g.indptr[v + 1]]
            assert row.tolist() == np.flatnonzero(levels[v] >= k).tolist()


def test_edge_budget_keeps_the_lowest_levels_that_fit():
    f = ternary_features(300, seed=1)
    full = C.similarity_graph(features=f)
    assert full.min_level == C._MIN_LEVEL and full.graph.num_edges == 300 * 299 // 2
    at = full.edge_counts  # [k - _MIN_LEVEL] -> edges of level >= k
    for budget in (0, 7, 1000, 20000):
        sg = C.similarity_graph(features=f, edge_budget=budget, row_block=24, col_chunk=256)
        k = sg.min_level - C._MIN_LEVEL
        assert at[k] <= budget and (k == 0 or at[k - 1] > budget), budget
        assert_same_graph(sg.graph, full.graph.at_least(sg.min_level))
        np.testing.assert_array_equal(sg.edge_counts[k:], at[k:])
        np.testing.assert_array_equal(sg.samples, full.samples)


def test_schedule_skips_thresholds_over_the_edge_budget():
    f = ternary_features(300, seed=1)
    at = C.similarity_graph(features=f).edge_counts
    res = C.cluster(features=f, num_train=10, edge_budget=2000, schedule="reference")
    over = [round(float(C.tau(k)), 2) for k in range(-100, 101)
            if at[k - C._MIN_LEVEL] > 2000 and C.tau(k) >= min(res.skipped_thresholds)]
    assert over and set(over) <= set(res.skipped_thresholds) and res.threshold > max(over)
    assert res.exact
    sim = C.cosine_similarity(f)
    assert res.cliques == nx_reference_peel(sim, np.float32(res.threshold))
    with pytest.raises(InputError, match="edge budget"):
        C.cluster(features=f, num_train=3, threshold=0.05, edge_budget=100)


# Output of the former dense implementation (an N x N int8 level matrix and Python-int bitsets
# over all N nodes; `git show 969e4a2:finextract_jax/cluster.py`) on ternary_features(2000),
# num_train=10: (kwargs, threshold, number of cliques, skipped thresholds, sha256 of
# json.dumps([threshold, cliques, representatives, skipped_thresholds, exact])).
# Smaller work budgets than the defaults keep this fast; they still skip 12 thresholds (the
# threshold budget is 10x the one used with the former implementation, whose units did not
# count building subproblems; the same thresholds are skipped).
SKIPPED_2000 = [0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.11, 0.12, 0.13, 0.14]
DENSE_IMPLEMENTATION_2000 = [
    (dict(subproblem_budget=20_000, threshold_budget=30_000_000, schedule="reference"), 0.15, 267, SKIPPED_2000,
     "5b1c5bff790bd773d69aa1dabd50014ba27dd8dbcbf69a9889154ea37e3cdff6"),
    (dict(select="topk", subproblem_budget=20_000, threshold_budget=30_000_000,
          schedule="reference"), 0.15, 10,
     SKIPPED_2000, "5d8d7da8ffe1d20dd96f2bda6be2bc476ce9d2a04c20aab49d517070f2e15779"),
    (dict(threshold=0.155, select="topk"), 0.155, 10, [],
     "59030c320080967fc3a98e34a1f29015d80069365799e9e72c29a7b0f8a52c67"),
    # Over its work budget: greedy cliques, exact=False (the exact peel has 394). Which
    # subproblems fall back depends on how work is counted, redefined with the compiled
    # kernels (a subproblem's construction counts): pinned to this implementation.
    (dict(threshold=0.17, subproblem_budget=100, threshold_budget=2000), 0.17, 402, [],
     "247680af5263ace15c998f3573513596721b63cfa5c651300ab6ac0bce7cb9fc"),
]


@pytest.fixture(scope="module")
def features_2000():
    return ternary_features(2000)


@pytest.mark.parametrize("kwargs, threshold, count, skipped, digest", DENSE_IMPLEMENTATION_2000,
                         ids=["schedule", "schedule-topk", "fixed-off-grid-topk", "fixed-greedy"])
def test_same_clusters_as_the_dense_implementation_at_2000(features_2000, kwargs, threshold,
                                                           count, skipped, digest):
    res = C.cluster(features=features_2000, num_train=10, **kwargs)
    assert (res.threshold, len(res.cliques), res.skipped_thresholds) == (threshold, count, skipped)
    out = [res.threshold, res.cliques, res.representatives, res.skipped_thresholds, res.exact]
    assert hashlib.sha256(json.dumps(out).encode()).hexdigest() == digest
