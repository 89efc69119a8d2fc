"""Samplers against diffusers' PyTorch schedulers, stepping with the same random model outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from jax import lax

from finextract_jax.errors import InputError
from finextract_jax.sampling import make_sampler
from finextract_jax.noise_schedule import alphas_cumprod_from_config
from finextract_jax.sampling.schedulers import SAMPLERS

# SD v1.4's scheduler/scheduler_config.json (PNDMScheduler).
SD14 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.7.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SHAPE = (2, 4, 8, 8)
TOL = dict(rtol=1e-5, atol=1e-5)


def assert_close(actual, desired):
    """fp32 agreement: 1e-5 relative, and 1e-5 absolute relative to the trajectory's scale
    (random model outputs drive some schedules' latents to |x| ~ 300, where fp32 rounding of
    the abar table alone moves the small entries by more than 1e-5)."""
    desired = np.asarray(desired)
    scale = max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=1e-5, atol=1e-5 * scale)


@jax.jit
def _run(sampler, x_T, outputs):
    """All intermediate latents of a scan over the sampler's steps with given model outputs."""
    def body(state, i):
        state = sampler.step(state, outputs[i], i)
        return state, sampler.latents(state)
    _, xs = lax.scan(body, sampler.init_state(x_T), jnp.arange(sampler.num_steps))
    return xs


def _run_torch(sched, x_T, outputs, **step_options):
    x = torch.from_numpy(x_T)
    xs = []
    for i, t in enumerate(sched.timesteps[: len(outputs)]):
        x = sched.step(torch.from_numpy(outputs[i]), t, x, **step_options).prev_sample
        xs.append(x.numpy().copy())
    return np.stack(xs)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    outs = rng.standard_normal((n,) + SHAPE).astype(np.float32)
    return x_T, outs


DDIM_CASES = [
    ({}, 50),  # SD v1.4 config as DDIMScheduler.from_config reads it
    ({}, 7),
    ({"timestep_spacing": "trailing", "set_alpha_to_one": True, "steps_offset": 0}, 50),
    ({"timestep_spacing": "trailing", "steps_offset": 0}, 7),
    ({"timestep_spacing": "linspace"}, 25),
    ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0}, 20),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("overrides,steps", DDIM_CASES)
def test_ddim_matches_diffusers(overrides, steps, prediction_type):
    cfg = dict(SD14, prediction_type=prediction_type, **overrides)
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    ours = make_sampler("ddim", cfg, steps)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
    assert ours.timesteps.dtype == jnp.int32 and ours.init_noise_sigma == ref.init_noise_sigma
    x_T, outs = _data(steps)
    assert_close(_run(ours, x_T, outs), _run_torch(ref, x_T, outs))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("use_clipped", [True, False])
def test_ddim_clip_sample_only_when_configured(use_clipped, prediction_type):
    """Clipped x0 with epsilon re-derived from it (our default) or kept (diffusers' step default), each
    against diffusers' DDIMScheduler.step(use_clipped_model_output=...); the pixel testbed's schedule, whose
    early x0 predictions leave [-1, 1] so that the two differ."""
    cfg = dict(SD14, clip_sample=True, clip_sample_range=1.0, prediction_type=prediction_type, beta_schedule="linear",
               beta_start=0.0001, beta_end=0.02)
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(10)
    ours = make_sampler("ddim", cfg, 10, **({} if use_clipped else {"use_clipped_model_output": False}))
    assert ours.clip_sample_range == 1.0 and ours.use_clipped_model_output == use_clipped
    x_T, outs = _data(10, seed=1)
    expected = _run_torch(ref, x_T, outs, use_clipped_model_output=use_clipped)
    assert_close(_run(ours, x_T, outs), expected)
    other = _run_torch(ref, x_T, outs, use_clipped_model_output=not use_clipped)
    assert np.abs(expected - other).max() > 0.1  # the case distinguishes the two
    # Without the key, clipping is off (diffusers' class default would clip SD latents).
    no_key = {k: v for k, v in SD14.items() if k != "clip_sample"}
    assert make_sampler("ddim", no_key, 10).clip_sample_range is None


DPM_CASES = [
    ({}, 20),  # >= 15 steps: second order until the final (sigma = 0) step
    ({}, 8),  # < 15 steps: lower_order_final path
    ({"solver_type": "heun"}, 10),
    ({"final_sigmas_type": "sigma_min"}, 20),
    ({"final_sigmas_type": "sigma_min", "lower_order_final": False}, 6),
    ({"timestep_spacing": "leading"}, 12),
    ({"timestep_spacing": "trailing"}, 16),
    ({"solver_order": 1}, 10),
    ({"lambda_min_clipped": -2.5}, 10),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("overrides,steps", DPM_CASES)
def test_dpm_matches_diffusers(overrides, steps, prediction_type):
    cfg = dict(SD14, prediction_type=prediction_type, **overrides)
    ref = DPMSolverMultistepScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    ours = make_sampler("dpm", cfg, steps)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
    x_T, outs = _data(steps, seed=2)
    assert_close(_run(ours, x_T, outs), _run_torch(ref, x_T, outs))


def test_reference_ddim_timesteps():
    ours = make_sampler("reference_ddim", SD14, 50)
    expected = [981, 961, 961] + list(range(941, 20, -20))
    assert np.asarray(ours.timesteps).tolist() == expected
    assert expected[-1] == 21 and len(expected) == 50
    # They are the first 50 of SD v1.4's default PNDM scheduler's 51.
    pndm = PNDMScheduler.from_config(SD14)
    pndm.set_timesteps(50)
    assert pndm.timesteps.numpy()[:50].tolist() == expected
    # Without a config: SD v1.4's steps_offset=1 and leading spacing by default.
    assert np.asarray(make_sampler("reference_ddim", None, 50).timesteps).tolist() == expected


def test_reference_ddim_update_by_hand():
    steps = 50
    s = make_sampler("reference_ddim", SD14, steps)
    abar = alphas_cumprod_from_config(SD14)
    x_T, outs = _data(steps, seed=3)
    xs = np.asarray(_run(s, x_T, outs))
    x = x_T.astype(np.float64)
    ts = np.asarray(s.timesteps)
    for i, t in enumerate(ts):
        prev = max(1, int(t) - 1000 // steps)
        eps = outs[i].astype(np.float64)
        x0 = (x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
        x = np.sqrt(abar[prev]) * x0 + np.sqrt(1 - abar[prev]) * eps
        np.testing.assert_allclose(xs[i], x, **TOL)
    # The first step goes 981 -> 961, the repeated 961 goes to 941 again, the last 21 -> 1.
    i0 = 0
    x1 = (np.sqrt(abar[961]) * (x_T - np.sqrt(1 - abar[981]) * outs[i0]) / np.sqrt(abar[981])
          + np.sqrt(1 - abar[961]) * outs[i0])
    np.testing.assert_allclose(xs[0], x1, **TOL)
    np.testing.assert_allclose(np.asarray(s.alpha_prev)[1:3] ** 2, abar[[941, 941]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.alpha_prev)[-1] ** 2, abar[1], rtol=1e-6)


def test_reference_ddim_v_prediction_converts_to_eps():
    cfg = dict(SD14, prediction_type="v_prediction")
    s = make_sampler("reference_ddim", cfg, 10)
    abar = alphas_cumprod_from_config(cfg)
    x_T, outs = _data(1, seed=4)
    t, prev = int(s.timesteps[0]), max(1, int(s.timesteps[0]) - 100)
    a, b = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
    x0 = a * x_T - b * outs[0]
    eps = a * outs[0] + b * x_T
    want = np.sqrt(abar[prev]) * x0 + np.sqrt(1 - abar[prev]) * eps
    got = s.latents(s.step(s.init_state(x_T), outs[0], 0))
    np.testing.assert_allclose(np.asarray(got), want, **TOL)


@pytest.mark.parametrize("name", SAMPLERS)
def test_step_in_jit_fori_loop(name):
    cfg = dict(SD14, prediction_type="v_prediction")
    s = make_sampler(name, cfg, 6)
    x_T, outs = _data(6, seed=5)

    def fake_unet(x, t):  # depends on x and the timestep, like a model would
        return 0.5 * x + 1e-3 * t.astype(jnp.float32)

    @jax.jit
    def sample(x_T):
        def body(i, state):
            x = s.model_input(state)
            return s.step(state, fake_unet(x, s.timesteps[i]), i)
        return s.latents(lax.fori_loop(0, s.num_steps, body, s.init_state(x_T)))

    def eager(x_T):
        state = s.init_state(x_T)
        for i in range(s.num_steps):
            state = s.step(state, fake_unet(state.x, s.timesteps[i]), i)
        return s.latents(state)

    got = sample(x_T)
    assert got.dtype == jnp.float32 and got.shape == SHAPE
    np.testing.assert_allclose(np.asarray(got), np.asarray(eager(x_T)), **TOL)


@pytest.mark.parametrize("name", SAMPLERS)
def test_to_epsilon_then_step_epsilon_equals_step_v(name):
    cfg = dict(SD14, prediction_type="v_prediction")
    s = make_sampler(name, cfg, 5)
    x_T, outs = _data(5, seed=6)
    a = b = s.init_state(x_T)
    for i in range(5):
        a = s.step(a, outs[i], i)
        b = s.step(b, s.to_epsilon(b.x, outs[i], i), i, prediction_type="epsilon")
    np.testing.assert_allclose(np.asarray(a.x), np.asarray(b.x), **TOL)


def test_overrides_and_describe():
    s = make_sampler("ddim", SD14, 10, set_alpha_to_one=True)
    assert float(s.alpha_prev[-1]) == 1.0 and float(s.sigma_prev[-1]) == 0.0
    abar0 = alphas_cumprod_from_config(SD14)[0]
    np.testing.assert_allclose(float(make_sampler("ddim", SD14, 10).alpha_prev[-1]) ** 2, abar0, rtol=1e-6)
    d = make_sampler("reference_ddim", SD14, 4, prediction_type="v_prediction").describe()
    assert d == {"sampler": "reference_ddim", "prediction_type": "v_prediction", "num_steps": 4,
                 "timesteps": [751, 501, 501, 251], "clip_sample_range": None}
    assert "prediction_type" not in SD14


def test_bf16_model_output_is_upcast():
    s = make_sampler("ddim", SD14, 4)
    x_T, outs = _data(4, seed=7)
    st = s.step(s.init_state(x_T), jnp.asarray(outs[0], jnp.bfloat16), 0)
    assert st.x.dtype == jnp.float32


def test_sampler_is_a_pytree_and_jit_argument():
    s = make_sampler("dpm", SD14, 5)
    leaves = jax.tree_util.tree_leaves(s)
    assert all(isinstance(l, jax.Array) for l in leaves)
    x_T, outs = _data(5, seed=8)
    np.testing.assert_allclose(np.asarray(_run(s, x_T, outs))[-1],
                               np.asarray(_run(make_sampler("dpm", SD14, 5), x_T, outs))[-1])


@pytest.mark.parametrize("name,cfg,steps", [
    ("nope", SD14, 10),
    ("ddim", SD14, 0),
    ("ddim", SD14, 1001),
    ("ddim", SD14, 2.5),
    ("ddim", dict(SD14, timestep_spacing="weird"), 10),
    ("ddim", dict(SD14, beta_schedule="sigmoid"), 10),
    ("ddim", dict(SD14, prediction_type="flow_prediction"), 10),
    ("ddim", dict(SD14, thresholding=True), 10),
    ("ddim", dict(SD14, rescale_betas_zero_snr=True), 10),
    ("dpm", dict(SD14, use_karras_sigmas=True), 10),
    ("dpm", dict(SD14, solver_order=3), 10),
    ("dpm", dict(SD14, algorithm_type="sde-dpmsolver++"), 10),
    ("ddim", "not a dict", 10),
])
def test_bad_settings_raise_input_error(name, cfg, steps):
    with pytest.raises(InputError):
        make_sampler(name, cfg, steps)
