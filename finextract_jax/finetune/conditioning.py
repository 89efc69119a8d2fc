"""The text conditioning of the fine-tuning step, for SD 1.x/2.x and SDXL.

SD 1.x/2.x (diffusers' train_dreambooth(_lora).py): the text encoder's last hidden state.

SDXL (diffusers' train_dreambooth_lora_sdxl.py; docs/method.md, SDXL): both encoders' penultimate
hidden states side by side, text_encoder_2's projected pooled output as the UNet's `text_embeds`,
and per image the micro-conditioning time ids: its original size (height, width) as read from
the file, the top-left corner of its centre crop in the resized image, and the training
resolution as target size. With `train_text_encoder` both encoders are trained (fully, or with
LoRA on their attention projections), as that script does.

Per-image arrays (`caption_data`) are computed once and gathered by the step; `step_conditioning`
turns them and the trainable text parameters into the UNet's (context, added_cond_kwargs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from finextract_jax.finetune import lora as lora_lib
from finextract_jax.finetune.data import TrainSet
from finextract_jax.models import components, sdxl
from finextract_jax.models.pipeline import Pipeline, encode_prompts, tokenize

# Pipeline attribute of each text encoder -> (its trainable key in a full fine-tune, in a LoRA
# fine-tune, the data key of its token ids, the pipeline attribute of its tokenizer).
TEXT_ENCODERS = {"text_encoder": ("text", "text_lora", "input_ids", "tokenizer"),
                 "text_encoder_2": ("text_2", "text_2_lora", "input_ids_2", "tokenizer_2")}


class Static:
    """Hash/eq by the identity of each module: lets the CLIP wrappers be part of a static jit argument
    (equal Trainer specs on the same pipeline then share one compiled step)."""

    def __init__(self, modules: tuple):
        self.modules = tuple(modules)

    def __eq__(self, other):
        return isinstance(other, Static) and len(other.modules) == len(self.modules) and all(
            a is b for a, b in zip(other.modules, self.modules))

    def __hash__(self):
        return hash(tuple(id(m) for m in self.modules))


def text_modules(pipe: Pipeline, compute_dtype) -> Static:
    """The trained text encoders' modules in the compute dtype (the pipeline's own in float32)."""
    parts = [getattr(pipe, name) for name in sdxl.text_encoder_names(pipe)]
    return Static(tuple(part.module if compute_dtype == jnp.float32 else
                        components.text_encoder_from_config(part.config, compute_dtype) for part in parts))


def time_ids(train_set: TrainSet) -> np.ndarray:
    """[N, 6] float32 SDXL time ids per training image: original size, crop top-left, target size."""
    resolution = train_set.pixels.shape[-1]
    return np.stack([sdxl.MicroConditioning(tuple(size), tuple(crop), (resolution, resolution)).time_ids()
                     for size, crop in zip(train_set.original_sizes, train_set.crop_top_lefts)])


def caption_data(pipe: Pipeline, train_set: TrainSet, train_text_encoder: bool) -> dict:
    """Per-image arrays the step gathers: each encoder's token ids when the text encoders are trained,
    else the frozen encoders' output (each distinct caption encoded once); SDXL's time ids."""
    captions = train_set.captions
    if train_text_encoder:
        data = {TEXT_ENCODERS[name][2]: tokenize(getattr(pipe, TEXT_ENCODERS[name][3]), captions)
                for name in sdxl.text_encoder_names(pipe)}
    else:
        unique = sorted(set(captions))
        rows = [unique.index(c) for c in captions]
        if sdxl.is_sdxl(pipe):
            context, pooled = sdxl.encode_prompts(pipe, unique)
            data = {"context": np.asarray(context)[rows], "text_embeds": np.asarray(pooled)[rows]}
        else:
            data = {"context": np.asarray(encode_prompts(pipe.text_encoder, pipe.tokenizer, unique), np.float32)[rows]}
    if sdxl.is_sdxl(pipe):
        data["time_ids"] = time_ids(train_set)
    return data


def init_trainable(pipe: Pipeline, method: str, rank: int, key) -> dict:
    """The text encoders' trainable parameters: their own (DreamBooth) or LoRA factors with B = 0."""
    out = {}
    for i, name in enumerate(sdxl.text_encoder_names(pipe)):
        full, factors, _, _ = TEXT_ENCODERS[name]
        params = getattr(pipe, name).params
        out[full if method == "dreambooth" else factors] = params if method == "dreambooth" else \
            lora_lib.init_factors(params, lora_lib.TEXT_ENCODER_TARGETS, rank, jax.random.fold_in(key, 2 + i))
    return out


def frozen_text(pipe: Pipeline) -> dict:
    """What a LoRA of the text encoders is added to: {"text": params[, "text_2": params]}."""
    return {TEXT_ENCODERS[name][0]: getattr(pipe, name).params for name in sdxl.text_encoder_names(pipe)}


def trained_text(trainable: dict) -> dict:
    """{pipeline attribute: trained params or LoRA factors} of the text encoders in `trainable`."""
    return {name: trainable.get(full, trainable.get(factors)) for name, (full, factors, _, _) in TEXT_ENCODERS.items()
            if full in trainable or factors in trainable}


def step_conditioning(modules: Static | None, method: str, lora_scale: float, trainable, frozen, data, indices):
    """(context [B, 77, d], added_cond_kwargs or None) of dataset rows `indices` inside the step."""
    if modules is None:
        context = data["context"][indices]
        pooled = data["text_embeds"][indices] if "text_embeds" in data else None
    else:
        outputs = []
        for module, name in zip(modules.modules, TEXT_ENCODERS):
            full, factors, ids_key, _ = TEXT_ENCODERS[name]
            params = trainable[full] if method == "dreambooth" else \
                lora_lib.merge(frozen[full], trainable[factors], lora_scale)
            outputs.append((module, params, data[ids_key][indices]))
        if len(outputs) == 2:
            context, pooled = sdxl.encode_ids(*outputs[0], *outputs[1])
        else:
            module, params, ids = outputs[0]
            context, pooled = module(ids, params=params, train=False)[0], None
    if "time_ids" not in data:
        return context, None
    return context, {"text_embeds": pooled, "time_ids": data["time_ids"][indices]}
