"""Samplers, start noise and (elsewhere in this package) the jitted guided-sampling loop."""
from finextract_jax.sampling.noise import batch_start_noise, load_init_latents, start_noise
from finextract_jax.sampling.schedulers import SAMPLERS, Sampler, SamplerState, make_sampler

__all__ = ["SAMPLERS", "Sampler", "SamplerState", "make_sampler", "start_noise",
           "load_init_latents", "batch_start_noise"]
