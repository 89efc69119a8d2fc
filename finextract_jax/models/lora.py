"""Low-rank adapter files (LoRA, LoCon, DoRA, LoHa, LoKr) onto our Flax parameter trees.

Key spellings, per module (`<prefix><module><factor>`):
- prefixes: PEFT / diffusers `unet.`, `text_encoder.`, `text_encoder_2.` (none: one model's own
  save, a text encoder's modules starting `text_model.`, a UNet's not; an inner `base_model.model.`
  is dropped); kohya / LyCORIS `lora_unet_`, `lora_te_` and `lora_te1_` (the first text encoder),
  `lora_te2_` (SDXL's second), with the module path written with `_`, the UNet's in diffusers'
  naming or (kohya's SDXL trainer) the original UNet's, `input_blocks_4_1_...` (single_file.py maps it);
- LoRA (and LoCon, its convolution form: down a kxk conv, up a 1x1 conv): `.lora_A[.<adapter>].weight`
  / `.lora_B...`, `.lora.down.weight` / `.lora.up.weight`, `.lora_down.weight` / `.lora_up.weight`,
  and diffusers' attention processors `<attn>.processor.to_q_lora.down.weight`;
- DoRA: `.lora_magnitude_vector` (PEFT) or `.dora_scale` (LyCORIS) next to a LoRA pair;
- LyCORIS LoHa `.hada_w1_a/_b`, `.hada_w2_a/_b` [, `.hada_t1`, `.hada_t2`] and LoKr `.lokr_w1[_a/_b]`,
  `.lokr_w2[_a/_b]` [, `.lokr_t2`];
- `.alpha`: the module's alpha.
Other adapter kinds (OFT, GLoRA, LyCORIS' lora_mid / diff / norm modules, LoRA biases) are refused
by name. The scale of a module is `lora_scale * alpha / rank`; alpha from its `.alpha` key, else
from the PEFT settings: the file's `lora_adapter_metadata` (diffusers writes PEFT's `unet.lora_alpha`,
`unet.alpha_pattern`, `unet.use_rslora`, or, for one model's save, the same keys bare) or PEFT's
adapter_config.json (lora_files.py turns it into that metadata), else assumed equal to the rank
(diffusers' silent assumption; we log it). A LoKr module with neither factor decomposed has no
rank and scale `lora_scale` (as LyCORIS loads it), or alpha / r when PEFT settings give r (as PEFT
does). The updates themselves are computed in lora_deltas.py; files and folders are found by lora_files.py.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from finextract_jax.errors import LoraError
from finextract_jax.models import lora_deltas, single_file
from finextract_jax.models.convert import flax_to_pytorch_key

log = logging.getLogger(__name__)

_FACTORS = (  # (regex on the key's tail, factor name; None: the regex's first group names it)
    (re.compile(r"\.lora_A(\.[A-Za-z0-9_]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(\.[A-Za-z0-9_]+)?\.weight$"), "up"),
    (re.compile(r"\.(?:lora|lora_linear_layer)\.down\.weight$"), "down"),
    (re.compile(r"\.(?:lora|lora_linear_layer)\.up\.weight$"), "up"),
    (re.compile(r"\.lora_down\.weight$"), "down"),
    (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
    (re.compile(r"\.dora_scale$"), "dora_scale"),
    (re.compile(r"\.lora_magnitude_vector(\.[A-Za-z0-9_]+)?(\.weight)?$"), "magnitude"),
    (re.compile(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)(\.[A-Za-z0-9_]+)?$"), None),
)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_REFUSED = (  # adapter kinds we recognise but do not apply: (regex on a key, what to call them)
    (re.compile(r"\.lora_mid\.weight$"), "LyCORIS LoCon with a CP/Tucker core (lora_mid)"),
    (re.compile(r"\.diff(_b)?$"), "LyCORIS full weight differences (diff)"),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_r|boft_R|boft_s)\b"), "OFT/BOFT"),
    (re.compile(r"\.[wb]_norm$"), "LyCORIS norm-layer fine-tuning (w_norm/b_norm)"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA"),
    (re.compile(r"\.(lora_B|lora_up|lora\.up)(\.[A-Za-z0-9_]+)?\.bias$"), "LoRA with bias terms (lora_bias)"),
    (re.compile(r"\.(ia3_l|on_input)\b"), "(IA)3"),
    (re.compile(r"lora_embedding_[AB]"), "LoRA on token embeddings"),
)
_COMPONENT_PREFIXES = (("unet.", "unet"), ("text_encoder.", "text_encoder"), ("text_encoder_2.", "text_encoder_2"),
                       ("lora_unet_", "unet"), ("lora_te_", "text_encoder"), ("lora_te1_", "text_encoder"),
                       ("lora_te2_", "text_encoder_2"))
_EXTRAS = {"alpha", "dora_scale", "magnitude"}  # per-module values that are not factors of the update


def _split_key(key: str):
    """(component, module name as written, factor) of one adapter tensor key, or None."""
    processor = _PROCESSOR.search(key)
    if processor:  # diffusers' attention processors: <attn>.processor.to_out_lora -> <attn>.to_out.0
        target, factor = processor.groups()
        module, factor = key[:processor.start()] + "." + ("to_out.0" if target == "to_out" else target), factor
    else:
        for pattern, name in _FACTORS:
            match = pattern.search(key)
            if match:
                module, factor = key[:match.start()], name or match.group(1)
                break
        else:
            return None
    for prefix, component in _COMPONENT_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    else:  # one model's own save (diffusers' save_lora_adapter, attention processors): no prefix
        component = None
    module = module.removeprefix("base_model.model.")
    if component is None:  # a CLIP text encoder's modules start with text_model., a UNet's never do
        component = "text_encoder" if module.startswith("text_model.") else "unet"
    return component, module, factor


def _unknown_keys_error(unknown: list, source: str) -> LoraError:
    for pattern, kind in _REFUSED:
        named = [k for k in unknown if pattern.search(k)]
        if named:
            return LoraError(f"{source}: holds {kind} (e.g. {named[0]}), which finextract_jax does not apply; "
                             "supported: LoRA/LoCon, DoRA, LoHa, LoKr")
    return LoraError(f"{source}: {len(unknown)} keys are not adapter factors, e.g. {unknown[:3]}; expected "
                     "diffusers/PEFT (lora_A/lora_B), kohya (lora_down/lora_up) or LyCORIS (hada_*/lokr_*) keys")


def group_modules(tensors: dict, source: str) -> dict:
    """{(component, module name): {factor: float32 array}} from an adapter state dict."""
    modules, unknown = {}, []
    for key, value in tensors.items():
        parsed = _split_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        component, module, factor = parsed
        modules.setdefault((component, module), {})[factor] = np.asarray(value, np.float32)
    if unknown:
        raise _unknown_keys_error(unknown, source)
    if not modules:
        raise LoraError(f"{source}: holds no LoRA factors")
    return modules


def _format(factors: dict, module: str, source: str) -> str:
    """'lora', 'loha' or 'lokr', after checking the module has a complete set of factors."""
    names = set(factors) - _EXTRAS
    loha = set(lora_deltas.LOHA_FACTORS)
    has = lambda full, a, b: (full in names) != ({a, b} <= names)  # one of: the full factor, or both halves
    if names == {"down", "up"}:
        return "lora"
    if names in (loha, loha | {"hada_t1", "hada_t2"}):
        return "loha"
    if (names <= set(lora_deltas.LOKR_FACTORS) and has("lokr_w1", "lokr_w1_a", "lokr_w1_b")
            and has("lokr_w2", "lokr_w2_a", "lokr_w2_b") and not {"lokr_t2", "lokr_w2"} <= names):
        return "lokr"
    for fmt, prefix in (("LoHa", "hada_"), ("LoKr", "lokr_"), ("LoRA", "")):
        if names and all(n.startswith(prefix) for n in names) and (prefix or names < {"down", "up"}):
            raise LoraError(f"{source}: {module} has an incomplete set of {fmt} factors {sorted(names)}")
    raise LoraError(f"{source}: {module} has factors {sorted(factors)} that form no LoRA, LoHa or LoKr update "
                    "(mixed formats, or only an alpha)")


def _pattern_key(patterns: dict, module: str):
    """PEFT's get_pattern_key: the first pattern that matches the module name's tail."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), None)


def _metadata(metadata: dict, source: str) -> dict:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraError(f"{source}: lora_adapter_metadata is not valid JSON") from None
    return config if isinstance(config, dict) else {}


def _component_configs(config: dict, components: set) -> dict:
    """{component: its PEFT settings}: a pipeline save prefixes them (`unet.lora_alpha`); one model's
    save (diffusers' save_lora_adapter) writes them bare, and they then belong to the file's one model."""
    out = {c: {k[len(c) + 1:]: v for k, v in config.items() if k.startswith(c + ".")} for c in components}
    bare = {k: v for k, v in config.items() if "." not in k}
    if bare and len(components) == 1 and not any(out.values()):
        out = {c: bare for c in components}
    return out


def _alpha(factors: dict, config: dict, module: str):
    """(alpha, whether rsLoRA scaling applies): the module's .alpha, else the PEFT settings' (alpha_pattern,
    then lora_alpha, or LoHa/LoKr's alpha), else None."""
    rslora = bool(config.get("use_rslora"))
    if "alpha" in factors:
        return float(factors["alpha"]), rslora
    patterns = config.get("alpha_pattern") or {}
    key = _pattern_key(patterns, module)
    if key is not None:
        return float(patterns[key]), rslora
    alpha = config.get("lora_alpha", config.get("alpha"))
    return (None if alpha is None else float(alpha)), rslora


def _configured_rank(config: dict, module: str):
    """PEFT's r for a module (rank_pattern, then r): PEFT scales a LoKr update by alpha / r even when
    neither of its factors is decomposed, where LyCORIS' own files, without settings, use scale 1."""
    patterns = config.get("rank_pattern") or {}
    key = _pattern_key(patterns, module)
    return patterns[key] if key is not None else config.get("r")


@dataclasses.dataclass
class Update:
    """One module's adapter: factors in the file's (PyTorch) layout and the scale folded onto them."""

    module: str  # the module's name in the file, for messages
    format: str  # 'lora' (LoRA/LoCon), 'loha' or 'lokr'
    factors: dict
    scale: float
    conv: bool  # the base layer is a convolution
    magnitude: np.ndarray | None = None  # DoRA
    peft_magnitude: bool = True  # lora_magnitude_vector (per output) rather than LyCORIS dora_scale

    def weight_delta(self, weight: np.ndarray) -> np.ndarray:
        """The change to a PyTorch-layout weight [out, in(, kh, kw)]."""
        delta = lora_deltas.DELTAS[self.format](self.factors)
        delta = delta.reshape(delta.shape[0], -1)
        if delta.shape != (weight.shape[0], weight.size // weight.shape[0]):
            raise LoraError(f"{self.module}: the {self.format} update has shape {delta.shape}, which does not fit "
                            f"the base layer {weight.shape}; was it made for another base model?")
        delta = delta.reshape(weight.shape) * np.float32(self.scale)
        if self.magnitude is None:
            return delta
        return lora_deltas.dora_weight(weight, delta, self.magnitude, self.peft_magnitude) - weight


@dataclasses.dataclass
class ResolvedLora:
    """Per component: {flax module path: Update}."""

    unet: dict
    text_encoder: dict
    text_encoder_2: dict = dataclasses.field(default_factory=dict)


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


def _layers_per_block(flat_unet: dict) -> int:
    return len({key[1] for key in flat_unet if key[0] == "down_blocks_0" and key[1].startswith("resnets_")})


def _torch_layout(kernel) -> np.ndarray:
    kernel = np.asarray(kernel, np.float32)
    return kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T


def _flax_layout(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T


def _magnitude(factors: dict, weight_shape: tuple, module: str, source: str):
    """(DoRA magnitude, is PEFT's layout) or (None, True), its shape checked against the layer."""
    if "magnitude" in factors:
        m = factors["magnitude"]
        if m.size != weight_shape[0]:
            raise LoraError(f"{source}: {module}: lora_magnitude_vector {m.shape} does not fit {weight_shape[0]} "
                            "output channels")
        return m, True
    if "dora_scale" in factors:
        m = factors["dora_scale"]
        per_out = (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
        per_in = (1, weight_shape[1]) + (1,) * (len(weight_shape) - 2)
        if m.shape not in (per_out, per_in):
            raise LoraError(f"{source}: {module}: dora_scale {m.shape} fits neither {per_out} nor {per_in}")
        return m, False
    return None, True


def resolve(tensors: dict, metadata: dict, unet_params: dict, text_params: dict, source: str,
            lora_scale: float = 1.0, text_encoder_2_params: dict | None = None) -> ResolvedLora:
    """Match an adapter state dict to the modules of our trees, with alpha/rank and scale folded in."""
    modules = group_modules(tensors, source)
    configs = _component_configs(_metadata(metadata, source), {c for c, _ in modules})
    trees = {"unet": unet_params, "text_encoder": text_params, "text_encoder_2": text_encoder_2_params}
    second = sorted(m for c, m in modules if c == "text_encoder_2")
    if second and text_encoder_2_params is None:
        raise LoraError(f"{source}: holds LoRA for a second text encoder (lora_te2_ / text_encoder_2, e.g. "
                        f"{second[0]}), as SDXL has; the pretrained model has one text encoder: is this LoRA for SDXL?")
    flats = {c: flatten_dict(t) for c, t in trees.items() if t is not None}
    indices = {c: _module_index(f) for c, f in flats.items()}
    resolved = {c: {} for c in trees}
    unmatched, assumed_alpha = [], []
    layers_per_block = _layers_per_block(flats["unet"])
    for (component, module), factors in modules.items():
        path = indices[component].get(module)
        if path is None and component == "unet":  # kohya's SDXL spelling: the original (SGM) UNet's names
            sgm = single_file.kohya_sgm_module(module, layers_per_block)
            path = indices["unet"].get(sgm) if sgm else None
        if path is None:
            unmatched.append(f"{component}:{module}")
            continue
        fmt = _format(factors, module, source)
        weight_shape = _torch_layout(flats[component][path + ("kernel",)]).shape
        if fmt == "lora" and (factors["down"].shape[1] != weight_shape[1] or factors["up"].shape[0] != weight_shape[0]
                              or factors["up"].shape[1] != factors["down"].shape[0]):
            raise LoraError(f"{source}: {module}: LoRA shapes down {factors['down'].shape} / up {factors['up'].shape} "
                            f"do not fit the base layer {weight_shape}; was it made for another base model?")
        config = configs[component]
        rank = lora_deltas.RANKS[fmt](factors) or _configured_rank(config, module)
        alpha, rslora = _alpha(factors, config, module)
        if rank is None:
            scale = lora_scale
        else:
            if alpha is None:
                alpha = float(rank)
                assumed_alpha.append(module)
            scale = lora_scale * alpha / (math.sqrt(rank) if rslora else rank)
        magnitude, peft_layout = _magnitude(factors, weight_shape, module, source)
        update_factors = {k: v for k, v in factors.items() if k not in _EXTRAS}
        resolved[component][path] = Update(f"{source}: {module}", fmt, update_factors, scale, len(weight_shape) == 4,
                                           magnitude, peft_layout)
    if unmatched:
        raise LoraError(f"{source}: {len(unmatched)} LoRA modules match no layer of the base model, e.g. "
                        f"{sorted(unmatched)[:3]}; is this LoRA for a different architecture?")
    if assumed_alpha:
        log.warning("%s: no alpha for %d LoRA modules (no .alpha keys or adapter metadata); assuming alpha = rank "
                    "(scale 1), as diffusers does", source, len(assumed_alpha))
    return ResolvedLora(resolved["unet"], resolved["text_encoder"], resolved["text_encoder_2"])


def merge(params: dict, updates: dict) -> dict:
    """A new tree with each targeted kernel replaced by W + its update (float32 arithmetic)."""
    if not updates:
        return params
    flat = dict(flatten_dict(params))
    for path, update in updates.items():
        kernel = flat[path + ("kernel",)]
        delta = _flax_layout(update.weight_delta(_torch_layout(kernel)))
        flat[path + ("kernel",)] = (np.asarray(kernel, np.float32) + delta).astype(kernel.dtype)
    return unflatten_dict(flat)


def unmerged_obstacle(updates: dict) -> str | None:
    """Why these UNet updates cannot run unmerged (as our LoraDense layers' x @ down @ up), or None.

    Only plain LoRA on the transformer blocks' linear layers can; convolutions, DoRA, LoHa and LoKr
    change the weight in ways that side path does not express.
    """
    for path, update in updates.items():
        where = "/".join(path)
        if update.format != "lora" or update.magnitude is not None:
            return f"{where} is {'DoRA' if update.magnitude is not None else update.format}"
        if update.conv:
            return f"{where} is a convolution"
        if not any(part.startswith("attentions_") for part in path):
            return f"{where} is outside the attention blocks"
    return None


def lora_collection(updates: dict, source: str) -> dict:
    """The `lora` variable collection our UNet's LoraDense layers read (unmerged mode)."""
    obstacle = unmerged_obstacle(updates)
    if obstacle:
        raise LoraError(f"{source}: cannot run unmerged ({obstacle}); use merged mode")
    return unflatten_dict({path + (name,): value for path, u in updates.items()
                           for name, value in (("down", u.factors["down"].T),
                                               ("up", u.factors["up"].T * np.float32(u.scale)))})
