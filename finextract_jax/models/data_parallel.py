"""An embedder's jitted forward over every local device: weights replicated, the batch split.

Why: feature extraction for clustering is, after sampling, the largest per-image cost of a run
(SSCD or a ViT over N images). On a host with several accelerators (or simulated CPU devices)
each batch is split over a one-axis mesh of the local devices, as the sampling loop splits its
batches; every image's computation is the same program, so the features do not depend on the
device count. A batch whose size does not divide the device count runs replicated instead.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class DataParallel:
    """`fn(params, batch) -> [B, ...]` jitted, with `params` replicated over the local devices."""

    def __init__(self, fn: Callable, params, devices=None):
        self.mesh = Mesh(np.asarray(devices if devices is not None else jax.local_devices()), ("data",))
        self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
        self._split = NamedSharding(self.mesh, PartitionSpec("data"))
        self._whole = NamedSharding(self.mesh, PartitionSpec())
        self._fn = jax.jit(fn)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        split = batch.shape[0] % self.mesh.size == 0
        batch = jax.device_put(batch, self._split if split else self._whole)
        return np.asarray(self._fn(self.params, batch))
