"""LoRA files (diffusers/PEFT keys or kohya keys) onto our Flax parameter trees.

Accepted key styles, per low-rank pair (A = down [rank, in], B = up [out, rank]):
- PEFT / diffusers >= 0.24: `unet.<module>.lora_A.weight`, `unet.<module>.lora_B.weight`
  (`text_encoder.` prefix for the text encoder; an optional `.default` adapter name);
- diffusers LoRACompatibleLinear: `unet.<module>.lora.down.weight`, `.lora.up.weight`;
- diffusers attention processors: `<block>.processor.to_q_lora.down.weight` (no prefix: UNet);
- kohya: `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`, and
  `lora_te_<module>` for the text encoder.
The scale of a pair is `lora_scale * alpha / rank`, alpha taken from the pair's `.alpha` key, else
from the file's `lora_adapter_metadata` (diffusers writes `unet.lora_alpha`, `unet.r`,
`unet.alpha_pattern`), else assumed equal to the rank (diffusers' silent assumption; we log it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from finextract_jax.errors import LoraError
from finextract_jax.models.convert import flax_to_pytorch_key

log = logging.getLogger(__name__)

_SUFFIXES = (  # (regex on the key tail, factor)
    (re.compile(r"\.lora_A(\.[A-Za-z0-9_]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(\.[A-Za-z0-9_]+)?\.weight$"), "up"),
    (re.compile(r"\.lora\.down\.weight$"), "down"),
    (re.compile(r"\.lora\.up\.weight$"), "up"),
    (re.compile(r"\.lora_down\.weight$"), "down"),
    (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
_COMPONENT_PREFIXES = (("unet.", "unet"), ("text_encoder.", "text_encoder"), ("lora_unet_", "unet"),
                       ("lora_te_", "text_encoder"), ("lora_te1_", "text_encoder"))


@dataclasses.dataclass
class LoraPair:
    down: np.ndarray  # PyTorch layout [rank, in] (or [rank, in, 1, 1] for 1x1 convs)
    up: np.ndarray  # [out, rank] (or [out, rank, 1, 1])
    alpha: float | None = None


def _split_key(key: str):
    """(component, module name as written, factor) of one LoRA tensor key, or None."""
    for pattern, factor in _SUFFIXES:
        match = pattern.search(key)
        if match:
            module = key[:match.start()]
            break
    else:
        return None
    for prefix, component in _COMPONENT_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    else:
        component = "unet"  # diffusers' attention-processor files carry no prefix
    module = module.removeprefix("base_model.model.")
    processor = _PROCESSOR.search(module)
    if processor:
        target = processor.group(1)
        module = module[:processor.start()] + "." + ("to_out.0" if target == "to_out" else target)
    return component, module, factor


def group_pairs(tensors: dict, source: str) -> dict:
    """{(component, module name): LoraPair} from a LoRA state dict."""
    raw = {}
    unknown = []
    for key, value in tensors.items():
        parsed = _split_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        component, module, factor = parsed
        raw.setdefault((component, module), {})[factor] = np.asarray(value, np.float32)
    if unknown:
        raise LoraError(f"{source}: {len(unknown)} keys are not LoRA factors, e.g. {unknown[:3]}; "
                        "expected diffusers/PEFT (lora_A/lora_B) or kohya (lora_down/lora_up) keys")
    pairs = {}
    for name, factors in raw.items():
        if "down" not in factors or "up" not in factors:
            raise LoraError(f"{source}: {name[1]} has only {sorted(factors)}; both down and up factors are needed")
        alpha = factors.get("alpha")
        pairs[name] = LoraPair(factors["down"], factors["up"], None if alpha is None else float(alpha))
    if not pairs:
        raise LoraError(f"{source}: holds no LoRA factors")
    return pairs


def _metadata_alpha(metadata: dict, component: str, module: str, rank: int):
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return None
    for pattern, alpha in (config.get(f"{component}.alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", module) or re.fullmatch(pattern, module):
            return float(alpha)
    alpha = config.get(f"{component}.lora_alpha")
    return None if alpha is None else float(alpha)


def _module_index(flat_params: dict) -> dict:
    """PyTorch module name and its kohya spelling -> Flax module path, for weight-bearing modules."""
    index = {}
    for key in flat_params:
        if key[-1] != "kernel":
            continue
        name = flax_to_pytorch_key(key)[: -len(".weight")]
        index[name] = key[:-1]
        index[name.replace(".", "_")] = key[:-1]
    return index


@dataclasses.dataclass
class ResolvedLora:
    """Per component: {flax module path: (down [in, r], up [r, out] with the scale folded in, is_conv)}."""

    unet: dict
    text_encoder: dict


def resolve(tensors: dict, metadata: dict, unet_params: dict, text_params: dict, source: str,
            lora_scale: float = 1.0) -> ResolvedLora:
    """Match a LoRA state dict to the modules of our trees and fold alpha/rank and scale in."""
    pairs = group_pairs(tensors, source)
    flats = {"unet": flatten_dict(unet_params), "text_encoder": flatten_dict(text_params)}
    indices = {c: _module_index(f) for c, f in flats.items()}
    resolved = {"unet": {}, "text_encoder": {}}
    unmatched = []
    assumed_alpha = []
    for (component, module), pair in pairs.items():
        path = indices[component].get(module)
        if path is None:
            unmatched.append(f"{component}:{module}")
            continue
        kernel = flats[component][path + ("kernel",)]
        down, up = pair.down, pair.up
        if down.ndim == 4 or up.ndim == 4:
            if down.shape[2:] != (1, 1) or up.shape[2:] != (1, 1):
                raise LoraError(f"{source}: {module} is a {down.shape[2]}x{down.shape[3]} conv LoRA; "
                                "only linear and 1x1-conv LoRA are supported")
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        rank = down.shape[0]
        fan_in, fan_out = kernel.shape[-2], kernel.shape[-1]
        if up.shape[1] != rank or down.shape[1] != fan_in or up.shape[0] != fan_out:
            raise LoraError(f"{source}: {module}: LoRA shapes down {pair.down.shape} / up {pair.up.shape} do not fit "
                            f"the base layer (in {fan_in}, out {fan_out}); was it made for another base model?")
        alpha = pair.alpha if pair.alpha is not None else _metadata_alpha(metadata, component, module, rank)
        if alpha is None:
            alpha = float(rank)
            assumed_alpha.append(module)
        scale = lora_scale * alpha / rank
        resolved[component][path] = (down.T.copy(), (up.T * scale).astype(np.float32), kernel.ndim == 4)
    if unmatched:
        raise LoraError(f"{source}: {len(unmatched)} LoRA modules match no layer of the base model, e.g. "
                        f"{sorted(unmatched)[:3]}; is this LoRA for a different architecture?")
    if assumed_alpha:
        log.warning("%s: no alpha for %d LoRA modules (no .alpha keys or adapter metadata); assuming alpha = rank "
                    "(scale 1), as diffusers does", source, len(assumed_alpha))
    return ResolvedLora(resolved["unet"], resolved["text_encoder"])


def merge(params: dict, deltas: dict) -> dict:
    """A new tree with W + down @ up added to each targeted kernel (float32 arithmetic)."""
    if not deltas:
        return params
    flat = dict(flatten_dict(params))
    for path, (down, up, _) in deltas.items():
        kernel = flat[path + ("kernel",)]
        delta = (down @ up).reshape(kernel.shape)
        flat[path + ("kernel",)] = (np.asarray(kernel, np.float32) + delta).astype(kernel.dtype)
    return unflatten_dict(flat)


def lora_collection(deltas: dict, source: str) -> dict:
    """The `lora` variable collection our UNet's LoraDense layers read (unmerged mode)."""
    convs = [("/".join(p)) for p, (_, _, is_conv) in deltas.items() if is_conv]
    if convs:
        raise LoraError(f"{source}: LoRA on convolution layers ({convs[:2]}) cannot run unmerged; use merged mode")
    # Only the transformer layers are LoraDense; a delta elsewhere would be silently ignored.
    outside = ["/".join(p) for p in deltas if not any(part.startswith("attentions_") for part in p)]
    if outside:
        raise LoraError(f"{source}: LoRA outside the attention blocks ({outside[:2]}) cannot run unmerged; "
                        "use merged mode")
    return unflatten_dict({path + (name,): value for path, (down, up, _) in deltas.items()
                           for name, value in (("down", down), ("up", up))})
