"""Tiny randomly initialised SD pipelines in the diffusers layout (for tests, demos, benchmarks).

Made without torch: our Flax modules are initialised, perturbed so that no parameter is trivially
zero or one (parity tests must exercise every weight), and written either as Flax msgpack or as
PyTorch-named safetensors that diffusers' StableDiffusionPipeline.from_pretrained reads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np
from flax.serialization import to_bytes
from flax.traverse_util import flatten_dict, unflatten_dict

from finextract_jax.models import components
from finextract_jax.models.convert import flax_to_pytorch
from finextract_jax.models.tokenizer import WORDS, write_tokenizer

DIFFUSERS_VERSION = "0.39.0"

SD1_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=4, cross_attention_dim=32, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
SD2_UNET = dict(SD1_UNET, attention_head_dim=[2, 4], use_linear_projection=True,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
# SDXL-shaped: no attention at the first level, linear projections, 64-ish heads scaled down,
# deeper transformers further down, the text_time addition embedding (pooled text embedding of
# TEXT_ENCODER_2's projection_dim + 6 micro-conditions x addition_time_embed_dim), and a context
# that concatenates both text encoders' hidden states (32 + 48).
SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2], use_linear_projection=True, cross_attention_dim=80,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
TEXT_ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# SDXL's OpenCLIP-G text encoder, scaled down: CLIPTextModelWithProjection (pooled -> projection_dim).
TEXT_ENCODER_2 = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=77, projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-5)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=[32, 64], layers_per_block=1, latent_channels=4,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=32,
           sample_size=16, scaling_factor=0.18215)
# SD v1.4's scheduler (the reference implementation takes its timesteps from it).
SCHEDULER_SD1 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                 "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
                 "prediction_type": "epsilon"}
SCHEDULER_SD2 = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                 "steps_offset": 1, "trained_betas": None, "clip_sample": False, "prediction_type": "v_prediction",
                 "timestep_spacing": "leading"}

# Overrides for pixel-space models (kind="pixel"): DDPM's schedule (linear betas 1e-4..0.02, as
# google/ddpm-cifar10-32; DDIM with x0 clipped to [-1, 1]), not SD's scaled_linear 0.00085..0.012, made for
# latents. SD's leaves sqrt(abar) = 0.085 of the image in x_t at the first DDIM step: at 32 px an image whose
# mean is far from 0 (emoji on white: +0.54 in [-1, 1]) shows its mean at ~2.5 noise standard deviations, so
# the model learns to read the brightness off the noise, and sampling from pure noise, which carries none,
# draws dark, saturated, background-less textures (testbed base, step 1000: mean sample pixel 0.16 against
# the data's 0.54). DDPM's schedule leaves 0.009 (0.3 standard deviations).
SCHEDULER_PIXEL = {"_class_name": "DDIMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                   "clip_sample": True, "clip_sample_range": 1.0, "timestep_spacing": "leading"}

# SDXL base's scheduler (EulerDiscrete; our samplers read its schedule) and VAE scaling factor.
SCHEDULER_SDXL = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
                  "interpolation_type": "linear", "use_karras_sigmas": False, "sample_max_value": 1.0,
                  "prediction_type": "epsilon", "timestep_spacing": "leading"}
SDXL_VAE_SCALING = 0.13025


def unet_config(family: str = "sd1", kind: str = "latent", **overrides) -> dict:
    config = dict({"sd2": SD2_UNET, "sdxl": SDXL_UNET}.get(family, SD1_UNET))
    if kind == "pixel":
        config.update(in_channels=3, out_channels=3, sample_size=16)
    config.update(overrides)
    return config


def random_params(shapes: dict, seed: int, scale: float = 0.05):
    """Random parameters for a flat {key: shape} tree, every leaf nontrivial.

    Weights ~ N(0, 1/fan_in) (fan_in from the kernel layout), norm scales near 1, biases small
    but nonzero, so parity tests exercise every weight. numpy, not `module.init`: no compile.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, struct in sorted(shapes.items()):
        shape = tuple(struct.shape)
        noise = rng.standard_normal(shape, dtype=np.float32)
        if path[-1] == "scale":
            out[path] = 1.0 + scale * 2 * noise
        elif path[-1] == "bias":
            out[path] = scale * noise
        else:
            fan_in = int(np.prod(shape[:-1])) if path[-1] == "kernel" else 1
            out[path] = noise / np.sqrt(max(fan_in, 1)) if path[-1] == "kernel" else noise * 0.5
    return unflatten_dict(out)


def init_unet(config: dict, seed: int = 0):
    module = components.unet_from_config(config)
    return random_params(components.expected_shapes("unet", module, config), seed + 1)


def init_text_encoder(config: dict, seed: int = 0):
    module = components.text_encoder_from_config(config)
    return random_params(components.expected_shapes("text_encoder", module, config), seed + 2)


def init_vae(config: dict, seed: int = 0):
    module = components.vae_from_config(config)
    return random_params(components.expected_shapes("vae", module, config), seed + 3)


def write_component(folder: str, kind: str, config: dict, params, fmt: str):
    """config.json + weights (Flax msgpack, or PyTorch-named safetensors) for one component."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    family = "transformers" if kind == "text_encoder" else "diffusers"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if fmt == "flax":
        name = "flax_model.msgpack" if family == "transformers" else "diffusion_flax_model.msgpack"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(to_bytes(jax.tree_util.tree_map(np.asarray, params)))
    elif fmt == "pt":
        name = "model.safetensors" if family == "transformers" else "diffusion_pytorch_model.safetensors"
        state = flax_to_pytorch(flatten_dict(params), vae=kind == "vae")
        save_file(state, os.path.join(folder, name), metadata={"format": "pt"})
    else:
        raise ValueError(f"unknown format {fmt!r}")


def unet_file_config(config: dict) -> dict:
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, **config}


def text_encoder_file_config(config: dict, vocab_size: int, bos: int, eos: int,
                             architecture: str = "CLIPTextModel") -> dict:
    return {"architectures": [architecture], "model_type": "clip_text_model", **config, "vocab_size": vocab_size,
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}


def _write_text_encoder(folder: str, config: dict, vocab_size: int, seed: int, fmt: str,
                        architecture: str = "CLIPTextModel"):
    file_config = text_encoder_file_config(config, vocab_size, vocab_size - 2, vocab_size - 1, architecture)
    write_component(folder, "text_encoder", file_config, init_text_encoder(file_config, seed), fmt)


def make_tiny(out: str, kind: str = "latent", fmt: str = "pt", seed: int = 0,
              prediction_type: str = "epsilon", family: str | None = None, unet_overrides: dict | None = None,
              words=None, text_overrides: dict | None = None, scheduler_overrides: dict | None = None) -> str:
    """Write a tiny random SD pipeline to `out` (atomically: built in a temp folder, then renamed).

    kind: 'latent' (with a tiny VAE), 'pixel' (no VAE) or 'sdxl' (StableDiffusionXLPipeline's
    layout: two text encoders and tokenizers, text_time UNet, EulerDiscrete, SDXL VAE scaling).
    family: 'sd1' (conv projections, epsilon, PNDM scheduler) or 'sd2' (linear projections,
    per-block heads, DDIM scheduler); by default sd2 when prediction_type is v_prediction.
    `words`: the tokenizer's whole-word vocabulary (default tokenizer.WORDS); `text_overrides`:
    text-encoder config fields (its width always follows the UNet's cross_attention_dim);
    `scheduler_overrides`: scheduler config fields (e.g. a pixel-space noise schedule).
    """
    if kind not in ("latent", "pixel", "sdxl"):
        raise ValueError(f"kind must be latent, pixel or sdxl, not {kind!r}")
    sdxl = kind == "sdxl"
    family = "sdxl" if sdxl else family or ("sd2" if prediction_type == "v_prediction" else "sd1")
    words = WORDS if words is None else words
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".make_tiny.", dir=parent)
    try:
        vocab_size = write_tokenizer(os.path.join(staging, "tokenizer"), words)
        u_config = unet_config(family, kind, **(unet_overrides or {}))
        write_component(os.path.join(staging, "unet"), "unet", unet_file_config(u_config), init_unet(u_config, seed),
                        fmt)
        # SDXL's context concatenates both encoders' hidden states.
        width = u_config["cross_attention_dim"] - (TEXT_ENCODER_2["hidden_size"] if sdxl else 0)
        t_config = dict(TEXT_ENCODER, hidden_act="gelu" if family == "sd2" else "quick_gelu",
                        **(text_overrides or {}), hidden_size=width)
        _write_text_encoder(os.path.join(staging, "text_encoder"), t_config, vocab_size, seed, fmt)
        scheduler = dict({"sd2": SCHEDULER_SD2, "sdxl": SCHEDULER_SDXL}.get(family, SCHEDULER_SD1),
                         prediction_type=prediction_type, **(scheduler_overrides or {}),
                         _diffusers_version=DIFFUSERS_VERSION)
        os.makedirs(os.path.join(staging, "scheduler"))
        with open(os.path.join(staging, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(scheduler, f, indent=2)
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                 "feature_extractor": [None, None], "safety_checker": [None, None],
                 "requires_safety_checker": False, "image_encoder": [None, None],
                 "scheduler": ["diffusers", scheduler["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"] if kind != "pixel" else [None, None]}
        if sdxl:
            # OpenCLIP's tokenizer pads with "!" (SDXL's tokenizer_2), not with the end token.
            write_tokenizer(os.path.join(staging, "tokenizer_2"), words, pad_token="!")
            _write_text_encoder(os.path.join(staging, "text_encoder_2"), TEXT_ENCODER_2, vocab_size, seed + 10, fmt,
                                "CLIPTextModelWithProjection")
            index = {k: v for k, v in index.items() if k not in ("safety_checker", "requires_safety_checker")}
            index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True,
                         text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                         tokenizer_2=["transformers", "CLIPTokenizer"])
        if kind != "pixel":
            v_config = dict(VAE, sample_size=u_config["sample_size"] * 2,
                            **({"scaling_factor": SDXL_VAE_SCALING, "force_upcast": True} if sdxl else {}))
            write_component(os.path.join(staging, "vae"), "vae",
                            {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **v_config},
                            init_vae(v_config, seed), fmt)
        with open(os.path.join(staging, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
