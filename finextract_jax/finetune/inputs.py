"""What the train step consumes besides parameters and text (finetune/conditioning.py): a checked
resolution and the VAE posterior of each training image (encoded once)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from finextract_jax.errors import InputError
from finextract_jax.models.pipeline import Pipeline, vae_posterior


def check_resolution(pipe: Pipeline, resolution: int):
    factor = pipe.vae_scale_factor
    if resolution <= 0 or resolution % factor:
        raise InputError(f"--resolution {resolution} is not a positive multiple of the VAE factor {factor}; "
                         f"use e.g. {max(factor, resolution // factor * factor)}")
    levels = len(pipe.unet.module.block_out_channels) - 1
    latent = resolution // factor
    if latent % (2 ** levels):
        multiple = factor * 2 ** levels
        raise InputError(f"--resolution {resolution} gives {latent}x{latent} UNet inputs, which its {levels} "
                         f"downsamplings cannot halve evenly; use a multiple of {multiple}")


def encode_latent_moments(pipe: Pipeline, pixels: np.ndarray, batch: int = 8):
    """VAE posterior (mean, std), NCHW, once per image: each step then draws its own latent sample."""
    module, params = pipe.vae.module, pipe.vae.params
    encode = jax.jit(lambda p, x: vae_posterior(module, p, x))

    means, stds = [], []
    for i in range(0, len(pixels), batch):
        mean, std = encode(params, jnp.asarray(pixels[i:i + batch]))
        means.append(np.asarray(mean))
        stds.append(np.asarray(std))
    return np.concatenate(means), np.concatenate(stds)

