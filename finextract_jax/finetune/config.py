"""What determines a fine-tune: the one config object of the `finetune` job and its defaults.

The defaults are the reference's (docs/method.md §1); the binaries, `reproduce` and the demo
build a `FinetuneConfig` and never restate them.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from finextract_jax.errors import InputError
from finextract_jax.finetune import augment as augment_lib
from finextract_jax.finetune import lora as lora_lib

METHODS = ("dreambooth", "lora")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEFAULT_LEARNING_RATE = {"dreambooth": 2e-6, "lora": 1e-4}  # docs/method.md §1
STEPS_PER_IMAGE = 200


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines the trained parameters (plus `steps`, which only says when to stop)."""

    method: str = "dreambooth"
    steps: int = 0  # 0: 200 per training image (the reference)
    learning_rate: float | None = None  # None: 2e-6 (DreamBooth) or 1e-4 (LoRA)
    batch_size: int = 1  # images per micro-batch, over all devices
    grad_accum: int = 1  # micro-batches per optimizer step
    rank: int = 64
    lora_alpha: float | None = None  # None: = rank
    train_text_encoder: bool = False
    augment: str = "none"
    seed: int = 0
    dtype: str = "float32"  # compute dtype; master weights and optimizer state stay float32
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    attention: str = "auto"  # auto: einsum on CPU (compiles faster), fused elsewhere

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"--method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.steps < 0:
            raise InputError(f"--steps must be >= 0 (0 = {STEPS_PER_IMAGE} per image), got {self.steps}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise InputError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise InputError(f"--batch_size and --grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}")
        if self.method == "lora":
            lora_lib.check_rank(self.rank, self.lora_alpha)
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.attention not in ("auto", "fused", "plain"):
            raise InputError(f"attention={self.attention!r} is not one of auto, fused, plain")
        augment_lib.AugmentConfig(self.augment)

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
        out["learning_rate"] = self.lr
        if self.method != "lora":
            out.pop("rank"), out.pop("lora_alpha")
        else:
            out["lora_alpha"] = self.alpha
        return out
