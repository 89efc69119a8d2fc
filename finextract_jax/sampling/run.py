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

from finextract_jax.errors import InputError
from finextract_jax.fileio import atomic_write_json, atomic_write_png
from finextract_jax.guidance import get_guidance
from finextract_jax.sampling import engine
from finextract_jax.sampling.noise import batch_start_noise, load_init_latents

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
            "process_count": jax.process_count()}


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
        import json

        try:
            with open(path) as f:
                previous = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: unreadable ({err}); use another --workdir") from None
        old = previous.get("settings", {})
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed[:4])
            raise InputError(f"{workdir} holds a run with other settings ({detail}); rerun with the same "
                             "settings to resume, or use a new --workdir")
        return previous
    return {}


def extract(config: ExtractConfig, workdir: str, progress: bool = True, devices=None) -> dict:
    """Generate `config.num_images` images into workdir/images, skipping those already there.

    Returns the run record (also written to workdir/run.json).
    """
    from finextract_jax.models.pipeline import load_finetuned, load_pipeline

    config = config.normalized()
    mesh = engine.data_mesh(devices)
    _validate(config, mesh.size)
    settings = dataclasses.asdict(config)
    previous = _previous_run(workdir, settings)

    batches = [np.arange(k, min(k + config.batch_size, config.num_images))
               for k in range(0, config.num_images, config.batch_size)]
    exists = lambda i: os.path.exists(os.path.join(workdir, "images", image_name(i)))
    todo = [b for b in batches if not all(exists(int(i)) for i in b)]
    record = {"settings": settings, "versions": _versions(), "devices": _devices(),
              "created": previous.get("created", datetime.datetime.now(datetime.timezone.utc).isoformat()),
              "status": "running"}
    if not todo:
        record = {**previous, **record, "status": "complete"}
        atomic_write_json(os.path.join(workdir, "run.json"), record)
        return record

    pretrained = load_pipeline(config.pretrained, dtype=config.dtype)
    lora_mode = "merged" if config.fusion == "vmap" else "unmerged"
    finetuned = load_finetuned(pretrained, config.finetuned, config.finetuned_format, lora_mode,
                               config.lora_scale, dtype=config.dtype)
    shape = pretrained.sample_shape
    init_latents = load_init_latents(config.init_latents, config.num_images, shape) if config.init_latents else None
    model = engine.prepare(pretrained, finetuned, config.method, config.prompt, config.fusion)
    sampler = engine.build_sampler(config.sampler, pretrained.scheduler_config, config.steps)
    sample = engine.make_batch_sampler(model, sampler, mesh)
    decode = engine.make_decoder(pretrained, mesh)
    vae_params = pretrained.vae.params if pretrained.vae else {}
    record.update(sampler=sampler.describe(), fusion=model.fusion)
    # Only now, with every input loaded and checked, does the workdir get written.
    images_dir = os.path.join(workdir, "images")
    os.makedirs(images_dir, exist_ok=True)
    for name in os.listdir(images_dir):  # temp files of a killed run
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(images_dir, name))
    atomic_write_json(os.path.join(workdir, "run.json"), {**previous, **record})

    def launch(indices):
        padded = np.concatenate([indices, np.repeat(indices[:1], config.batch_size - len(indices))])
        x_T = batch_start_noise(padded, config.seed, shape, init_latents)
        return sample(model.variables, model.contexts, x_T, config.guidance_scale, config.correction)

    def finish(indices, outputs):
        x0, first_bad = outputs
        engine.check_finite(np.asarray(first_bad)[: len(indices)], indices, sampler)
        images = np.asarray(decode(vae_params, x0))
        for row, index in enumerate(indices):
            atomic_write_png(os.path.join(workdir, "images", image_name(int(index))), images[row])

    bar = None
    if progress:
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
    atomic_write_json(os.path.join(workdir, "run.json"), record)
    return record
