"""guidance_fit: λ read off a (pretrained, fine-tuned) pair on the fine-tune's training images."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from finextract_jax.errors import InputError
from finextract_jax.guidance_fit import GuidanceFit, fit_guidance, moments, term_moments


def _synthetic(lam, off_line, n=400_000, seed=0):
    """eps_pre, eps_ft, noise where the data's noise given x averages to eps_q, and the fine-tune sits a
    fraction lam of the way from eps_pre to eps_q, plus an off-line part of scale `off_line`."""
    rng = np.random.default_rng(seed)
    eps_pre = rng.standard_normal(n)
    eps_q = eps_pre + rng.standard_normal(n)
    noise = eps_q + 2.0 * rng.standard_normal(n)  # irreducible: E[noise | x] = eps_q
    eps_ft = eps_pre + lam * (eps_q - eps_pre) + off_line * rng.standard_normal(n)
    return (jnp.asarray(a, jnp.float32) for a in (eps_pre, eps_ft, noise))


@pytest.mark.parametrize("lam", [0.2, 0.5, 1.0])
def test_moments_recover_the_fraction_despite_irreducible_noise(lam):
    """On the model's own line, |d|² / <d, r> is λ; the regression <d, r> / |r|² would be pulled far
    below it by the noise the data keeps (here 4x the signal)."""
    eps_pre, eps_ft, noise = _synthetic(lam, off_line=0.0)
    moved, toward = (float(v) for v in moments(eps_pre, eps_ft, noise))
    assert moved / toward == pytest.approx(lam, rel=0.02)
    regression = toward / float(jnp.sum((noise - eps_pre) ** 2))
    assert regression < 0.3 * lam


def test_term_moments_separate_the_captions_pull_from_the_fine_tunes():
    """When the noise is a g + b f plus irreducible noise, the normal equations of term_moments give back
    (a, b), and their d-sums are `moments`' (d = g + f)."""
    rng = np.random.default_rng(2)
    eps_pre, g, f, rest = (rng.standard_normal(200_000) for _ in range(4))
    noise = eps_pre + 0.8 * g + 2.5 * f + 1.5 * rest
    eps_pre, eps_caption, eps_ft, noise = (jnp.asarray(v, jnp.float32) for v in (eps_pre, eps_pre + g, eps_pre + g + f, noise))
    gg, gf, ff, gr, fr = (float(v) for v in term_moments(eps_pre, eps_caption, eps_ft, noise))
    assert np.linalg.solve([[gg, gf], [gf, ff]], [gr, fr]) == pytest.approx([0.8, 2.5], abs=0.02)
    moved, toward = (float(v) for v in moments(eps_pre, eps_ft, noise))
    assert (gg + 2 * gf + ff, gr + fr) == (pytest.approx(moved, rel=1e-4), pytest.approx(toward, rel=1e-4))


def test_off_line_movement_lowers_w_to_the_least_squares_scale():
    """Movement off the line inflates the fitted λ, and 1/λ is then the scale w minimising
    |eps_pre + w d − noise|² (checked on a grid), below the 1/λ of the line alone."""
    eps_pre, eps_ft, noise = _synthetic(0.25, off_line=0.5)
    moved, toward = (float(v) for v in moments(eps_pre, eps_ft, noise))
    w = toward / moved
    grid = np.linspace(0.5, 6.0, 1101)
    losses = [float(jnp.mean((eps_pre + g * (eps_ft - eps_pre) - noise) ** 2)) for g in grid]
    assert w == pytest.approx(grid[int(np.argmin(losses))], abs=0.01)
    assert w < 0.6 * 4.0  # the line alone would give w = 4


def test_a_base_against_itself_has_no_guidance_scale(tiny_pipe):
    """The same model on both sides: nothing moved, λ undefined, and asking for w is a typed error
    naming the cause (not a division by zero or an infinite scale)."""
    pipe = tiny_pipe("pixel")
    x0 = np.random.default_rng(0).uniform(-1, 1, (2,) + tuple(pipe.sample_shape)).astype(np.float32)
    fit = fit_guidance(pipe, pipe, x0, "", timesteps=(500,), draws=1)
    assert fit.moved == 0.0 and fit.toward == 0.0
    with pytest.raises(InputError, match="did not move toward"):
        fit.guidance_scale
    with pytest.raises(InputError, match="model space"):
        fit_guidance(pipe, pipe, x0[:, :2], "")
    with pytest.raises(InputError, match="timesteps"):
        fit_guidance(pipe, pipe, x0, "", timesteps=(5000,))


def test_fit_on_a_fine_tune_matches_the_unets_outputs_computed_directly(tiny_dir, tiny_pipe):
    """The fit's moments equal those of the two UNets applied by hand (pretrained on the empty prompt,
    fine-tuned on the caption, v-outputs converted to epsilon) for the noise it draws, and its w is the
    least-squares scale on those inputs: the wiring, on a v-prediction model."""
    from finextract_jax.models.pipeline import encode_prompts
    from finextract_jax.noise_schedule import add_noise, alphas_cumprod_from_config

    pre = tiny_pipe("sd2")
    ft = dataclasses.replace(pre, unet=dataclasses.replace(pre.unet, params=jax_tree_perturbed(pre.unet.params)))
    x0 = np.random.default_rng(1).standard_normal((3,) + tuple(pre.sample_shape)).astype(np.float32)
    fit = fit_guidance(pre, ft, x0, "sks cat", timesteps=(300,), draws=2, seed=4)
    split = fit_guidance(pre, ft, x0, "sks cat", timesteps=(300,), draws=2, seed=4, split_caption=True)
    assert pre.prediction_type == "v_prediction" and fit.caption_scale is None

    alpha = np.asarray(alphas_cumprod_from_config(pre.scheduler_config), np.float32)[300]
    images = np.repeat(x0, 2, axis=0)
    noise = np.random.default_rng([4, 0, 13]).standard_normal(images.shape).astype(np.float32)
    x_t = add_noise(images, noise, np.full(len(images), alpha))

    def eps(pipe, prompt):
        context = jnp.repeat(encode_prompts(pipe.text_encoder, pipe.tokenizer, [prompt]), len(images), axis=0)
        v = pipe.unet.module.apply(pipe.unet_variables(), x_t, jnp.int32(300), context)
        return np.sqrt(alpha) * np.asarray(v) + np.sqrt(1 - alpha) * np.asarray(x_t)

    eps_pre, eps_ft = eps(pre, ""), eps(ft, "sks cat")
    d, r = eps_ft - eps_pre, noise - eps_pre
    assert fit.moved == pytest.approx(np.mean(d * d), rel=1e-4)
    assert fit.toward == pytest.approx(np.mean(d * r), rel=1e-4)
    assert fit.per_timestep == {300: pytest.approx(fit.fraction)}
    assert isinstance(fit, GuidanceFit) and fit.to_json()["guidance_scale"] == pytest.approx(1 / fit.fraction)
    assert split.fraction == pytest.approx(fit.fraction, rel=1e-4)  # the split adds scales, changes nothing else
    g, f = eps(pre, "sks cat") - eps_pre, eps_ft - eps(pre, "sks cat")
    (a, b), *_ = np.linalg.lstsq(np.stack([g.ravel(), f.ravel()], 1), r.ravel(), rcond=None)
    assert (split.caption_scale, split.finetune_scale) == (pytest.approx(a, rel=1e-3), pytest.approx(b, rel=1e-3))


def jax_tree_perturbed(params, scale=0.05, seed=3):
    """params plus small Gaussian noise: a stand-in fine-tune that moved everywhere a little."""
    import jax

    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(tree, [l + scale * rng.standard_normal(l.shape).astype(l.dtype) for l in leaves])


def test_epsilon_from_output_inverts_each_parameterisation():
    """The noise a perfect UNet output implies is the noise that was added, whatever the model predicts:
    epsilon itself, v (its training target) or the clean sample; an unknown type is a typed error."""
    from finextract_jax.noise_schedule import add_noise, epsilon_from_output, training_target

    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 3, 4, 4)).astype(np.float32)
    abar = np.array([0.9, 0.05], np.float32)
    x_t = add_noise(x0, noise, abar)
    outputs = {"epsilon": noise, "v_prediction": training_target(x0, noise, abar, "v_prediction"), "sample": x0}
    for ptype, output in outputs.items():
        np.testing.assert_allclose(epsilon_from_output(x_t, output, abar, ptype), noise, atol=2e-5, err_msg=ptype)
    with pytest.raises(InputError, match="prediction_type"):
        epsilon_from_output(x_t, noise, abar, "flow")
