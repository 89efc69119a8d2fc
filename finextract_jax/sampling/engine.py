"""The guided sampler: a whole batch's denoising loop in one jitted, device-sharded function.

Both UNets of a step are evaluated inside the same compiled loop body (docs/method.md §2), in one of
three fusion strategies:
- "two_applies": one `apply` per distinct model, each over the batch repeated for its prompts;
- "vmap": the two parameter trees stacked and one `apply` vmapped over them;
- "lora_batch": for an unmerged LoRA fine-tune, ONE pass over the doubled batch in which the
  low-rank delta is gated on for the fine-tuned half only (one copy of the base weights).
"auto" picks per backend and checkpoint, by the measurements in benchmarks/RESULTS.md.

The batch axis is sharded over a 1-D `jax.sharding.Mesh` ("data"); parameters are replicated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from finextract_jax.errors import InputError, NonFiniteError
from finextract_jax.guidance import CAPTION, EMPTY, FINETUNED, PRETRAINED, GuidanceSpec, get_guidance
from finextract_jax.models import sdxl
from finextract_jax.models.pipeline import Pipeline, encode_prompts, vae_decode
from finextract_jax.sampling.schedulers import Sampler, make_sampler

FUSIONS = ("auto", "two_applies", "vmap", "lora_batch")


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (or the given) devices, axis "data"."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def build_sampler(name: str, scheduler_config: dict, steps: int) -> Sampler:
    """Our samplers; "ddim" is the clean one, ending at abar = 1 (docs/method.md §3)."""
    overrides = {"set_alpha_to_one": True} if name == "ddim" else {}
    return make_sampler(name, scheduler_config, steps, **overrides)


def resolve_fusion(fusion: str, spec: GuidanceSpec, finetuned: Pipeline) -> str:
    if fusion not in FUSIONS:
        raise InputError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    two_models = len(spec.models) == 2
    if fusion == "auto":
        # Measured (benchmarks/RESULTS.md): two applies in one jit beat vmap over stacked trees
        # on CPU; for an unmerged LoRA the single doubled-batch pass avoids a second weight read.
        return "lora_batch" if two_models and finetuned.unet_lora is not None else "two_applies"
    if fusion == "lora_batch" and (not two_models or finetuned.unet_lora is None):
        raise InputError("fusion=lora_batch needs a LoRA fine-tune loaded unmerged and a method that "
                         "evaluates both models (finextract)")
    if fusion == "vmap" and not two_models:
        raise InputError(f"fusion=vmap needs a method that evaluates both models, not {spec.name}")
    return fusion


@dataclasses.dataclass
class GuidedModel:
    """Everything the jitted loop needs, as arrays (passed as arguments, never baked in)."""

    spec: GuidanceSpec
    evaluations: tuple  # distinct (model, prompt text) pairs: what the UNets compute (text None: SDXL's zeros)
    order: tuple  # for each of spec.evaluations, its index in `evaluations`
    fusion: str
    variables: dict  # {"pretrained": vars, "finetuned": vars} or {"stacked": vars}
    # {"context": [len(evaluations), tokens, dim]}, and for SDXL "text_embeds" [n, dim] and "time_ids" [n, 6].
    contexts: dict
    unet: Any  # the flax module (both models share the architecture)
    prediction_type: str
    sdxl: dict | None = None  # SDXL's conditioning settings, for the run record


def _conditioning(pipe: Pipeline, text: str | None, micro: sdxl.MicroConditioning | None) -> dict:
    """One evaluation's UNet conditioning, each array with a leading axis of 1."""
    if sdxl.is_sdxl(pipe):
        return sdxl.conditioning(pipe, text or "", empty=text is None, micro=micro)
    return {"context": encode_prompts(pipe.text_encoder, pipe.tokenizer, [text])}


def prepare(pretrained: Pipeline, finetuned: Pipeline, method: str, prompt: str, fusion: str = "auto",
            micro: sdxl.MicroConditioning | None = None) -> GuidedModel:
    """Encode the prompts (each with the text encoder(s) of the model that consumes it) and lay
    out the parameters for the chosen fusion strategy.

    SDXL (models/sdxl.py): the empty-prompt slot is all zeros when the base model says
    force_zeros_for_empty_prompt (a caption "" is still encoded); `micro` defaults to the
    generated size and no crop.
    """
    spec = get_guidance(method)
    fusion = resolve_fusion(fusion, spec, finetuned)
    pipes = {PRETRAINED: pretrained, FINETUNED: finetuned}
    zero_empty = sdxl.is_sdxl(pretrained) and pretrained.force_zeros_for_empty_prompt
    texts = {EMPTY: None if zero_empty else "", CAPTION: prompt}
    micro = (micro or sdxl.micro_conditioning(pretrained)) if sdxl.is_sdxl(pretrained) else None
    evaluations = tuple(dict.fromkeys((m, texts[p]) for m, p in spec.evaluations))
    contexts = jax.tree_util.tree_map(lambda *rows: jnp.concatenate(rows),
                                      *[_conditioning(pipes[m], text, micro) for m, text in evaluations])
    if fusion == "vmap":
        variables = {"stacked": jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]),
                                                       {"params": pretrained.unet.params},
                                                       {"params": finetuned.unet.params})}
        if finetuned.unet_lora is not None:
            raise InputError("fusion=vmap needs merged LoRA weights (lora_mode=merged)")
    elif fusion == "lora_batch":
        variables = {FINETUNED: finetuned.unet_variables()}
    else:
        variables = {m: pipes[m].unet_variables() for m in spec.models}
    order = tuple(evaluations.index((m, texts[p])) for m, p in spec.evaluations)
    record = micro and {**micro.to_json(), "unconditional": "zeros" if zero_empty else "empty prompt"}
    return GuidedModel(spec, evaluations, order, fusion, variables, contexts, finetuned.unet.module,
                       finetuned.prediction_type, record)


def evaluate(model: GuidedModel, variables, contexts, x, t):
    """UNet outputs for each distinct evaluation at (x, t), as a list in `model.evaluations` order."""
    batch = x.shape[0]
    n = len(model.evaluations)

    def apply(variables, x, cond, **kwargs):
        added = {k: cond[k] for k in ("text_embeds", "time_ids")} if "time_ids" in cond else None
        return model.unet.apply(variables, x, t, cond["context"], added_cond_kwargs=added, **kwargs)

    def rows_of(rows):
        """The conditioning of evaluations `rows`, each repeated over the batch, stacked in order."""
        return jax.tree_util.tree_map(
            lambda c: jnp.concatenate([jnp.broadcast_to(c[i][None], (batch,) + c.shape[1:]) for i in rows]), contexts)

    if model.fusion == "lora_batch":
        gate = jnp.concatenate([jnp.full((batch,), m == FINETUNED, jnp.float32) for m, _ in model.evaluations])
        out = apply(variables[FINETUNED], jnp.tile(x, (n, 1, 1, 1)), rows_of(range(n)), lora_gate=gate)
        return jnp.split(out, n)
    if model.fusion == "vmap":
        expand = lambda c: jnp.broadcast_to(c[None], (batch,) + c.shape)
        out = jax.vmap(lambda v, c: apply(v, x, jax.tree_util.tree_map(expand, c)))(variables["stacked"], contexts)
        return list(out)
    outputs = {}
    for m in dict.fromkeys(m for m, _ in model.evaluations):
        rows = [i for i, (mi, _) in enumerate(model.evaluations) if mi == m]
        out = apply(variables[m], jnp.tile(x, (len(rows), 1, 1, 1)), rows_of(rows))
        outputs.update(zip(rows, jnp.split(out, len(rows))))
    return [outputs[i] for i in range(n)]


def guided_steps(sampler: Sampler, guidance_max_timestep: int | None) -> np.ndarray | None:
    """Per step, whether it is guided (t <= guidance_max_timestep); None: every step is."""
    if guidance_max_timestep is None:
        return None
    return np.asarray(sampler.timesteps) <= guidance_max_timestep


def make_batch_sampler(model: GuidedModel, sampler: Sampler, mesh: Mesh,
                       guidance_max_timestep: int | None = None) -> Callable:
    """jit(variables, contexts, x_T, scale, correction) -> (x_0 [B,C,H,W] f32, first_bad_step [B] i32).

    first_bad_step is -1 for images whose latents stayed finite, else the first step at which
    they did not. scale/correction are traced: changing them does not recompile. Steps with a
    timestep above `guidance_max_timestep` combine with scale 1 and correction 0: the guided model
    on the caption alone (the fine-tune for finextract and cfg), unguided.
    """
    guided = guided_steps(sampler, guidance_max_timestep)

    def run(variables, contexts, x_T, scale, correction):
        def body(i, carry):
            state, first_bad = carry
            x = sampler.model_input(state)
            t = sampler.timesteps[i]
            outs = evaluate(model, variables, contexts, x, t)
            eps = [sampler.to_epsilon(x, outs[j].astype(jnp.float32), i, model.prediction_type) for j in model.order]
            w, k = scale, correction
            if guided is not None:
                on = jnp.asarray(guided)[i]
                w, k = jnp.where(on, scale, 1.0), jnp.where(on, correction, 0.0)
            state = sampler.step(state, model.spec.combine(eps, w, k), i, prediction_type="epsilon")
            bad = ~jnp.isfinite(state.x).all(axis=(1, 2, 3))
            first_bad = jnp.where((first_bad < 0) & bad, i, first_bad)
            return state, first_bad

        init = (sampler.init_state(x_T * sampler.init_noise_sigma), jnp.full((x_T.shape[0],), -1, jnp.int32))
        state, first_bad = jax.lax.fori_loop(0, sampler.num_steps, body, init)
        return sampler.latents(state), first_bad

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
    return jax.jit(run, in_shardings=(replicated, replicated, batch_sharded, None, None),
                   out_shardings=(batch_sharded, batch_sharded))


def check_finite(first_bad: np.ndarray, indices: np.ndarray, sampler: Sampler):
    bad = np.flatnonzero(np.asarray(first_bad) >= 0)
    if bad.size:
        step = int(np.asarray(first_bad)[bad].min())
        raise NonFiniteError(
            f"latents became non-finite at step {step} (timestep {int(sampler.timesteps[step])}) for images "
            f"{[int(indices[b]) for b in bad][:10]}; lower --guidance_scale or use float32")


def make_decoder(pipe: Pipeline, mesh: Mesh) -> Callable:
    """jit(vae_params, x_0) -> uint8 images [B, H, W, 3]; pixel-space models skip the VAE."""
    vae, scale = pipe.vae, pipe.latent_scale

    def decode(vae_params, x0):
        images = x0 if vae is None else vae_decode(vae.module, vae_params, x0, scale)
        images = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        return jnp.round(jnp.transpose(images, (0, 2, 3, 1)) * 255).astype(jnp.uint8)

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
    return jax.jit(decode, in_shardings=(replicated, batch_sharded), out_shardings=batch_sharded)
