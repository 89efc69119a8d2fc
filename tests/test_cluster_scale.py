"""The chance schedule (stated rule, exact prefix peels, quality on known copy groups) and the
similarity join across devices and processes (same graph, same clusters.json)."""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from finextract_jax import cluster as C
from finextract_jax import stages
from finextract_jax.cluster.synthetic import copy_group_features, copy_group_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cluster import nx_reference_peel, random_similarity  # noqa: E402


def test_chance_clique_size_is_where_the_expected_clique_count_drops_below_one():
    def expected(n, p, s):
        return math.comb(n, s) * p ** (s * (s - 1) / 2)

    for n, edges in [(500, 44142), (500, 2000), (40, 700), (12, 3), (2000, 10**6)]:
        p = edges / (n * (n - 1) / 2)
        s = C.chance_clique_size(n, edges)
        assert expected(n, p, s) >= 1 > expected(n, p, s + 1), (n, edges)
    assert C.chance_clique_size(10, 0) == 1 and C.chance_clique_size(10, 45) == 10
    assert C.chance_clique_size(1, 0) == 1


def test_peel_down_to_a_size_is_the_prefix_of_the_full_peel():
    rng = np.random.default_rng(21)
    for trial in range(40):
        n = int(rng.integers(3, 45))
        _, sim = random_similarity(rng, n, clusters=int(rng.integers(0, 4)))
        k = int(rng.integers(-20, 60))
        graph = C.similarity_graph(similarity=sim).graph.at_least(k)
        full = nx_reference_peel(sim, C.tau(k))
        for min_size in (2, 3, 4, 6):
            got = C.peel_cliques(graph, min_size=min_size)
            assert got.cliques == [c for c in full if len(c) >= min_size], (trial, min_size)


def test_core_and_masked_later_degrees_match_networkx():
    import networkx as nx

    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(1, 60))
        edges = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < 0.2]
        graph = C.Graph.from_edges(n, edges)
        reference = nx.Graph(edges)
        reference.add_nodes_from(range(n))
        for k in range(6):
            assert set(np.flatnonzero(graph.core(k))) == set(nx.k_core(reference, k)), (trial, k)
        mask = rng.random(n) < 0.6
        want = [sum(u > v and mask[u] for u in reference[v]) if mask[v] else 0 for v in range(n)]
        assert graph.later_degrees(mask).tolist() == want


def _plain_chance_scan(sg):
    """The chance rule by a plain upward scan, every threshold peeled: the first k with at
    least one group of cliques larger than chance whose count is the same at k, k + 1, k + 2;
    else the threshold with the most groups (the lower on ties)."""
    def count(k):
        graph = sg.graph.at_least(k)
        size = C.chance_clique_size(sg.n, graph.num_edges)
        return len(graph.joined_groups(C.peel_cliques(graph, min_size=size + 1).cliques))

    start = C.start_level(sg.samples)
    for k in range(start, C._MAX_LEVEL + 1):
        counts = [count(k + i) for i in range(C.STABLE_STEPS)]
        if counts[0] and len(set(counts)) == 1:
            return k
    counts = {k: count(k) for k in range(start, C._MAX_LEVEL + 1)}
    return max(counts, key=lambda k: (counts[k], -k))


def test_chance_schedule_equals_a_plain_scan():
    rng = np.random.default_rng(4)
    for trial in range(6):
        feats, _ = random_similarity(rng, int(rng.integers(60, 140)), d=16, clusters=6)
        sg = C.similarity_graph(features=feats)
        res = C.cluster_graph(sg, 3, schedule="chance")
        assert res.schedule == "chance" and res.level == _plain_chance_scan(sg), trial
        graph = sg.graph.at_least(res.level)
        assert res.chance_size == C.chance_clique_size(sg.n, graph.num_edges)
        full = C.peel_cliques(graph).cliques
        significant = [c for c in full if len(c) > res.chance_size]
        groups = graph.joined_groups(significant)
        assert res.cliques == [significant[i] for i in groups]
        # topk: N0 guesses, one clique per group first, then the next largest of the peel.
        num = len(res.cliques) + 1
        topk = C.cluster_graph(sg, num, schedule="chance", select="topk")
        assert topk.level == res.level and topk.cliques == res.cliques + full[len(significant):][:1]
        assert C.cluster_graph(sg, 1, schedule="chance", select="topk").cliques == res.cliques[:1]


def test_joined_groups_match_a_brute_force_grouping():
    import networkx as nx

    rng = np.random.default_rng(5)
    for trial in range(60):
        n = int(rng.integers(2, 60))
        density = rng.choice([0.02, 0.1, 0.3])
        edges = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < density]
        graph = C.Graph.from_edges(n, edges)
        cliques = np.array_split(rng.permutation(n), int(rng.integers(1, n + 1)))
        cliques = [sorted(c.tolist()) for c in cliques if len(c)]
        adj = nx.Graph(edges)
        p = len(edges) / (n * (n - 1) / 2)
        joined = nx.Graph()
        joined.add_nodes_from(range(len(cliques)))
        for a in range(len(cliques)):
            for b in range(a + 1, len(cliques)):
                links = sum(adj.has_edge(u, v) for u in cliques[a] for v in cliques[b])
                pairs = len(cliques[a]) * len(cliques[b])
                if links >= 0.25 * pairs and links > p * pairs + 5 * math.sqrt(
                        p * (1 - p) * pairs):
                    joined.add_edge(a, b)
        want = sorted(min(group) for group in nx.connected_components(joined))
        assert graph.joined_groups(cliques) == want, trial


@pytest.fixture(scope="module")
def copy_groups():
    """N = 500: 10 training images with ~20 noisy copies each among 300 diverse images."""
    return copy_group_features(500, num_train=10, copy_fraction=0.4, zipf=0.0, seed=1)


def test_chance_schedule_finds_the_copy_groups(copy_groups):
    feats, labels = copy_groups
    chance = C.cluster(features=feats, num_train=10)
    scores = copy_group_scores(chance.cliques, chance.representatives, labels)
    assert scores["precision"] >= 0.9 and scores["recall"] >= 0.9, scores
    assert scores["pair_precision"] >= 0.9, scores
    # The reference rule stops at the first threshold with >= N0 cliques, in the dense part
    # of the graph, and keeps every clique there: mostly chance mixtures.
    reference = C.cluster(features=feats, num_train=10, schedule="reference")
    ref_scores = copy_group_scores(reference.cliques, reference.representatives, labels)
    assert reference.threshold < chance.threshold
    assert ref_scores["precision"] < 0.5 < scores["precision"], ref_scores


def test_a_large_copy_group_is_found_whole():
    # 2,000 images, 600 copies of 20 images with Zipf counts: 183 copies of the first. At the
    # chosen threshold that group is one clique: a greedy clique meets the colouring bound, so
    # proving it maximum costs one colouring instead of a descent through all its members.
    feats, labels = copy_group_features(2000, num_train=20, copy_fraction=0.3, zipf=1.0, seed=0)
    res = C.cluster(features=feats, num_train=20)
    scores = copy_group_scores(res.cliques, res.representatives, labels)
    assert scores["precision"] >= 0.9 and scores["recall"] >= 0.9, scores
    blob = np.flatnonzero(labels == np.bincount(labels[labels >= 0]).argmax())
    assert len(np.intersect1d(res.cliques[0], blob)) >= 0.9 * len(blob)


_TWO_DEVICES = """
import numpy as np, jax
from finextract_jax import cluster as C
assert len(jax.devices()) == 2
rng = np.random.default_rng(0)
f = rng.normal(size=(1100, 48)).astype(np.float32)
f[:300] += 1.5 * rng.normal(size=(1, 48)).astype(np.float32)
def tiles(devices):
    return {(r0, c0): t for r0, c0, t in C.feature_tiles(f, 256, 512, devices=devices)}
one, two = tiles(jax.devices()[:1]), tiles(jax.devices())
assert len(one) == 11 and one.keys() == two.keys()  # an odd count: the last batch is padded
for key in one:
    np.testing.assert_array_equal(one[key], two[key])
a = C.similarity_graph(features=f, row_block=256, col_chunk=512, edge_budget=100000)
# The sampled pairs are the matrix's entries; the matrix comes from tiles of another shape, and XLA:CPU's
# dot may block another shape's sums differently (one float32 ulp), so not bit for bit.
np.testing.assert_allclose(a.samples, C.cosine_similarity(f).reshape(-1)[
    np.sort(np.random.default_rng(0).choice(1100 * 1100, 1000, replace=False))], rtol=0, atol=1e-6)
print("ok")
"""


def test_similarity_tiles_on_two_devices_equal_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _TWO_DEVICES], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_same_clusters_json_as_one(tmp_path):
    # 600 images: two row blocks, so each process computes one of the two tiles.
    feats, _ = copy_group_features(600, num_train=8, copy_fraction=0.3, zipf=0.0, seed=2)
    path = tmp_path / "features.npy"
    np.save(path, feats)
    options = dict(select="reference", threshold=0.25, schedule="reference", edge_budget=10**6)
    one = stages.cluster_to_workdir(str(tmp_path / "one"), 8, features=feats, progress=False,
                                    **options)
    port = _free_port()
    flags = [f"--features_file={path}", "--num_train=8", f"--workdir={tmp_path / 'two'}",
             "--threshold=0.25", "--schedule=reference", "--edge_budget=1000000",
             f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.cluster", *flags,
                               f"--process_id={i}"], cwd=ROOT,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    two = json.load(open(tmp_path / "two" / "clusters.json"))
    assert not (tmp_path / "two" / "clusters.json.1").exists()
    for record in (one, two):
        record.pop("timing")
    assert two == one and len(one["cliques"]) > 8
