"""SD folders and fine-tuned checkpoints -> Flax modules and parameter trees.

`load_pipeline` reads a diffusers-layout folder; `load_finetuned` reads a fine-tuned checkpoint
in any form docs/cli.md lists (full folder, partial folder, LoRA file or folder) against its
pretrained pipeline. PyTorch weights are converted once and cached with orbax, keyed on the
source files' paths, sizes and mtimes, so a changed file is never served from a stale cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from finextract_jax.errors import CheckpointError, ConfigMismatchError
from finextract_jax.logs import quiet_orbax
from finextract_jax.options import DTYPES
from finextract_jax.models import components, configs, hub, lora, lora_files, single_file, single_file_configs
from finextract_jax.models.convert import pytorch_to_flax
from finextract_jax.models.weights import find_weights, read_json, read_msgpack, read_state_dict, to_float32

log = logging.getLogger(__name__)

CACHE_VERSION = "1"
LORA_FILE = lora_files.LORA_FILE
FINETUNED_FORMATS = ("auto", "full", "single_file", "lora")  # how --finetuned is read ("auto": detect_format)
_FAMILY = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers"}
_BUILDERS = {"unet": components.unet_from_config, "vae": components.vae_from_config,
             "text_encoder": components.text_encoder_from_config}
JNP_DTYPES = {name: getattr(jnp, name) for name in DTYPES}


def default_cache_dir() -> str | None:
    """$FINEXTRACT_CACHE, or ~/.cache/finextract_jax; FINEXTRACT_CACHE='' disables the cache."""
    value = os.environ.get("FINEXTRACT_CACHE")
    if value is not None:
        return value or None
    return os.path.join(os.path.expanduser("~"), ".cache", "finextract_jax")


@dataclasses.dataclass
class Component:
    module: Any
    params: Any
    config: dict
    source: str


@dataclasses.dataclass
class Pipeline:
    """A Stable Diffusion model as Flax modules + parameter trees.

    `unet_lora` is set for an unmerged LoRA fine-tune: `unet.params` is then the pretrained
    tree itself (one copy in memory) and the delta lives in this `lora` variable collection.
    """

    path: str
    unet: Component
    text_encoder: Component
    tokenizer: Any
    vae: Component | None
    scheduler_config: dict
    unet_lora: Any = None
    # SDXL (a text_time UNet, see models/sdxl.py): the second text encoder (CLIPTextModelWithProjection),
    # its tokenizer, and whether the unconditional embedding is zeros rather than the encoded "".
    text_encoder_2: Component | None = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1) if self.vae else 1

    @property
    def latent_scale(self) -> float:
        """What the VAE's posterior is multiplied by before the UNet sees it (1 for pixel models)."""
        return latent_scale(self.vae)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the UNet denoises: latents, or pixels for a pixel-space model."""
        size = self.unet.module.sample_size
        return (self.unet.module.in_channels, size, size)

    def unet_variables(self) -> dict:
        variables = {"params": self.unet.params}
        if self.unet_lora is not None:
            variables["lora"] = self.unet_lora
        return variables


# diffusers' AutoencoderKL default, for VAE configs that predate the `scaling_factor` key.
DEFAULT_LATENT_SCALE = 0.18215


def latent_scale(vae: Component | None) -> float:
    return float(vae.config.get("scaling_factor", DEFAULT_LATENT_SCALE)) if vae is not None else 1.0


def vae_posterior(vae_module, vae_params, pixels):
    """Pixels [B, 3, H, W] in [-1, 1] -> the VAE posterior's (mean, std), [B, C, h, w], unscaled.
    (diffusers' Flax VAE returns it channels-last; everything here is channels-first.)"""
    dist = vae_module.apply({"params": vae_params}, pixels, method=vae_module.encode).latent_dist
    return jnp.transpose(dist.mean, (0, 3, 1, 2)), jnp.transpose(dist.std, (0, 3, 1, 2))


def vae_decode(vae_module, vae_params, latents, scale: float):
    """UNet-space latents [B, C, h, w] (posterior times `scale`) -> pixels [B, 3, H, W], about [-1, 1]."""
    z = (latents / scale).astype(vae_module.dtype)
    return vae_module.apply({"params": vae_params}, z, method=vae_module.decode).sample


def parse_dtype(dtype) -> Any:
    if isinstance(dtype, str):
        if dtype not in JNP_DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {', '.join(JNP_DTYPES)}")
        return JNP_DTYPES[dtype]
    return dtype


def cast_params(tree, dtype):
    """Floating leaves to `dtype`, on device (one transfer for the whole tree)."""
    dtype = np.dtype(parse_dtype(dtype))
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x
    return jax.device_put(jax.tree_util.tree_map(lambda x: cast(x if isinstance(x, jax.Array) else np.asarray(x)),
                                                 tree))


def _cache_key(weights_path: str, config: dict) -> str:
    stat = os.stat(weights_path)
    blob = json.dumps([CACHE_VERSION, os.path.abspath(weights_path), stat.st_size, stat.st_mtime_ns, config],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _cache_restore(cache_dir: str, key: str):
    path = os.path.join(cache_dir, key)
    if not os.path.isdir(path):
        return None
    import orbax.checkpoint as ocp

    try:
        quiet_orbax()
        return ocp.PyTreeCheckpointer().restore(path)
    except Exception as err:  # an unreadable entry is rebuilt, never trusted
        log.warning("ignoring unreadable cache entry %s (%s)", path, err)
        shutil.rmtree(path, ignore_errors=True)
        return None


def _cache_save(cache_dir: str, key: str, tree: dict):
    import orbax.checkpoint as ocp

    os.makedirs(cache_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir)
    try:
        quiet_orbax()
        ocp.PyTreeCheckpointer().save(os.path.join(staging, "tree"), tree)
        os.replace(os.path.join(staging, "tree"), os.path.join(cache_dir, key))
    except OSError as err:
        log.warning("could not write cache entry %s (%s)", key, err)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_component(folder: str, kind: str, dtype="float32", attention: str = "auto", allow_pickle: bool = False,
                   cache_dir: str | None = None, pending_cache: list | None = None) -> Component:
    """One of unet/, text_encoder/, vae/ as (module, params); weights checked against the config.

    A fresh conversion is cached right away, or, with `pending_cache`, appended there for the
    caller to write once every component of the checkpoint has loaded (so a failed load caches nothing).
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not found (expected a diffusers component folder with config.json)")
    config = read_json(os.path.join(folder, "config.json"))
    compute_dtype = parse_dtype(dtype)
    module = _build(kind, config, compute_dtype, attention, folder)
    expected = lambda: components.expected_shapes(kind, module, config)  # tracing costs seconds: only if needed
    weights = find_weights(folder, _FAMILY[kind])
    if weights.endswith(".msgpack"):
        flat = flatten_dict(read_msgpack(weights))
        _check_tree(flat, expected(), weights)
    else:
        key = _cache_key(weights, config) if cache_dir else None
        cached = _cache_restore(cache_dir, key) if key else None
        if cached is not None:
            flat = flatten_dict(cached)
        else:
            state, _ = read_state_dict(weights, allow_pickle)
            flat = pytorch_to_flax(to_float32(state), expected(), weights)
            if key:
                entry = (cache_dir, key, unflatten_dict(flat))
                pending_cache.append(entry) if pending_cache is not None else _cache_save(*entry)
    params = cast_params(unflatten_dict(to_float32(flat)), compute_dtype)
    return Component(module, params, config, weights)


def _build(kind: str, config: dict, compute_dtype, attention: str, source: str):
    build = _BUILDERS[kind]
    return build(config, compute_dtype, attention, source=source) if kind == "unet" else \
        build(config, compute_dtype, source=source)


def component_from_state(kind: str, config: dict, pt_state: dict, source: str, dtype="float32",
                         attention: str = "auto") -> Component:
    """A component from a diffusers/transformers-named PyTorch state dict (numpy) and its config."""
    compute_dtype = parse_dtype(dtype)
    module = _build(kind, config, compute_dtype, attention, source)
    flat = pytorch_to_flax(to_float32(pt_state), components.expected_shapes(kind, module, config), source)
    return Component(module, cast_params(unflatten_dict(flat), compute_dtype), config, source)


def _check_tree(flat: dict, expected: dict, source: str):
    missing = [k for k in expected if k not in flat]
    unexpected = [k for k in flat if k not in expected]
    wrong = [k for k in expected if k in flat and tuple(np.shape(flat[k])) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        show = lambda keys: ["/".join(k) for k in keys[:3]]
        raise CheckpointError(f"{source}: parameters do not fit config.json (missing {show(missing)}, "
                              f"unexpected {show(unexpected)}, wrong shape {show(wrong)})")


def load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: tokenizer folder not found")
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{folder}: cannot load the CLIP tokenizer ({str(err).splitlines()[0]})") from None


def _require_folder(path: str, what: str):
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: not found; pass the {what}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: is a file; the {what} must be a diffusers folder")


def load_pipeline(path: str, dtype="float32", attention: str = "auto", allow_pickle: bool = False,
                  cache_dir: str | None = "default") -> Pipeline:
    """A diffusers-layout SD folder (weights as Flax msgpack, safetensors or .bin), or a hub id (models/hub.py)."""
    cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir
    path = hub.resolve(path, "pretrained")
    if single_file.is_single_file(path):
        return _single_file_pipeline(path, dtype, attention, allow_pickle)
    _require_folder(path, "pretrained model folder (diffusers layout)")
    if not os.path.isdir(os.path.join(path, "unet")):
        raise CheckpointError(f"{path}: has no unet/ folder; expected the diffusers layout "
                              "(model_index.json, unet/, text_encoder/, tokenizer/, scheduler/, vae/)")
    pending = []
    load = lambda name: load_component(os.path.join(path, name), name, dtype, attention, allow_pickle, cache_dir,
                                       pending)
    scheduler_config = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    vae = load("vae") if os.path.isdir(os.path.join(path, "vae")) else None
    pipe = Pipeline(path, load("unet"), load("text_encoder"), load_tokenizer(os.path.join(path, "tokenizer")), vae,
                    scheduler_config)
    if pipe.unet.config.get("addition_embed_type") == "text_time":
        pipe = dataclasses.replace(pipe, **_sdxl_parts(path, lambda folder: load_component(
            folder, "text_encoder", dtype, attention, allow_pickle, cache_dir, pending)))
    if vae is not None and vae.config.get("latent_channels") != pipe.unet.module.in_channels:
        raise CheckpointError(f"{path}: vae latent_channels {vae.config.get('latent_channels')} != unet in_channels "
                              f"{pipe.unet.module.in_channels}")
    for entry in pending:
        _cache_save(*entry)
    return pipe


def _single_file_pipeline(path: str, dtype, attention: str, allow_pickle: bool) -> Pipeline:
    """A pretrained single file in the original SD/SDXL layout (models/single_file_configs.py: configs
    read off its shapes; tokenizers from tokenizer/ (tokenizer_2/) beside it, else SD's own from the HF cache)."""
    state = single_file.read(path, allow_pickle)
    config = single_file_configs.infer_configs(path, state)
    states = single_file_configs.component_states(state, config)
    build = lambda part: component_from_state(_KIND.get(part, part), config[part], states[part], path, dtype,
                                              attention) if part in states else None
    family = single_file.family(state)
    sdxl = dict(text_encoder_2=build("text_encoder_2"), tokenizer_2=_single_file_tokenizer(path, family, "tokenizer_2"),
                force_zeros_for_empty_prompt=config["force_zeros_for_empty_prompt"]) if family == "sdxl" else {}
    return Pipeline(path, build("unet"), build("text_encoder"), _single_file_tokenizer(path, family), build("vae"),
                    config["scheduler"], **sdxl)


_KIND = {"text_encoder_2": "text_encoder"}
# The tokenizers SD's single files were trained with (as diffusers' from_single_file loads them).
_SD_TOKENIZERS = {("sd1", "tokenizer"): ("openai/clip-vit-large-patch14", ""),
                  ("sd2", "tokenizer"): ("stabilityai/stable-diffusion-2-1", "tokenizer"),
                  ("sdxl", "tokenizer"): ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
                  ("sdxl", "tokenizer_2"): ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2")}


def _single_file_tokenizer(path: str, family: str, folder: str = "tokenizer"):
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), folder)
    if os.path.isdir(beside):
        return load_tokenizer(beside)
    from transformers import CLIPTokenizer

    repo, subfolder = _SD_TOKENIZERS[family, folder]
    try:
        return CLIPTokenizer.from_pretrained(repo, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: a single file holds no tokenizer; put the model's {folder}/ folder beside "
                              f"it, or make {repo} reachable through the Hugging Face cache "
                              f"({str(err).splitlines()[0]})") from None


def _sdxl_parts(path: str, load_text_encoder) -> dict:
    """SDXL's second text encoder and tokenizer, and model_index.json's force_zeros_for_empty_prompt
    (StableDiffusionXLPipeline's default, True, when the file does not say)."""
    for part in ("text_encoder_2", "tokenizer_2"):
        if not os.path.isdir(os.path.join(path, part)):
            raise CheckpointError(f"{path}: an SDXL model (text_time UNet) needs {part}/ "
                                  "(SDXL refiners, with text_encoder_2 alone, are not supported)")
    index_file = os.path.join(path, "model_index.json")
    index = read_json(index_file) if os.path.isfile(index_file) else {}
    return dict(text_encoder_2=load_text_encoder(os.path.join(path, "text_encoder_2")),
                tokenizer_2=load_tokenizer(os.path.join(path, "tokenizer_2")),
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))


def check_compatible(pretrained_config: dict, finetuned_config: dict, source: str, kind: str = "unet"):
    """Raise ConfigMismatchError naming each field where the two configs' resolved architectures
    differ (models/configs.py: keys a config file leaves out count at the library's defaults)."""
    diffs = configs.differences(kind, pretrained_config, finetuned_config)
    if diffs:
        what = {"unet": "UNet", "text_encoder": "text encoder", "scheduler": "noise schedule"}[kind]
        raise ConfigMismatchError(f"{source}: not a fine-tune of the pretrained model; {what} config differs in "
                                  + "; ".join(diffs))


def detect_format(path: str) -> str:
    """'lora' for a LoRA file or a folder holding pytorch_lora_weights.safetensors; 'full' for a folder with unet/."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: not found; pass a fine-tuned SD folder, a unet/ folder or a LoRA file")
    if os.path.isfile(path):
        if single_file.is_single_file(path):
            return "single_file"
        if path.endswith(".safetensors"):
            return "lora"
        raise CheckpointError(f"{path}: a single file must be a LoRA .safetensors file or an SD checkpoint "
                              "(.safetensors, or .ckpt with --allow_pickle)")
    if lora_files.is_adapter_folder(path):  # diffusers' LoRA file, or PEFT's adapter_model + adapter_config
        return "lora"
    if os.path.isdir(os.path.join(path, "unet")):
        return "full"
    raise CheckpointError(f"{path}: has neither unet/ nor {LORA_FILE} nor a PEFT adapter_model; expected a "
                          "fine-tuned SD folder or a LoRA")


def load_finetuned(pretrained: Pipeline, path: str, finetuned_format: str = "auto", lora_mode: str = "merged",
                   lora_scale: float = 1.0, dtype="float32", attention: str = "auto", allow_pickle: bool = False,
                   cache_dir: str | None = "default") -> Pipeline:
    """The fine-tuned model as a Pipeline sharing the pretrained parts it does not replace.

    lora_mode: 'merged' folds W + scale*(alpha/r)*B@A into a full UNet tree; 'unmerged' keeps the
    pretrained tree and puts the factors in `unet_lora` (text-encoder LoRA is always merged: the
    prompt is encoded once, so it costs nothing). An adapter that cannot run unmerged (LoCon,
    DoRA, LoHa, LoKr, LoRA outside the attention blocks) is merged whatever lora_mode says.
    """
    cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir
    path = hub.resolve(path, "finetuned")
    fmt = detect_format(path) if finetuned_format == "auto" else finetuned_format
    if fmt == "full":
        _require_folder(path, "fine-tuned model folder")
        if not os.path.isdir(os.path.join(path, "unet")):
            raise CheckpointError(f"{path}: has no unet/ folder; a full fine-tune needs at least unet/")
        pending = []
        unet_config = read_json(os.path.join(path, "unet", "config.json"))
        check_compatible(pretrained.unet.config, unet_config, path)
        scheduler_file = os.path.join(path, "scheduler", "scheduler_config.json")
        if os.path.isfile(scheduler_file):
            check_compatible(pretrained.scheduler_config, read_json(scheduler_file), path, "scheduler")
        unet = load_component(os.path.join(path, "unet"), "unet", dtype, attention, allow_pickle, cache_dir, pending)
        text_encoder = pretrained.text_encoder
        if os.path.isdir(os.path.join(path, "text_encoder")):
            check_compatible(pretrained.text_encoder.config, read_json(os.path.join(path, "text_encoder", "config.json")),
                             path, "text_encoder")
            text_encoder = load_component(os.path.join(path, "text_encoder"), "text_encoder", dtype, attention,
                                          allow_pickle, cache_dir, pending)
        tokenizer = load_tokenizer(os.path.join(path, "tokenizer")) if os.path.isdir(
            os.path.join(path, "tokenizer")) else pretrained.tokenizer
        text_encoder_2 = pretrained.text_encoder_2
        if text_encoder_2 is not None and os.path.isdir(os.path.join(path, "text_encoder_2")):  # SDXL
            text_encoder_2 = load_component(os.path.join(path, "text_encoder_2"), "text_encoder", dtype, attention,
                                            allow_pickle, cache_dir, pending)
        for entry in pending:
            _cache_save(*entry)
        return dataclasses.replace(pretrained, path=path, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                   text_encoder_2=text_encoder_2, unet_lora=None)
    if fmt == "single_file":
        return _single_file_finetune(pretrained, path, dtype, attention, allow_pickle)
    if fmt != "lora":
        raise CheckpointError(f"unknown finetuned_format {finetuned_format!r}; use {', '.join(FINETUNED_FORMATS)}")
    if lora_mode not in ("merged", "unmerged"):
        raise CheckpointError(f"unknown lora_mode {lora_mode!r}; use merged or unmerged")
    tensors, metadata, file = lora_files.read_adapter(path, allow_pickle)
    second = pretrained.text_encoder_2
    resolved = lora.resolve(tensors, metadata, pretrained.unet.params, pretrained.text_encoder.params, file,
                            lora_scale, text_encoder_2_params=second.params if second else None)
    merge_text = lambda part, updates: dataclasses.replace(part, params=cast_params(lora.merge(part.params, updates),
                                                                                    dtype), source=file)
    text_encoder = merge_text(pretrained.text_encoder, resolved.text_encoder) if resolved.text_encoder else \
        pretrained.text_encoder
    second = merge_text(second, resolved.text_encoder_2) if resolved.text_encoder_2 else second
    obstacle = lora.unmerged_obstacle(resolved.unet) if lora_mode == "unmerged" else None
    if obstacle:
        log.info("%s: merged into the UNet (%s, which cannot run unmerged)", file, obstacle)
    if lora_mode == "merged" or obstacle:
        unet = dataclasses.replace(pretrained.unet, params=cast_params(lora.merge(pretrained.unet.params,
                                                                                  resolved.unet), dtype), source=file)
        return dataclasses.replace(pretrained, path=path, unet=unet, text_encoder=text_encoder,
                                   text_encoder_2=second, unet_lora=None)
    collection = cast_params(lora.lora_collection(resolved.unet, file), dtype) if resolved.unet else None
    return dataclasses.replace(pretrained, path=path, text_encoder=text_encoder, text_encoder_2=second,
                               unet_lora=collection)


def _single_file_finetune(pretrained: Pipeline, path: str, dtype, attention: str, allow_pickle: bool) -> Pipeline:
    """A fine-tune as one original-layout file, read with the pretrained model's configs: every
    weight must fit them (the file's UNet and text encoder replace the pretrained ones; its VAE, if
    any, is not used, as for a fine-tuned folder)."""
    state = single_file.read(path, allow_pickle)
    configs_ = {"unet": pretrained.unet.config, "text_encoder": pretrained.text_encoder.config,
                "text_encoder_2": pretrained.text_encoder_2.config if pretrained.text_encoder_2 else None}
    states = single_file_configs.component_states(state, configs_)
    try:
        parts = {part: component_from_state(_KIND.get(part, part), configs_[part], pt_state, path, dtype, attention)
                 for part, pt_state in states.items() if pt_state}
    except CheckpointError as err:
        raise ConfigMismatchError(f"not a fine-tune of the pretrained model: {err}") from None
    if "unet" not in parts:
        raise CheckpointError(f"{path}: holds no UNet weights")
    return dataclasses.replace(pretrained, path=path, unet_lora=None, **parts)


def tokenize(tokenizer, prompts) -> np.ndarray:
    """[n, model_max_length] int32 ids, padded and truncated like diffusers' SD pipeline."""
    return np.asarray(tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="np").input_ids, np.int32)


def encode_prompts(text_encoder: Component, tokenizer, prompts) -> jax.Array:
    """The CLIP last hidden states SD conditions on, [n, tokens, dim]."""
    ids = jnp.asarray(tokenize(tokenizer, prompts))
    return _encode(text_encoder.module, text_encoder.params, ids)


def _encode(module, params, ids):
    return jax.jit(lambda p, i: module(i, params=p, train=False)[0])(params, ids)
