"""The configs of a pretrained single file (models/single_file.py), read off its weights' shapes.

A single file holds weights, no config. What the shapes say is read from them (channels, blocks,
layers per block, transformer depth per block, widths, vocabulary, the SDXL text_time embedding's
sizes); what they do not say follows each family's published configs (README, "Checkpoints we read"):
- heads: SD 1.x 8 per block; SD 2.x and SDXL (linear projections) 64 channels per head; CLIP 64 wide;
- SD 2.x conditions on OpenCLIP's penultimate layer (23 of 24 layers built); SDXL keeps every layer
  of both encoders (the pipeline takes their penultimate hidden states itself), the second with its
  text projection (CLIPTextModelWithProjection), and zeros as the empty prompt's embedding;
- sizes: 512 px (SD 1.x, SD 2-base), 768 px (SD 2.x v-prediction), 1024 px (SDXL); VAE scaling
  0.18215, SDXL's 0.13025;
- the prediction type: a sidecar `<file>.yaml` (the original LDM/SGM config, as A1111 and diffusers'
  `original_config` use it) saying `parameterization: "v"` or an SGM `VScaling` denoiser, else SD 1.x
  and SDXL epsilon, SD 2.x v-prediction (SD 2-base, an epsilon model, needs the sidecar);
- the noise schedule: SD's scaled-linear betas, with the scheduler class diffusers' from_single_file
  gives each family (DDIM for SD 1.x/2.x, EulerDiscrete for SDXL).
"""
from __future__ import annotations

import logging
import os
import re

from finextract_jax.errors import CheckpointError
from finextract_jax.models import single_file

log = logging.getLogger(__name__)

# SD's training noise schedule (the scheduler configs of SD 1.5, 2.1 and SDXL base, which diffusers'
# from_single_file takes its schedulers from).
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                "steps_offset": 1, "clip_sample": False, "skip_prk_steps": True, "trained_betas": None,
                "timestep_spacing": "leading"}
SDXL_SCHEDULER = dict(SD_SCHEDULER, _class_name="EulerDiscreteScheduler", interpolation_type="linear",
                      use_karras_sigmas=False, sample_max_value=1.0)
LATENT_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def _count(keys, pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _unet_config(unet: dict, linear: bool, sample_size: int, pooled_dim: int | None) -> dict:
    keys = list(unet)
    levels = _count(keys, r"down_blocks\.(\d+)\.")
    channels = [int(unet[f"down_blocks.{b}.resnets.0.conv1.weight"].shape[0]) for b in range(levels)]
    has_attention = lambda part, b: any(k.startswith(f"{part}.{b}.attentions.") for k in keys)
    cross = next(v.shape[1] for k, v in unet.items() if k.endswith("attn2.to_k.weight"))
    depth = [_count(keys, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1 for b in range(levels)]
    config = {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
        "in_channels": int(unet["conv_in.weight"].shape[1]), "out_channels": int(unet["conv_out.weight"].shape[0]),
        "block_out_channels": channels, "layers_per_block": _count(keys, r"down_blocks\.0\.resnets\.(\d+)\."),
        "down_block_types": ["CrossAttnDownBlock2D" if has_attention("down_blocks", b) else "DownBlock2D"
                             for b in range(levels)],
        "up_block_types": ["CrossAttnUpBlock2D" if has_attention("up_blocks", b) else "UpBlock2D"
                           for b in range(levels)],
        "cross_attention_dim": int(cross), "use_linear_projection": linear,
        "attention_head_dim": [max(1, c // 64) for c in channels] if linear else 8,
        "transformer_layers_per_block": depth if len(set(depth)) > 1 else depth[0],
    }
    if "add_embedding.linear_1.weight" in unet:  # SDXL: pooled text embedding + 6 micro-conditions, each embedded
        inputs = int(unet["add_embedding.linear_1.weight"].shape[1])
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=inputs,
                      addition_time_embed_dim=(inputs - pooled_dim) // 6)
    return config


def _vae_config(vae: dict, sample_size: int, scale: float) -> dict:
    keys = list(vae)
    levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    return {
        "_class_name": "AutoencoderKL", "in_channels": int(vae["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(vae["decoder.conv_out.weight"].shape[0]),
        "block_out_channels": [int(vae[f"encoder.down_blocks.{b}.resnets.0.conv1.weight"].shape[0])
                               for b in range(levels)],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": _count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "latent_channels": int(vae["post_quant_conv.weight"].shape[0]), "norm_num_groups": 32,
        "sample_size": sample_size, "scaling_factor": scale,
    }


def _text_encoder_config(text: dict, open_clip: bool, projection_dim: int = 512) -> dict:
    keys = list(text)
    hidden = int(text["text_model.embeddings.token_embedding.weight"].shape[1])
    config = {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": hidden,
        "vocab_size": int(text["text_model.embeddings.token_embedding.weight"].shape[0]),
        "max_position_embeddings": int(text["text_model.embeddings.position_embedding.weight"].shape[0]),
        "intermediate_size": int(text["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": _count(keys, r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": max(1, hidden // 64), "hidden_act": "gelu" if open_clip else "quick_gelu",
        # Unused by CLIPTextModel, compared all the same: transformers' default; SDXL's CLIP-L 768, as published.
        "layer_norm_eps": 1e-5, "projection_dim": projection_dim,
    }
    if "text_projection.weight" in text:
        config.update(architectures=["CLIPTextModelWithProjection"],
                      projection_dim=int(text["text_projection.weight"].shape[0]))
    return config


def _v_prediction_in_sidecar(config: dict) -> bool:
    """LDM's model.params.parameterization "v", or SGM's denoiser with VScaling (v-prediction SDXL)."""
    params = (config.get("model") or {}).get("params") or {}
    scaling = (((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config") or {})
    return params.get("parameterization") == "v" or str(scaling.get("target", "")).endswith("VScaling")


def prediction_type(path: str, family: str) -> str:
    """From the sidecar `<file>.yaml`, else SD 1.x/SDXL epsilon and SD 2.x v-prediction (module doc)."""
    sidecar = os.path.splitext(path)[0] + ".yaml"
    if os.path.isfile(sidecar):
        import yaml

        try:
            with open(sidecar) as f:
                config = yaml.safe_load(f) or {}
            return "v_prediction" if _v_prediction_in_sidecar(config) else "epsilon"
        except (yaml.YAMLError, AttributeError, OSError) as err:
            raise CheckpointError(f"{sidecar}: not a readable LDM config ({err})") from None
    if family == "sd2":
        log.info("%s: SD 2.x single file without a %s sidecar: v-prediction assumed (SD 2.x 768-v); put its LDM "
                 "config (parameterization: eps) beside it for an epsilon model", path, os.path.basename(sidecar))
        return "v_prediction"
    return "epsilon"


def component_states(state: dict, configs: dict) -> dict:
    """{component: its diffusers/transformers-named state dict} for the components `configs` has."""
    readers = {"unet": single_file.unet_state, "vae": single_file.vae_state,
               "text_encoder": lambda s: single_file.text_encoder_state(
                   s, configs["text_encoder"].get("num_hidden_layers")),
               "text_encoder_2": single_file.text_encoder_2_state}
    return {part: read(state) for part, read in readers.items() if configs.get(part)}


def infer_configs(path: str, state: dict) -> dict:
    """{'unet', 'vae', 'text_encoder', 'text_encoder_2', 'scheduler', 'force_zeros_for_empty_prompt'} of a
    pretrained single file (module doc); vae and text_encoder_2 None when the file has none."""
    family = single_file.family(state)
    prediction = prediction_type(path, family)
    size = {"sdxl": 128, "sd2": 96 if prediction == "v_prediction" else 64}.get(family, 64)
    text = single_file.text_encoder_state(state)
    text_2 = single_file.text_encoder_2_state(state)
    if not text or (family == "sdxl" and not text_2):
        prefixes = f"{single_file.SDXL_CLIP_PREFIX}* and {single_file.SDXL_OPEN_CLIP_PREFIX}*" if family == "sdxl" \
            else f"{single_file.CLIP_PREFIX}* or {single_file.OPEN_CLIP_PREFIX}*"
        raise CheckpointError(f"{path}: has no text encoder ({prefixes}); as the pretrained model a single file "
                              "must hold the whole pipeline")
    text_config = _text_encoder_config(text, family == "sd2", 768 if family == "sdxl" else 512)
    if family == "sd2":  # SD 2.x conditions on OpenCLIP's penultimate layer
        text_config["num_hidden_layers"] -= 1
    text_2_config = _text_encoder_config(text_2, True) if text_2 else None
    unet = _unet_config(single_file.unet_state(state), family != "sd1", size,
                        text_2_config["projection_dim"] if text_2_config else None)
    vae = single_file.vae_state(state)
    return {"unet": unet, "vae": _vae_config(vae, size * 8, LATENT_SCALE[family]) if vae else None,
            "text_encoder": text_config, "text_encoder_2": text_2_config,
            "scheduler": dict(SDXL_SCHEDULER if family == "sdxl" else SD_SCHEDULER, prediction_type=prediction),
            "force_zeros_for_empty_prompt": family == "sdxl"}
