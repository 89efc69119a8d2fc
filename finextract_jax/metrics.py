"""Extraction metrics (docs/method.md §5): AS, A-ESR, per-image matches, and the pairs grid.

For each training image x_i: s_i = max over extracted e of cos(f(x_i), f(e)).
AS = mean_i s_i; A-ESR = mean_i 1[s_i > tau_s] (strictly greater, tau_s = 0.7 by default).
Ties in the best match go to the first extracted image in sorted order.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from finextract_jax.errors import InputError
from finextract_jax.grids import labelled_grid
from finextract_jax.options import option

DEFAULT_SUCCESS_THRESHOLD = 0.7


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """How extracted images are scored (the evaluate flags beside the embedder's)."""

    success_threshold: float = option(DEFAULT_SUCCESS_THRESHOLD, "Similarity above which a training image counts "
                                      "as extracted (A-ESR).")

    def __post_init__(self):
        if not -1.0 <= self.success_threshold <= 1.0:
            raise InputError(f"--success_threshold is a cosine similarity in [-1, 1], got {self.success_threshold}")


def _unit(x, what: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"{what} must be a non-empty [N, D] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{what} contain NaN or Inf")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norm == 0):
        raise InputError(f"{what} have an all-zero row; cosine similarity is undefined")
    return x / norm


def extraction_scores(train_features, extracted_features, train_names: Sequence[str],
                      extracted_names: Sequence[str],
                      success_threshold: float = DEFAULT_SUCCESS_THRESHOLD,
                      features: str = "") -> dict:
    """The metrics.json dictionary (docs/cli.md)."""
    if not math.isfinite(success_threshold):
        raise InputError(f"--success_threshold must be finite, got {success_threshold}")
    t = _unit(train_features, "training features")
    e = _unit(extracted_features, "extracted features")
    if t.shape[1] != e.shape[1]:
        raise InputError(f"feature sizes differ: training {t.shape[1]} vs extracted "
                         f"{e.shape[1]}")
    if len(train_names) != t.shape[0] or len(extracted_names) != e.shape[0]:
        raise InputError("names and features have different lengths")
    sim = t @ e.T
    best = np.argmax(sim, axis=1)
    s = sim[np.arange(t.shape[0]), best]
    per_image = [{"train": train_names[i], "match": extracted_names[int(best[i])],
                  "similarity": float(s[i])} for i in range(t.shape[0])]
    return {"AS": float(np.mean(s)),
            "A_ESR": float(np.mean(s > success_threshold)),
            "success_threshold": float(success_threshold),
            "features": features,
            "per_image": per_image}


def pairs_grid(train_images: Sequence[Image.Image], matched_images: Sequence[Image.Image],
               similarities: Sequence[float], tile: int = 256,
               success_threshold: Optional[float] = None,
               labels: Optional[Sequence[str]] = None) -> Image.Image:
    """Each training image beside its best extracted match, the similarity written below."""
    if len(train_images) != len(matched_images) or len(train_images) != len(similarities):
        raise InputError("pairs_grid: lists of different lengths")
    rows = []
    for r, (train, match, s) in enumerate(zip(train_images, matched_images, similarities)):
        ok = success_threshold is not None and s > success_threshold
        name = labels[r] if labels is not None else f"train #{r}"
        rows.append([(train, name, False), (match, f"similarity {s:.3f}" + (" (extracted)" if ok else ""), ok)])
    return labelled_grid(rows, ["training image", "best match"], tile)
