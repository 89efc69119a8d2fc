"""Flax modules built from diffusers/transformers config.json files, refusing what they would mis-build.

This is one of the few places that import diffusers'/transformers' Flax classes (the VAE and the
CLIP text encoder; the UNet is ours, see unet.py). Their deprecation warnings are silenced here.
"""
from __future__ import annotations

import functools
import json
import logging
import warnings

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from finextract_jax.errors import CheckpointError
from finextract_jax.models.configs import resolve_unet
from finextract_jax.models.unet import UNet2DConditionModel

warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers)\..*")
for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from diffusers import FlaxAutoencoderKL  # noqa: E402
from diffusers.utils import logging as _diffusers_logging  # noqa: E402
from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection  # noqa: E402
from transformers.utils import logging as _transformers_logging  # noqa: E402

_diffusers_logging.set_verbosity_error()
_transformers_logging.set_verbosity_error()

# UNet config keys our module reads.
_UNET_FIELDS = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
                "block_out_channels", "layers_per_block", "attention_head_dim", "num_attention_heads",
                "cross_attention_dim", "use_linear_projection", "only_cross_attention",
                "transformer_layers_per_block", "flip_sin_to_cos", "freq_shift", "norm_num_groups", "norm_eps",
                "mid_block_type", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim")
# Keys that change the architecture: we build only their default (SD 1.x/2.x) value and refuse
# any other, instead of silently building a different network.
_UNET_DEFAULT_ONLY = {
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}
# Keys that do not change the float32 network (dropout is off at inference; upcast_attention only
# matters for PyTorch fp16; our attention accumulates in float32 anyway).
_UNET_IGNORED = {"dropout", "upcast_attention", "addition_embed_type_num_heads"}
_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}

_VAE_DEFAULT_ONLY = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                     "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None,
                     "latents_std": None}
_VAE_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
               "layers_per_block", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor")


def _check_config(config: dict, fields, default_only: dict, ignored, source: str):
    for key, value in config.items():
        if key.startswith("_") or key in fields or key in ignored:
            continue
        if key not in default_only:
            raise CheckpointError(f"{source}: unsupported config key {key!r}={value!r}; "
                                  "only SD 1.x/2.x-style models are supported")
        default = default_only[key]
        same = value == default or (isinstance(default, (int, float)) and isinstance(value, (int, float))
                                     and float(value) == float(default))
        if not same:
            raise CheckpointError(f"{source}: config {key}={value!r} is not supported (only {default!r}); "
                                  "this architecture would be built wrongly")


def unet_from_config(config: dict, dtype=jnp.float32, attention: str = "auto", source: str = "unet") -> UNet2DConditionModel:
    """Our UNet for a diffusers config.json, built from the config diffusers would resolve (its
    defaults for missing keys: an SD 1.4 config and a current save of it build the same module)."""
    config = resolve_unet(config)
    _check_config(config, _UNET_FIELDS, _UNET_DEFAULT_ONLY, _UNET_IGNORED, source)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()
              if k in _UNET_FIELDS and not (k == "sample_size" and v is None)}
    for key in ("down_block_types", "up_block_types"):
        unknown = set(kwargs.get(key, ())) - _BLOCKS
        if unknown:
            raise CheckpointError(f"{source}: unsupported {key} {sorted(unknown)}")
    if kwargs.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in ("UNetMidBlock2DCrossAttn", None):
        raise CheckpointError(f"{source}: unsupported mid_block_type {kwargs['mid_block_type']!r}")
    addition = kwargs.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise CheckpointError(f"{source}: unsupported addition_embed_type {addition!r} (only SDXL's 'text_time')")
    if addition and not (kwargs.get("addition_time_embed_dim") and kwargs.get("projection_class_embeddings_input_dim")):
        raise CheckpointError(f"{source}: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                              "projection_class_embeddings_input_dim")
    if isinstance(kwargs.get("cross_attention_dim"), tuple):
        raise CheckpointError(f"{source}: per-block cross_attention_dim is not supported")
    groups = kwargs.get("norm_num_groups", 32)
    for ch in kwargs.get("block_out_channels", ()):
        if ch % groups:
            raise CheckpointError(f"{source}: block_out_channels {ch} is not a multiple of norm_num_groups {groups}")
    return UNet2DConditionModel(**kwargs, dtype=dtype, attention=attention)


def vae_from_config(config: dict, dtype=jnp.float32, source: str = "vae"):
    _check_config(config, _VAE_FIELDS, _VAE_DEFAULT_ONLY, {"force_upcast"}, source)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in _VAE_FIELDS}
    return FlaxAutoencoderKL(**kwargs, dtype=dtype)


def text_encoder_from_config(config: dict, dtype=jnp.float32, source: str = "text_encoder"):
    """FlaxCLIPTextModel, or FlaxCLIPTextModelWithProjection when config.json says so (SDXL's
    text_encoder_2, whose projected pooled output conditions the UNet)."""
    with_projection = "CLIPTextModelWithProjection" in config.get("architectures", ())
    try:
        clip_config = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: bad CLIP text config: {err}") from None
    model = FlaxCLIPTextModelWithProjection if with_projection else FlaxCLIPTextModel
    return model(clip_config, dtype=dtype, _do_init=False)


def expected_shapes(kind: str, module, config: dict) -> dict:
    """Flat {flax key: ShapeDtypeStruct} of a module's parameters, without allocating them.

    Tracing a large module's init takes seconds, and a base model and its fine-tune share one
    config, so shapes are memoised per (kind, config).
    """
    return dict(_expected_shapes(kind, json.dumps(config, sort_keys=True, default=str)))


@functools.lru_cache(maxsize=16)
def _expected_shapes(kind: str, config_json: str):
    config = json.loads(config_json)
    module = {"unet": unet_from_config, "vae": vae_from_config, "text_encoder": text_encoder_from_config}[kind](config)
    key = jax.random.PRNGKey(0)
    if kind == "unet":
        size = module.sample_size
        added = {k: jnp.zeros((1, n)) for k, n in (module.added_cond_shapes() or {}).items()} or None
        shapes = jax.eval_shape(lambda k: module.init(
            k, jnp.zeros((1, module.in_channels, size, size)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 1, module.cross_attention_dim)), added_cond_kwargs=added)["params"], key)
    elif kind == "vae":
        shapes = jax.eval_shape(module.init_weights, key)
    elif kind == "text_encoder":
        shapes = jax.eval_shape(lambda k: module.init_weights(k, (1, 1)), key)
    else:
        raise ValueError(kind)
    return tuple(flatten_dict(shapes).items())
