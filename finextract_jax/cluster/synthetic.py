"""Synthetic SSCD-like features with known copy groups, and how well clusters recover them.

Why here: the benchmarks and the tests measure clustering quality on the same data, and the
schedule's chance rule (``schedule.py``) was chosen by these measurements, so the data and the
scores live next to the code they judge.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def copy_group_features(n: int, num_train: int = 20, dim: int = 512, copy_fraction: float = 0.05,
                        zipf: float = 1.0, seed: int = 0, chunk: int = 8192
                        ) -> tuple[np.ndarray, np.ndarray]:
    """SSCD-like unit features of generated images and the training image each copies.

    num_train 'training' images; a copy_fraction of the rows are noisy near-duplicates of them
    (cosine 0.55-0.95 to their training image, so 0.3-0.9 between two copies), their counts
    proportional to 1 / rank**zipf (zipf=0: equal expected counts). The rest are diverse
    images sharing a model 'style' and one of 64 'topics': cosine 0.07 +- 0.045 between
    topics, 0.17 within one (25th percentile of all pairs ~0.04, as for SSCD on one
    fine-tuned model's samples). Rows are shuffled. Returns (features [n, dim] float32,
    labels [n]: the training image copied, -1 for a diverse image). Written chunk by chunk,
    so that N = 10^5 needs no more than the output.
    """
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    style = unit(rng.normal(size=dim))
    topics = unit(rng.normal(size=(64, dim)))
    train = unit(0.3 * style + 0.35 * topics[rng.integers(64, size=num_train)]
                 + rng.normal(size=(num_train, dim)) / np.sqrt(dim))
    weights = 1.0 / np.arange(1, num_train + 1) ** zipf
    n_copy = int(round(copy_fraction * n))
    source = np.full(n, -1)
    source[:n_copy] = rng.choice(num_train, size=n_copy, p=weights / weights.sum())
    perm = rng.permutation(n)
    out = np.empty((n, dim), np.float32)
    for t0 in range(0, n, chunk):
        src = source[t0:t0 + chunk]
        copy = (src >= 0)[:, None]
        a = rng.uniform(0.55, 0.95, size=(src.size, 1))
        copies = a * train[np.maximum(src, 0)] + np.sqrt(1 - a * a) * unit(
            rng.normal(size=(src.size, dim)))
        diverse = (0.3 * style + 0.35 * topics[rng.integers(64, size=src.size)]
                   + rng.normal(size=(src.size, dim)) / np.sqrt(dim))
        out[perm[t0:t0 + chunk]] = unit(np.where(copy, copies, diverse))
    labels = np.empty(n, np.int64)
    labels[perm] = source
    return out, labels


def copy_group_scores(cliques: Sequence[Sequence[int]], representatives: Sequence[int],
                      labels: np.ndarray) -> dict:
    """Scores of a clustering against known copy groups (labels >= 0; -1 = no group).

    precision: distinct groups hit by the representatives / representatives (a
      representative of no group, or of a group already hit, is a miss);
    recall: distinct groups hit / groups (training images with at least one copy);
    pair_precision: pairs inside one clique that are copies of one image / pairs inside
      cliques (over the cliques that have representatives);
    pair_recall: pairs of copies of one image that share a clique / all such pairs.
    """
    labels = np.asarray(labels)
    rep_labels = labels[np.asarray(representatives, np.int64)] if len(representatives) else []
    hit = {int(x) for x in rep_labels if x >= 0}
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, np.int64)
    findable = int((sizes >= 1).sum())
    rep_set = set(int(r) for r in representatives)
    same = total = found = 0
    for clique in cliques:
        lab = labels[np.asarray(clique, np.int64)]
        counts = np.bincount(lab[lab >= 0]) if (lab >= 0).any() else np.zeros(0, np.int64)
        pairs_same = int((counts * (counts - 1) // 2).sum())
        found += pairs_same
        if rep_set.intersection(clique):
            same += pairs_same
            total += len(clique) * (len(clique) - 1) // 2
    all_same = int((sizes * (sizes - 1) // 2).sum())
    return {"representatives": len(representatives), "groups": findable,
            "precision": len(hit) / max(1, len(representatives)),
            "recall": len(hit) / max(1, findable),
            "pair_precision": same / total if total else 1.0,
            "pair_recall": found / all_same if all_same else 1.0}
