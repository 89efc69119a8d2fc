"""Cosine similarity of the images, tile by tile over the upper triangle, and the 0.01 grid.

Thresholds live on the 0.01 grid: ``tau_k = float32(k / 100)`` for integer k, and i~j is an
edge iff ``float32(sim_ij) >= tau_k`` (i != j); the level of a similarity is the largest such
k. Nothing of size N x N is ever held: the similarity is computed in JAX, tile by tile over
the upper triangle (each pair once, so the graph is symmetric by construction), and a tile is
dropped as soon as the pairs at or above the current cut-off are taken out of it.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

from finextract_jax.errors import InputError

NUM_THRESHOLD_SAMPLES = 1000
THRESHOLD_QUANTILE = 0.25
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


_TILE_FNS: dict = {}


def _tile_batch_fn():
    """One jitted batch of tiles, [L, B, D] x [L, C, D] -> [L, B, C]. With the batch axis
    sharded over L devices every device computes its own tile (no communication), by the
    same program as a single device computing one tile: the same floats on 1 or L devices."""
    if "batch" not in _TILE_FNS:
        import jax
        import jax.numpy as jnp

        def batch(rows, cols):
            return jnp.einsum("lrd,lcd->lrc", rows, cols, precision=jax.lax.Precision.HIGHEST)

        _TILE_FNS["batch"] = jax.jit(batch)
    return _TILE_FNS["batch"]


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


def tile_share() -> tuple[int, int]:
    """(this process's index, number of processes): the tiles ``feature_tiles`` computes here
    are every ``count``-th of the upper triangle's, starting at ``index``."""
    import jax

    return jax.process_index(), jax.process_count()


def feature_tiles(features, row_block: int = ROW_BLOCK, col_chunk: int = COL_CHUNK,
                  devices: Optional[Sequence] = None, share: tuple[int, int] = (0, 1)
                  ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(r0, c0, S[r0:r1, c0:c1])`` of the cosine similarity, upper-triangle tiles.

    Computed in JAX, L padded tiles at a time, one per device of ``devices`` (default: this
    process's devices), as one computation sharded over a one-axis mesh of them; the next
    batch is dispatched before the current one is handed out, so the matmuls overlap the
    caller's work. ``share=(index, count)``: only the tiles index, index + count, ... of the
    row-major tile order (one process's share of a multi-process run), in that order.
    Entries on and below the diagonal are whatever the product gives; callers use only j > i.
    """
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    feats = _check_features(features)
    n, d = feats.shape
    normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    rb, cc = _tile_shape(n, row_block, col_chunk)
    devices = list(devices or jax.local_devices())
    sharding = NamedSharding(Mesh(np.array(devices), ("tiles",)), PartitionSpec("tiles"))
    fn = _tile_batch_fn()

    def padded(a, b, rows):
        out = np.zeros((1, rows, d), np.float32)
        out[0, : b - a] = normed[a:b]
        return out

    col_cache: dict = {}  # (c0, device) -> the column chunk on that device

    def cols_on(c0, device):
        if (c0, device) not in col_cache:
            col_cache[c0, device] = jax.device_put(padded(c0, min(n, c0 + cc), cc), device)
        return col_cache[c0, device]

    grid = list(_tile_grid(n, rb, cc))[share[0]::share[1]]
    empty = (0, 0, 0, 0)

    def dispatched():
        for b0 in range(0, len(grid), len(devices)):
            tiles = grid[b0:b0 + len(devices)]
            tiles = tiles + [empty] * (len(devices) - len(tiles))
            rows = [jax.device_put(padded(r0, r1, rb), dev)
                    for (r0, r1, _, _), dev in zip(tiles, devices)]
            cols = [cols_on(c0, dev) for (_, _, c0, _), dev in zip(tiles, devices)]
            out = fn(jax.make_array_from_single_device_arrays(
                (len(devices), rb, d), sharding, rows),
                jax.make_array_from_single_device_arrays((len(devices), cc, d), sharding, cols))
            yield tiles, out

    batches = dispatched()
    ahead = next(batches, None)
    while ahead is not None:
        (tiles, out), ahead = ahead, next(batches, None)
        shards = {shard.device: shard.data for shard in out.addressable_shards}
        for (r0, r1, c0, c1), dev in zip(tiles, devices):
            if r1 > r0:
                yield r0, c0, np.asarray(shards[dev])[0, :r1 - r0, :c1 - c0]


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
