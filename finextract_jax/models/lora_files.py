"""Where adapter weights and their settings live on disk, as one (tensors, metadata) pair for lora.py.

Two writers, two layouts:
- diffusers' `save_lora_weights` (pipelines) and `save_lora_adapter` (one model): one
  `pytorch_lora_weights.safetensors`, its keys prefixed `unet.` / `text_encoder.` / `text_encoder_2.`
  (pipelines) or not at all (one model), the PEFT settings in the `lora_adapter_metadata` header
  entry, with the same prefixes or none;
- PEFT's `save_pretrained` (a PeftModel around the UNet or a text encoder): `adapter_model.safetensors`
  (older PEFT: `adapter_model.bin`, a pickle) with keys `base_model.model.<module>.lora_A.weight`, and
  the settings in `adapter_config.json` (peft_type, r, lora_alpha or alpha, rank_pattern,
  alpha_pattern, use_rslora, use_dora, target_modules, ...). A DreamBooth script saving both models
  writes `unet/` and `text_encoder/` (SDXL: `text_encoder_2/`) subfolders, each such a pair.

A PEFT folder's model is named by its folder (unet, text_encoder, text_encoder_2), else by its keys
(a CLIP text encoder's modules start with `text_model.`, a UNet's never do). Its config becomes the
same prefixed `lora_adapter_metadata` diffusers writes, so lora.py reads one format.
"""
from __future__ import annotations

import json
import os

from finextract_jax.errors import CheckpointError, LoraError
from finextract_jax.models.weights import read_state_dict

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights / save_lora_adapter
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's save_pretrained
ADAPTER_CONFIG = "adapter_config.json"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# PEFT adapter types whose saved factors lora.py applies (their alpha key: LoRA's lora_alpha, LoHa/LoKr's alpha).
PEFT_TYPES = ("LORA", "LOHA", "LOKR")


def _adapter_file(folder: str) -> str | None:
    return next((os.path.join(folder, n) for n in ADAPTER_FILES if os.path.isfile(os.path.join(folder, n))), None)


def peft_folders(path: str) -> list:
    """[(component or None, adapter file)] of a PEFT save: the folder itself, or its component subfolders."""
    if not os.path.isdir(path):
        return []
    own = _adapter_file(path)
    if own:
        name = os.path.basename(os.path.normpath(path))
        return [(name if name in COMPONENTS else None, own)]
    found = [(c, _adapter_file(os.path.join(path, c))) for c in COMPONENTS]
    return [(c, f) for c, f in found if f]


def is_adapter_folder(path: str) -> bool:
    """A folder holding diffusers' LoRA file or a PEFT adapter save (docstring above)."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, LORA_FILE)) or bool(peft_folders(path)))


def _peft_config(file: str) -> dict:
    """adapter_config.json beside a PEFT adapter file, checked for what lora.py cannot apply ({} if absent)."""
    path = os.path.join(os.path.dirname(file), ADAPTER_CONFIG)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise LoraError(f"{path}: not a readable PEFT adapter config ({err})") from None
    if not isinstance(config, dict):
        raise LoraError(f"{path}: not a PEFT adapter config (expected a JSON object)")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type not in PEFT_TYPES:
        raise LoraError(f"{path}: a PEFT {peft_type} adapter, which finextract_jax does not apply; supported: "
                        "LORA (LoRA, DoRA, rsLoRA), LOHA, LOKR")
    if config.get("modules_to_save"):
        raise LoraError(f"{path}: trains whole modules besides the adapter (modules_to_save "
                        f"{config['modules_to_save']}), which finextract_jax does not apply")
    if config.get("bias", "none") != "none":
        raise LoraError(f"{path}: trains biases (bias={config['bias']!r}), which finextract_jax does not apply")
    return config


def _component(named: str | None, tensors: dict) -> str:
    if named:
        return named
    modules = [k.removeprefix("base_model.model.") for k in tensors]
    return "text_encoder" if modules and all(m.startswith("text_model.") for m in modules) else "unet"


def read_adapter(path: str, allow_pickle: bool = False) -> tuple[dict, dict, str]:
    """(tensors, metadata, the file to name in messages) of a LoRA file or folder, in diffusers' pipeline
    spelling: PEFT saves get component-prefixed keys and their adapter_config.json as lora_adapter_metadata."""
    if os.path.isfile(path):
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        saves = [(folder if folder in COMPONENTS else None, path)] if os.path.basename(path) in ADAPTER_FILES else []
    elif os.path.isfile(os.path.join(path, LORA_FILE)):
        saves, path = [], os.path.join(path, LORA_FILE)
    else:
        saves = peft_folders(path)
        if not saves:
            raise CheckpointError(f"{path}: holds neither {LORA_FILE} nor a PEFT adapter "
                                  f"({' / '.join(ADAPTER_FILES)} with {ADAPTER_CONFIG})")
    if not saves:
        tensors, metadata = read_state_dict(path, allow_pickle)
        return tensors, metadata, path
    tensors, settings = {}, {}
    for named, file in saves:
        state, _ = read_state_dict(file, allow_pickle)
        component = _component(named, state)
        tensors.update({f"{component}.{k}": v for k, v in state.items()})
        settings.update({f"{component}.{k}": v for k, v in _peft_config(file).items()})
    source = saves[0][1] if len(saves) == 1 else path
    return tensors, {"lora_adapter_metadata": json.dumps(settings)} if settings else {}, source
