"""PyTorch state dicts <-> Flax parameter trees, without torch.

The mapping is guided by the Flax model's expected tree (its shapes, from `jax.eval_shape`),
so that one set of rules serves diffusers' UNet and VAE (which rename `name.N` to `name_N`) and
transformers' CLIP (which keeps `layers/N`): for each PyTorch key we try the few Flax keys it can
be, and keep the one the model has with a matching shape. Every expected parameter must be
filled and every PyTorch parameter used; otherwise the error names the keys.
"""
from __future__ import annotations

import re

import numpy as np

from finextract_jax.errors import CheckpointError

# Modules that diffusers' Flax models hold as lists (`resnets_0`); the PyTorch names are `resnets.0`.
_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
               "transformer_blocks", "to_out", "net")
_LIST_PART = re.compile(r"^(%s)_(\d+)$" % "|".join(_LIST_NAMES))
# The VAE's Flax attention block keeps the pre-0.14 diffusers names.
_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
# Buffers that PyTorch checkpoints carry but that are not parameters.
_IGNORED_PT_KEYS = re.compile(r"(position_ids|num_batches_tracked)$")


def _path_variants(pt_key: str):
    parts = pt_key.split(".")
    yield tuple(parts)
    yield tuple(re.sub(r"(\w+)[.](\d+)", r"\1_\2", pt_key).split("."))


def _candidates(pt_key: str, tensor: np.ndarray):
    """(flax key, converted tensor) pairs that `pt_key` may stand for."""
    for path in _path_variants(pt_key):
        module, leaf = path[:-1], path[-1]
        modules = [module]
        if module and module[-1] in _VAE_ATTENTION:
            modules.append(module[:-1] + (_VAE_ATTENTION[module[-1]],))
        for mod in modules:
            if leaf in ("weight", "gamma"):
                if tensor.ndim == 4:
                    yield mod + ("kernel",), tensor.transpose(2, 3, 1, 0)
                elif tensor.ndim == 2:
                    yield mod + ("kernel",), tensor.T
                    yield mod + ("embedding",), tensor
                yield mod + ("scale",), tensor
            elif leaf in ("bias", "beta"):
                yield mod + ("bias",), tensor
            else:
                yield mod + (leaf,), tensor


def pytorch_to_flax(pt_state: dict, expected: dict, source: str) -> dict:
    """Map a PyTorch state dict (numpy arrays) onto the flat Flax keys of `expected`.

    `expected` maps Flax key tuples to objects with `.shape`. Returns a flat dict of numpy arrays.
    """
    flat = {}
    unused = []
    for pt_key, tensor in pt_state.items():
        if _IGNORED_PT_KEYS.search(pt_key):
            continue
        tensor = np.asarray(tensor)
        for flax_key, converted in _candidates(pt_key, tensor):
            if flax_key in expected and tuple(expected[flax_key].shape) == converted.shape:
                flat[flax_key] = converted
                break
        else:
            unused.append(f"{pt_key} {tuple(tensor.shape)}")
    missing = sorted("/".join(k) + f" {tuple(v.shape)}" for k, v in expected.items() if k not in flat)
    if unused or missing:
        raise CheckpointError(
            f"{source}: weights do not fit the model its config.json describes "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unused)} unexpected, e.g. {unused[:3]}); "
            "check that config.json belongs to these weights")
    return flat


def flax_to_pytorch_key(flax_key: tuple, vae: bool = False) -> str:
    """The PyTorch (diffusers/transformers) name of a flat Flax key."""
    *module, leaf = flax_key
    module = [_LIST_PART.sub(r"\1.\2", part) for part in module]
    if vae and module:
        inverse = {v: k for k, v in _VAE_ATTENTION.items()}
        if module[-1] in inverse:
            module[-1] = inverse[module[-1]].replace("to_out_0", "to_out.0")
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join(module + [leaf])


def flax_to_pytorch(flat_params: dict, vae: bool = False) -> dict:
    """Flat Flax tree -> PyTorch-named state dict of numpy arrays (inverse of pytorch_to_flax)."""
    out = {}
    for key, value in flat_params.items():
        value = np.asarray(value)
        if key[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[flax_to_pytorch_key(key, vae)] = np.ascontiguousarray(value)
    return out
