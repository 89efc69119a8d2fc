"""LoRA factors for training: which layers, their initialisation, and how they enter the models.

Trainable factors are kept in PEFT's convention: per target layer `down` = A^T [in, r] and
`up` = B^T [r, out], with the delta x @ down @ up * (alpha / r). So Adam sees the same
gradients as PEFT's (a folded-in scale would change the effective learning rate when
alpha != r). The scale is folded into `up` only when the factors are handed to our UNet's
`lora` collection or merged into the text encoder.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from finextract_jax.errors import InputError
from finextract_jax.models.convert import flax_to_pytorch_key

# diffusers' train_dreambooth_lora.py targets (PyTorch module names).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def module_name(path: tuple) -> str:
    """PyTorch module name of a Flax module path (no `.weight`)."""
    return flax_to_pytorch_key(tuple(path) + ("kernel",))[: -len(".weight")]


def target_paths(params, targets) -> list:
    """Flax module paths of the Dense layers whose PyTorch name ends with one of `targets`."""
    paths = []
    for key, value in flatten_dict(params).items():
        if key[-1] != "kernel" or np.ndim(value) != 2:
            continue
        name = module_name(key[:-1])
        if any(name == t or name.endswith("." + t) for t in targets):
            paths.append(key[:-1])
    return sorted(paths)


def check_rank(rank: int, alpha: float):
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
        raise InputError(f"--rank must be a positive integer, got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise InputError(f"--lora_alpha must be positive, got {alpha!r}")


def init_factors(params, targets, rank: int, key) -> dict:
    """{'down', 'up'} per target path (nested like `params`): A ~ N(0, 1/r), B = 0.

    That is PEFT's `init_lora_weights="gaussian"`, which diffusers' LoRA script uses; B = 0 makes
    the fine-tune start exactly at the pretrained model.
    """
    paths = target_paths(params, targets)
    if not paths:
        raise InputError(f"no layers named {list(targets)} in the model; nothing for LoRA to train")
    flat = flatten_dict(params)
    out = {}
    for i, path in enumerate(paths):
        fan_in, fan_out = flat[path + ("kernel",)].shape
        down = jax.random.normal(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32) / rank
        out[path + ("down",)] = down
        out[path + ("up",)] = jnp.zeros((rank, fan_out), jnp.float32)
    return unflatten_dict(out)


def scaled(factors, scale: float):
    """The factors with the LoRA scale folded into `up`: what our UNet's `lora` collection holds."""
    flat = flatten_dict(factors)
    return unflatten_dict({k: (v * scale if k[-1] == "up" else v) for k, v in flat.items()})


def merge(params, factors, scale: float):
    """params with W + scale * down @ up at each factored layer (traceable, differentiable)."""
    flat = dict(flatten_dict(params))
    pairs = flatten_dict(factors)
    for key in pairs:
        if key[-1] != "down":
            continue
        path = key[:-1]
        kernel = flat[path + ("kernel",)]
        delta = pairs[path + ("down",)] @ pairs[path + ("up",)]
        flat[path + ("kernel",)] = kernel + (scale * delta).astype(kernel.dtype)
    return unflatten_dict(flat)


def to_peft_state_dict(factors, prefix: str) -> dict:
    """`<prefix>.<module>.lora_A.weight` [r, in] / `lora_B.weight` [out, r] numpy arrays."""
    out = {}
    for key, value in flatten_dict(factors).items():
        path, factor = key[:-1], key[-1]
        value = np.asarray(jax.device_get(value), np.float32)
        letter = "A" if factor == "down" else "B"
        out[f"{prefix}.{module_name(path)}.lora_{letter}.weight"] = np.ascontiguousarray(value.T)
    return out


def adapter_metadata(rank: int, alpha: float, targets) -> dict:
    """PEFT LoraConfig fields as diffusers stores them (`<component>.` prefix added by the caller)."""
    return {
        "alpha_pattern": {}, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": "gaussian",
        "lora_alpha": alpha, "lora_dropout": 0.0, "peft_type": "LORA", "r": int(rank), "rank_pattern": {},
        "target_modules": sorted(targets), "task_type": None, "use_dora": False, "use_rslora": False,
    }
