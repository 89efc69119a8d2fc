"""The forward-diffusion noise schedule, shared by sampling, fine-tuning and caption recovery.

One home for what the three agree on: the training betas and abar_t of a scheduler config (read
with diffusers' defaults for missing keys), how a clean sample is noised, and what the UNet
regresses (its `prediction_type`). The samplers (`sampling/schedulers.py`) build their step
tables on top of `alphas_cumprod`; fine-tuning and caption recovery noise images with
`add_noise` and score against `training_target`. Functions are pure and work on numpy or jnp
arrays (jnp inside jit).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from finextract_jax.errors import InputError

# diffusers' (0.39) defaults, common to its DDPM-family schedulers, for the keys that shape betas.
SCHEDULE_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    rescale_betas_zero_snr=False,
)


def read_schedule(config: Optional[Mapping[str, Any]]) -> dict:
    """The schedule keys of a scheduler config, missing (or null) ones at diffusers' defaults."""
    out = dict(SCHEDULE_DEFAULTS)
    out.update({k: v for k, v in (config or {}).items() if k in SCHEDULE_DEFAULTS and v is not None})
    return out


def betas_from_config(cfg: Mapping[str, Any]) -> np.ndarray:
    """The training betas (float64) for a scheduler config, as diffusers builds them."""
    cfg = read_schedule(cfg)
    n = int(cfg["num_train_timesteps"])
    if n < 1:
        raise InputError(f"num_train_timesteps must be >= 1, got {n}")
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
        if betas.shape != (n,):
            raise InputError(f"trained_betas has shape {betas.shape}, expected ({n},)")
        return betas
    schedule = cfg["beta_schedule"]
    b0, b1 = float(cfg["beta_start"]), float(cfg["beta_end"])
    if schedule == "linear":
        return np.linspace(b0, b1, n, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(b0**0.5, b1**0.5, n, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                        dtype=np.float64)
    raise InputError(f"unsupported beta_schedule {schedule!r}; use linear, scaled_linear or "
                     "squaredcos_cap_v2")


def alphas_cumprod_from_config(cfg: Optional[Mapping[str, Any]]) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 − beta_s), float64, t = 0..T−1."""
    if read_schedule(cfg)["rescale_betas_zero_snr"]:
        raise InputError("rescale_betas_zero_snr=True is not supported")
    return np.cumprod(1.0 - betas_from_config(cfg))


def _per_sample(alpha_bar, ndim: int):
    return jnp.reshape(alpha_bar, (-1,) + (1,) * (ndim - 1))


def add_noise(x0, noise, alpha_bar):
    """x_t = sqrt(abar) x0 + sqrt(1 − abar) noise, abar one value per sample."""
    a = _per_sample(alpha_bar, x0.ndim)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def training_target(x0, noise, alpha_bar, prediction_type: str):
    """The UNet's regression target: eps, or v = sqrt(abar) eps − sqrt(1 − abar) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _per_sample(alpha_bar, x0.ndim)
        return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0
    raise InputError(f"prediction_type {prediction_type!r} has no training target here "
                     "(use epsilon or v_prediction)")


def epsilon_from_output(x_t, output, alpha_bar, prediction_type: str):
    """The noise a UNet output implies at x_t: the output itself (epsilon), sqrt(abar) v + sqrt(1 − abar) x_t
    (v-prediction) or (x_t − sqrt(abar) x0) / sqrt(1 − abar) (sample); abar one value per sample or one for all."""
    a = _per_sample(alpha_bar, x_t.ndim)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return jnp.sqrt(a) * output + jnp.sqrt(1.0 - a) * x_t
    if prediction_type == "sample":
        return (x_t - jnp.sqrt(a) * output) / jnp.sqrt(1.0 - a)
    raise InputError(f"unsupported prediction_type {prediction_type!r}")
