"""The threshold schedule and the representatives: from a similarity graph to clusters.json's
content (docs/method.md §4)."""
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
from finextract_jax.cluster.similarity import _MAX_LEVEL, _check_features, check_similarity, tau
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
