"""Our Flax modules against diffusers/transformers PyTorch on the same tiny checkpoints (fp32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from finextract_jax.models.pipeline import encode_prompts, tokenize

PROMPTS = ["a photo of sks dog", ""]


def _torch_unet_out(tp, x, t, context):
    with torch.no_grad():
        return tp.unet(torch.tensor(x), torch.tensor(t), torch.tensor(context)).sample.numpy()


@pytest.fixture
def small_attention_chunks(monkeypatch):
    """Chunked attention in blocks of 22 queries (3 blocks, 2 padded rows) on the tiny models' 64 tokens,
    so its loop, padding and reassembly run (the default budget would take them in one block)."""
    from finextract_jax.models import unet

    monkeypatch.setattr(unet, "CHUNK_SCORE_BYTES", 0)
    monkeypatch.setattr(unet, "MIN_QUERY_CHUNK", 24)


@pytest.mark.parametrize("attention", ["fused", "chunked"])
@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_unet_and_text_encoder_match_pytorch(name, attention, tiny_pipe, torch_pipe, small_attention_chunks):
    pipe, tp = tiny_pipe(name), torch_pipe(name)
    ids = tokenize(pipe.tokenizer, PROMPTS)
    with torch.no_grad():
        ref_text = tp.text_encoder(torch.tensor(ids, dtype=torch.long))[0].numpy()
    text = np.asarray(encode_prompts(pipe.text_encoder, pipe.tokenizer, PROMPTS))
    assert np.abs(text - ref_text).max() <= 1e-5

    x = np.random.RandomState(0).randn(2, *pipe.sample_shape).astype(np.float32)
    t = np.array([10, 700])
    ref = _torch_unet_out(tp, x, t, ref_text)
    module = pipe.unet.module.clone(attention=attention)
    ours = np.asarray(module.apply({"params": pipe.unet.params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ref_text)))
    assert np.abs(ref).max() > 0.5  # a real signal, not a degenerate network
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("attention", ["plain", "chunked"])
def test_attention_implementations_agree(attention, tiny_pipe, small_attention_chunks):
    pipe = tiny_pipe("sd1")
    x = jax.random.normal(jax.random.PRNGKey(0), (2,) + pipe.sample_shape)
    context = jax.random.normal(jax.random.PRNGKey(1), (2, 77, 32))
    a = pipe.unet.module.clone(attention="fused").apply({"params": pipe.unet.params}, x, jnp.array([5, 900]), context)
    b = pipe.unet.module.clone(attention=attention).apply({"params": pipe.unet.params}, x, jnp.array([5, 900]), context)
    assert float(jnp.abs(a - b).max()) <= 1e-5


def test_chunked_attention_matches_pytorch_sdpa_at_a_32x32_latent():
    """The shapes the CPU benchmark's UNet attends over (1024 tokens, 8 heads of 8; 77 text tokens), in
    blocks of the default size, against torch's scaled_dot_product_attention (what diffusers calls)."""
    from finextract_jax.models.unet import attend, attention_implementation, query_chunk

    rng = np.random.default_rng(0)
    for keys in (1024, 77):
        q = rng.standard_normal((2, 1024, 8, 8), dtype=np.float32)
        k, v = (rng.standard_normal((2, keys, 8, 8), dtype=np.float32) for _ in range(2))
        if keys == 1024:
            assert query_chunk(2 * 8, 1024, keys) < 1024  # self-attention runs in several blocks
        with torch.no_grad():
            heads_major = lambda a: torch.tensor(a).transpose(1, 2)
            ref = torch.nn.functional.scaled_dot_product_attention(*map(heads_major, (q, k, v))).transpose(1, 2)
        ours = jax.jit(lambda *a: attend(*a, "chunked"))(q, k, v)
        assert np.abs(np.asarray(ours) - ref.numpy()).max() <= 1e-5
    assert attention_implementation("auto", jnp.float32, 8) == ("chunked" if jax.default_backend() == "cpu"
                                                                 else "fused")


def test_vae_decode_matches_pytorch(tiny_pipe, torch_pipe):
    pipe, tp = tiny_pipe("sd1"), torch_pipe("sd1")
    z = np.random.RandomState(1).randn(2, 4, 8, 8).astype(np.float32)
    with torch.no_grad():
        ref = tp.vae.decode(torch.tensor(z)).sample.numpy()
    ours = pipe.vae.module.apply({"params": pipe.vae.params}, jnp.asarray(z), method=pipe.vae.module.decode).sample
    assert ours.shape == ref.shape == (2, 3, 16, 16)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-5


def test_param_tree_is_diffusers_flax_tree(tiny_pipe):
    """Same names and shapes as diffusers' FlaxUNet2DConditionModel, so its msgpack files load."""
    import finextract_jax.models.components  # noqa: F401  (silences diffusers' Flax deprecation warnings)
    from diffusers import FlaxUNet2DConditionModel

    for name in ("sd1", "sd2"):
        pipe = tiny_pipe(name)
        # (diffusers' Flax UNet hard-codes 32 GroupNorm groups and takes no norm_num_groups.)
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in pipe.unet.config.items()
                  if not k.startswith("_") and k != "norm_num_groups"}
        reference = FlaxUNet2DConditionModel(**fields)
        shapes = flatten_dict(jax.eval_shape(reference.init_weights, jax.random.PRNGKey(0)))
        ours = flatten_dict(pipe.unet.params)
        assert {k: tuple(v.shape) for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_flax_msgpack_and_safetensors_give_same_params(tiny_pipe):
    a, b = flatten_dict(tiny_pipe("sd1").unet.params), flatten_dict(tiny_pipe("sd1_flax").unet.params)
    assert a.keys() == b.keys()
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    ta, tb = flatten_dict(tiny_pipe("sd1").text_encoder.params), flatten_dict(tiny_pipe("sd1_flax").text_encoder.params)
    assert all(np.array_equal(np.asarray(ta[k]), np.asarray(tb[k])) for k in ta)


def test_pixel_model_has_no_vae(tiny_pipe):
    pipe = tiny_pipe("pixel")
    assert pipe.vae is None and pipe.sample_shape == (3, 16, 16)


def test_bfloat16_params_and_attention_track_float32(tiny_dir, tiny_pipe, small_attention_chunks):
    """bf16 weights load as bf16, and the bf16 UNet is as close to float32 with chunked attention as with
    XLA's (one test: bf16 on CPU pays its op compilations once)."""
    from finextract_jax.models.pipeline import load_pipeline

    pipe = load_pipeline(tiny_dir["sd1"], dtype="bfloat16", cache_dir=None)
    leaves = jax.tree_util.tree_leaves(pipe.unet.params)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    x = jax.random.normal(jax.random.PRNGKey(0), (2,) + pipe.sample_shape)
    context = jax.random.normal(jax.random.PRNGKey(1), (2, 77, 32))
    run = lambda p, attention: p.unet.module.clone(attention=attention).apply(
        {"params": p.unet.params}, x, jnp.array([5, 900]), context)
    ref = np.asarray(run(tiny_pipe("sd1"), "fused"))
    errors = {}
    for attention in ("fused", "chunked"):
        out = run(pipe, attention)
        assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
        errors[attention] = np.abs(np.asarray(out.astype(jnp.float32)) - ref).max()
    assert errors["chunked"] <= 1.5 * errors["fused"] + 1e-3
