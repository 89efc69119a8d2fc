"""SDXL conditioning: both text encoders, the pooled embedding and the micro-conditioning.

As StableDiffusionXLPipeline.encode_prompt (clip_skip unset) computes it:
- context: each encoder's penultimate hidden state (hidden_states[-2]; CLIP-L, then OpenCLIP-G),
  concatenated on the feature axis ([n, 77, 768 + 1280] for SDXL base);
- pooled: text_encoder_2's projected pooled output (`text_embeds`, [n, 1280]);
- the unconditional ("") embedding is all zeros, context and pooled, when the model's
  model_index.json says force_zeros_for_empty_prompt (SDXL base does; it is the pipeline's
  default when no negative prompt is given), else "" encoded like any prompt;
- time ids: original_size + crops_coords_top_left + target_size, six numbers per image, which
  the UNet's text_time embedding turns into sinusoids (diffusers' `_get_add_time_ids`). By default
  the generated image's own size and no crop, as the pipeline does.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from finextract_jax.errors import InputError
from finextract_jax.models.pipeline import Pipeline, tokenize


@dataclasses.dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size conditioning, (height, width) / (top, left) in pixels."""

    original_size: tuple[int, int]
    crops_coords_top_left: tuple[int, int]
    target_size: tuple[int, int]

    def time_ids(self) -> np.ndarray:
        """[6] float32, in diffusers' order."""
        return np.asarray(tuple(self.original_size) + tuple(self.crops_coords_top_left) + tuple(self.target_size),
                          np.float32)

    def to_json(self) -> dict:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}


def is_sdxl(pipe: Pipeline) -> bool:
    return pipe.text_encoder_2 is not None


def image_size(pipe: Pipeline) -> tuple[int, int]:
    """(height, width) in pixels of what the pipeline generates by default."""
    size = pipe.unet.module.sample_size * pipe.vae_scale_factor
    return (size, size)


def micro_conditioning(pipe: Pipeline, original_size: Sequence[int] | None = None,
                       crops_coords_top_left: Sequence[int] = (0, 0),
                       target_size: Sequence[int] | None = None) -> MicroConditioning:
    """The pipeline's defaults (the generated size, no crop) for whatever is not given."""
    default = image_size(pipe)
    values = [tuple(int(v) for v in (x if x is not None else default))
              for x in (original_size, crops_coords_top_left, target_size)]
    if any(len(v) != 2 for v in values) or min(values[0] + values[2]) <= 0 or min(values[1]) < 0:
        raise InputError(f"SDXL micro-conditioning takes (height, width) sizes > 0 and a (top, left) crop >= 0, "
                         f"not {values}")
    return MicroConditioning(*values)


def text_encoder_names(pipe: Pipeline) -> tuple[str, ...]:
    """The pipeline's text encoders (attribute names), in the order their outputs are concatenated."""
    return ("text_encoder", "text_encoder_2") if is_sdxl(pipe) else ("text_encoder",)


def micro_conditioning_setting(pipe: Pipeline, original_size=None, crops_coords_top_left=None,
                               target_size=None) -> MicroConditioning | None:
    """The micro-conditioning of an SDXL pipeline from the settings given (None: the default), or
    None for another model, which refuses any setting."""
    given = [v is not None for v in (original_size, crops_coords_top_left, target_size)]
    if not is_sdxl(pipe):
        if any(given):
            raise InputError("--sdxl_original_size/--sdxl_crops_coords_top_left/--sdxl_target_size apply to SDXL "
                             f"models only; {pipe.path} is not one")
        return None
    return micro_conditioning(pipe, original_size, crops_coords_top_left or (0, 0), target_size)


def encode_ids(text_1, params_1, ids_1, text_2, params_2, ids_2) -> tuple[jax.Array, jax.Array]:
    """(context [n, 77, d1 + d2], pooled [n, projection_dim]), float32, from each tokenizer's ids [n, 77].

    Pure and traceable: the same function conditions sampling, the fine-tuning step (gradients
    through both encoders when they are trained) and the caption search.
    """
    out_1 = text_1(ids_1, params=params_1, train=False, output_hidden_states=True)
    out_2 = text_2(ids_2, params=params_2, train=False, output_hidden_states=True)
    context = jnp.concatenate([out_1.hidden_states[-2].astype(jnp.float32),
                               out_2.hidden_states[-2].astype(jnp.float32)], axis=-1)
    return context, out_2[0].astype(jnp.float32)  # text_embeds of CLIPTextModelWithProjection


def token_ids(pipe: Pipeline, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each tokenizer's ids of `prompts` (the second pads with its own token, "!" for SDXL base)."""
    return tokenize(pipe.tokenizer, prompts), tokenize(pipe.tokenizer_2, prompts)


def encode_prompts(pipe: Pipeline, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """(context [n, 77, d1 + d2], pooled [n, projection_dim]) for each prompt, float32."""
    text_1, text_2 = pipe.text_encoder, pipe.text_encoder_2
    ids_1, ids_2 = token_ids(pipe, prompts)
    return _jitted_encoder(text_1.module, text_2.module)(text_1.params, jnp.asarray(ids_1), text_2.params,
                                                         jnp.asarray(ids_2))


@functools.lru_cache(maxsize=8)
def _jitted_encoder(text_1, text_2):
    """One compiled `encode_ids` per pair of text modules (a run encodes its prompt and "" with it)."""
    return jax.jit(lambda p1, i1, p2, i2: encode_ids(text_1, p1, i1, text_2, p2, i2))


def unconditional(pipe: Pipeline) -> tuple[jax.Array, jax.Array]:
    """The empty-prompt (context, pooled): zeros under force_zeros_for_empty_prompt, else "" encoded."""
    if pipe.force_zeros_for_empty_prompt:
        shapes = jax.eval_shape(lambda: encode_prompts(pipe, [""]))
        return tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
    return encode_prompts(pipe, [""])


def conditioning(pipe: Pipeline, prompt: str, empty: bool, micro: MicroConditioning) -> dict:
    """One evaluation's UNet conditioning: {"context" [1, 77, d], "text_embeds" [1, p], "time_ids" [1, 6]}.
    `empty`: the unconditional slot of a guidance method (see `unconditional`)."""
    context, pooled = unconditional(pipe) if empty else encode_prompts(pipe, [prompt])
    return {"context": context, "text_embeds": pooled, "time_ids": jnp.asarray(micro.time_ids())[None]}
