"""Clique finder vs brute force and vs a networkx implementation of the reference semantics."""
import itertools
import math
import random

import networkx as nx
import numpy as np
import pytest

from finextract_jax import cluster as C
from finextract_jax.errors import InputError


# ---------------------------------------------------------------------------------------------
# Independent implementations, written from METHOD.md §4 and the documented tie-break.


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


def bitsets(n, edges):
    adj = [0] * n
    for i, j in edges:
        adj[i] |= 1 << j
        adj[j] |= 1 << i
    return adj


# ---------------------------------------------------------------------------------------------


def test_max_clique_equals_brute_force():
    rng = random.Random(1234)
    for _ in range(150):
        n = rng.randint(1, 25)
        p = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9, rng.random()])
        edges = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < p]
        got = C.max_clique(bitsets(n, edges))
        assert got == brute_force_max_clique(n, edges), (n, p)


def test_max_clique_ties_take_lexicographically_smallest():
    # Two disjoint triangles {4,5,6} and {1,2,3}, plus {0,7,8}: all size 3.
    edges = [(4, 5), (5, 6), (4, 6), (1, 2), (2, 3), (1, 3), (0, 7), (7, 8), (0, 8)]
    assert C.max_clique(bitsets(9, edges)) == [0, 7, 8]
    res = C.peel_cliques(bitsets(9, edges), (1 << 9) - 1)
    assert res.cliques == [[0, 7, 8], [1, 2, 3], [4, 5, 6]]


def test_peel_equals_networkx_reference_semantics():
    rng = np.random.default_rng(7)
    for trial in range(60):
        n = int(rng.integers(2, 45))
        _, sim = random_similarity(rng, n, clusters=int(rng.integers(0, 4)))
        k = int(rng.integers(-30, 70))
        adj = C.adjacency_bitsets(C.levels_from_similarity(sim).levels, k)
        got = C.peel_cliques(adj, (1 << n) - 1)
        assert got.complete and got.exact
        assert got.cliques == nx_reference_peel(sim, C.tau(k)), trial


def test_global_bitset_path_gives_the_same_partition(monkeypatch):
    rng = np.random.default_rng(8)
    for trial in range(25):
        n = int(rng.integers(5, 40))
        _, sim = random_similarity(rng, n, clusters=int(rng.integers(0, 3)))
        k = int(rng.integers(-20, 50))
        levels = C.levels_from_similarity(sim).levels
        adj = C.adjacency_bitsets(levels, k)
        local = C.peel_cliques(adj, (1 << n) - 1, local_adjacency=C._local_from_levels(levels, k))
        monkeypatch.setattr(C, "LOCAL_MAX", 3)
        direct = C.peel_cliques(adj, (1 << n) - 1)
        monkeypatch.setattr(C, "LOCAL_MAX", 1024)
        assert local.cliques == direct.cliques == nx_reference_peel(sim, C.tau(k)), trial


def test_schedule_equals_networkx_reference_semantics():
    rng = np.random.default_rng(11)
    for trial in range(50):
        n = int(rng.integers(4, 40))
        feats, sim = random_similarity(rng, n, clusters=int(rng.integers(1, 4)))
        num_train = int(rng.integers(1, min(n, 12) + 1))
        seed = int(rng.integers(0, 3))
        thr, cliques = nx_reference_cluster(sim, num_train, seed)
        res = C.cluster(similarity=sim, num_train=num_train, seed=seed)
        assert res.threshold == pytest.approx(thr, abs=1e-6), trial
        assert res.cliques == cliques, trial
        assert res.skipped_thresholds == [] and res.exact
        topk = C.cluster(similarity=sim, num_train=num_train, seed=seed, select="topk")
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
    sl = C.levels_from_similarity(s)
    # 36 entries, 1000 samples capped at all 36: 26 zeros (incl. the diagonal) -> q25 = 0.
    assert sorted(sl.samples.tolist()) == sorted(s.reshape(-1).tolist())
    assert C.start_level(sl.samples) == 0
    # At 0.00 everything is connected: [0,1,2,3,4,5] is not a clique ((3,5) missing? no:
    # sim 0 >= 0 is an edge), so one clique of 6 < N0 = 3; 0.01: edges > 0 only ->
    # {0,1,2}, {3,4}? no: 0-3 (0.12) and 1-4 (0.12) also edges; cliques {0,1,2},{3,4},{5}.
    res = C.cluster(similarity=s, num_train=3)
    assert res.threshold == pytest.approx(0.01)
    assert res.cliques == [[0, 1, 2], [3, 4], [5]]
    # Representative of {0,1,2}: all tie (sums 1.8) -> smallest index; {3,4} -> 3.
    assert res.representatives == [0, 3, 5]
    res2 = C.cluster(similarity=s, num_train=1)
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
    adj = C.adjacency_bitsets(C.levels_from_similarity(s).levels, 7)
    assert adj[0] == 0b10 and adj[2] == 0
    assert C.adjacency_bitsets(C.levels_from_similarity(s).levels, 8)[0] == 0
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
    sl = C.levels_from_features(f, seed=4)
    sl2 = C.levels_from_similarity(got, seed=4)
    np.testing.assert_array_equal(sl.samples, sl2.samples)
    np.testing.assert_array_equal(sl.levels, sl2.levels)


def test_budget_skips_dense_thresholds_deterministically():
    rng = np.random.default_rng(5)
    n = 120
    f = rng.normal(size=(n, 4)) + 2.5  # all similar: a dense graph at low thresholds
    sim = C.cosine_similarity(f)
    kw = dict(similarity=sim, num_train=10, subproblem_budget=300, threshold_budget=5000)
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
    res = C.cluster(features=feats, num_train=10)
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
