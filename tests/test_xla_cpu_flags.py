"""finextract_jax's XLA:CPU default (no YNNPACK fusions, finextract_jax/__init__.py): set on import,
never over the user's own choice, never on a jaxlib where the flag is unverified, and in effect."""
import jax
import jax.numpy as jnp

import finextract_jax
from finextract_jax import YNN_FLAG, _prefer_xla_cpu_emitters


def test_flag_added_to_the_users_flags():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert _prefer_xla_cpu_emitters(environ, "0.10.2")
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {YNN_FLAG}="
    environ = {}
    assert _prefer_xla_cpu_emitters(environ, "0.10.2") and environ["XLA_FLAGS"] == f"{YNN_FLAG}="


def test_users_choice_and_unverified_jaxlib_left_alone():
    environ = {"XLA_FLAGS": f"{YNN_FLAG}=+reduce"}
    assert not _prefer_xla_cpu_emitters(environ, "0.10.2") and environ["XLA_FLAGS"] == f"{YNN_FLAG}=+reduce"
    environ = {}
    assert not _prefer_xla_cpu_emitters(environ, "0.11.0") and environ == {}  # XLA aborts on unknown flags


def _conv_weight_gradient_hlo() -> str:
    def loss(x, w):
        return jnp.sum(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return jax.jit(jax.grad(loss, argnums=1)).lower(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))).compile().as_text()


def test_in_effect_in_this_process():
    """The suite imports finextract_jax before JAX's CPU client exists, as every binary does: no YNNPACK
    fusion is compiled (with jaxlib's default this gradient is one)."""
    assert finextract_jax.__version__
    if jax.default_backend() == "cpu":
        assert "__ynn_fusion" not in _conv_weight_gradient_hlo()
