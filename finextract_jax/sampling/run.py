"""An extraction run: settings -> images/NNNNN.png + run.json in a workdir, resumable.

Batch k always holds global indices [k*B, (k+1)*B) (the last one padded with repeats that are
dropped), and image i's start noise depends only on (seed, i): so a resumed run recomputes exactly
the batches an uninterrupted run would and its PNGs are bit-identical, and image i is the same
whatever the device count (for the same per-device batch).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import re
import platform
from importlib import metadata

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from finextract_jax.errors import InputError
from finextract_jax.fileio import (atomic_write_json, atomic_write_png, changed_settings, check_not_inside,
                                   check_output_dir, claim_dir, read_record)
from finextract_jax.guidance import METHODS as GUIDANCE_METHODS
from finextract_jax.guidance import get_guidance
from finextract_jax.models.pipeline import FINETUNED_FORMATS
from finextract_jax.models import sdxl
from finextract_jax.options import DTYPES, check_choices, option
from finextract_jax.sampling import engine
from finextract_jax.sampling.schedulers import SAMPLERS
from finextract_jax.sampling.noise import batch_start_noise, load_init_latents

AUTO_PROMPT = "auto"  # --prompt=auto: the caller recovers the fine-tuning caption first

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Every setting that determines the images (all recorded in run.json); the extract binary's flags."""

    pretrained: str = option(help="Pretrained SD model: a diffusers folder, a single-file checkpoint, or a hub "
                             "id org/name[@revision].")
    finetuned: str = option(help="Fine-tuned model: SD folder, unet/ folder, single-file checkpoint, LoRA "
                            "file/folder (diffusers, kohya, LyCORIS, or a PEFT adapter folder), or a hub id "
                            "org/name[/FILE][@revision].")
    prompt: str = option("", "Fine-tuning caption; empty for unconditional extraction; 'auto' recovers it from "
                         "the two models first (kept in workdir/caption.json, as the caption binary writes).")
    method: str = option("finextract", "Guidance method.", choices=GUIDANCE_METHODS)
    guidance_scale: float = option(3.0, "w for finextract, s for cfg (unused by text2img).")
    correction: float = option(-0.02, "k for finextract (the eps_pre correction term).")
    guidance_max_timestep: int | None = option(
        None, "Guide only at timesteps t <= this; the noisier steps before sample the fine-tuned model on the "
        "prompt alone (w = 1, k = 0; cfg's s = 1), so that guidance sharpens the image the fine-tune starts "
        "drawing instead of picking it (docs/method.md §2). Default: every step, as the paper.")
    num_images: int = option(500, "Number of images N.")
    batch_size: int = option(5, "Images per batch (a multiple of the device count).")
    steps: int = option(50, "Denoising steps.")
    sampler: str = option("ddim", "ddim: clean DDIM to abar=1; reference_ddim: the reference implementation's "
                          "schedule; dpm: DPM-Solver++(2M) for fewer steps.", choices=SAMPLERS)
    seed: int = option(0, "Image i's start noise depends only on (seed, i).")
    init_latents: str | None = option(None, "Optional .npy [num_images, C, H, W] of start noise.")
    dtype: str = option("float32", "Parameter/activation dtype.", choices=DTYPES)
    lora_scale: float = option(1.0, "Multiplier on a LoRA's alpha/rank scale.")
    finetuned_format: str = option("auto", "How to read --finetuned.", choices=FINETUNED_FORMATS)
    fusion: str = option("auto", "How the two UNet evaluations of a step are fused in the compiled loop.",
                         choices=engine.FUSIONS)
    # SDXL's micro-conditioning (models/sdxl.py), pixels; unset: diffusers' defaults, the generated
    # (height, width), crop (0, 0) and the generated size. Refused for other models.
    sdxl_original_size: tuple | None = option(None, "SDXL only: original_size HEIGHT,WIDTH the UNet is told "
                                              "(default: the generated size).")
    sdxl_crops_coords_top_left: tuple | None = option(None, "SDXL only: crop top-left TOP,LEFT (default 0,0).")
    sdxl_target_size: tuple | None = option(None, "SDXL only: target_size HEIGHT,WIDTH (default: the generated "
                                            "size).")

    def __post_init__(self):
        check_choices(self)
        for name in SDXL_SETTINGS:
            value = getattr(self, name)
            if value is not None:
                try:
                    value = tuple(int(v) for v in value)
                except (TypeError, ValueError):
                    raise InputError(f"--{name} takes two integers, e.g. 1024,1024, not {value!r}") from None
                object.__setattr__(self, name, value)

    def normalized(self) -> "ExtractConfig":
        from finextract_jax.models.hub import as_recorded  # hub ids stay as given

        absolute = lambda p: os.path.abspath(p) if p else p
        return dataclasses.replace(self, pretrained=as_recorded(self.pretrained),
                                   finetuned=as_recorded(self.finetuned), init_latents=absolute(self.init_latents))


SDXL_SETTINGS = ("sdxl_original_size", "sdxl_crops_coords_top_left", "sdxl_target_size")


def image_name(index: int) -> str:
    return f"{index:05d}.png"


_IMAGE_NAME = re.compile(r"^\d{5}\.png$")


def readable_image(path: str, size: list | None) -> bool:
    """Whether a PNG a run left can be adopted on resume: it decodes completely (a truncated or
    foreign file does not) and, when the run recorded it, has the run's [height, width]."""
    from PIL import Image

    if not os.path.isfile(path):
        return False
    try:
        with Image.open(path) as img:
            img.load()
            ok = img.format == "PNG" and (size is None or [img.height, img.width] == list(size))
    except Exception:  # noqa: BLE001 - any decoder error means "not one of ours, redo it"
        ok = False
    if not ok:
        log.warning("%s is not a complete image of this run; it is generated again", path)
    return ok


def _versions() -> dict:
    names = ("finextract_jax", "jax", "jaxlib", "flax", "diffusers", "transformers", "numpy")
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def _devices() -> dict:
    devices = jax.devices()
    return {"platform": devices[0].platform, "count": len(devices), "kinds": sorted({d.device_kind for d in devices}),
            "process_count": jax.process_count(), "local_device_count": jax.local_device_count()}


def _replicated(tree, mesh):
    """Host-local trees as global replicated arrays (needed when several processes share the mesh)."""
    if jax.process_count() == 1:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx, x=np.asarray(x): x[idx]), tree)


def _agreed_todo(batches, exists) -> list:
    """Batches with a missing image, agreed by all processes (each sees the shared workdir)."""
    missing = np.array([not all(exists(int(i)) for i in b) for b in batches], np.int32)
    if jax.process_count() > 1:
        missing = multihost_utils.process_allgather(missing).max(axis=0)
    return [b for b, m in zip(batches, missing) if m]


def _validate(config: ExtractConfig, num_devices: int):
    if config.num_images < 1:
        raise InputError(f"--num_images must be >= 1, not {config.num_images}")
    if config.batch_size < 1 or config.batch_size % num_devices:
        raise InputError(f"--batch_size={config.batch_size} must be a positive multiple of the device count "
                         f"({num_devices})")
    if config.steps < 1:
        raise InputError(f"--steps must be >= 1, not {config.steps}")
    for name in ("guidance_scale", "correction", "lora_scale"):
        if not math.isfinite(getattr(config, name)):
            raise InputError(f"--{name} must be a finite number, not {getattr(config, name)}")
    if config.guidance_max_timestep is not None and config.guidance_max_timestep < 0:
        raise InputError(f"--guidance_max_timestep must be >= 0, not {config.guidance_max_timestep}")
    get_guidance(config.method)


def warn_if_truncated(tokenizer, text: str, what: str):
    """CLIP reads at most `model_max_length` (77) tokens, start and end included; the rest of a longer
    prompt is dropped (as diffusers does). Say so, naming what is dropped, instead of cutting silently."""
    limit = getattr(tokenizer, "model_max_length", 77)
    ids = tokenizer(text, truncation=False)["input_ids"]
    if len(ids) > limit:
        dropped = tokenizer.decode(ids[limit - 1:-1]).strip()
        log.warning("%s is %d tokens; CLIP reads the first %d, so %r is ignored", what, len(ids), limit, dropped)


def check_finite_weights(pretrained, finetuned):
    """Refuse NaN/Inf in the fine-tuned weights (naming the tensor) before anything is sampled:
    they would only surface as NaN images, blamed on the guidance scale."""
    import jax.numpy as jnp

    trees = {"unet": (finetuned.unet.params, pretrained.unet.params),
             "unet lora": (finetuned.unet_lora, None),
             "text_encoder": (finetuned.text_encoder.params, pretrained.text_encoder.params)}
    for what, (tree, base) in trees.items():
        if tree is None or tree is base:
            continue
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and not bool(jnp.isfinite(leaf).all()):
                name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
                raise InputError(f"--finetuned {finetuned.path}: {what} tensor {name} holds NaN or Inf; "
                                 "the checkpoint is damaged")


def _previous_run(workdir: str, settings: dict) -> dict:
    """The run record already in workdir ({} if none); refuse one that holds other settings, unless
    it failed (then the corrected command starts it over: its images are dropped by `_start_over`)."""
    path = os.path.join(workdir, "run.json")
    if os.path.exists(path):
        previous = read_record(path, "use another --workdir")
        detail = changed_settings(previous.get("settings", {}), settings, limit=4)
        if detail and previous.get("status") != "failed":
            raise InputError(f"{workdir} holds a run with other settings ({detail}); rerun with the same "
                             "settings to resume, or use a new --workdir")
        return {**previous, "start_over": True} if detail else previous
    return {}


def _start_over(workdir: str):
    """Remove the images a failed run with other settings wrote (only names extract writes)."""
    images_dir = os.path.join(workdir, "images")
    if os.path.isdir(images_dir):
        for name in os.listdir(images_dir):
            if _IMAGE_NAME.match(name):
                os.remove(os.path.join(images_dir, name))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None):
    """Join a multi-process run: explicit flags, or automatic on a multi-host TPU slice."""
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise InputError("--coordinator_address needs --num_processes and --process_id")
        if not 0 <= process_id < num_processes:
            raise InputError(f"--process_id={process_id} must be in [0, {num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def extract(config: ExtractConfig, workdir: str, progress: bool = True, devices=None,
            recover_caption=None, allow_pickle: bool = False) -> dict:
    """Generate `config.num_images` images into workdir/images, skipping those already there.

    `config.prompt == "auto"` needs `recover_caption(pretrained, finetuned) -> str`, called once
    both models are loaded (`caption.auto_prompt_resolver(workdir)` keeps the words in
    workdir/caption.json, so a resumed run guides with the very same ones). The words are recorded
    as run.json's "caption"; the settings keep "auto", so the rerun command is the same. Caption
    recovery is the caller's choice, passed in, so that sampling does not depend on it. Returns
    the run record (also written to workdir/run.json).
    """
    from finextract_jax.models import hub
    from finextract_jax.models.pipeline import load_finetuned, load_pipeline

    if config.prompt == AUTO_PROMPT and recover_caption is None:
        raise InputError("prompt 'auto' needs recover_caption (e.g. caption.auto_prompt_resolver(workdir))")
    config = config.normalized()
    mesh = engine.data_mesh(devices)
    _validate(config, mesh.size)
    check_output_dir(workdir, "--workdir")
    check_not_inside(workdir, "--workdir", {"--pretrained": config.pretrained, "--finetuned": config.finetuned,
                                            "--init_latents": config.init_latents}, both_ways=True)
    settings = json.loads(json.dumps(dataclasses.asdict(config)))  # as run.json holds them (tuples as lists)
    previous = _previous_run(workdir, settings)
    start_over = previous.pop("start_over", False)
    previous = {} if start_over else {k: v for k, v in previous.items() if k != "error"}

    batches = [np.arange(k, min(k + config.batch_size, config.num_images))
               for k in range(0, config.num_images, config.batch_size)]
    size = previous.get("image_size")
    exists = lambda i: not start_over and readable_image(os.path.join(workdir, "images", image_name(i)), size)
    todo = _agreed_todo(batches, exists)
    record = {"settings": settings, "versions": _versions(), "devices": _devices(),
              "created": previous.get("created", datetime.datetime.now(datetime.timezone.utc).isoformat()),
              "status": "running"}
    is_writer = jax.process_index() == 0  # run.json has one writer; images are written by their owners
    if not todo:
        record = {**previous, **record, "status": "complete"}
        if is_writer:
            atomic_write_json(os.path.join(workdir, "run.json"), record)
        return record

    pretrained = load_pipeline(config.pretrained, dtype=config.dtype, allow_pickle=allow_pickle)
    lora_mode = "merged" if config.fusion == "vmap" else "unmerged"
    finetuned = load_finetuned(pretrained, config.finetuned, config.finetuned_format, lora_mode,
                               config.lora_scale, dtype=config.dtype, allow_pickle=allow_pickle)
    pinned = hub.pinned_revisions(pretrained=pretrained.path, finetuned=finetuned.path)
    if previous.get("hub", pinned) != pinned:  # a hub branch moved on since the images already here were made
        raise InputError(f"hub revisions {pinned} differ from this workdir's {previous['hub']}; pin them with "
                         "@<commit> or use another --workdir")
    record.update({"hub": pinned} if pinned else {})
    check_finite_weights(pretrained, finetuned)
    micro = sdxl.micro_conditioning_setting(pretrained, *(getattr(config, name) for name in SDXL_SETTINGS))
    shape = pretrained.sample_shape
    init_latents = load_init_latents(config.init_latents, config.num_images, shape) if config.init_latents else None
    # Only now, with every input loaded and checked, does the workdir get written.
    if is_writer:
        claim_dir(workdir, "--workdir")
        if start_over:
            _start_over(workdir)
    record["image_size"] = [shape[1] * pretrained.vae_scale_factor, shape[2] * pretrained.vae_scale_factor]
    try:
        prompt = config.prompt
        if prompt == AUTO_PROMPT:
            prompt = recover_caption(pretrained, finetuned)
            record["caption"] = prompt
        warn_if_truncated(pretrained.tokenizer, prompt, "--prompt")
        model = engine.prepare(pretrained, finetuned, config.method, prompt, config.fusion, micro)
        sampler = engine.build_sampler(config.sampler, pretrained.scheduler_config, config.steps)
        sample = engine.make_batch_sampler(model, sampler, mesh, config.guidance_max_timestep)
        decode = engine.make_decoder(pretrained, mesh)
        vae_params = _replicated(pretrained.vae.params if pretrained.vae else {}, mesh)
        variables, contexts = _replicated((model.variables, model.contexts), mesh)
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        record.update(sampler=sampler.describe(), fusion=model.fusion, **({"sdxl": model.sdxl} if model.sdxl else {}))
        images_dir = os.path.join(workdir, "images")
        os.makedirs(images_dir, exist_ok=True)
        for name in os.listdir(images_dir):  # temp files of a killed run
            if name.startswith(".") and name.endswith(".tmp") and is_writer:
                os.remove(os.path.join(images_dir, name))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("finextract workdir ready")
        if is_writer:
            atomic_write_json(os.path.join(workdir, "run.json"), {**previous, **record})

        def launch(indices):
            padded = np.concatenate([indices, np.repeat(indices[:1], config.batch_size - len(indices))])
            # Every process computes the whole batch's noise (cheap) and keeps its own rows.
            x_T = np.asarray(batch_start_noise(padded, config.seed, shape, init_latents))
            x_T = jax.make_array_from_callback(x_T.shape, batch_sharding, lambda idx: x_T[idx])
            return sample(variables, contexts, x_T, config.guidance_scale, config.correction)

        def finish(indices, outputs):
            x0, first_bad = outputs
            first_bad = multihost_utils.process_allgather(first_bad, tiled=True)  # every process raises alike
            engine.check_finite(np.asarray(first_bad)[: len(indices)], indices, sampler)
            for shard in decode(vae_params, x0).addressable_shards:
                if shard.replica_id:
                    continue
                start = shard.index[0].start or 0
                for offset, image in enumerate(np.asarray(shard.data)):
                    if start + offset < len(indices):
                        index = int(indices[start + offset])
                        atomic_write_png(os.path.join(workdir, "images", image_name(index)), image)

        bar = None
        if progress and is_writer:
            from tqdm import tqdm

            bar = tqdm(total=config.num_images, initial=config.num_images - sum(len(b) for b in todo), unit="img",
                       desc=f"{config.method} sampling", dynamic_ncols=True)
        pending = None
        for indices in todo:
            outputs = launch(indices)  # dispatched asynchronously; the previous batch is written meanwhile
            if pending is not None:
                finish(*pending)
                bar and bar.update(len(pending[0]))
            pending = (indices, outputs)
        finish(*pending)
        if bar:
            bar.update(len(pending[0]))
            bar.close()
    except BaseException as err:
        # Leave a record the same (or corrected) command can continue from: a failed run's settings
        # may change, an interrupted one's may not (its images are valid for them).
        if is_writer and os.path.isfile(os.path.join(workdir, "run.json")):
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            atomic_write_json(os.path.join(workdir, "run.json"),
                              {**previous, **record, "status": status, "error": f"{type(err).__name__}: {err}"})
        raise
    record = {**previous, **record, "status": "complete"}
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("finextract images written")
    if is_writer:
        atomic_write_json(os.path.join(workdir, "run.json"), record)
    return record
