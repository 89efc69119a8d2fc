"""A running average of the trained weights, kept as the last link of the optimizer chain.

Training a base from scratch at a high constant learning rate (testbed/base.py) leaves a noisy last
iterate, and a diffusion model's samples show it; the average is what such runs export. Living in
the optimizer state, it is checkpointed and resumed with it and needs nothing of its own.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class WeightAverage(NamedTuple):
    """The optimizer state's running average of the weights (checkpointed with it; `export` writes it)."""

    count: Any  # updates averaged so far
    average: Any  # pytree like the trainable parameters


def weight_average(decay: float) -> optax.GradientTransformation:
    """Last link of the optimizer chain: an exponential moving average of the parameters after each
    update, with diffusers' EMAModel warm-up (decay_t = min(decay, (1 + t) / (10 + t))) so that the
    first steps' random weights fade out fast. It passes the updates through unchanged."""
    def init(params):
        return WeightAverage(jnp.zeros((), jnp.int32), jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), params))

    def update(updates, state, params):
        t = state.count.astype(jnp.float32)
        decay_t = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        average = jax.tree_util.tree_map(lambda a, p, u: decay_t * a + (1.0 - decay_t) * (p + u),
                                         state.average, params, updates)
        return updates, WeightAverage(state.count + 1, average)

    return optax.GradientTransformation(init, update)


def averaged_weights(opt_state):
    """The `weight_average` in an optimizer state, or None when the run keeps none."""
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda s: isinstance(s, WeightAverage))
             if isinstance(s, WeightAverage)]
    return found[0].average if found else None
