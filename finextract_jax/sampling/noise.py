"""Start noise for sampling (docs/method.md §3): one independent Gaussian per image, derived from
(seed, global image index) only.

Image i's start latents are `normal(fold_in(PRNGKey(seed), i), [C, H, W])`, so any image can be
regenerated alone, and the noise of a batch does not depend on the batch size, on which other
images share the batch, or on the number of devices. `--init_latents` replaces this with an
array the user supplies ([num_images, C, H, W], the diffusers/PyTorch layout).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from finextract_jax.errors import InputError

Array = jnp.ndarray


def start_noise(seed, indices, shape_chw: Sequence[int]) -> Array:
    """Standard normal start latents for the given global image indices.

    Args:
      seed: integer seed (a Python int or a traced integer scalar).
      indices: int array [n] of global image indices (>= 0); may be traced (e.g. a sharded
        batch of indices inside jit).
      shape_chw: static (C, H, W) of one image's latents.
    Returns:
      float32 [n, C, H, W]; row j depends only on (seed, indices[j]).
    """
    shape = tuple(int(d) for d in shape_chw)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"latent shape must be (C, H, W) with positive sizes, got {tuple(shape_chw)}")
    indices = jnp.asarray(indices)
    if indices.ndim != 1:
        raise InputError(f"indices must be a 1-D integer array, got shape {indices.shape}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise InputError(f"indices must be integers, got {indices.dtype}")
    if isinstance(seed, (int, np.integer)) and not 0 <= int(seed) < 2**31:
        raise InputError(f"seed must be in [0, 2**31), got {seed}")
    return _start_noise(seed, indices, shape)


@functools.partial(jax.jit, static_argnums=2)
def _start_noise(seed, indices, shape):
    # Always compiled, so eager calls and calls inside the caller's jit run the same program.
    base = jax.random.PRNGKey(seed)

    def one(i):
        return jax.random.normal(jax.random.fold_in(base, i), shape, dtype=jnp.float32)

    return jax.vmap(one)(indices.astype(jnp.uint32))


def load_init_latents(path: str, num_images: Optional[int] = None,
                      shape_chw: Optional[Sequence[int]] = None) -> np.ndarray:
    """Load `--init_latents`: a .npy array [num_images, C, H, W] of start latents.

    Checks that the file loads, is a finite floating-point 4-D array, has `num_images` rows
    (when given) and per-image shape `shape_chw` (when given: the model's latent shape).
    Returns float32 numpy [num_images, C, H, W]. Raises InputError with what was expected.
    """
    if not os.path.isfile(path):
        raise InputError(f"--init_latents: no such file: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any load failure is the user's file
        raise InputError(f"--init_latents: cannot read {path} as a .npy array ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"--init_latents: {path} holds several arrays (.npz); give one .npy array "
                         "of shape [num_images, C, H, W]")
    expected = "[" + ", ".join(
        [str(num_images) if num_images is not None else "num_images"]
        + ([str(int(d)) for d in shape_chw] if shape_chw is not None else ["C", "H", "W"])) + "]"
    if arr.ndim != 4:
        raise InputError(f"--init_latents: {path} has shape {list(arr.shape)}; expected {expected} "
                         "(the diffusers/PyTorch NCHW layout)")
    if not (np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"--init_latents: {path} has dtype {arr.dtype}; expected a float array")
    if num_images is not None and arr.shape[0] != int(num_images):
        raise InputError(f"--init_latents: {path} has {arr.shape[0]} images (shape {list(arr.shape)}) "
                         f"but --num_images={num_images}; expected {expected}")
    if shape_chw is not None and tuple(arr.shape[1:]) != tuple(int(d) for d in shape_chw):
        raise InputError(f"--init_latents: {path} has per-image shape {list(arr.shape[1:])}, but the "
                         f"model's latents are {[int(d) for d in shape_chw]} (C, H, W); expected "
                         f"{expected}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        bad = np.unique(np.nonzero(~np.isfinite(arr))[0])
        raise InputError(f"--init_latents: {path} has non-finite values in images "
                         f"{bad[:10].tolist()}{' ...' if len(bad) > 10 else ''}")
    return arr


def batch_start_noise(indices, seed: int, shape_chw: Sequence[int],
                      init_latents: Optional[np.ndarray] = None) -> Array:
    """Start latents for a batch of global indices: rows of `init_latents` when given (as
    returned by `load_init_latents`), else `start_noise(seed, indices, shape_chw)`."""
    if init_latents is None:
        return start_noise(seed, indices, shape_chw)
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= init_latents.shape[0])):
        raise InputError(f"image indices {idx.tolist()[:10]} out of range for --init_latents with "
                         f"{init_latents.shape[0]} images")
    return jnp.asarray(init_latents[idx], jnp.float32)
