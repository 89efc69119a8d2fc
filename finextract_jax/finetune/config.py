"""What determines a fine-tune: the one config object of the `finetune` job and its defaults.

The defaults are the reference's (docs/method.md §1); the binaries, `reproduce` and the demo
build a `FinetuneConfig` and never restate them.
"""
from __future__ import annotations

import dataclasses

from finextract_jax.errors import InputError
from finextract_jax.finetune import augment as augment_lib
from finextract_jax.finetune import lora as lora_lib
from finextract_jax.options import DTYPES, check_choices, option

METHODS = ("dreambooth", "lora")
DEFAULT_LEARNING_RATE = {"dreambooth": 2e-6, "lora": 1e-4}  # docs/method.md §1
STEPS_PER_IMAGE = 200
ATTENTIONS = ("auto", "fused", "plain")  # auto: einsum on CPU (compiles faster), fused elsewhere


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines the trained parameters (plus `steps`, which only says when to stop)."""

    method: str = option("dreambooth", "Full UNet fine-tuning or LoRA.", choices=METHODS)
    steps: int = option(0, f"Optimizer steps; 0 = {STEPS_PER_IMAGE} per training image (the reference).")
    learning_rate: float | None = option(None, "Constant AdamW learning rate (default "
                                         f"{DEFAULT_LEARNING_RATE['dreambooth']:g} dreambooth, "
                                         f"{DEFAULT_LEARNING_RATE['lora']:g} lora).")
    batch_size: int = option(1, "Images per micro-batch, split over the devices.")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.")
    rank: int = option(64, "LoRA rank.")
    lora_alpha: float | None = option(None, "LoRA alpha (default: = rank).")
    train_text_encoder: bool = option(False, "Also fine-tune the text encoder (fully, or with LoRA).")
    augment: str = option("none", "Defence applied to training images.", choices=augment_lib.AUGMENTS)
    seed: int = option(0, "Seed of LoRA init, data order, noise, timesteps and augmentations.")
    dtype: str = option("float32", "Compute dtype (weights and optimizer state stay float32).", choices=DTYPES)
    adam_beta1: float = option(0.9, flag=False)
    adam_beta2: float = option(0.999, flag=False)
    adam_epsilon: float = option(1e-8, flag=False)
    weight_decay: float = option(1e-2, flag=False)
    max_grad_norm: float = option(1.0, flag=False)
    attention: str = option("auto", choices=ATTENTIONS, flag=False)
    # Training a base from scratch (testbed/base.py) exports an average of the weights: at a high constant
    # learning rate the last iterate is noisy, and a diffusion model's samples show it. Fine-tunes keep 0.
    ema_decay: float = option(0.0, flag=False)

    def __post_init__(self):
        check_choices(self)
        if self.steps < 0:
            raise InputError(f"--steps must be >= 0 (0 = {STEPS_PER_IMAGE} per image), got {self.steps}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise InputError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise InputError(f"--batch_size and --grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}")
        if self.method == "lora":
            lora_lib.check_rank(self.rank, self.lora_alpha)
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[self.method]

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.rank)

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank

    def total_steps(self, num_images: int) -> int:
        return self.steps or STEPS_PER_IMAGE * num_images

    def identity(self) -> dict:
        """The fields a resumed run must share with the checkpoints it resumes from."""
        out = dataclasses.asdict(self)
        out.pop("steps")
        out.pop("attention")
        if not self.ema_decay:
            out.pop("ema_decay")  # checkpoints written before the field existed still resume
        out["learning_rate"] = self.lr
        if self.method != "lora":
            out.pop("rank"), out.pop("lora_alpha")
        else:
            out["lora_alpha"] = self.alpha
        return out
