"""Single-file checkpoints in the original Stable Diffusion (LDM) layout, without torch.

One `.safetensors` (or, allowed explicitly, a weights-only `.ckpt`) holding
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and the text encoder: SD 1.x's
`cond_stage_model.transformer.*` (a transformers CLIPTextModel already) or SD 2.x's OpenCLIP
`cond_stage_model.model.*`. Here: the renaming to diffusers' PyTorch names, as diffusers'
`loaders/single_file_utils.py` does it (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint). diffusers' functions are not called:
that module imports torch at the top, and the library reads safetensors without torch. The map is
checked key by key against `from_single_file` in tests/test_single_file.py.

For a single file used as the *pretrained* model, `infer_configs` reads the configs off the
shapes, with SD's conventions for what shapes do not say (README, "Checkpoints we read"):
head counts (SD 1.x: 8 heads; SD 2.x, linear projections: 64 channels per head), CLIP's 64-wide
heads, and the prediction type: a sidecar `<file>.yaml` (the original LDM config, as A1111 and
diffusers' `original_config` use it) saying `parameterization: "v"`, else SD 1.x epsilon and
SD 2.x v-prediction (SD 2-base, an epsilon model, needs the sidecar).
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np

from finextract_jax.errors import CheckpointError
from finextract_jax.models.weights import PICKLE_SUFFIXES, read_state_dict

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x
SDXL_MARKER = "conditioner.embedders."
# Keys of the original layout that are not weights of the three models (EMA copies, the schedule
# buffers, OpenCLIP's parts CLIPTextModel does not have).
_OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")

_UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_UNET_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OPEN_CLIP_LAYER = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj"))

# SD's training noise schedule (the scheduler configs of SD 1.5 and 2.1, which diffusers'
# from_single_file takes its schedulers from).
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                "steps_offset": 1, "clip_sample": False, "skip_prk_steps": True, "trained_betas": None,
                "timestep_spacing": "leading"}
SD_LATENT_SCALE = 0.18215


def is_single_file(path: str) -> bool:
    """A file holding an original-layout UNet (`model.diffusion_model.*`): pickles are taken to
    be one (a LoRA is never a .ckpt); a .safetensors file is checked by its header alone."""
    if not os.path.isfile(path):
        return False
    if path.endswith(PICKLE_SUFFIXES):
        return True
    if not path.endswith(".safetensors"):
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return any(k.startswith(UNET_PREFIX) for k in f.keys())
    except Exception:  # an unreadable file is reported by the reader that loads it
        return False


def read(path: str, allow_pickle: bool = False) -> dict:
    """The file's state dict as numpy arrays; refuses what is not an SD 1.x/2.x single file."""
    state, _ = read_state_dict(path, allow_pickle)
    if any(k.startswith(SDXL_MARKER) for k in state):
        raise CheckpointError(f"{path}: an SDXL single-file checkpoint; convert it to the diffusers layout "
                              "(only SD 1.x/2.x single files are read)")
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError(f"{path}: no {UNET_PREFIX}* keys; not a Stable Diffusion checkpoint in the "
                              "original layout")
    return state


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _layers_per_block(unet: dict) -> int:
    """From where the first downsampler sits (input_blocks.{L+1}.0.op); one level: all inputs."""
    ops = sorted(int(m.group(1)) for k in unet if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k)))
    if ops:
        return ops[0] - 1
    return len({k.split(".")[1] for k in unet if k.startswith("input_blocks.")}) - 1


def _resnet(rest: str) -> str:
    for old, new in _UNET_RESNET:
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _unet_key(key: str, layers: int) -> str:
    for old, new in _UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    m = re.match(r"middle_block\.(\d+)\.(.+)$", key)
    if m:
        slot, rest = int(m.group(1)), m.group(2)
        return f"mid_block.attentions.0.{rest}" if slot == 1 else f"mid_block.resnets.{slot // 2}.{_resnet(rest)}"
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$", key)
    if not m:
        return key  # unknown: left as is, reported by the loader as unexpected
    part, index, slot, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if part == "input_blocks":
        block, layer = divmod(index - 1, layers + 1)
        if slot == 1:
            return f"down_blocks.{block}.attentions.{layer}.{rest}"
        if rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
        return f"down_blocks.{block}.resnets.{layer}.{_resnet(rest)}"
    block, layer = divmod(index, layers + 1)
    if slot == 0:
        return f"up_blocks.{block}.resnets.{layer}.{_resnet(rest)}"
    if rest.startswith("conv."):  # output_blocks.i.1.conv (no attention) or .2.conv
        return f"up_blocks.{block}.upsamplers.0.{rest}"
    return f"up_blocks.{block}.attentions.{layer}.{rest}"


def unet_state(state: dict) -> dict:
    """`model.diffusion_model.*` -> diffusers UNet2DConditionModel names (EMA copies left out)."""
    unet = _strip(state, UNET_PREFIX)
    layers = _layers_per_block(unet)
    return {_unet_key(k, layers): v for k, v in unet.items()}


def _vae_key(key: str, levels: int) -> str:
    key = re.sub(r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", key)
    m = re.match(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(\w+)$", key)
    if m:
        return f"{m.group(1)}.mid_block.attentions.0.{_VAE_ATTENTION.get(m.group(2), m.group(2))}.{m.group(3)}"
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    # The decoder's levels are numbered from the bottom in LDM, from the top in diffusers.
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.resnets.",
                 key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                 lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.", key)
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def vae_state(state: dict) -> dict:
    """`first_stage_model.*` -> diffusers AutoencoderKL names; the mid-block attention's 1x1
    convolutions become the linear layers diffusers holds ({} when the file has no VAE)."""
    vae = _strip(state, VAE_PREFIX)
    levels = len({k.split(".")[2] for k in vae if k.startswith("decoder.up.")})
    out = {}
    for key, value in vae.items():
        new = _vae_key(key, levels)
        if ".mid_block.attentions.0." in new and new.endswith(".weight") and np.ndim(value) > 2:
            value = np.asarray(value).reshape(value.shape[:2])
        out[new] = value
    return out


def text_encoder_state(state: dict, num_layers: int | None = None) -> dict:
    """The text encoder as transformers CLIPTextModel names ({} when the file has none).

    SD 1.x's is a CLIPTextModel already. SD 2.x's OpenCLIP transformer is renamed and its fused
    attention input projection split into q, k, v; SD 2.x conditions on the penultimate layer, so
    resblocks from `num_layers` on (the config's num_hidden_layers, 23 of 24) are left out.
    """
    clip = _strip(state, CLIP_PREFIX)
    if clip:
        return clip
    open_clip = _strip(state, OPEN_CLIP_PREFIX)
    out = {}
    for key, value in open_clip.items():
        if key in _OPEN_CLIP_UNUSED:
            continue
        top = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
               "positional_embedding": "text_model.embeddings.position_embedding.weight",
               "ln_final.weight": "text_model.final_layer_norm.weight",
               "ln_final.bias": "text_model.final_layer_norm.bias"}
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", key)
        if not m:
            out[key] = value  # unknown: reported by the loader as unexpected
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if num_layers is not None and layer >= num_layers:
            continue
        prefix = f"text_model.encoder.layers.{layer}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            leaf = rest.rsplit("_", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3, axis=0)):
                out[f"{prefix}self_attn.{name}.{leaf}"] = part
            continue
        for old, new in _OPEN_CLIP_LAYER:
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[prefix + rest] = value
    return out


def family(state: dict) -> str:
    """'sd1' (CLIP text encoder, conv projections) or 'sd2' (OpenCLIP, linear projections)."""
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in state):
        return "sd2"
    proj = [v for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")]
    return "sd2" if proj and np.ndim(proj[0]) == 2 else "sd1"


def _count(keys, pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _unet_config(unet: dict, sd2: bool, sample_size: int) -> dict:
    keys = list(unet)
    levels = _count(keys, r"down_blocks\.(\d+)\.")
    channels = [int(unet[f"down_blocks.{b}.resnets.0.conv1.weight"].shape[0]) for b in range(levels)]
    has_attention = lambda part, b: any(k.startswith(f"{part}.{b}.attentions.") for k in keys)
    cross = next(v.shape[1] for k, v in unet.items() if k.endswith("attn2.to_k.weight"))
    depth = [_count(keys, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1 for b in range(levels)]
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
        "in_channels": int(unet["conv_in.weight"].shape[1]), "out_channels": int(unet["conv_out.weight"].shape[0]),
        "block_out_channels": channels, "layers_per_block": _count(keys, r"down_blocks\.0\.resnets\.(\d+)\."),
        "down_block_types": ["CrossAttnDownBlock2D" if has_attention("down_blocks", b) else "DownBlock2D"
                             for b in range(levels)],
        "up_block_types": ["CrossAttnUpBlock2D" if has_attention("up_blocks", b) else "UpBlock2D"
                           for b in range(levels)],
        "cross_attention_dim": int(cross), "use_linear_projection": sd2,
        "attention_head_dim": [max(1, c // 64) for c in channels] if sd2 else 8,
        "transformer_layers_per_block": depth if len(set(depth)) > 1 else depth[0],
    }


def _vae_config(vae: dict, sample_size: int) -> dict:
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
        "sample_size": sample_size, "scaling_factor": SD_LATENT_SCALE,
    }


def _text_encoder_config(text: dict, sd2: bool) -> dict:
    keys = list(text)
    hidden = int(text["text_model.embeddings.token_embedding.weight"].shape[1])
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": hidden,
        "vocab_size": int(text["text_model.embeddings.token_embedding.weight"].shape[0]),
        "max_position_embeddings": int(text["text_model.embeddings.position_embedding.weight"].shape[0]),
        "intermediate_size": int(text["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": _count(keys, r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": max(1, hidden // 64), "hidden_act": "gelu" if sd2 else "quick_gelu",
        "layer_norm_eps": 1e-5, "projection_dim": 512,  # unused by CLIPTextModel; transformers' default
    }


def prediction_type(path: str, sd2: bool) -> str:
    """From the sidecar `<file>.yaml` (LDM config: model.params.parameterization), else SD 1.x
    epsilon and SD 2.x v-prediction (the 768-v models; SD 2-base needs the sidecar)."""
    sidecar = os.path.splitext(path)[0] + ".yaml"
    if os.path.isfile(sidecar):
        import yaml

        try:
            with open(sidecar) as f:
                params = ((yaml.safe_load(f) or {}).get("model") or {}).get("params") or {}
        except (yaml.YAMLError, AttributeError, OSError) as err:
            raise CheckpointError(f"{sidecar}: not a readable LDM config ({err})") from None
        return "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    if sd2:
        log.info("%s: SD 2.x single file without a %s sidecar: v-prediction assumed (SD 2.x 768-v); put its LDM "
                 "config (parameterization: eps) beside it for an epsilon model", path, os.path.basename(sidecar))
        return "v_prediction"
    return "epsilon"


def infer_configs(path: str, state: dict) -> dict:
    """{'unet', 'vae', 'text_encoder', 'scheduler'} configs for a pretrained single file (module doc)."""
    sd2 = family(state) == "sd2"
    prediction = prediction_type(path, sd2)
    size = 96 if sd2 and prediction == "v_prediction" else 64  # 768 px for SD 2.x-v, else 512 px
    unet = unet_state(state)
    text_open_clip = text_encoder_state(state)
    if not text_open_clip:
        raise CheckpointError(f"{path}: has no text encoder ({CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}*); as the "
                              "pretrained model a single file must hold the whole pipeline")
    text_config = _text_encoder_config(text_open_clip, sd2)
    if sd2:  # SD 2.x conditions on OpenCLIP's penultimate layer
        text_config["num_hidden_layers"] -= 1
    vae = vae_state(state)
    return {"unet": _unet_config(unet, sd2, size), "vae": _vae_config(vae, size * 8) if vae else None,
            "text_encoder": text_config, "scheduler": dict(SD_SCHEDULER, prediction_type=prediction)}
