"""Configs compared as models, not as files.

A `config.json` lists only the keys the library that wrote it knew: Stable Diffusion v1.4's
UNet config (diffusers 0.2.2) has no `use_linear_projection`, a DreamBooth fine-tune saved by
current diffusers lists ~50 keys. diffusers builds both with the class's own defaults for what
is missing, so two configs describe the same network when their *resolved* forms agree. Here:
the defaults diffusers (UNet, schedulers) and transformers (CLIP text encoder) fill in, and the
architecture each resolved config describes, so that a difference is reported only where the
networks differ. Torch-free: the defaults are written out here, and tests/test_configs.py checks
them against the signatures of diffusers' PyTorch classes.
"""
from __future__ import annotations

import logging

from finextract_jax.noise_schedule import SCHEDULE_DEFAULTS

log = logging.getLogger(__name__)

# diffusers 0.39 UNet2DConditionModel.__init__ defaults, every argument.
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-05, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}
# Resolved keys that do not change the float32 network we build: the default sample size (an
# input, not a weight), dropout (off at inference), upcast_attention (PyTorch fp16 only).
_UNET_NOT_ARCHITECTURE = {"sample_size", "dropout", "upcast_attention"}
# The defaults every diffusers scheduler class SD ships with (PNDM, DDIM, DDPM, LMS, Euler,
# Euler ancestral, DPM-Solver multistep) shares for the keys that define the training noise
# schedule and what the UNet predicts; the rest of a scheduler config only shapes sampling,
# which always follows the pretrained model's scheduler.
SCHEDULER_DEFAULTS = dict(SCHEDULE_DEFAULTS, prediction_type="epsilon")
# CLIP text-encoder config keys that shape the network (transformers fills the rest with
# CLIPTextConfig's defaults; token ids, dropout and initialisation do not change a forward pass
# of the last hidden state, which is what SD conditions on). Not vocab_size: a fine-tune may add
# tokens (it then ships its own tokenizer/, which encodes its prompts).
_TEXT_ENCODER_ARCHITECTURE = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                              "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
                              "architectures")


def resolve_unet(config: dict) -> dict:
    """The config diffusers' UNet2DConditionModel would record: its defaults for missing keys;
    keys it does not know are dropped, as diffusers ignores them (logged). `_`-keys are kept."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET_DEFAULTS)
    if unknown:
        log.info("UNet config keys %s are not UNet2DConditionModel arguments; ignored as diffusers does", unknown)
    resolved = {k: v for k, v in config.items() if k.startswith("_")}
    resolved.update(UNET_DEFAULTS)
    resolved.update({k: v for k, v in config.items() if k in UNET_DEFAULTS})
    return resolved


def _per_block(value, blocks: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * blocks


def unet_architecture(config: dict) -> dict:
    """What a UNet config builds, in one canonical form: resolved, per-block values as lists, and
    diffusers' head count (`num_attention_heads`, or, by its historical naming, `attention_head_dim`)."""
    resolved = resolve_unet(config)
    blocks = len(resolved["down_block_types"])
    arch = {k: (list(v) if isinstance(v, tuple) else v) for k, v in resolved.items()
            if not k.startswith("_") and k not in _UNET_NOT_ARCHITECTURE}
    heads, head_dim = arch.pop("num_attention_heads"), arch.pop("attention_head_dim")
    arch["attention_heads"] = _per_block(heads or head_dim, blocks)
    for key in ("only_cross_attention", "transformer_layers_per_block"):
        arch[key] = _per_block(arch[key], blocks)
    return arch


def scheduler_architecture(config: dict) -> dict:
    """The training noise schedule and prediction type a scheduler config describes."""
    resolved = dict(SCHEDULER_DEFAULTS)
    resolved.update({k: v for k, v in (config or {}).items() if k in SCHEDULER_DEFAULTS and v is not None})
    resolved["beta_start"], resolved["beta_end"] = float(resolved["beta_start"]), float(resolved["beta_end"])
    return resolved


def text_encoder_architecture(config: dict) -> dict:
    """The CLIP text encoder a config.json describes, with transformers' CLIPTextConfig defaults."""
    from transformers import CLIPTextConfig

    resolved = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}).to_dict()
    arch = {k: resolved.get(k) for k in _TEXT_ENCODER_ARCHITECTURE}
    arch["architectures"] = list(arch["architectures"] or ["CLIPTextModel"])
    return arch


_ARCHITECTURES = {"unet": unet_architecture, "scheduler": scheduler_architecture,
                  "text_encoder": text_encoder_architecture}


def differences(kind: str, pretrained: dict, finetuned: dict) -> list[str]:
    """'field: pretrained X vs fine-tuned Y' for each field where the resolved architectures differ."""
    a, b = _ARCHITECTURES[kind](pretrained), _ARCHITECTURES[kind](finetuned)
    return [f"{key}: pretrained {a.get(key)!r} vs fine-tuned {b.get(key)!r}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
