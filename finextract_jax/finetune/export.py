"""Fine-tunes as ordinary diffusers checkpoints, written atomically (temp + rename).

- DreamBooth: an SD-layout folder. `unet/` (and `text_encoder/` when it was trained) are new
  PyTorch-named `.safetensors`; every other component is taken from the pretrained folder
  (hard-linked where the filesystem allows, else copied; converted to safetensors when the
  pretrained weights are Flax msgpack), so the folder loads on its own with
  `StableDiffusionPipeline.from_pretrained` as well as with `load_finetuned`.
- LoRA: `pytorch_lora_weights.safetensors` with diffusers/PEFT keys and the adapter metadata
  (rank, alpha, target modules) that diffusers' `save_lora_weights` writes (SDXL's second text
  encoder under `text_encoder_2.`, as `StableDiffusionXLPipeline.save_lora_weights` writes it), plus
  an `OWNER_KEY` entry by which a rerun knows the file is its own to replace.

Both go through fileio's atomic writers and ownership rules: an existing --out is replaced only
when finextract wrote it (`check_output`).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
from flax.traverse_util import flatten_dict

from finextract_jax import fileio
from finextract_jax.errors import InputError
from finextract_jax.finetune import lora as lora_lib
from finextract_jax.models.convert import flax_to_pytorch

LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
OWNER_KEY = "finextract_jax"  # safetensors metadata entry of the LoRA files we write
_WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
                 "text_encoder_2": "model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}


def _save_safetensors(tensors: dict, path: str, metadata: dict):
    from safetensors.numpy import save_file

    with fileio.atomic_file(path) as tmp:
        save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}, tmp,
                  metadata=metadata)


def _link_or_copy_tree(src: str, dst: str):
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link)


def _is_our_lora(path: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, "np") as f:
            return OWNER_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable: certainly not a file we wrote
        return False


def check_output(out: str, method: str, inputs: dict):
    """Refuse, before training, an --out that is not ours to (re)place: an existing folder without
    finextract's marker, an existing LoRA file we did not write, a path that cannot be written, or
    one overlapping an input folder ({flag: path}; a replaced folder would take the input along)."""
    if not out:
        raise InputError("--out is required")
    if method == "lora" and out.endswith(".safetensors"):
        if os.path.isdir(out):
            raise InputError(f"--out {out} is a folder; name a .safetensors file or a folder without the suffix")
        if os.path.lexists(out) and not _is_our_lora(out):
            raise InputError(f"--out {out} exists and was not written by finextract; choose a new file name")
        fileio.check_writable_parent(out, "--out")
    else:
        fileio.check_output_dir(out, "--out")
    fileio.check_not_inside(out, "--out", inputs, both_ways=True)


def _component_folder(folder: str, name: str, config: dict, params):
    os.makedirs(folder)
    fileio.atomic_write_json(os.path.join(folder, "config.json"), config)
    state = flax_to_pytorch(flatten_dict(params), vae=name == "vae")
    _save_safetensors(state, os.path.join(folder, _WEIGHT_FILES[name]), {"format": "pt"})


def save_dreambooth(out: str, pretrained_path: str, components: dict) -> str:
    """Write an SD-layout folder: `components` {name: (config, params)} as PyTorch safetensors
    (at least "unet"; "text_encoder" when trained; any other whose pretrained weights are not
    PyTorch), everything else of `pretrained_path` alongside."""
    unknown = sorted(set(components) - set(_WEIGHT_FILES))
    if "unet" not in components or unknown:
        raise InputError(f"save_dreambooth needs a unet and only {sorted(_WEIGHT_FILES)} (got {sorted(components)})")
    with fileio.atomic_dir(out, "--out") as staging:
        for name, (config, params) in components.items():
            _component_folder(os.path.join(staging, name), name, config, params)
        for name in sorted(os.listdir(pretrained_path)):
            src = os.path.join(pretrained_path, name)
            if os.path.exists(os.path.join(staging, name)) or name.startswith("."):
                continue
            if os.path.isdir(src):
                _link_or_copy_tree(src, os.path.join(staging, name))
            elif name == "model_index.json" or name.endswith((".json", ".txt", ".md")):
                shutil.copy2(src, os.path.join(staging, name))
    return out


def lora_file_path(out: str) -> str:
    """`out` itself when it names a .safetensors file, else `out/pytorch_lora_weights.safetensors`."""
    return out if out.endswith(".safetensors") else os.path.join(out, LORA_FILE)


def _alpha_value(alpha):
    alpha = float(alpha)
    return int(alpha) if alpha.is_integer() else alpha


def save_lora(out: str, unet_factors, rank: int, alpha: float, text_factors: dict | None = None,
              unet_targets=lora_lib.UNET_TARGETS, text_targets=lora_lib.TEXT_ENCODER_TARGETS) -> str:
    """Write the factors as diffusers' `save_lora_weights` would; returns the file.

    text_factors: {"text_encoder": factors[, "text_encoder_2": factors]} (the component names are
    the key prefixes diffusers' SD and SDXL pipelines load)."""
    parts = [("unet", unet_factors, unet_targets)] + [(name, factors, text_targets)
                                                      for name, factors in (text_factors or {}).items()]
    parts = [(prefix, factors, targets) for prefix, factors, targets in parts if factors]
    if not parts:
        raise InputError("no LoRA factors to save")
    tensors, metadata = {}, {}
    for prefix, factors, targets in parts:
        tensors.update(lora_lib.to_peft_state_dict(factors, prefix))
        for key, value in lora_lib.adapter_metadata(rank, _alpha_value(alpha), targets).items():
            metadata[f"{prefix}.{key}"] = value
    check_output(out, "lora", {})
    path = lora_file_path(out)
    if path != out:
        fileio.claim_dir(out, "--out")
    _save_safetensors(tensors, path, {"format": "pt", OWNER_KEY: "finetune",
                                      ADAPTER_METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
    return path
