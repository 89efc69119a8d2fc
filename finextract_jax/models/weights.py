"""Reading weight files safely: Flax msgpack, safetensors (no torch), weights-only pickles.

Untrusted checkpoints never execute code: safetensors and msgpack are pure data; `.bin` goes
through `torch.load(weights_only=True)`; any other pickle (`.ckpt`, `.pt`, `.pth`) is refused
unless the caller allows pickles, and even then it is loaded weights-only.
"""
from __future__ import annotations

import json
import os

import numpy as np

from finextract_jax.errors import CheckpointError

# Per component: (Flax file, safetensors file, PyTorch pickle file), in order of preference.
WEIGHT_NAMES = {
    "diffusers": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "transformers": ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin"),
}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def weight_file_names(family: str) -> list[str]:
    """A component's weight file names in order of preference: Flax, safetensors, .bin, fp16 safetensors."""
    names = WEIGHT_NAMES[family]
    return list(names) + [n.replace(".safetensors", ".fp16.safetensors") for n in names if n.endswith(".safetensors")]


def find_weights(folder: str, family: str) -> str:
    """The weight file of a component folder, preferring Flax, then safetensors, then .bin."""
    for name in weight_file_names(family):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_NAMES[family])})")


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(tensors as numpy arrays, metadata) without importing torch."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except Exception as err:  # safetensors raises its own error types for corrupt headers/data
        raise CheckpointError(f"{path}: not a valid safetensors file ({err}); re-download or re-export it") from None
    return tensors, metadata


ALLOW_PICKLE_HELP = ("Read pickled checkpoints (.ckpt, .pt, .pth), weights-only (torch.load(weights_only=True), no "
                     "code runs); refused without it. Needs torch.")


def read_pickle_weights(path: str, allow_pickle: bool) -> dict:
    """A PyTorch pickle loaded weights-only (no code runs); `.ckpt`/`.pt` need `allow_pickle`."""
    if not path.endswith(".bin") and not allow_pickle:
        raise CheckpointError(f"{path}: pickled checkpoints can run code when loaded and are refused; "
                              "convert it to .safetensors, or pass --allow_pickle to load it weights-only")
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading PyTorch pickles needs torch: pip install 'finextract_jax[torch]'") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be loaded weights-only ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); convert it to .safetensors") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items() if hasattr(v, "numpy")}


def read_state_dict(path: str, allow_pickle: bool = False) -> tuple[dict, dict]:
    """(PyTorch-named numpy state dict, metadata) from a .safetensors or pickle file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: not found")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith(PICKLE_SUFFIXES):
        return read_pickle_weights(path, allow_pickle), {}
    raise CheckpointError(f"{path}: unknown weight format (expected .safetensors, .msgpack or .bin)")


def read_msgpack(path: str) -> dict:
    from flax.serialization import msgpack_restore

    try:
        with open(path, "rb") as f:
            tree = msgpack_restore(f.read())
    except Exception as err:
        raise CheckpointError(f"{path}: not a valid Flax msgpack file ({err})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: expected a parameter tree")
    return tree


def to_float32(tree):
    """numpy floating leaves to float32 (fp16/bf16 checkpoints), others unchanged."""
    return {k: (np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
                or str(np.asarray(v).dtype) == "bfloat16" else np.asarray(v)) for k, v in tree.items()}
