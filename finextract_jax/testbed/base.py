"""Training the testbed's base model: the `finetune` trainer, from random weights, with caption dropout.

The base is a 32 px pixel-space model of the SD family (diffusers UNet2DConditionModel, 1.4M
parameters, cross-attention at 8x8 and in the mid block, a 3-layer CLIP text encoder trained with
it, the offline tokenizer
with every caption word as one token, DDPM's pixel-space noise schedule: models/tiny.SCHEDULER_PIXEL, and
v-prediction), trained on the testbed's train split (finextract_jax/testbed/data.py).

Why v-prediction (SD 2.x's objective) and not epsilon: on DDPM's schedule the first DDIM step keeps
sqrt(abar) = 0.0093 of the image in x_t. An epsilon model must predict the noise up to an offset of
0.0093 x the image there, which costs it ~1e-5 of loss per pixel to get wrong, so it learns the image's
brightness at high noise last; DDIM then divides its noise error by 0.0093, clips x0 to [-1, 1], and the
samples come out grey (the epsilon run at step 250: spread of the samples' mean pixel 0.011 against the
data's 0.207, mean 0.009 against 0.538). v = sqrt(abar) eps - sqrt(1 - abar) x0 is the image itself at high
noise: the first thing the model learns is the first thing sampling needs.

Caption dropout as SD trains it: each sample of each step independently gets the empty caption
with probability `caption_dropout`, drawn from (seed, step), so that the base learns eps(x, "")
on every image (FineXtract and cfg evaluate it at every step). The train set holds each image
twice, captioned and with "", and the sampler picks the row.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from finextract_jax.errors import InputError
from finextract_jax.finetune.data import TrainSet
from finextract_jax.finetune.train import Trainer
from finextract_jax.models.tiny import SCHEDULER_PIXEL, make_tiny

# Sized for 2 CPU cores: 1.2 s per step of 32 images there, idle (2.5 s with YNNPACK, cores shared; attention at
# 16x16 too, or 4M parameters, took 7 s). On one GPU 20,000 steps take minutes.
TESTBED_UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[32, 64, 64],
                    layers_per_block=1, attention_head_dim=8, cross_attention_dim=64,
                    down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"])
# Larger variants for a GPU run, still CPU-friendly where it matters: width and depth go to the 16x16 and 8x8
# levels (cheap per parameter), attention stays at 8x8 (at 16x16 it was the CPU's cost).
TESTBED_UNETS = {
    "small": TESTBED_UNET,
    "medium": dict(TESTBED_UNET, block_out_channels=[32, 64, 128], layers_per_block=2),
    "large": dict(TESTBED_UNET, block_out_channels=[64, 128, 192], layers_per_block=2, cross_attention_dim=128),
}
TESTBED_TEXT = dict(num_hidden_layers=3, num_attention_heads=4, intermediate_size=256)
# The trained base the repository carries (SD layout; CARD.md there: how far it was trained and how it did).
COMMITTED_BASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base_model")


def make_init(out: str, words, seed: int = 0, size: str = "small") -> str:
    """The randomly initialised testbed pipeline (SD layout, PyTorch-named safetensors); `size`: a key of
    TESTBED_UNETS."""
    if size not in TESTBED_UNETS:
        raise InputError(f"unknown testbed size {size!r}; one of {', '.join(TESTBED_UNETS)}")
    from finextract_jax.models.tokenizer import WORDS

    return make_tiny(out, kind="pixel", fmt="pt", seed=seed, prediction_type="v_prediction", family="sd1",
                     unet_overrides=TESTBED_UNETS[size],
                     words=list(dict.fromkeys(list(WORDS) + list(words))), text_overrides=TESTBED_TEXT,
                     scheduler_overrides=SCHEDULER_PIXEL)


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
        epochs = sample // n  # one permutation per epoch the batch touches, not one per sample
        rows = np.concatenate([self._permutation(int(e))[sample[epochs == e] % n] for e in np.unique(epochs)])
        dropped = np.random.default_rng([self.config.seed, step, 1]).random(per_step) < self.caption_dropout
        return (rows + n * dropped).astype(np.int32).reshape(self.config.grad_accum, self.config.batch_size)

    def run_identity(self) -> dict:
        return {**super().run_identity(), "caption_dropout": self.caption_dropout}
