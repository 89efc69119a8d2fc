"""Samplers as pure functions for a jitted denoising loop (docs/method.md §3).

`make_sampler(name, scheduler_config, num_steps)` returns a `Sampler`: a pytree (flax struct)
holding the per-step tables as float32/int32 arrays, whose methods are pure `jnp` code that
can run inside `jax.jit` + `lax.fori_loop`/`scan` with a traced step index `i`:

    sampler = make_sampler("ddim", scheduler_config, 50)
    state = sampler.init_state(x_T * sampler.init_noise_sigma)
    def body(i, state):
        x = sampler.model_input(state)              # latents fed to the UNet (fp32)
        t = sampler.timesteps[i]                    # the UNet's timestep
        out = unet(x, t, ...)                       # model output in its prediction_type
        return sampler.step(state, out, i)
    state = lax.fori_loop(0, sampler.num_steps, body, state)
    x_0 = sampler.latents(state)

Samplers:
- "ddim": DDIM with eta = 0, matching diffusers' `DDIMScheduler` (0.39) for the same config:
  timesteps from `timestep_spacing` / `steps_offset`, previous timestep t − T//N, the final step
  going to `final_alpha_cumprod` (1 when `set_alpha_to_one`, else abar_0), optional
  `clip_sample` of x0 (off unless the config turns it on: SD latents are not in [−1, 1]).
- "reference_ddim": the reference implementation's loop. Its timesteps are those of SD v1.4's
  default PNDMScheduler (skip_prk_steps=True, steps_offset=1), which repeat one step
  (981, 961, 961, 941, ..., 21 for 50; the reference runs the first N of PNDM's N + 1), and its
  update is x0 = (x − sqrt(1−abar_t) eps)/sqrt(abar_t), x_prev = sqrt(abar_prev) x0 +
  sqrt(1−abar_prev) eps with prev = max(1, t − T//N): it ends at t = 1, not at abar = 1.
- "dpm" (alias "dpmsolver++"): DPM-Solver++ multistep (2nd order, midpoint, lower_order_final),
  matching diffusers' `DPMSolverMultistepScheduler` defaults as it reads an SD config. Its state
  carries the previous step's x0 prediction.

Config keys are read as diffusers reads them *for that scheduler class*: keys the class does not
know are ignored, missing keys take that class's defaults (so SD v1.x's PNDM-style config gives
DDIM "leading" spacing but DPM-Solver "linspace" spacing, exactly as `from_config` does).
Per-step coefficients are computed once, in float64 numpy, and stored as float32; the update
arithmetic is float32 whatever the dtype of the model output.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from flax import struct

from finextract_jax.errors import InputError
from finextract_jax.noise_schedule import SCHEDULE_DEFAULTS, alphas_cumprod_from_config

Array = jnp.ndarray

SAMPLERS = ("ddim", "reference_ddim", "dpm")
_ALIASES = {"dpmsolver++": "dpm", "dpm_solver": "dpm", "dpmsolver": "dpm"}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Defaults of the diffusers (0.39) scheduler classes for the keys we read.
_COMMON_DEFAULTS = dict(SCHEDULE_DEFAULTS, prediction_type="epsilon", thresholding=False)
_DDIM_DEFAULTS = dict(
    _COMMON_DEFAULTS,
    clip_sample=True,  # diffusers' class default; make_sampler turns it off unless the config says so
    clip_sample_range=1.0,
    set_alpha_to_one=True,
    steps_offset=0,
    timestep_spacing="leading",
)
# SD v1.4's scheduler: PNDMScheduler(skip_prk_steps=True, steps_offset=1), "leading" spacing.
_REFERENCE_DEFAULTS = dict(_COMMON_DEFAULTS, steps_offset=1, timestep_spacing="leading")
_DPM_DEFAULTS = dict(
    _COMMON_DEFAULTS,
    solver_order=2,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    use_lu_lambdas=False,
    use_flow_sigmas=False,
    final_sigmas_type="zero",
    lambda_min_clipped=-math.inf,
    variance_type=None,
    timestep_spacing="linspace",
    steps_offset=0,
    use_dynamic_shifting=False,
)


def _read_config(config: Optional[Mapping[str, Any]], defaults: Mapping[str, Any]) -> dict:
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise InputError(f"scheduler config must be a dict, got {type(config).__name__}")
    out = dict(defaults)
    for key, value in config.items():
        if key in defaults and value is not None or key == "trained_betas":
            out[key] = value
    return out


def _check_common(cfg: Mapping[str, Any], num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise InputError(f"number of steps must be an integer, got {num_steps!r}")
    num_steps = int(num_steps)
    n_train = int(cfg["num_train_timesteps"])
    if not 1 <= num_steps <= n_train:
        raise InputError(f"steps must be between 1 and num_train_timesteps={n_train}, got {num_steps}")
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        raise InputError(f"unsupported prediction_type {cfg['prediction_type']!r}; this sampler "
                         f"supports {', '.join(PREDICTION_TYPES)}")
    if cfg.get("thresholding"):
        raise InputError("dynamic thresholding (thresholding=True) is not supported")
    return num_steps


# --------------------------------------------------------------------------------------------
# Timestep lists (numpy int64, descending), as diffusers computes them


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, timestep_spacing: str = "leading",
                   steps_offset: int = 0) -> np.ndarray:
    """diffusers DDIMScheduler.set_timesteps."""
    n, T = num_steps, num_train_timesteps
    if timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif timestep_spacing == "leading":
        ratio = T // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
        ts += steps_offset
    elif timestep_spacing == "trailing":
        ratio = T / n
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64)
        ts -= 1
    else:
        raise InputError(f"unsupported timestep_spacing {timestep_spacing!r}; use linspace, "
                         "leading or trailing")
    return ts


def pndm_plms_timesteps(num_steps: int, num_train_timesteps: int = 1000,
                        timestep_spacing: str = "leading", steps_offset: int = 1) -> np.ndarray:
    """diffusers PNDMScheduler.set_timesteps with skip_prk_steps=True: N + 1 timesteps, the
    second one repeated (981, 961, 961, 941, ..., 21, 1 for N = 50 on SD v1.4)."""
    n, T = num_steps, num_train_timesteps
    if timestep_spacing == "linspace":
        base = np.linspace(0, T - 1, n).round().astype(np.int64)
    elif timestep_spacing == "leading":
        base = (np.arange(0, n) * (T // n)).round() + steps_offset
    elif timestep_spacing == "trailing":
        base = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
    else:
        raise InputError(f"unsupported timestep_spacing {timestep_spacing!r}; use linspace, "
                         "leading or trailing")
    plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    return plms.astype(np.int64).copy()


def reference_ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000,
                             timestep_spacing: str = "leading", steps_offset: int = 1) -> np.ndarray:
    """The reference loop's timesteps: the first N of PNDM's (skip_prk_steps) N + 1."""
    return pndm_plms_timesteps(num_steps, num_train_timesteps, timestep_spacing, steps_offset)[:num_steps]


def dpm_timesteps(num_steps: int, num_train_timesteps: int = 1000, timestep_spacing: str = "linspace",
                  steps_offset: int = 0, last_timestep: Optional[int] = None) -> np.ndarray:
    """diffusers DPMSolverMultistepScheduler.set_timesteps (no Karras/exp/beta/Lu sigmas)."""
    n, T = num_steps, num_train_timesteps
    last = T if last_timestep is None else last_timestep
    if timestep_spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif timestep_spacing == "leading":
        ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        ts += steps_offset
    elif timestep_spacing == "trailing":
        ts = np.arange(last, 0, -T / n).round().copy().astype(np.int64)
        ts -= 1
    else:
        raise InputError(f"unsupported timestep_spacing {timestep_spacing!r}; use linspace, "
                         "leading or trailing")
    return ts


# --------------------------------------------------------------------------------------------
# The sampler


@struct.dataclass
class SamplerState:
    """Loop carry: the current latents x (float32) and, for multistep solvers, the previous
    step's x0 prediction (`prev_x0`, same shape; None for one-step samplers)."""

    x: Array
    prev_x0: Optional[Array] = None


@struct.dataclass
class Sampler:
    """A sampler for a static number of steps; a pytree whose array leaves are per-step tables.

    Array fields ([S] = per step i = 0..S−1; all float32 except `timesteps`):
      timesteps: int32 [S], the timestep the UNet is given at step i.
      alpha, sigma: sqrt(abar_t), sqrt(1 − abar_t) at step i (to convert the model output).
      For "ddim" kinds: alpha_prev, sigma_prev: sqrt(abar_prev), sqrt(1 − abar_prev).
      For "dpm": coef_x, coef_x0, coef_prev_x0: x_prev = coef_x·x + coef_x0·x0 +
        coef_prev_x0·prev_x0 (x0 predictions; coef_prev_x0 = 0 on first-order steps).
    Static fields: name, kind ("ddim" or "dpm"), prediction_type, num_steps, init_noise_sigma,
      clip_sample_range (None: no clipping of x0), use_clipped_model_output: when x0 is clipped, the step's
      epsilon is re-derived from the clipped x0 (True, the DDIM paper's and ADM's sampler; diffusers'
      DDIMScheduler.step(use_clipped_model_output=True)) or kept as the model gave it (False, diffusers'
      default). Only pixel-space models clip (SD's latent configs do not). Keeping the unclipped epsilon makes
      the step inconsistent exactly where guidance overshoots: x_prev = alpha_prev clip(x0) + sigma_prev eps
      with eps = (x - alpha x0) / sigma carries -alpha x0 of the *unclipped* x0, so a pixel pushed past +1 is
      moved down, and guided samples of the testbed base turned into dark-framed saturated squares (cfg at
      s = 3: retrieval of the caption's own image 0.070 with False, 0.758 with True; benchmarks/RESULTS.md).
    """

    timesteps: Array
    alpha: Array
    sigma: Array
    alpha_prev: Optional[Array] = None
    sigma_prev: Optional[Array] = None
    coef_x: Optional[Array] = None
    coef_x0: Optional[Array] = None
    coef_prev_x0: Optional[Array] = None
    name: str = struct.field(pytree_node=False, default="ddim")
    kind: str = struct.field(pytree_node=False, default="ddim")
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    num_steps: int = struct.field(pytree_node=False, default=0)
    init_noise_sigma: float = struct.field(pytree_node=False, default=1.0)
    clip_sample_range: Optional[float] = struct.field(pytree_node=False, default=None)
    use_clipped_model_output: bool = struct.field(pytree_node=False, default=True)

    # -- loop API ---------------------------------------------------------------------------

    def init_state(self, x_T) -> SamplerState:
        """Loop carry for start latents x_T (already multiplied by `init_noise_sigma`)."""
        x = jnp.asarray(x_T, jnp.float32)
        prev = jnp.zeros_like(x) if self.kind == "dpm" else None
        return SamplerState(x=x, prev_x0=prev)

    def model_input(self, state: SamplerState) -> Array:
        """What the UNet sees at this step (scale_model_input is the identity for these)."""
        return state.x

    def latents(self, state: SamplerState) -> Array:
        return state.x

    def _coefs(self, i):
        return self.alpha[i], self.sigma[i]

    def to_x0_eps(self, x, model_output, i, prediction_type: Optional[str] = None):
        """(x0, eps) predictions at step i from a model output of `prediction_type`
        (default: the sampler's), in float32."""
        ptype = self.prediction_type if prediction_type is None else prediction_type
        x = jnp.asarray(x, jnp.float32)
        out = jnp.asarray(model_output, jnp.float32)
        a, s = self._coefs(i)
        if ptype == "epsilon":
            return (x - s * out) / a, out
        if ptype == "v_prediction":
            return a * x - s * out, a * out + s * x
        if ptype == "sample":
            return out, (x - a * out) / s
        raise InputError(f"unsupported prediction_type {ptype!r}")

    def to_epsilon(self, x, model_output, i, prediction_type: Optional[str] = None) -> Array:
        """Epsilon at step i from a model output (identity for epsilon models). Use it on each
        UNet output before guidance when the model is v-prediction, then call
        `step(..., prediction_type="epsilon")`."""
        ptype = self.prediction_type if prediction_type is None else prediction_type
        if ptype == "epsilon":
            return jnp.asarray(model_output, jnp.float32)
        return self.to_x0_eps(x, model_output, i, ptype)[1]

    def step(self, state: SamplerState, model_output, i, prediction_type: Optional[str] = None
             ) -> SamplerState:
        """Advance from step i (timestep timesteps[i]) to the next; pure, `i` may be traced.

        `model_output` is the (guided) network output at (state.x, timesteps[i]) in
        `prediction_type` (default: the config's)."""
        x = state.x
        x0, eps = self.to_x0_eps(x, model_output, i, prediction_type)
        if self.kind == "ddim":
            if self.clip_sample_range is not None:
                x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
                if self.use_clipped_model_output:  # keep the step on the DDIM path of the clipped x0
                    a, s = self._coefs(i)
                    eps = (x - a * x0) / s
            x_prev = self.alpha_prev[i] * x0 + self.sigma_prev[i] * eps
            return SamplerState(x=x_prev, prev_x0=state.prev_x0)
        # DPM-Solver++ (data prediction): multistep update on x0 predictions.
        x_prev = self.coef_x[i] * x + self.coef_x0[i] * x0 + self.coef_prev_x0[i] * state.prev_x0
        return SamplerState(x=x_prev, prev_x0=x0)

    def describe(self) -> dict:
        """JSON-able summary for run records."""
        return {"sampler": self.name, "prediction_type": self.prediction_type,
                "num_steps": self.num_steps, "timesteps": [int(t) for t in np.asarray(self.timesteps)],
                "clip_sample_range": self.clip_sample_range,
                **({} if self.clip_sample_range is None
                   else {"use_clipped_model_output": self.use_clipped_model_output})}


def _f32(a) -> Array:
    return jnp.asarray(np.asarray(a, dtype=np.float64).astype(np.float32))


def _ddim_like(name, ts, abar, abar_prev, ptype, clip_range) -> Sampler:
    ts = np.asarray(ts, np.int64)
    a_t = abar[ts]
    return Sampler(
        timesteps=jnp.asarray(ts.astype(np.int32)),
        alpha=_f32(np.sqrt(a_t)), sigma=_f32(np.sqrt(1 - a_t)),
        alpha_prev=_f32(np.sqrt(abar_prev)), sigma_prev=_f32(np.sqrt(1 - abar_prev)),
        name=name, kind="ddim", prediction_type=ptype, num_steps=len(ts),
        init_noise_sigma=1.0, clip_sample_range=clip_range)


def _make_ddim(config, num_steps) -> Sampler:
    cfg = _read_config(config, _DDIM_DEFAULTS)
    if config is None or "clip_sample" not in config:
        cfg["clip_sample"] = False  # SD latents are not in [-1, 1]; clipping must be asked for
    n = _check_common(cfg, num_steps)
    abar = alphas_cumprod_from_config(cfg)
    T = int(cfg["num_train_timesteps"])
    ts = ddim_timesteps(n, T, cfg["timestep_spacing"], int(cfg["steps_offset"]))
    if ts.min() < 0 or ts.max() >= T:
        raise InputError(f"timesteps {ts.tolist()} fall outside [0, {T}); check steps_offset")
    final = 1.0 if cfg["set_alpha_to_one"] else abar[0]
    prev = ts - T // n
    abar_prev = np.where(prev >= 0, abar[np.clip(prev, 0, T - 1)], final)
    clip = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
    return _ddim_like("ddim", ts, abar, abar_prev, cfg["prediction_type"], clip)


def _make_reference_ddim(config, num_steps) -> Sampler:
    cfg = _read_config(config, _REFERENCE_DEFAULTS)
    n = _check_common(cfg, num_steps)
    abar = alphas_cumprod_from_config(cfg)
    T = int(cfg["num_train_timesteps"])
    ts = reference_ddim_timesteps(n, T, cfg["timestep_spacing"], int(cfg["steps_offset"]))
    if ts.min() < 0 or ts.max() >= T:
        raise InputError(f"timesteps {ts.tolist()} fall outside [0, {T}); check steps_offset")
    prev = np.maximum(1, ts - T // n)
    return _ddim_like("reference_ddim", ts, abar, abar[prev], cfg["prediction_type"], None)


def _alpha_sigma(sig: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """diffusers' _sigma_to_alpha_sigma_t: alpha = 1/sqrt(1+sigma^2), sigma_t = sigma·alpha."""
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    return alpha, sig * alpha


def _make_dpm(config, num_steps) -> Sampler:
    cfg = _read_config(config, _DPM_DEFAULTS)
    n = _check_common(cfg, num_steps)
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                "use_flow_sigmas", "use_dynamic_shifting"):
        if cfg[key]:
            raise InputError(f"DPM-Solver option {key}=True is not supported")
    if cfg["algorithm_type"] != "dpmsolver++":
        raise InputError(f"DPM-Solver algorithm_type {cfg['algorithm_type']!r} is not supported; "
                         "use dpmsolver++")
    order = int(cfg["solver_order"])
    if order not in (1, 2):
        raise InputError(f"DPM-Solver solver_order {order} is not supported; use 1 or 2")
    if cfg["solver_type"] not in ("midpoint", "heun"):
        raise InputError(f"DPM-Solver solver_type {cfg['solver_type']!r} is not supported")
    if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise InputError(f"final_sigmas_type {cfg['final_sigmas_type']!r} is not supported")
    if cfg["variance_type"] in ("learned", "learned_range"):
        raise InputError("learned-variance models are not supported")

    abar = alphas_cumprod_from_config(cfg)
    T = int(cfg["num_train_timesteps"])
    lam_all = 0.5 * (np.log(abar) - np.log1p(-abar))
    clipped_idx = int(np.searchsorted(lam_all[::-1], float(cfg["lambda_min_clipped"])))
    ts = dpm_timesteps(n, T, cfg["timestep_spacing"], int(cfg["steps_offset"]), T - clipped_idx)
    if ts.min() < 0 or ts.max() >= T:
        raise InputError(f"timesteps {ts.tolist()} fall outside [0, {T}); check steps_offset")
    S = len(ts)

    sig_all = np.sqrt((1 - abar) / abar)
    sig_last = sig_all[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sig_all[ts], [sig_last]])  # [S + 1]
    alpha, sigma_t = _alpha_sigma(sigmas)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma_t)  # +inf where sigma = 0

    coef_x = np.zeros(S)
    coef_x0 = np.zeros(S)
    coef_prev = np.zeros(S)
    lower_order_final = bool(cfg["lower_order_final"])
    for i in range(S):
        last = i == S - 1
        first_order = (order == 1 or i < 1 or
                       (last and (cfg["euler_at_final"] or (lower_order_final and S < 15)
                                  or cfg["final_sigmas_type"] == "zero")))
        if sigmas[i + 1] == 0.0:
            # lambda_t = +inf: exp(-h) = 0, x_prev = x0 (first order; diffusers forces it).
            if not first_order:
                raise AssertionError("second-order step into sigma = 0")
            coef_x[i], coef_x0[i] = 0.0, 1.0
            continue
        h = lam[i + 1] - lam[i]
        ratio = sigma_t[i + 1] / sigma_t[i]
        b = -alpha[i + 1] * np.expm1(-h)  # the DDIM/first-order weight on D0
        coef_x[i] = ratio
        if first_order:
            coef_x0[i] = b
            continue
        r0 = (lam[i] - lam[i - 1]) / h
        # D0 = m0, D1 = (m0 - m1)/r0
        if cfg["solver_type"] == "midpoint":
            c1 = 0.5 * b
        else:  # heun
            c1 = alpha[i + 1] * (np.expm1(-h) / h + 1.0)
        coef_x0[i] = b + c1 / r0
        coef_prev[i] = -c1 / r0

    return Sampler(
        timesteps=jnp.asarray(ts.astype(np.int32)),
        alpha=_f32(alpha[:S]), sigma=_f32(sigma_t[:S]),
        coef_x=_f32(coef_x), coef_x0=_f32(coef_x0), coef_prev_x0=_f32(coef_prev),
        name="dpm", kind="dpm", prediction_type=cfg["prediction_type"], num_steps=S,
        init_noise_sigma=1.0, clip_sample_range=None)


_BUILDERS = {"ddim": _make_ddim, "reference_ddim": _make_reference_ddim, "dpm": _make_dpm}


def make_sampler(name: str, scheduler_config: Optional[Mapping[str, Any]], num_steps: int,
                 **overrides: Any) -> Sampler:
    """Build a sampler.

    Args:
      name: "ddim" (clean default), "reference_ddim" (the reference implementation's loop) or
        "dpm" (DPM-Solver++ 2M; alias "dpmsolver++").
      scheduler_config: the model's scheduler config dict (scheduler/scheduler_config.json as
        loaded by json; keys starting with "_" and keys the sampler does not use are ignored).
        None: diffusers' class defaults.
      num_steps: number of denoising steps (static: it fixes the loop length and table sizes).
      **overrides: config keys to replace, e.g. `set_alpha_to_one=True` for a DDIM whose last
        step goes to abar = 1 although the SD v1.x config says False; and `use_clipped_model_output`
        (default True; see Sampler), a step option of diffusers rather than a config key.
    Raises:
      InputError: unknown sampler, bad step count, or config options that are not supported.
    """
    key = _ALIASES.get(name, name)
    if key not in _BUILDERS:
        raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    use_clipped = bool(overrides.pop("use_clipped_model_output", True))
    if overrides:
        if scheduler_config is not None and not isinstance(scheduler_config, Mapping):
            raise InputError(f"scheduler config must be a dict, got {type(scheduler_config).__name__}")
        scheduler_config = {**(scheduler_config or {}), **overrides}
    return _BUILDERS[key](scheduler_config, num_steps).replace(use_clipped_model_output=use_clipped)
