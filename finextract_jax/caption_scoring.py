"""The caption search's batched scorer (docs/method.md §6): squared denoising errors of both models
for many prompts x many (image, timestep, noise) pairs, by one jitted function.

Prompts arrive as token-id rows of the (first) tokenizer and are encoded inside the jit. For SDXL
(models/sdxl.py) they are encoded as the UNet is conditioned everywhere else: both encoders'
penultimate hidden states, the pooled projection of the second, and the micro-conditioning time
ids (by default the generated size and no crop, as extraction samples). SDXL's two tokenizers
share CLIP's vocabulary and differ only in their padding token, so the second encoder's rows are
the first's re-padded (`second_rows`); a pair whose vocabularies differ is refused.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from finextract_jax.errors import CheckpointError
from finextract_jax.models import sdxl


def token_rows(tokenizer, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """[n, max_length] int32 rows bos + ids + eos + padding, as `tokenize` would give for the text."""
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = np.full((len(sequences), length), pad, np.int32)
    for row, ids in enumerate(sequences):
        ids = [tokenizer.bos_token_id] + list(ids)[:length - 2] + [tokenizer.eos_token_id]
        rows[row, :len(ids)] = ids
    return rows


def second_rows(rows: np.ndarray, eos_id: int, pad_id: int) -> np.ndarray:
    """The second tokenizer's rows for the first's: the same ids, `pad_id` after the first end token."""
    rows = np.asarray(rows)
    first_eos = np.argmax(rows == eos_id, axis=1)
    return np.where(np.arange(rows.shape[1])[None] > first_eos[:, None], pad_id, rows).astype(np.int32)


def _check_shared_vocabulary(pipe):
    first, second = pipe.tokenizer, pipe.tokenizer_2
    if first.get_vocab() != second.get_vocab() or first.eos_token_id != second.eos_token_id:
        raise CheckpointError(f"{pipe.path}: the caption search needs SDXL's two tokenizers to share one "
                              "vocabulary (SDXL's do); these differ")


class PromptScorer:
    """Squared errors of both models for many prompts x many pairs, by one jitted function."""

    def __init__(self, pretrained, finetuned, pairs, batch_size: int, need_pretrained: bool = True,
                 micro: sdxl.MicroConditioning | None = None):
        self.noisy, self.t, self.target = (jnp.asarray(a) for a in pairs)
        self.batch_size = batch_size
        self.need_pretrained = need_pretrained
        names = sdxl.text_encoder_names(finetuned)
        self.shared_text = all(getattr(finetuned, n) is getattr(pretrained, n) for n in names)
        self.text = {"ft": tuple(getattr(finetuned, n).params for n in names)}
        if need_pretrained and not self.shared_text:
            self.text["pre"] = tuple(getattr(pretrained, n).params for n in names)
        self.unets = {"ft": finetuned.unet_variables()}
        if need_pretrained:
            self.unets["pre"] = pretrained.unet_variables()
        self.micro, self.time_ids, self._repad = None, None, None
        if sdxl.is_sdxl(finetuned):
            _check_shared_vocabulary(finetuned)
            self.micro = micro or sdxl.micro_conditioning(pretrained)
            self.time_ids = jnp.asarray(self.micro.time_ids())[None]
            second = finetuned.tokenizer_2
            self._repad = functools.partial(second_rows, eos_id=second.eos_token_id, pad_id=second.pad_token_id)
        self._fn = _error_function(tuple(getattr(finetuned, n).module for n in names), finetuned.unet.module,
                                   pretrained.unet.module if need_pretrained else None, self.shared_text)

    def errors(self, rows: np.ndarray, pairs: slice = slice(None)):
        """(E_ft [n, R'], E_pre [n, R'] or None) for token rows [n, L] on pairs[pairs]."""
        noisy, t, target = self.noisy[pairs], self.t[pairs], self.target[pairs]
        per_call = max(1, self.batch_size // noisy.shape[0])
        count = len(rows)
        padded = np.concatenate([rows, np.repeat(rows[-1:], (-count) % per_call, 0)])
        ft, pre = [], []
        for start in range(0, len(padded), per_call):
            chunk = padded[start:start + per_call]
            ids = (jnp.asarray(chunk),) + ((jnp.asarray(self._repad(chunk)),) if self._repad else ())
            e_ft, e_pre = self._fn(self.text, self.unets, ids, self.time_ids, noisy, t, target)
            ft.append(e_ft)
            pre.append(e_pre)
        ft = np.concatenate([np.asarray(e) for e in ft])[:count]
        pre = np.concatenate([np.asarray(e) for e in pre])[:count] if self.need_pretrained else None
        return ft, pre


@functools.lru_cache(maxsize=8)
def _error_function(text_modules: tuple, unet_ft, unet_pre, shared_text: bool):
    def encode(params, ids):
        if len(text_modules) == 2:
            return sdxl.encode_ids(text_modules[0], params[0], ids[0], text_modules[1], params[1], ids[1])
        return text_modules[0](ids[0], params=params[0], train=False)[0], None

    def run(text, unets, ids, time_ids, noisy, t, target):
        k, r = ids[0].shape[0], noisy.shape[0]
        tile = lambda a: jnp.tile(a, (k,) + (1,) * (a.ndim - 1))

        def errors(encoded, variables, unet):
            context, pooled = encoded
            sdxl_kwargs = {} if pooled is None else {"added_cond_kwargs": {
                "text_embeds": jnp.repeat(pooled, r, axis=0),
                "time_ids": jnp.broadcast_to(time_ids, (k * r, time_ids.shape[1]))}}
            out = unet.apply(variables, tile(noisy), tile(t), jnp.repeat(context, r, axis=0).astype(unet.dtype),
                             **sdxl_kwargs)
            return jnp.mean((out.astype(jnp.float32) - tile(target)) ** 2, axis=tuple(range(1, out.ndim))).reshape(k, r)

        encoded_ft = encode(text["ft"], ids)
        e_ft = errors(encoded_ft, unets["ft"], unet_ft)
        if unet_pre is None:
            return e_ft, jnp.zeros((), jnp.float32)
        encoded_pre = encoded_ft if shared_text else encode(text["pre"], ids)
        return e_ft, errors(encoded_pre, unets["pre"], unet_pre)

    return jax.jit(run)


def prompt_scores(score: str, e_ft, e_pre, normalizer) -> np.ndarray:
    """Per-prompt score (higher: the fine-tuned model recognises the prompt more), [n]."""
    if score == "advantage":
        return np.mean((e_pre - e_ft) / normalizer, axis=1)
    return np.mean((normalizer - e_ft) / normalizer, axis=1)
