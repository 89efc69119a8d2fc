"""Training the testbed's base model: the `finetune` trainer, from random weights, with caption dropout.

The base is a 32 px pixel-space model of the SD family (diffusers UNet2DConditionModel, 1.4M
parameters, cross-attention at 8x8 and in the mid block, a 3-layer CLIP text encoder trained with
it, the offline tokenizer
with every caption word as one token, DDPM's pixel-space noise schedule: TESTBED_SCHEDULER), trained on
the testbed's train split (finextract_jax/testbed/data.py).

Caption dropout as SD trains it: each sample of each step independently gets the empty caption
with probability `caption_dropout`, drawn from (seed, step), so that the base learns eps(x, "")
on every image (FineXtract and cfg evaluate it at every step). The train set holds each image
twice, captioned and with "", and the sampler picks the row.
"""
from __future__ import annotations

import functools

import numpy as np

from finextract_jax.errors import InputError
from finextract_jax.finetune.data import TrainSet
from finextract_jax.finetune.train import Trainer

# Sized for 2 CPU cores: 1.2 s per step of 32 images there, idle (2.5 s with YNNPACK, cores shared; attention at
# 16x16 too, or 4M parameters, took 7 s). On one GPU 20,000 steps take minutes.
TESTBED_UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[32, 64, 64],
                    layers_per_block=1, attention_head_dim=8, cross_attention_dim=64,
                    down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"])
TESTBED_TEXT = dict(num_hidden_layers=3, num_attention_heads=4, intermediate_size=256)
# DDPM's pixel-space schedule (linear betas 1e-4..0.02, as google/ddpm-cifar10-32; DDIM with x0 clipped to
# [-1, 1]), not SD's scaled_linear 0.00085..0.012, made for latents. SD's leaves sqrt(abar) = 0.085 of the
# image in x_t at the first DDIM step; emoji on white average +0.54 in [-1, 1], so at 32 px a model trained
# on it reads the background's brightness off the noise's mean (2.5 standard deviations of it), and sampling
# from pure noise, which has none, drew dark, saturated textures without backgrounds (measured on the base
# at step 1000: mean sample pixel 0.16 against the data's 0.54; 0.63 when the mean image's share was put
# into the start noise). DDPM's schedule leaves 0.009 at the first DDIM step (0.3 standard deviations).
TESTBED_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                     "clip_sample": True, "clip_sample_range": 1.0, "timestep_spacing": "leading"}


def make_init(out: str, words, seed: int = 0) -> str:
    """The randomly initialised testbed pipeline (SD layout, PyTorch-named safetensors)."""
    from finextract_jax.models.tiny import make_tiny
    from finextract_jax.models.tokenizer import WORDS

    return make_tiny(out, kind="pixel", fmt="pt", seed=seed, unet_overrides=TESTBED_UNET,
                     words=list(dict.fromkeys(list(WORDS) + list(words))), text_overrides=TESTBED_TEXT,
                     scheduler_overrides=TESTBED_SCHEDULER)


def dropout_train_set(images: np.ndarray, captions: list, keys: list) -> TrainSet:
    """Rows 0..N-1: the images with their captions; rows N..2N-1: the same images with ""."""
    pixels = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return TrainSet(np.concatenate([pixels, pixels]), list(captions) + [""] * len(captions),
                    list(keys) + [k + ":uncond" for k in keys])


class DropoutTrainer(Trainer):
    """The fine-tuning Trainer on a `dropout_train_set`: epochs over the N images, each sample
    captioned "" with probability `caption_dropout`."""

    def __init__(self, *args, caption_dropout: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.steps < 1 or not 0.0 <= caption_dropout < 1.0:
            raise InputError(f"--steps must be >= 1 and --caption_dropout in [0, 1), got {self.config.steps}, "
                             f"{caption_dropout}")
        self.caption_dropout = caption_dropout
        self.num_images = len(self.train_set) // 2
        self.total_steps = self.config.steps

    @functools.lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.config.seed, epoch]).permutation(self.num_images)

    def batch_indices(self, step: int) -> np.ndarray:
        n, per_step = self.num_images, self.config.grad_accum * self.config.batch_size
        sample = np.arange(step * per_step, (step + 1) * per_step)
        rows = np.array([self._permutation(int(g // n))[g % n] for g in sample])
        dropped = np.random.default_rng([self.config.seed, step, 1]).random(per_step) < self.caption_dropout
        return (rows + n * dropped).astype(np.int32).reshape(self.config.grad_accum, self.config.batch_size)

    def run_identity(self) -> dict:
        return {**super().run_identity(), "caption_dropout": self.caption_dropout}
