"""GroupNorm (+SiLU), convolution and bias layers whose backward pass is written out by hand.

Why: in a UNet training step XLA differentiates GroupNorm into four reductions over the activation
(the gradients of the mean, of the mean square, of scale and of bias) and the convolution's bias
into one more, and on CPU it fuses the whole elementwise chain before each reduction (the
normalisation recomputed, SiLU's derivative with its exponential, the upstream adds) into every
one of them: the testbed base's step spent most of its non-convolution time there
(benchmarks/RESULTS.md, issue 18). Here the backward computes each activation-sized gradient once
and takes every per-channel sum as a product with a vector of ones, which XLA runs as a matrix
product (it fuses nothing into it, so the operand is materialised once) instead of a reduction
loop: two sums per GroupNorm, one per bias.

The forward is exactly Flax's (nn.GroupNorm: float32 statistics, E[x^2] - E[x]^2 clipped at 0;
nn.Conv: one convolution plus the bias), and the parameter trees are the same ("scale"/"bias",
"kernel"/"bias"), so checkpoints and the diffusers parity are unchanged; the gradients are the
same mathematics summed in another order (float32 rounding).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def channel_sums(t, keep_batch: bool = False):
    """Sums of t [..., C] over every axis but the last ([C]), or but the first and last ([B, C]).

    On CPU a product with a vector of ones (a matrix product for XLA); elsewhere a reduction."""
    channels = t.shape[-1]
    if jax.default_backend() != "cpu":
        return jnp.sum(t, axis=tuple(range(1 if keep_batch else 0, t.ndim - 1)))
    if keep_batch:  # a batch of [1, P] x [P, C] products: no transpose of t (a [P] vector would need one)
        rows = t.reshape(t.shape[0], -1, channels)
        ones = jnp.ones((rows.shape[0], 1, rows.shape[1]), t.dtype)
        return jnp.einsum("bqp,bpc->bqc", ones, rows)[:, 0]
    rows = t.reshape(-1, channels)
    return jnp.dot(jnp.ones((rows.shape[0],), t.dtype), rows)


@jax.custom_vjp
def add_bias(y, bias):
    """y [B, ..., C] + bias ([C] or [B, 1, ..., 1, C]), whose bias gradient is channel_sums."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, bias.shape


def _add_bias_bwd(bias_shape, grad):
    per_batch = len(bias_shape) > 1
    grad_bias = channel_sums(grad, keep_batch=per_batch).reshape(bias_shape)
    return grad, grad_bias


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _group_stats(x32, groups: int, epsilon: float):
    """Per (batch, group) mean and 1/std of x32 [B, H, W, C] in float32, as Flax's GroupNorm computes them."""
    batch, channels = x32.shape[0], x32.shape[-1]
    grouped = x32.reshape(batch, -1, groups, channels // groups)
    mean = jnp.mean(grouped, axis=(1, 3))
    mean_square = jnp.mean(jnp.square(grouped), axis=(1, 3))
    variance = jnp.maximum(0.0, mean_square - jnp.square(mean))
    return mean, jax.lax.rsqrt(variance + epsilon)


def _per_channel(per_group, channels: int):
    """[B, G] -> [B, 1, 1, C]: each group's value on its channels."""
    repeated = jnp.repeat(per_group, channels // per_group.shape[1], axis=1)
    return repeated.reshape(per_group.shape[0], 1, 1, channels)


def _normalise(x, scale, bias, groups, epsilon):
    x32 = x.astype(jnp.float32)
    mean, rstd = _group_stats(x32, groups, epsilon)
    channels = x.shape[-1]
    y = (x32 - _per_channel(mean, channels)) * (_per_channel(rstd, channels) * scale) + bias
    return y, (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def group_norm(x, scale, bias, groups: int, epsilon: float, silu: bool, dtype):
    """GroupNorm of x [B, H, W, C] with per-channel scale and bias (float32), output in `dtype`,
    then SiLU when `silu` (applied in `dtype`, as nn.silu after nn.GroupNorm)."""
    return _group_norm_fwd(x, scale, bias, groups, epsilon, silu, dtype)[0]


def _group_norm_fwd(x, scale, bias, groups, epsilon, silu, dtype):
    y, (mean, rstd) = _normalise(x, scale, bias, groups, epsilon)
    y = y.astype(dtype)
    return (jax.nn.silu(y) if silu else y), (x, scale, bias, mean, rstd)


def _group_norm_bwd(groups, epsilon, silu, dtype, residuals, grad):
    x, scale, bias, mean, rstd = residuals
    batch, channels = x.shape[0], x.shape[-1]
    rstd_c = _per_channel(rstd, channels)
    x_hat = (x.astype(jnp.float32) - _per_channel(mean, channels)) * rstd_c
    grad_y = grad.astype(jnp.float32)
    if silu:
        pre = x_hat * scale + bias
        gate = jax.nn.sigmoid(pre)
        grad_y = grad_y * gate * (1.0 + pre * (1.0 - gate))
    sum_grad = channel_sums(grad_y, keep_batch=True)  # [B, C]
    sum_grad_x_hat = channel_sums(grad_y * x_hat, keep_batch=True)
    count = x[0].size // groups  # elements per (batch, group)
    per_group = lambda s: jnp.sum((s * scale).reshape(batch, groups, channels // groups), axis=-1) / count
    grad_x = rstd_c * (grad_y * scale - _per_channel(per_group(sum_grad), channels)
                       - x_hat * _per_channel(per_group(sum_grad_x_hat), channels))
    return (grad_x.astype(x.dtype), jnp.sum(sum_grad_x_hat, axis=0).astype(scale.dtype),
            jnp.sum(sum_grad, axis=0).astype(bias.dtype))


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """nn.GroupNorm (channels last, parameters "scale" and "bias") with group_norm's backward,
    optionally followed by SiLU (`silu=True`: nn.silu(nn.GroupNorm(...)(x)))."""

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    silu: bool = False

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.silu, self.dtype)


class Conv(nn.Module):
    """nn.Conv for NHWC inputs (parameters "kernel" [kh, kw, in, out] and "bias" [out], Flax's
    initialisers), its bias added by add_bias."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Any = "SAME"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            tuple(self.kernel_size) + (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.conv_general_dilated(x, kernel, tuple(self.strides), self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return add_bias(y, bias)
