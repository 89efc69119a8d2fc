"""Single-file checkpoints in the original Stable Diffusion (LDM / SGM) layout, without torch.

One `.safetensors` (or, allowed explicitly, a weights-only `.ckpt`) holding
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and the text encoders: SD 1.x's
`cond_stage_model.transformer.*` (a transformers CLIPTextModel already), SD 2.x's OpenCLIP
`cond_stage_model.model.*`, or SDXL's (SGM layout) CLIP-L `conditioner.embedders.0.transformer.*`
and OpenCLIP-G `conditioner.embedders.1.model.*`. Here: the renaming to diffusers' PyTorch names,
as diffusers' `loaders/single_file_utils.py` does it (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint). diffusers'
functions are not called: that module imports torch at the top, and the library reads
safetensors without torch. The map is checked key by key against `from_single_file`
(StableDiffusionPipeline's and StableDiffusionXLPipeline's) in tests/test_single_file.py.
kohya's SDXL LoRA files name UNet modules in this layout too (`kohya_sgm_module`).

For a single file used as the *pretrained* model, single_file_configs.py reads the configs off
the shapes.
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
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's CLIP-L (a CLIPTextModel already)
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP-G (with its text projection)
# OpenCLIP's parts CLIPTextModel does not have (SDXL's text_encoder_2 keeps text_projection).
_OPEN_CLIP_UNUSED = ("logit_scale", "attn_mask")

_UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",  # SDXL
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_UNET_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OPEN_CLIP_LAYER = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj"))


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
    """The file's state dict as numpy arrays; refuses what is not an SD 1.x/2.x/XL single file."""
    state, _ = read_state_dict(path, allow_pickle)
    sdxl_text = {k[len(SDXL_MARKER):].split(".", 2)[1] for k in state if k.startswith(SDXL_MARKER)}
    if sdxl_text and not any(k.startswith((SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX)) for k in state):
        raise CheckpointError(f"{path}: an SDXL checkpoint whose text encoders are not SDXL base's (CLIP-L as "
                              f"{SDXL_CLIP_PREFIX}*, OpenCLIP-G as {SDXL_OPEN_CLIP_PREFIX}*); SDXL refiners are not "
                              "supported")
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


# kohya's LoRA module names for the original UNet (its SDXL trainer's): the names above with "_" for ".".
_KOHYA_SGM = re.compile(r"^(time_embed|label_emb_0|out|input_blocks_\d+|middle_block|output_blocks_\d+)_(\d+)(?:_(.+))?$")
_KOHYA_SGM_RESNET = re.compile(r"^(in_layers|out_layers|emb_layers)_(\d+)$")


def kohya_sgm_module(name: str, layers_per_block: int) -> str | None:
    """A kohya LoRA module in the original UNet's naming (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
    `middle_block_0_in_layers_2`) -> the diffusers module, written with "_" as kohya writes those
    (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`); None for other names."""
    m = _KOHYA_SGM.match(name)
    if not m:
        return None
    head = re.sub(r"_(\d+)$", r".\1", m.group(1))
    tail = _KOHYA_SGM_RESNET.sub(r"\1.\2", m.group(3) or "")
    key = ".".join(part for part in (head, m.group(2), tail) if part) + ".weight"
    return _unet_key(key, layers_per_block)[: -len(".weight")].replace(".", "_")


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


def _open_clip_state(open_clip: dict, num_layers: int | None) -> dict:
    """OpenCLIP's text transformer as transformers CLIP names: the fused attention input projection
    split into q, k, v; resblocks from `num_layers` on left out; `text_projection` (x @ P) as the
    Linear weight P.T of CLIPTextModelWithProjection (dropped by callers that have no projection)."""
    top = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
           "positional_embedding": "text_model.embeddings.position_embedding.weight",
           "ln_final.weight": "text_model.final_layer_norm.weight",
           "ln_final.bias": "text_model.final_layer_norm.bias"}
    out = {}
    for key, value in open_clip.items():
        if key in _OPEN_CLIP_UNUSED:
            continue
        if key == "text_projection":
            out["text_projection.weight"] = np.asarray(value).T
            continue
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


def text_encoder_state(state: dict, num_layers: int | None = None) -> dict:
    """The (first) text encoder as transformers CLIPTextModel names ({} when the file has none).

    SD 1.x's and SDXL's CLIP-L are CLIPTextModels already. SD 2.x's OpenCLIP transformer is renamed
    (`_open_clip_state`); SD 2.x conditions on the penultimate layer, so resblocks from `num_layers`
    on (the config's num_hidden_layers, 23 of 24) are left out, and so is its unused projection.
    """
    clip = _strip(state, CLIP_PREFIX) or _strip(state, SDXL_CLIP_PREFIX)
    if clip:
        return clip
    out = _open_clip_state(_strip(state, OPEN_CLIP_PREFIX), num_layers)
    out.pop("text_projection.weight", None)
    return out


def text_encoder_2_state(state: dict) -> dict:
    """SDXL's OpenCLIP-G as CLIPTextModelWithProjection names, every layer ({} when the file has none)."""
    return _open_clip_state(_strip(state, SDXL_OPEN_CLIP_PREFIX), None)


def family(state: dict) -> str:
    """'sd1' (CLIP text encoder, conv projections), 'sd2' (OpenCLIP, linear projections) or 'sdxl'
    (both text encoders, the UNet's text_time embedding `label_emb`)."""
    if any(k.startswith((SDXL_MARKER, UNET_PREFIX + "label_emb.")) for k in state):
        return "sdxl"
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in state):
        return "sd2"
    proj = [v for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")]
    return "sd2" if proj and np.ndim(proj[0]) == 2 else "sd1"
