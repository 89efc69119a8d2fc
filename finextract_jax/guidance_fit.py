"""How far a fine-tune moved toward its training images, as model guidance's λ, and the w = 1/λ it implies.

Model guidance (guidance.py) assumes the fine-tuned model's noise prediction lies on the line from
the pretrained one to the fine-tuning data's, a fraction λ along it:

    eps_ft(x, c) = eps_pre(x, "") + λ (eps_q(x) − eps_pre(x, "")),

and extrapolates with w = 1/λ to reach eps_q. The reference fixes w (3 for DreamBooth, 5 for LoRA)
for every checkpoint; but a fine-tune trained harder sits further along the line and a fixed w then
overshoots. Whoever holds the training images (a checkpoint owner checking their own leak, the
testbed's curve) can read λ off the two models: for training images x0 noised to
x_t = sqrt(abar) x0 + sqrt(1 − abar) ε, the expected noise given x_t under the data is eps_q(x_t), so with
d = eps_ft − eps_pre and r = ε − eps_pre,

    E<d, r> = λ E|eps_q − eps_pre|²    and    E|d|² = λ² E|eps_q − eps_pre|²,    so    λ = E|d|² / E<d, r>.

(Regressing d on r instead would shrink λ toward 0 by the irreducible noise E|ε − eps_q|².) A fine-tune
also moves off that line, d = λ (eps_q − eps_pre) + e; then E|d|² gains E|e|² and the fitted λ grows
past the true one. Its w = 1/λ is in every case the least-squares best scale, the w that brings
eps_pre + w d closest to the noise actually added to the training images: extrapolating further
amplifies e more than it gains along the line. Both
expectations are taken in epsilon units, as guidance combines them, over the images, `draws` noise
draws and `timesteps`; the per-timestep ratios are kept too, since nothing forces one λ for all noise
levels. It costs two UNet evaluations per (image, timestep, draw): no sampling.

d holds two pulls that w amplifies alike: the caption's on the base, g = eps_pre(x, c) − eps_pre(x, ""),
and the fine-tune's own, f = eps_ft(x, c) − eps_pre(x, c). `split_caption` fits r ≈ a g + b f by least
squares (a third evaluation, the base on the caption): b is how far past the fine-tune its own pull
should be extrapolated, a how far the caption's, each with the other at its best.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from finextract_jax.errors import InputError

FIT_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclasses.dataclass(frozen=True)
class GuidanceFit:
    """λ over all timesteps (`fraction`), per timestep, the two expectations it is the ratio of, and with
    split_caption the least-squares scales of the caption's pull and the fine-tune's own."""

    fraction: float
    per_timestep: dict  # {timestep: λ_t}
    moved: float  # E|d|², mean per element
    toward: float  # E<d, r>, mean per element
    caption_scale: float | None = None  # a
    finetune_scale: float | None = None  # b

    @property
    def guidance_scale(self) -> float:
        """w = 1/λ; a fine-tune that did not move toward its images (λ <= 0) has none."""
        if not self.fraction > 0:
            raise InputError(f"the fine-tune did not move toward its training images (λ = {self.fraction:.3g}): "
                             "no guidance scale extrapolates to them")
        return 1.0 / self.fraction

    def to_json(self) -> dict:
        return {"fraction": self.fraction, "guidance_scale": 1.0 / self.fraction if self.fraction > 0 else None,
                "per_timestep": {str(t): v for t, v in self.per_timestep.items()}, "moved": self.moved,
                "toward": self.toward, "caption_scale": self.caption_scale, "finetune_scale": self.finetune_scale}


def moments(eps_pre, eps_ft, noise):
    """(sum |d|², sum <d, r>) with d = eps_ft − eps_pre, r = noise − eps_pre: λ is their ratio, and 1/λ the w
    that brings eps_pre + w d closest (least squares) to the noise actually added."""
    d = eps_ft - eps_pre
    return jnp.sum(d * d), jnp.sum(d * (noise - eps_pre))


def term_moments(eps_pre, eps_pre_caption, eps_ft, noise):
    """Sums (gg, gf, ff, gr, fr) of the caption's pull g = eps_pre_caption − eps_pre, the fine-tune's
    f = eps_ft − eps_pre_caption and r = noise − eps_pre: the normal equations of r ≈ a g + b f. (d = g + f, so
    `moments` is (gg + 2 gf + ff, gr + fr).)"""
    g, f, r = eps_pre_caption - eps_pre, eps_ft - eps_pre_caption, noise - eps_pre
    return jnp.stack([jnp.sum(g * g), jnp.sum(g * f), jnp.sum(f * f), jnp.sum(g * r), jnp.sum(f * r)])


def fit_guidance(pretrained, finetuned, x0: np.ndarray, caption: str, timesteps=FIT_TIMESTEPS, draws: int = 4,
                 seed: int = 0, batch_size: int = 32, split_caption: bool = False) -> GuidanceFit:
    """λ of `finetuned` over `pretrained` (loaded Pipelines) on training images `x0` in model space
    ([N, C, H, W], caption.images_to_model_space), the fine-tuned model conditioned on `caption` and the
    pretrained one on the empty prompt, exactly as FineXtract samples; `split_caption` adds the scales a, b
    of the caption's pull and the fine-tune's own. Deterministic in `seed`."""
    from finextract_jax.noise_schedule import add_noise, alphas_cumprod_from_config, epsilon_from_output
    from finextract_jax.sampling import engine

    x0 = np.asarray(x0, np.float32)
    if x0.ndim != 4 or len(x0) == 0 or x0.shape[1:] != tuple(pretrained.sample_shape):
        raise InputError(f"fit_guidance needs images [N, {', '.join(map(str, pretrained.sample_shape))}] in model "
                         f"space, got {x0.shape}")
    alphas = np.asarray(alphas_cumprod_from_config(pretrained.scheduler_config), np.float32)
    if min(timesteps) < 0 or max(timesteps) >= len(alphas):
        raise InputError(f"fit_guidance: timesteps must lie in [0, {len(alphas) - 1}], got {tuple(timesteps)}")
    guided = engine.prepare(pretrained, finetuned, "finextract", caption, fusion="two_applies")
    # The base on the empty prompt and on the caption, as cfg would evaluate it.
    base = engine.prepare(pretrained, pretrained, "cfg", caption, fusion="two_applies") if split_caption else None
    ptype = guided.prediction_type

    @jax.jit
    def sums(variables, contexts, x_t, noise, t, alpha_bar):
        eps = lambda model, outs: [epsilon_from_output(x_t, outs[j].astype(jnp.float32), alpha_bar, ptype)
                                   for j in model.order]
        eps_pre, eps_ft = eps(guided, engine.evaluate(guided, variables[0], contexts[0], x_t, t))
        if base is None:
            moved, toward = moments(eps_pre, eps_ft, noise)
            return jnp.stack([moved, 0.0, 0.0, toward, 0.0])  # d in g's slots (_moved_toward)
        _, eps_pre_caption = eps(base, engine.evaluate(base, variables[1], contexts[1], x_t, t))
        return term_moments(eps_pre, eps_pre_caption, eps_ft, noise)

    variables = (guided.variables,) + ((base.variables,) if base else ())
    contexts = (guided.contexts,) + ((base.contexts,) if base else ())
    images = np.repeat(x0, draws, axis=0)
    per_timestep, total = {}, np.zeros(5)
    for step, t in enumerate(timesteps):
        noise = np.random.default_rng([seed, step, 13]).standard_normal(images.shape).astype(np.float32)
        x_t = np.asarray(add_noise(images, noise, np.full(len(images), alphas[t])), np.float32)
        part_sums = sum(np.asarray(sums(variables, contexts, jnp.asarray(x_t[i:i + batch_size]),
                                        jnp.asarray(noise[i:i + batch_size]), jnp.int32(t), jnp.float32(alphas[t])),
                                   np.float64) for i in range(0, len(images), batch_size))
        moved, toward = _moved_toward(part_sums)
        per_timestep[int(t)] = moved / toward if toward else float("nan")
        total += part_sums / images.size / len(timesteps)
    moved, toward = _moved_toward(total)
    scales = {}
    if split_caption:
        (gg, gf, ff, gr, fr) = total
        scales = dict(zip(("caption_scale", "finetune_scale"),
                          (float(v) for v in np.linalg.lstsq([[gg, gf], [gf, ff]], [gr, fr], rcond=None)[0])))
    return GuidanceFit(fraction=moved / toward if toward else float("nan"), per_timestep=per_timestep,
                       moved=moved, toward=toward, **scales)


def _moved_toward(sums) -> tuple:
    """(E|d|², E<d, r>) from term sums (gg, gf, ff, gr, fr); without the split, d sits whole in g's slots."""
    gg, gf, ff, gr, fr = (float(v) for v in sums)
    return gg + 2 * gf + ff, gr + fr
