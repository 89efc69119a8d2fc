"""Guidance arithmetic on fixed noise predictions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finextract_jax import guidance as G
from finextract_jax.errors import InputError

rng = np.random.default_rng(0)
PRE = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
FT = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
UNC = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)


def test_finextract_formula():
    got = G.finextract(PRE, FT, 3.0, -0.02)
    want = PRE.astype(np.float64) + 3.0 * (FT - PRE.astype(np.float64)) - 0.02 * PRE
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    assert got.dtype == jnp.float32 and got.shape == PRE.shape


def test_finextract_special_cases():
    # w = 1, k = 0: just the fine-tuned prediction; w = 0, k = 0: just the pretrained one.
    np.testing.assert_allclose(np.asarray(G.finextract(PRE, FT, 1.0, 0.0)), FT, atol=1e-6)
    np.testing.assert_allclose(np.asarray(G.finextract(PRE, FT, 0.0)), PRE, atol=1e-6)
    # k scales the pretrained prediction only.
    d = np.asarray(G.finextract(PRE, FT, 5.0, 0.1) - G.finextract(PRE, FT, 5.0, 0.0))
    np.testing.assert_allclose(d, 0.1 * PRE, atol=1e-6)


def test_cfg_and_text2img():
    np.testing.assert_allclose(np.asarray(G.cfg(UNC, FT, 3.0)), UNC + 3.0 * (FT - UNC), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(G.cfg(UNC, FT, 1.0)), FT, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(G.text2img(FT)), FT)


def test_bf16_inputs_combine_in_float32():
    pre16, ft16 = jnp.asarray(PRE, jnp.bfloat16), jnp.asarray(FT, jnp.bfloat16)
    got = G.finextract(pre16, ft16, 5.0, -0.02)
    assert got.dtype == jnp.float32
    p, f = np.asarray(pre16, np.float64), np.asarray(ft16, np.float64)
    np.testing.assert_allclose(np.asarray(got), p + 5 * (f - p) - 0.02 * p, rtol=1e-6, atol=1e-6)
    assert G.cfg(pre16, ft16, 3.0).dtype == jnp.float32
    assert G.text2img(ft16).dtype == jnp.float32


def test_registry_evaluations():
    fx, cfg, t2i = G.get_guidance("finextract"), G.get_guidance("cfg"), G.get_guidance("text2img")
    # FineXtract: pretrained UNet on the empty prompt, fine-tuned UNet on the caption.
    assert fx.evaluations == (("pretrained", "empty"), ("finetuned", "caption"))
    assert cfg.evaluations == (("finetuned", "empty"), ("finetuned", "caption"))
    assert t2i.evaluations == (("finetuned", "caption"),)
    assert fx.models == ("pretrained", "finetuned") and cfg.models == ("finetuned",)
    assert (fx.default_scale, fx.default_correction) == (3.0, -0.02)
    assert cfg.default_scale == 3.0 and t2i.default_scale == 1.0
    assert fx.uses_correction and not cfg.uses_correction and not t2i.uses_correction
    assert set(G.METHODS) == {"finextract", "finextract_caption", "cfg", "text2img"}
    assert G.PAPER_METHODS == ("finextract", "cfg", "text2img")
    ablation = G.get_guidance("finextract_caption")  # the base on the caption: w amplifies the fine-tune's pull only
    assert ablation.evaluations == (("pretrained", "caption"), ("finetuned", "caption"))
    assert [G.get_guidance(m).model_guidance for m in G.METHODS] == [True, True, False, False]


def test_registry_combine_matches_functions():
    fx, cfg, t2i = (G.get_guidance(m) for m in ("finextract", "cfg", "text2img"))
    np.testing.assert_array_equal(np.asarray(fx.combine([PRE, FT], 3.0, -0.02)),
                                  np.asarray(G.finextract(PRE, FT, 3.0, -0.02)))
    np.testing.assert_array_equal(np.asarray(cfg.combine([UNC, FT], 3.0, -0.02)),
                                  np.asarray(G.cfg(UNC, FT, 3.0)))
    np.testing.assert_array_equal(np.asarray(t2i.combine([FT], 7.0, 1.0)), FT)


def test_combine_with_traced_scales_under_jit():
    spec = G.get_guidance("finextract")
    f = jax.jit(lambda outs, w, k: spec.combine(outs, w, k))
    a = f([PRE, FT], 3.0, -0.02)
    b = f([PRE, FT], 5.0, 0.0)  # same compiled function, new scalars
    np.testing.assert_allclose(np.asarray(a), np.asarray(G.finextract(PRE, FT, 3.0, -0.02)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(b), np.asarray(G.finextract(PRE, FT, 5.0, 0.0)), atol=1e-6)
    assert f._cache_size() == 1


def test_unknown_method():
    with pytest.raises(InputError, match="finextract, finextract_caption, cfg, text2img"):
        G.get_guidance("cfgpp")


def test_bad_spec():
    with pytest.raises(InputError):
        G.GuidanceSpec("x", (("teacher", "empty"),), lambda o, s, c: o[0], 1.0, 0.0, False)


def test_schedule_matched_correction():
    """k scaled so that the first step shifts x0 (by -k sigma/alpha eps) as far as the reference's first step
    on SD's schedule (t = 981) does: identity there, 1/8.2 on DDPM's linear pixel schedule at t = 961."""
    from finextract_jax.noise_schedule import alphas_cumprod_from_config

    sd = alphas_cumprod_from_config(G.REFERENCE_SCHEDULE)
    assert G.schedule_matched_correction(-0.02, float(sd[981])) == -0.02
    assert G.schedule_matched_correction(0.0, 1e-4) == 0.0
    pixel = alphas_cumprod_from_config({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02})
    ratio = np.sqrt((1 - sd[981]) / sd[981]) / np.sqrt((1 - pixel[961]) / pixel[961])
    assert G.schedule_matched_correction(-0.02, float(pixel[961])) == pytest.approx(-0.02 * ratio, rel=1e-12)
    assert G.schedule_matched_correction(-0.02, float(pixel[961])) == pytest.approx(-0.00243, abs=1e-5)
    # SD sampled from a less noisy first step (25 steps: t = 961): k grows to keep the first shift.
    assert G.schedule_matched_correction(-0.02, float(sd[961])) == pytest.approx(-0.02 * 13.1204 / 11.6760, rel=1e-4)
