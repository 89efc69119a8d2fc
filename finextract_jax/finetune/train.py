"""DreamBooth and LoRA fine-tuning: one jitted, data-parallel train step and a resumable loop.

What the step computes (diffusers' train_dreambooth(_lora).py, and train_dreambooth_lora_sdxl.py
for SDXL, without prior preservation): x0 = VAE latent sample * scaling_factor (or the pixels of
a pixel-space model), t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
loss = MSE(UNet(x_t, t, c), target) with c the text conditioning (finetune/conditioning.py) and target eps
or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 per the scheduler config; AdamW at a constant
learning rate after clipping the global gradient norm (diffusers' max_grad_norm = 1).

Reproducibility: all randomness of a sample (latent draw, noise, timestep, augmentation) comes
from a key derived from (seed, step, index of the sample in the global batch), and the data order
from (seed, epoch). So a run resumed from a checkpoint, or run on another number of devices,
draws exactly the same numbers as an uninterrupted run.

Sharding: a 1-D mesh with axis "data"; parameters, optimizer state and the (small) dataset are
replicated, the per-step index array is split over "data", and XLA all-reduces the gradients.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from finextract_jax import fileio
from finextract_jax.errors import InputError, NonFiniteError
from finextract_jax.finetune import augment as augment_lib
from finextract_jax.finetune import conditioning
from finextract_jax.finetune import export as export_lib
from finextract_jax.finetune import lora as lora_lib
from finextract_jax.finetune.config import FinetuneConfig
from finextract_jax.finetune.data import TrainSet
from finextract_jax.finetune.inputs import check_resolution, encode_latent_moments
from finextract_jax.finetune.weight_average import averaged_weights, weight_average
from finextract_jax.models import sdxl
from finextract_jax.models.pipeline import JNP_DTYPES, Pipeline, vae_posterior
from finextract_jax.noise_schedule import add_noise, alphas_cumprod_from_config, training_target

log = logging.getLogger(__name__)

def make_mesh(batch_size: int, devices=None) -> Mesh:
    """A 1-D "data" mesh over as many devices as evenly split the micro-batch."""
    devices = list(devices if devices is not None else jax.devices())
    count = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
    if count < len(devices):
        log.info("micro-batch %d splits evenly over %d of %d devices; using %d", batch_size, count, len(devices),
                 count)
    return Mesh(np.array(devices[:count]), ("data",))


@dataclasses.dataclass(frozen=True)
class _StepSpec:
    """Static part of the compiled step; equal specs share one compilation (tests rely on it)."""

    unet: Any  # linen module, compute dtype
    text: conditioning.Static | None  # the CLIP wrappers, when the text encoders are trained
    vae: Any  # linen VAE, when latents are encoded inside the step (augmented latent models)
    method: str
    prediction_type: str
    train_text_encoder: bool
    augment: augment_lib.AugmentConfig
    lora_scale: float
    vae_scaling: float
    sample_shape: tuple
    optimizer: tuple  # (lr, b1, b2, eps, weight_decay, max_grad_norm, ema_decay)
    mesh: Mesh


@dataclasses.dataclass
class TrainState:
    step: int
    trainable: Any  # dreambooth: {"unet"[, "text"[, "text_2"]]}; lora: {"unet_lora"[, "text_lora"[, "text_2_lora"]]}
    opt_state: Any


def _optimizer(spec: _StepSpec) -> optax.GradientTransformation:
    lr, b1, b2, eps, weight_decay, max_norm, ema_decay = spec.optimizer
    chain = [optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)]
    if max_norm > 0:
        chain.insert(0, optax.clip_by_global_norm(max_norm))
    if ema_decay > 0:
        chain.append(weight_average(ema_decay))
    return optax.chain(*chain) if len(chain) > 1 else chain[0]


def _per_sample_loss(spec: _StepSpec, trainable, frozen, data, indices, keys):
    """MSE per sample [B] for dataset rows `indices` [B] with per-sample keys [B]."""
    split = jax.vmap(lambda k: jax.random.split(k, 4))(keys)
    k_latent, k_noise, k_time, k_aug = split[:, 0], split[:, 1], split[:, 2], split[:, 3]
    if "latent_mean" in data:
        mean, std = data["latent_mean"][indices], data["latent_std"][indices]
        eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(k_latent)
        x0 = (mean + std * eps) * spec.vae_scaling
    else:
        pixels = augment_lib.augment_batch(spec.augment, k_aug, data["pixels"][indices])
        if spec.vae is not None:
            mean, std = vae_posterior(spec.vae, frozen["vae"], pixels)
            eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(k_latent)
            x0 = (mean + std * eps) * spec.vae_scaling
        else:
            x0 = pixels
    x0 = jax.lax.stop_gradient(x0.astype(jnp.float32))
    noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(k_noise)
    timesteps = jax.vmap(lambda k: jax.random.randint(k, (), 0, frozen["alphas_cumprod"].shape[0]))(k_time)
    return denoising_loss(spec, trainable, frozen, data, indices, x0, noise, timesteps)


def denoising_loss(spec: _StepSpec, trainable, frozen, data, indices, x0, noise, timesteps):
    """MSE per sample [B] of the UNet's prediction at x0 [B, C, H, W] noised by `noise` to `timesteps` [B],
    conditioned on dataset rows `indices` (what diffusers' training scripts compute; the parity tests
    call it with their draws)."""
    alpha_bar = frozen["alphas_cumprod"][timesteps]
    noisy = add_noise(x0, noise, alpha_bar)
    target = training_target(x0, noise, alpha_bar, spec.prediction_type)

    context, added = conditioning.step_conditioning(spec.text, spec.method, spec.lora_scale, trainable, frozen, data,
                                                    indices)
    if spec.method == "dreambooth":
        variables = {"params": trainable["unet"]}
    else:
        variables = {"params": frozen["unet"], "lora": lora_lib.scaled(trainable["unet_lora"], spec.lora_scale)}
    prediction = spec.unet.apply(variables, noisy, timesteps, context, added_cond_kwargs=added).astype(jnp.float32)
    return jnp.mean((prediction - target) ** 2, axis=tuple(range(1, prediction.ndim)))


def _step_impl(spec: _StepSpec, trainable, opt_state, frozen, data, indices, step, seed):
    """One optimizer update from `indices` [grad_accum, micro_batch]; returns (trainable, opt_state, metrics)."""
    accum, micro = indices.shape
    step_key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    sample_ids = jnp.arange(accum * micro, dtype=jnp.uint32).reshape(accum, micro)
    batch_sharding = NamedSharding(spec.mesh, P("data"))

    def micro_step(grad_sum, xs):
        rows, ids = xs
        rows = jax.lax.with_sharding_constraint(rows, batch_sharding)
        keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(ids)
        loss_fn = lambda params: jnp.mean(_per_sample_loss(spec, params, frozen, data, rows, keys))
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        return jax.tree_util.tree_map(jnp.add, grad_sum, grads), loss

    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    if accum == 1:  # no loop: XLA:CPU ran the UNet's backward ~10x slower inside a scan body
        grads, losses = micro_step(zeros, (indices[0], sample_ids[0]))
    else:
        grads, losses = jax.lax.scan(micro_step, zeros, (indices, sample_ids))
        grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
    updates, opt_state = _optimizer(spec).update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": jnp.mean(losses), "grad_norm": optax.global_norm(grads)}


@functools.lru_cache(maxsize=16)
def _compiled_step(spec: _StepSpec):
    replicated = NamedSharding(spec.mesh, P())
    return jax.jit(functools.partial(_step_impl, spec), donate_argnums=(0, 1),
                   out_shardings=(replicated, replicated, replicated))


@functools.lru_cache(maxsize=16)
def _compiled_eval(spec: _StepSpec):
    def evaluate(trainable, frozen, data, indices, keys):
        return _per_sample_loss(spec, trainable, frozen, data, indices, keys)
    return jax.jit(evaluate)


def _resolve_attention(name: str) -> str:
    if name != "auto":
        return name
    return "plain" if jax.default_backend() == "cpu" else "fused"


class Trainer:
    """A fine-tuning job: pretrained pipeline + training set + config -> trained parameters."""

    def __init__(self, pipe: Pipeline, train_set: TrainSet, config: FinetuneConfig, mesh: Mesh | None = None):
        self.pipe, self.train_set, self.config = pipe, train_set, config
        self.mesh = mesh if mesh is not None else make_mesh(config.batch_size)
        if config.batch_size % self.mesh.devices.size:
            raise InputError(f"--batch_size {config.batch_size} does not split over {self.mesh.devices.size} devices")
        resolution = train_set.pixels.shape[-1]
        check_resolution(pipe, resolution)
        compute = JNP_DTYPES[config.dtype]
        unet = pipe.unet.module.clone(dtype=compute, attention=_resolve_attention(config.attention),
                                      sample_size=resolution // pipe.vae_scale_factor)
        text = conditioning.text_modules(pipe, compute) if config.train_text_encoder else None
        encode_in_step = pipe.vae is not None and config.augment != "none"
        self.alphas_cumprod = np.asarray(alphas_cumprod_from_config(pipe.scheduler_config), np.float32)
        training_target(jnp.zeros(1), jnp.zeros(1), jnp.ones(1), pipe.prediction_type)  # refuse 'sample' early
        self.spec = _StepSpec(
            unet=unet, text=text, vae=pipe.vae.module if encode_in_step else None, method=config.method,
            prediction_type=pipe.prediction_type, train_text_encoder=config.train_text_encoder,
            augment=augment_lib.AugmentConfig(config.augment), lora_scale=config.lora_scale,
            vae_scaling=pipe.latent_scale,
            sample_shape=(pipe.sample_shape[0], resolution // pipe.vae_scale_factor,
                          resolution // pipe.vae_scale_factor),
            optimizer=(config.lr, config.adam_beta1, config.adam_beta2, config.adam_epsilon, config.weight_decay,
                       config.max_grad_norm, config.ema_decay),
            mesh=self.mesh)
        self.total_steps = config.total_steps(len(train_set))
        self._permutations = {}
        self.losses = []  # (step, loss) of every step run by fit()
        self.steps_per_second = None
        self._frozen = None
        self._data = None

    # ---- inputs -------------------------------------------------------------------------

    def _replicate(self, tree):
        sharding = NamedSharding(self.mesh, P())
        return jax.tree_util.tree_map(lambda x: jax.device_put(jnp.asarray(x), sharding), tree)

    def data(self) -> dict:
        """Per-image arrays the step gathers from: latent moments or pixels, and text conditioning."""
        if self._data is None:
            pipe, pixels = self.pipe, self.train_set.pixels
            data = {}
            if pipe.vae is not None and self.spec.vae is None:
                data["latent_mean"], data["latent_std"] = encode_latent_moments(pipe, pixels)
            else:
                data["pixels"] = pixels
            data.update(conditioning.caption_data(pipe, self.train_set, self.config.train_text_encoder))
            self._data = self._replicate(data)
        return self._data

    def frozen(self) -> dict:
        if self._frozen is None:
            frozen = {"alphas_cumprod": self.alphas_cumprod}
            if self.config.method == "lora":
                frozen["unet"] = self.pipe.unet.params
                if self.config.train_text_encoder:
                    frozen.update(conditioning.frozen_text(self.pipe))
            if self.spec.vae is not None:
                frozen["vae"] = self.pipe.vae.params
            self._frozen = self._replicate(frozen)
        return self._frozen

    def init_state(self) -> TrainState:
        config, pipe = self.config, self.pipe
        key = jax.random.PRNGKey(config.seed)
        if config.method == "dreambooth":
            trainable = {"unet": pipe.unet.params}
        else:
            trainable = {"unet_lora": lora_lib.init_factors(pipe.unet.params, lora_lib.UNET_TARGETS, config.rank,
                                                            jax.random.fold_in(key, 1))}
        if config.train_text_encoder:
            trainable.update(conditioning.init_trainable(pipe, config.method, config.rank, key))
        # float32 master copies, never aliasing the pipeline's arrays (the step donates its inputs).
        trainable = self._replicate(jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable))
        opt_state = self._replicate(_optimizer(self.spec).init(trainable))
        return TrainState(0, trainable, opt_state)

    def batch_indices(self, step: int) -> np.ndarray:
        """Dataset rows of optimizer step `step`, [grad_accum, batch_size]: epochs of seeded permutations."""
        n = len(self.train_set)
        per_step = self.config.grad_accum * self.config.batch_size
        rows = []
        for g in range(step * per_step, (step + 1) * per_step):
            epoch = g // n
            if epoch not in self._permutations:
                self._permutations = {epoch: np.random.default_rng([self.config.seed, epoch]).permutation(n)}
            rows.append(self._permutations[epoch][g % n])
        return np.asarray(rows, np.int32).reshape(self.config.grad_accum, self.config.batch_size)

    # ---- compute ------------------------------------------------------------------------

    def step(self, state: TrainState) -> tuple[TrainState, dict]:
        """One optimizer update (donates `state`'s arrays)."""
        indices = jax.device_put(self.batch_indices(state.step), NamedSharding(self.mesh, P(None, "data")))
        trainable, opt_state, metrics = _compiled_step(self.spec)(
            state.trainable, state.opt_state, self.frozen(), self.data(), indices, jnp.uint32(state.step),
            jnp.uint32(self.config.seed))
        return TrainState(state.step + 1, trainable, opt_state), metrics

    def eval_loss(self, state: TrainState, repeats: int = 8, seed: int = 1234) -> float:
        """Mean loss over every image x `repeats` fixed (noise, timestep) draws: comparable across states."""
        n = len(self.train_set)
        indices = jnp.tile(jnp.arange(n, dtype=jnp.int32), repeats)
        keys = jax.random.split(jax.random.PRNGKey(seed), n * repeats)
        losses = _compiled_eval(self.spec)(state.trainable, self.frozen(), self.data(), indices, keys)
        return float(jnp.mean(losses))

    # ---- outputs ------------------------------------------------------------------------

    def export(self, state: TrainState, out: str) -> str:
        """Write the trained weights (their running average when the config keeps one)."""
        average = averaged_weights(state.opt_state)
        trainable = jax.device_get(state.trainable if average is None else average)
        pipe = self.pipe
        text = conditioning.trained_text(trainable)
        if self.config.method == "dreambooth":
            return export_lib.save_dreambooth(out, pipe.path, dreambooth_components(pipe, trainable["unet"], text))
        return export_lib.save_lora(out, trainable["unet_lora"], self.config.rank, self.config.alpha, text)

    def fit(self, state: TrainState | None = None, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
            log_every: int = 10, progress: bool = True, callback: Callable | None = None) -> TrainState:
        """Train to `total_steps`, resuming from `checkpoint_dir` if it holds a checkpoint of this run.

        `callback(state, metrics)` runs after each step (tests use it to interrupt a run).
        """
        manager = None
        if checkpoint_dir:
            manager = _CheckpointManager(checkpoint_dir, checkpoint_every, self.run_identity())
        try:
            if state is None:
                state = self.init_state()
                if manager is not None:
                    state = manager.restore_latest(state)
            if state.step:
                log.info("resuming at step %d of %d", state.step, self.total_steps)
            state = self._loop(state, manager, log_every, progress, callback)
            if manager is not None:
                manager.save(state, force=True)
        finally:
            if manager is not None:
                manager.close()
        return state

    def _loop(self, state, manager, log_every, progress, callback):
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=state.step, unit="step", disable=not progress, dynamic_ncols=True,
                   desc=f"finetune {self.config.method}")
        start_step, start_time = state.step, None
        pending = []
        try:
            while state.step < self.total_steps:
                state, metrics = self.step(state)
                pending.append((state.step, metrics))
                if start_time is None:  # the first step includes compilation
                    jax.block_until_ready(metrics["loss"])
                    start_time, start_step = time.perf_counter(), state.step
                if state.step % max(log_every, 1) == 0 or state.step == self.total_steps:
                    self._report(pending, bar)
                    pending = []
                bar.update(1)
                if manager is not None:
                    manager.save(state)
                if callback is not None:
                    callback(state, metrics)
        finally:
            bar.close()
        if start_time is not None and state.step > start_step:
            jax.block_until_ready(state.trainable)
            self.steps_per_second = (state.step - start_step) / (time.perf_counter() - start_time)
            log.info("%.2f steps/s after compilation", self.steps_per_second)
        return state

    def _report(self, pending, bar):
        """Log the loss of the steps since the last report; stop on a non-finite loss."""
        losses = [(s, float(m["loss"]), float(m["grad_norm"])) for s, m in pending]
        for s, loss, _ in losses:
            if not np.isfinite(loss):
                raise NonFiniteError(f"training loss became {loss} at step {s}; lower --learning_rate "
                                     "or use --dtype=float32")
        s, loss, grad_norm = losses[-1]
        self.losses.extend((s, l) for s, l, _ in losses)
        log.info("step %d/%d loss %.5f (mean of last %d: %.5f) grad_norm %.4f", s, self.total_steps, loss,
                 len(losses), float(np.mean([l for _, l, _ in losses])), grad_norm)
        bar.set_postfix(loss=f"{loss:.4f}")

    def run_identity(self) -> dict:
        return {"config": self.config.identity(), "pretrained": os.path.abspath(self.pipe.path),
                "data": self.train_set.fingerprint(), "devices_matter": False}


class _CheckpointManager:
    """orbax CheckpointManager for (trainable, opt_state) every `every` steps, with the run identity."""

    def __init__(self, directory: str, every: int, identity: dict):
        import orbax.checkpoint as ocp

        self.ocp, self.every, self.identity = ocp, every, identity
        self.directory = os.path.abspath(directory)
        identity_file = os.path.join(self.directory, "run.json")
        if os.path.isfile(identity_file):
            previous = fileio.read_record(identity_file, "remove it or pass another --checkpoint_dir")
            steps = os.path.join(self.directory, "steps")
            holds_checkpoints = os.path.isdir(steps) and bool(os.listdir(steps))
            # A folder without a checkpoint (a run that failed before its first) is taken over.
            if holds_checkpoints and previous != json.loads(json.dumps(identity)):
                diff = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
                raise InputError(f"{self.directory} holds checkpoints of a different run (differs in {diff}); "
                                 "remove it or pass another --checkpoint_dir")
        fileio.claim_dir(self.directory, "--checkpoint_dir")
        fileio.atomic_write_json(identity_file, identity)
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        self.manager = ocp.CheckpointManager(os.path.join(self.directory, "steps"), options=options)

    def restore_latest(self, state: TrainState) -> TrainState:
        step = self.manager.latest_step()
        if step is None:
            return state
        template = {"trainable": state.trainable, "opt_state": state.opt_state}
        abstract = jax.tree_util.tree_map(self.ocp.utils.to_shape_dtype_struct, template)
        restored = self.manager.restore(step, args=self.ocp.args.StandardRestore(abstract))
        return TrainState(int(step), restored["trainable"], restored["opt_state"])

    def save(self, state: TrainState, force: bool = False):
        due = self.every > 0 and state.step % self.every == 0
        if not (due or force) or state.step == 0 or self.manager.latest_step() == state.step:
            return
        self.manager.save(state.step, args=self.ocp.args.StandardSave(
            {"trainable": state.trainable, "opt_state": state.opt_state}))

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def dreambooth_components(pipe: Pipeline, unet_params, text: dict | None = None) -> dict:
    """{name: (config, params)} to write as safetensors: the trained parts (`text`: {"text_encoder"
    [, "text_encoder_2"]: params}), plus pretrained parts held only as Flax msgpack (so that
    diffusers PyTorch can load the export)."""
    text = text or {}
    components = {"unet": (pipe.unet.config, unet_params)}
    for name in sdxl.text_encoder_names(pipe):
        part = getattr(pipe, name)
        if name in text or part.source.endswith(".msgpack"):
            components[name] = (part.config, text.get(name, part.params))
    if pipe.vae is not None and pipe.vae.source.endswith(".msgpack"):
        components["vae"] = (pipe.vae.config, pipe.vae.params)
    return {name: (config, jax.device_get(params)) for name, (config, params) in components.items()}


def default_checkpoint_dir(out: str) -> str:
    return os.path.abspath(out).rstrip(os.sep) + ".checkpoints"


def check_outputs(out: str, method: str, checkpoint_dir: str, train_dir: str, pretrained: str):
    """Refuse, before anything is loaded or written, outputs that are not ours to write or that
    overlap an input or each other (see fileio)."""
    inputs = {"--train_dir": train_dir, "--pretrained": pretrained}
    export_lib.check_output(out, method, inputs)
    fileio.check_output_dir(checkpoint_dir, "--checkpoint_dir")
    fileio.check_not_inside(checkpoint_dir, "--checkpoint_dir", {**inputs, "--out": out}, both_ways=True)


def remove_checkpoints(checkpoint_dir: str):
    """Delete what `_CheckpointManager` wrote (steps/, run.json, the marker); the folder itself only
    when finetune created it and nothing else is left in it."""
    created = fileio.created_by_us(checkpoint_dir)
    shutil.rmtree(os.path.join(checkpoint_dir, "steps"), ignore_errors=True)
    for name in ("run.json", fileio.MARKER):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(checkpoint_dir, name))
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(checkpoint_dir)


def finetune(pretrained: Pipeline | str, train_dir: str, out: str, config: FinetuneConfig, caption: str | None = None,
             resolution: int | None = None, checkpoint_dir: str | None = None, checkpoint_every: int = 100,
             keep_checkpoints: bool = False, mesh: Mesh | None = None, progress: bool = True, log_every: int = 10,
             callback: Callable | None = None) -> str:
    """Fine-tune `pretrained` on `train_dir` and export to `out`; resumable; returns the exported path.

    Checkpoints go to `checkpoint_dir` (default `<out>.checkpoints`) every `checkpoint_every`
    steps and are removed after a successful export unless `keep_checkpoints`.
    """
    from finextract_jax.finetune.data import load_train_set
    from finextract_jax.models.pipeline import load_pipeline

    checkpoint_dir = checkpoint_dir or default_checkpoint_dir(out)
    check_outputs(out, config.method, checkpoint_dir, train_dir,
                  pretrained if isinstance(pretrained, str) else pretrained.path)
    pipe = load_pipeline(pretrained) if isinstance(pretrained, str) else pretrained
    resolution = resolution or pipe.unet.module.sample_size * pipe.vae_scale_factor
    check_resolution(pipe, resolution)
    train_set = load_train_set(train_dir, resolution, caption)
    trainer = Trainer(pipe, train_set, config, mesh)
    log.info("fine-tuning (%s) on %d images at %dpx for %d steps, lr %g, %d device(s)", config.method,
             len(train_set), resolution, trainer.total_steps, config.lr, trainer.mesh.devices.size)
    state = trainer.fit(checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, log_every=log_every,
                        progress=progress, callback=callback)
    path = trainer.export(state, out)
    if not keep_checkpoints:
        remove_checkpoints(checkpoint_dir)
    return path
