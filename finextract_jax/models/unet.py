"""Our Flax definition of diffusers' UNet2DConditionModel (SD 1.x / 2.x / XL family).

Why not diffusers' FlaxUNet2DConditionModel as is: it differs from the PyTorch model that
published checkpoints are trained with by ~1e-4 per call (tanh-approximate GELU in GEGLU, and
GroupNorm eps 1e-5 instead of 1e-6 in Transformer2D), and 50 guided steps amplify that. It also
materialises the softmax in attention and cannot apply a LoRA delta to part of a batch.

This module loads exactly the parameter tree diffusers' Flax UNet uses (same names and shapes;
a test checks it), so Flax msgpack checkpoints and diffusers' PyTorch->Flax mapping apply, and
adds:
- exact GELU and the PyTorch epsilons (parity with diffusers PyTorch to ~1e-6 in float32);
- attention through `jax.nn.dot_product_attention` (`"fused"`, XLA's formulation; `"cudnn"` asks for
  cuDNN flash attention on GPU where its shapes allow), in query blocks over all keys (`"chunked"`,
  for CPU, where the whole score matrix does not stay in cache) or the plain einsum formulation
  (`"plain"`, kept for parity tests); "auto", the default, is "chunked" on CPU and "fused" elsewhere;
- unmerged LoRA: a `lora` variable collection holding factors for any Dense layer, applied only
  to the batch rows whose `lora_gate` is 1, so a (pretrained, LoRA fine-tuned) pair runs as one
  pass over a doubled batch with one copy of the base weights.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from finextract_jax.errors import InputError
from finextract_jax.models.fast_backward import Conv, GroupNorm, add_bias

Dtype = Any


class LoraDense(nn.Module):
    """nn.Dense with the same parameters, plus an optional low-rank delta.

    The delta lives in the `lora` collection as `down` [in, r] and `up` [r, out] (the LoRA
    scale already folded into `up`); `gate` ([batch] of 0/1) selects the rows it applies to.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, gate=None):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = add_bias(y, self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(self.dtype))
        if self.has_variable("lora", "down"):
            down = self.get_variable("lora", "down").astype(self.dtype)
            up = self.get_variable("lora", "up").astype(self.dtype)
            delta = jnp.dot(jnp.dot(x.astype(self.dtype), down), up)
            if gate is not None:
                delta = delta * gate.reshape((-1,) + (1,) * (delta.ndim - 1)).astype(self.dtype)
            y = y + delta
        return y


ATTENTION_IMPLEMENTATIONS = ("auto", "fused", "plain", "cudnn", "chunked")
# "chunked": score bytes per query block (all batch rows and heads together), and the fewest queries per
# block. Measured on a 2-vCPU AMD EPYC (benchmarks/RESULTS.md, issue 18): blocks of 16-64 queries were
# equally fast within noise, 128 and more slower; the whole 1024x1024 score matrix of a 32x32 latent does
# not stay in cache, and XLA:CPU then spends most of a sampling step streaming it through memory.
CHUNK_SCORE_BYTES = 2 << 20
MIN_QUERY_CHUNK = 32


def attention_implementation(implementation: str, dtype, head_dim: int) -> str:
    """The concrete implementation behind `implementation` for this backend, dtype and head size.

    "auto": the measured choice per backend (benchmarks/RESULTS.md): "chunked" on CPU, "fused" elsewhere.
    "cudnn" (cuDNN flash attention, on a GPU; elsewhere the fused path) takes 16-bit inputs with head_dim a
    multiple of 8, up to 256 on Hopper and later, 128 before (JAX's own check); other shapes fall back to
    the fused XLA formulation.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r} "
                         f"(use one of {', '.join(ATTENTION_IMPLEMENTATIONS)})")
    if implementation == "auto":
        implementation = "chunked" if jax.default_backend() == "cpu" else "fused"
    if implementation == "cudnn" and not (jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2
                                          and head_dim % 8 == 0 and head_dim <= _cudnn_max_head_dim()):
        return "fused"
    return implementation


def _cudnn_max_head_dim() -> int:
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    return 256 if float(capability) >= 9.0 else 128


def query_chunk(batch_heads: int, queries: int, keys: int) -> int:
    """Queries per block of chunked attention: as many as keep one block's float32 scores
    ([batch x heads, chunk, keys]) within CHUNK_SCORE_BYTES, at least MIN_QUERY_CHUNK, at most all."""
    return min(queries, max(MIN_QUERY_CHUNK, CHUNK_SCORE_BYTES // (4 * batch_heads * keys)))


def chunked_attention(query, key, value, chunk: int):
    """Attention computed `chunk` queries at a time, each block over all keys (an exact softmax per row).

    Why: the same arithmetic as jax.nn.dot_product_attention's XLA formulation (logits in float32 at
    least, softmax in float32, probabilities cast to the value dtype), but a loop over query blocks keeps
    each block's scores in cache instead of materialising the whole [queries, keys] matrix, like
    PyTorch's blocked CPU attention. Heads-major inside, so every block is a plain batched matmul.
    """
    batch, tokens, heads, head_dim = query.shape
    logits_dtype = jnp.promote_types(query.dtype, jnp.float32)
    scale = jnp.asarray(1.0 / math.sqrt(head_dim), logits_dtype)
    heads_major = lambda t: t.transpose(0, 2, 1, 3)  # [batch, heads, tokens, head_dim]
    k, v = heads_major(key), heads_major(value)
    blocks = -(-tokens // chunk)
    chunk = -(-tokens // blocks)  # the same number of blocks, least padding
    q = jnp.pad(heads_major(query), ((0, 0), (0, 0), (0, blocks * chunk - tokens), (0, 0)))
    q = q.reshape(batch, heads, blocks, chunk, head_dim).transpose(2, 0, 1, 3, 4)

    def block(q_block):
        logits = jnp.einsum("bhqd,bhkd->bhqk", q_block, k, preferred_element_type=logits_dtype) * scale
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", probs, v)

    out = jax.lax.map(block, q) if blocks > 1 else block(q[0])[None]
    out = out.transpose(1, 0, 3, 2, 4).reshape(batch, blocks * chunk, heads, head_dim)
    return out[:, :tokens]


def attend(query, key, value, implementation: str):
    """Multi-head attention on [batch, tokens, heads, head_dim] arrays."""
    implementation = attention_implementation(implementation, query.dtype, query.shape[-1])
    if implementation == "plain":
        scale = 1.0 / math.sqrt(query.shape[-1])
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) * scale
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, value)
    if implementation == "chunked":
        chunk = query_chunk(query.shape[0] * query.shape[2], query.shape[1], key.shape[1])
        return chunked_attention(query, key, value, chunk)
    return jax.nn.dot_product_attention(query, key, value, implementation="cudnn" if implementation == "cudnn" else None)


class Attention(nn.Module):
    query_dim: int
    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, hidden_states, context=None, gate=None):
        context = hidden_states if context is None else context
        inner = self.heads * self.dim_head
        q = LoraDense(inner, use_bias=False, dtype=self.dtype, name="to_q")(hidden_states, gate)
        k = LoraDense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context, gate)
        v = LoraDense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context, gate)
        split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.dim_head))
        out = attend(split(q), split(k), split(v), self.attention)
        out = out.reshape(out.shape[:2] + (inner,))
        return LoraDense(self.query_dim, dtype=self.dtype, name="to_out_0")(out, gate)


class GEGLU(nn.Module):
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, gate=None):
        hidden, gelu_gate = jnp.split(LoraDense(self.dim * 8, dtype=self.dtype, name="proj")(x, gate), 2, axis=-1)
        return hidden * jax.nn.gelu(gelu_gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, gate=None):
        x = GEGLU(self.dim, dtype=self.dtype, name="net_0")(x, gate)
        return LoraDense(self.dim, dtype=self.dtype, name="net_2")(x, gate)


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    dim_head: int
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, context, gate=None):
        attn = lambda name: Attention(self.dim, self.heads, self.dim_head, self.dtype, self.attention, name=name)
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        self_context = context if self.only_cross_attention else None
        x = attn("attn1")(norm("norm1")(x), self_context, gate) + x
        x = attn("attn2")(norm("norm2")(x), context, gate) + x
        return FeedForward(self.dim, dtype=self.dtype, name="ff")(norm("norm3")(x), gate) + x


class Transformer2D(nn.Module):
    in_channels: int
    heads: int
    dim_head: int
    depth: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, context, gate=None):
        batch, height, width, channels = x.shape
        inner = self.heads * self.dim_head
        residual = x
        # PyTorch's Transformer2DModel uses eps 1e-6 here (diffusers' Flax port uses 1e-5).
        x = GroupNorm(self.norm_num_groups, 1e-6, self.dtype, name="norm")(x)
        if self.use_linear_projection:
            x = LoraDense(inner, dtype=self.dtype, name="proj_in")(x.reshape(batch, height * width, channels), gate)
        else:
            x = Conv(inner, (1, 1), padding="VALID", dtype=self.dtype, name="proj_in")(x)
            x = x.reshape(batch, height * width, inner)
        for i in range(self.depth):
            x = BasicTransformerBlock(
                inner, self.heads, self.dim_head, self.only_cross_attention, self.dtype, self.attention,
                name=f"transformer_blocks_{i}",
            )(x, context, gate)
        if self.use_linear_projection:
            x = LoraDense(inner, dtype=self.dtype, name="proj_out")(x, gate).reshape(batch, height, width, inner)
        else:
            x = Conv(inner, (1, 1), padding="VALID", dtype=self.dtype, name="proj_out")(
                x.reshape(batch, height, width, inner))
        return x + residual


class ResnetBlock2D(nn.Module):
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        conv3 = lambda name: Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=name)
        residual = x
        h = GroupNorm(self.groups, self.eps, self.dtype, silu=True, name="norm1")(x)
        h = conv3("conv1")(h)
        time_emb = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
        h = add_bias(h, time_emb[:, None, None, :])
        h = GroupNorm(self.groups, self.eps, self.dtype, silu=True, name="norm2")(h)
        h = conv3("conv2")(h)
        if x.shape[-1] != self.out_channels:
            residual = Conv(self.out_channels, (1, 1), padding="VALID", dtype=self.dtype, name="conv_shortcut")(x)
        return h + residual


class Downsample2D(nn.Module):
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Conv(self.out_channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                       name="conv")(x)


class Upsample2D(nn.Module):
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, h * 2, w * 2, c), method="nearest")
        return Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv")(x)


def sinusoidal_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
    """diffusers' get_timestep_embedding, in float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def text_time_input(added_cond_kwargs, time_embed_dim: int, flip_sin_to_cos: bool, freq_shift: float):
    """SDXL's addition-embedding input: [pooled text embedding, sinusoidal(each time id)], float32."""
    if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
        # Typed: a caller that does not supply SDXL's conditioning (models/sdxl.py builds it) stops with one line.
        raise InputError("an SDXL UNet (addition_embed_type 'text_time') needs the pooled text embedding and the "
                         "micro-conditioning time ids (added_cond_kwargs)")
    text_embeds = added_cond_kwargs["text_embeds"]
    time_embeds = sinusoidal_embedding(jnp.reshape(added_cond_kwargs["time_ids"], (-1,)), time_embed_dim,
                                       flip_sin_to_cos, freq_shift)
    return jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds.reshape(text_embeds.shape[0], -1)], axis=-1)


def _resnet_and_attention(block, i, x, temb, context, gate):
    """Layer i of a Down/Up block: resnets_i, then attentions_i when the block has heads
    (called inside the block's compact __call__, so the submodules belong to it)."""
    x = ResnetBlock2D(block.out_channels, block.groups, block.eps, block.dtype, name=f"resnets_{i}")(x, temb)
    if block.heads:
        x = Transformer2D(block.out_channels, block.heads, block.out_channels // block.heads, block.depth,
                          block.use_linear_projection, block.only_cross_attention, block.groups, block.dtype,
                          block.attention, name=f"attentions_{i}")(x, context, gate)
    return x


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with `heads`) or DownBlock2D (heads=0)."""

    out_channels: int
    num_layers: int
    add_downsample: bool
    heads: int = 0
    depth: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, temb, context, gate=None):
        skips = []
        for i in range(self.num_layers):
            x = _resnet_and_attention(self, i, x, temb, context, gate)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with `heads`) or UpBlock2D (heads=0); consumes skip connections."""

    out_channels: int
    num_layers: int
    add_upsample: bool
    heads: int = 0
    depth: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, skips, temb, context, gate=None):
        for i in range(self.num_layers):
            x = _resnet_and_attention(self, i, jnp.concatenate([x, skips[-1 - i]], axis=-1), temb, context, gate)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class MidBlock(nn.Module):
    channels: int
    heads: int
    depth: int = 1
    use_linear_projection: bool = False
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, temb, context, gate=None):
        x = ResnetBlock2D(self.channels, self.groups, self.eps, self.dtype, name="resnets_0")(x, temb)
        x = Transformer2D(self.channels, self.heads, self.channels // self.heads, self.depth,
                          self.use_linear_projection, False, self.groups, self.dtype, self.attention,
                          name="attentions_0")(x, context, gate)
        return ResnetBlock2D(self.channels, self.groups, self.eps, self.dtype, name="resnets_1")(x, temb)


class UNet2DConditionModel(nn.Module):
    """The SD UNet; inputs and outputs are NCHW like diffusers, internals NHWC.

    Fields are the diffusers config keys this family uses; `config.unet_from_config` builds one
    from a config.json and refuses keys it would otherwise silently ignore.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int | Sequence[int] = 8
    num_attention_heads: int | Sequence[int] | None = None
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    only_cross_attention: bool | Sequence[bool] = False
    transformer_layers_per_block: int | Sequence[int] = 1
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    # SDXL's micro-conditioning: pooled text embedding + sinusoidal embeddings of the time ids.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    def added_cond_shapes(self) -> dict | None:
        """{"text_embeds": dim, "time_ids": count} the text_time embedding expects, else None.

        As diffusers infers it: a refiner has 5 micro-conditions (aesthetic score instead of the
        target size) and a pooled embedding as wide as cross_attention_dim; the base model has 6.
        """
        if self.addition_embed_type != "text_time":
            return None
        dim, width = self.projection_class_embeddings_input_dim, self.addition_time_embed_dim
        count = 5 if 5 * width + self.cross_attention_dim == dim else 6
        return {"text_embeds": dim - count * width, "time_ids": count}

    def _per_block(self, value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.down_block_types)

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, lora_gate=None, added_cond_kwargs=None):
        """added_cond_kwargs: {"text_embeds": [B, D], "time_ids": [B, n]} for an SDXL-style
        (addition_embed_type="text_time") UNet, as diffusers takes them; ignored otherwise."""
        channels = tuple(self.block_out_channels)
        # diffusers' historical naming: attention_head_dim holds the number of heads.
        heads = self._per_block(self.num_attention_heads or self.attention_head_dim)
        cross_only = self._per_block(self.only_cross_attention)
        depth = self._per_block(self.transformer_layers_per_block)
        common = dict(groups=self.norm_num_groups, eps=self.norm_eps, dtype=self.dtype, attention=self.attention)
        context = encoder_hidden_states.astype(self.dtype)

        timesteps = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (sample.shape[0],))
        temb = sinusoidal_embedding(timesteps, channels[0], self.flip_sin_to_cos, self.freq_shift)
        temb = _TimestepEmbedding(channels[0] * 4, dtype=self.dtype, name="time_embedding")(temb)
        if self.addition_embed_type == "text_time":
            # diffusers' add_time_proj has no parameters: add_embedding is a _TimestepEmbedding.
            add_embeds = text_time_input(added_cond_kwargs, self.addition_time_embed_dim, self.flip_sin_to_cos,
                                         self.freq_shift)
            temb = temb + _TimestepEmbedding(channels[0] * 4, dtype=self.dtype, name="add_embedding")(add_embeds)

        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        x = Conv(channels[0], (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv_in")(x)
        skips = [x]
        for level, block_type in enumerate(self.down_block_types):
            x, block_skips = DownBlock(
                channels[level], self.layers_per_block, level < len(channels) - 1,
                heads[level] if block_type == "CrossAttnDownBlock2D" else 0, depth[level],
                self.use_linear_projection, cross_only[level], **common, name=f"down_blocks_{level}",
            )(x, temb, context, lora_gate)
            skips += block_skips

        if self.mid_block_type == "UNetMidBlock2DCrossAttn":
            x = MidBlock(channels[-1], heads[-1], depth[-1], self.use_linear_projection, **common,
                         name="mid_block")(x, temb, context, lora_gate)

        for level, block_type in enumerate(self.up_block_types):
            source = len(channels) - 1 - level
            n = self.layers_per_block + 1
            block_skips, skips = skips[-n:], skips[:-n]
            x = UpBlock(
                channels[source], n, level < len(channels) - 1,
                heads[source] if block_type == "CrossAttnUpBlock2D" else 0, depth[source],
                self.use_linear_projection, cross_only[source], **common, name=f"up_blocks_{level}",
            )(x, block_skips, temb, context, lora_gate)

        x = GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype, silu=True, name="conv_norm_out")(x)
        x = Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))


class _TimestepEmbedding(nn.Module):
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, temb):
        temb = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(temb.astype(self.dtype))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(temb))
