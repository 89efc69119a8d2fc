"""Noise-prediction combiners: FineXtract model guidance and the two baselines (docs/method.md §2).

Why model guidance: the fine-tuned model's distribution is modelled as
p_ft ∝ p_pre^(1-λ) · q^λ, with q the (private) fine-tuning distribution. Solving for q's score
gives an extrapolation *away from the pretrained model, through the fine-tuned one*:

    eps_q = eps_pre + w · (eps_ft − eps_pre),     w = 1/λ > 1.

The reference implementation runs the conditional form, with the pretrained UNet on the EMPTY
prompt and the fine-tuned UNet on the caption (two UNet evaluations per step), plus a small
correction term k · eps_pre (DreamBooth w=3, k=−0.02; LoRA w=5, k=0):

    eps = eps_pre(x,"") + w · (eps_ft(x,c) − eps_pre(x,"")) + k · eps_pre(x,"").

All functions here are pure `jnp` code: they work on traced values inside `jit`/`fori_loop`
(the scale and correction may be traced scalars, so changing them does not recompile). The
arithmetic is done in float32 whatever the dtype of the predictions (bfloat16 UNets included):
with w = 3..5 the difference eps_ft − eps_pre is small relative to its terms and is amplified,
so computing it in bf16 would amplify bf16 rounding error too.

For v-prediction models, convert every model output to epsilon before combining
(`Sampler.to_epsilon`): the combination weights of `finextract` sum to 1 + k, so with k ≠ 0
combining raw v outputs is not the same as combining epsilons (for `cfg`/`text2img`, and
`finextract` with k = 0, the weights sum to 1 and both orders agree).

`finextract_caption` is an ablation of it with the base on the caption as well,
eps_pre(x,c) + w (eps_ft(x,c) − eps_pre(x,c)) + k eps_pre(x,c): w then amplifies only what fine-tuning
changed, where FineXtract's w also amplifies the caption's pull on the base (cfg's direction).

`GUIDANCE` maps a method name to a `GuidanceSpec`: which (model, prompt) evaluations the method
needs and how to combine their outputs, so the sampling step can be written once for all methods.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence, Tuple

import jax.numpy as jnp

from finextract_jax.errors import InputError

Array = jnp.ndarray

PRETRAINED = "pretrained"
FINETUNED = "finetuned"
EMPTY = "empty"
CAPTION = "caption"
MODELS = (PRETRAINED, FINETUNED)
PROMPTS = (EMPTY, CAPTION)


def _f32(x) -> Array:
    return jnp.asarray(x, dtype=jnp.float32)


def finextract(eps_pre_uncond, eps_ft_cond, w, k=0.0) -> Array:
    """FineXtract model guidance: eps_pre + w·(eps_ft − eps_pre) + k·eps_pre, in float32.

    Args:
      eps_pre_uncond: pretrained UNet's prediction with the empty prompt.
      eps_ft_cond: fine-tuned UNet's prediction with the caption (empty prompt when no caption
        leaked: the same code then does unconditional extraction).
      w: guidance scale w = 1/λ (> 1 extrapolates towards the fine-tuning data).
      k: correction coefficient on the pretrained prediction (reference: −0.02 for DreamBooth,
        0 for LoRA).
    """
    pre = _f32(eps_pre_uncond)
    ft = _f32(eps_ft_cond)
    w = _f32(w)
    k = _f32(k)
    return pre + w * (ft - pre) + k * pre


# The reference's k was set on SD v1.x's noise schedule, whose sampler starts at t = 981 (50 DDIM
# steps, leading spacing, offset 1): sigma/alpha = 13.12 there.
REFERENCE_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                      "num_train_timesteps": 1000}
REFERENCE_FIRST_TIMESTEP = 981


def noise_to_signal(alpha_bar: float) -> float:
    """sigma / alpha = sqrt((1 - abar) / abar): how far an error in epsilon moves DDIM's x0 estimate."""
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def schedule_matched_correction(k: float, first_alpha_bar: float) -> float:
    """k for a sampler whose first step sits at noise level `first_alpha_bar`, scaled so that the first
    step moves DDIM's x0 estimate as far as k does in the reference's first step on SD's schedule.

    Why: the term k eps_pre added to the noise prediction shifts DDIM's x0 estimate by
    -k (sigma/alpha) eps_pre. sigma/alpha at the first step is 13.12 for the reference (SD, t = 981) but
    108 for DDPM's linear pixel schedule at t = 961, so the reference k pushes a pixel model's first
    x0 eight times as far, past the clipping range (docs/method.md §2). Identity for SD's schedule
    sampled from t = 981 (the reference's 50 steps), exact in float64.
    """
    from finextract_jax.noise_schedule import alphas_cumprod_from_config

    reference = float(alphas_cumprod_from_config(REFERENCE_SCHEDULE)[REFERENCE_FIRST_TIMESTEP])
    if reference == first_alpha_bar:
        return float(k)
    return float(k) * noise_to_signal(reference) / noise_to_signal(first_alpha_bar)


def cfg(eps_ft_uncond, eps_ft_cond, s) -> Array:
    """Classifier-free guidance on the fine-tuned model alone (baseline), in float32:
    eps_ft(x,"") + s·(eps_ft(x,c) − eps_ft(x,"")); reference s = 3."""
    unc = _f32(eps_ft_uncond)
    cond = _f32(eps_ft_cond)
    return unc + _f32(s) * (cond - unc)


def text2img(eps_ft_cond) -> Array:
    """Plain text-to-image sampling with the fine-tuned model and the caption (baseline, s = 1)."""
    return _f32(eps_ft_cond)


Evaluation = Tuple[str, str]  # (model in MODELS, prompt in PROMPTS)


@dataclasses.dataclass(frozen=True)
class GuidanceSpec:
    """What a guidance method needs from the UNets and how it combines their outputs.

    Attributes:
      name: method name, as `--method` spells it.
      evaluations: the UNet evaluations of one step, in the order `combine` expects their outputs:
        each is (model, prompt) with model in {"pretrained", "finetuned"} and prompt in
        {"empty", "caption"}. Each prompt is encoded with the text encoder of the model that
        consumes it.
      combine: combine(outputs, scale, correction) -> float32 noise prediction. `outputs` is a
        sequence of arrays matching `evaluations`; `scale` and `correction` may be traced.
        Methods without a correction term ignore it.
      default_scale, default_correction: the reference settings (FineXtract: DreamBooth values;
        use w = 5, k = 0 for LoRA).
      uses_correction: whether `correction` has any effect.
    """

    name: str
    evaluations: Tuple[Evaluation, ...]
    combine: Callable[[Sequence[Array], Array, Array], Array]
    default_scale: float
    default_correction: float
    uses_correction: bool

    def __post_init__(self):
        for model, prompt in self.evaluations:
            if model not in MODELS or prompt not in PROMPTS:
                raise InputError(f"bad evaluation ({model!r}, {prompt!r}) in guidance {self.name!r}")

    @property
    def models(self) -> Tuple[str, ...]:
        """The distinct models this method evaluates (in first-use order)."""
        return tuple(dict.fromkeys(m for m, _ in self.evaluations))

    @property
    def model_guidance(self) -> bool:
        """Whether the method guides with the pretrained model (FineXtract and its ablation): it then takes
        FineXtract's (w, k); the baselines sample the fine-tune alone."""
        return PRETRAINED in self.models

    @property
    def num_evaluations(self) -> int:
        return len(self.evaluations)


def _combine_finextract(outs, scale, correction):
    eps_pre, eps_ft_cond = outs  # the base on the empty prompt (finextract) or the caption (finextract_caption)
    return finextract(eps_pre, eps_ft_cond, scale, correction)


def _combine_cfg(outs, scale, correction):
    del correction
    eps_ft_uncond, eps_ft_cond = outs
    return cfg(eps_ft_uncond, eps_ft_cond, scale)


def _combine_text2img(outs, scale, correction):
    del scale, correction
    (eps_ft_cond,) = outs
    return text2img(eps_ft_cond)


_FINEXTRACT = GuidanceSpec(
    name="finextract",
    evaluations=((PRETRAINED, EMPTY), (FINETUNED, CAPTION)),
    combine=_combine_finextract,
    default_scale=3.0,
    default_correction=-0.02,
    uses_correction=True,
)
GUIDANCE = {
    "finextract": _FINEXTRACT,
    # An ablation, not the paper's: the base sees the caption too, so w amplifies only the fine-tune's own
    # pull eps_ft(c) − eps_pre(c), not the caption's pull on the base (docs/method.md §2, the split fit).
    "finextract_caption": dataclasses.replace(_FINEXTRACT, name="finextract_caption",
                                              evaluations=((PRETRAINED, CAPTION), (FINETUNED, CAPTION))),
    "cfg": GuidanceSpec(
        name="cfg",
        evaluations=((FINETUNED, EMPTY), (FINETUNED, CAPTION)),
        combine=_combine_cfg,
        default_scale=3.0,
        default_correction=0.0,
        uses_correction=False,
    ),
    "text2img": GuidanceSpec(
        name="text2img",
        evaluations=((FINETUNED, CAPTION),),
        combine=_combine_text2img,
        default_scale=1.0,
        default_correction=0.0,
        uses_correction=False,
    ),
}
METHODS = tuple(GUIDANCE)
PAPER_METHODS = ("finextract", "cfg", "text2img")  # what the paper's table compares


def get_guidance(name: str) -> GuidanceSpec:
    """The GuidanceSpec for a method name; InputError naming the choices for an unknown one."""
    try:
        return GUIDANCE[name]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown guidance method {name!r}; choose one of {', '.join(METHODS)}") from None
