"""An extraction run: settings -> images/NNNNN.png + run.json in a workdir, resumable.

Batch k always holds global indices [k*B, (k+1)*B) (the last one padded with repeats that are
dropped), and image i's start noise depends only on (seed, i): so a resumed run recomputes exactly
the batches an uninterrupted run would and its PNGs are bit-identical, and image i is the same
whatever the device count (for the same per-device batch).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
from importlib import metadata

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from finextract_jax.errors import InputError
from finextract_jax.fileio import atomic_write_json, atomic_write_png, changed_settings, read_record
from finextract_jax.guidance import get_guidance
from finextract_jax.sampling import engine
from finextract_jax.sampling.noise import batch_start_noise, load_init_latents

AUTO_PROMPT = "auto"  # --prompt=auto: the caller recovers the fine-tuning caption first

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Every setting that determines the images (all recorded in run.json)."""

    pretrained: str
    finetuned: str
    prompt: str = ""
    method: str = "finextract"
    guidance_scale: float = 3.0
    correction: float = -0.02
    num_images: int = 500
    batch_size: int = 5
    steps: int = 50
    sampler: str = "ddim"
    seed: int = 0
    init_latents: str | None = None
    dtype: str = "float32"
    lora_scale: float = 1.0
    finetuned_format: str = "auto"
    fusion: str = "auto"

    def normalized(self) -> "ExtractConfig":
        absolute = lambda p: os.path.abspath(p) if p else p
        return dataclasses.replace(self, pretrained=absolute(self.pretrained), finetuned=absolute(self.finetuned),
                                   init_latents=absolute(self.init_latents))


def image_name(index: int) -> str:
    return f"{index:05d}.png"


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
    if config.dtype not in ("float32", "bfloat16"):
        raise InputError(f"--dtype must be float32 or bfloat16, not {config.dtype!r}")
    get_guidance(config.method)


def _previous_run(workdir: str, settings: dict) -> dict:
    """The run record already in workdir ({} if none); refuse one that holds other settings."""
    path = os.path.join(workdir, "run.json")
    if os.path.exists(path):
        previous = read_record(path, "use another --workdir")
        detail = changed_settings(previous.get("settings", {}), settings, limit=4)
        if detail:
            raise InputError(f"{workdir} holds a run with other settings ({detail}); rerun with the same "
                             "settings to resume, or use a new --workdir")
        return previous
    return {}


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
            recover_caption=None) -> dict:
    """Generate `config.num_images` images into workdir/images, skipping those already there.

    `config.prompt == "auto"` needs `recover_caption(pretrained, finetuned) -> str`, called once
    both models are loaded (`caption.auto_prompt_resolver(workdir)` keeps the words in
    workdir/caption.json, so a resumed run guides with the very same ones). The words are recorded
    as run.json's "caption"; the settings keep "auto", so the rerun command is the same. Caption
    recovery is the caller's choice, passed in, so that sampling does not depend on it. Returns
    the run record (also written to workdir/run.json).
    """
    from finextract_jax.models.pipeline import load_finetuned, load_pipeline

    if config.prompt == AUTO_PROMPT and recover_caption is None:
        raise InputError("prompt 'auto' needs recover_caption (e.g. caption.auto_prompt_resolver(workdir))")
    config = config.normalized()
    mesh = engine.data_mesh(devices)
    _validate(config, mesh.size)
    settings = dataclasses.asdict(config)
    previous = _previous_run(workdir, settings)

    batches = [np.arange(k, min(k + config.batch_size, config.num_images))
               for k in range(0, config.num_images, config.batch_size)]
    exists = lambda i: os.path.exists(os.path.join(workdir, "images", image_name(i)))
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

    pretrained = load_pipeline(config.pretrained, dtype=config.dtype)
    lora_mode = "merged" if config.fusion == "vmap" else "unmerged"
    finetuned = load_finetuned(pretrained, config.finetuned, config.finetuned_format, lora_mode,
                               config.lora_scale, dtype=config.dtype)
    prompt = config.prompt
    if prompt == AUTO_PROMPT:
        prompt = recover_caption(pretrained, finetuned)
        record["caption"] = prompt
    shape = pretrained.sample_shape
    init_latents = load_init_latents(config.init_latents, config.num_images, shape) if config.init_latents else None
    model = engine.prepare(pretrained, finetuned, config.method, prompt, config.fusion)
    sampler = engine.build_sampler(config.sampler, pretrained.scheduler_config, config.steps)
    sample = engine.make_batch_sampler(model, sampler, mesh)
    decode = engine.make_decoder(pretrained, mesh)
    vae_params = _replicated(pretrained.vae.params if pretrained.vae else {}, mesh)
    variables, contexts = _replicated((model.variables, model.contexts), mesh)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    record.update(sampler=sampler.describe(), fusion=model.fusion)
    # Only now, with every input loaded and checked, does the workdir get written.
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
    record = {**previous, **record, "status": "complete"}
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("finextract images written")
    if is_writer:
        atomic_write_json(os.path.join(workdir, "run.json"), record)
    return record
