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


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_unet_and_text_encoder_match_pytorch(name, tiny_pipe, torch_pipe):
    pipe, tp = tiny_pipe(name), torch_pipe(name)
    ids = tokenize(pipe.tokenizer, PROMPTS)
    with torch.no_grad():
        ref_text = tp.text_encoder(torch.tensor(ids, dtype=torch.long))[0].numpy()
    text = np.asarray(encode_prompts(pipe.text_encoder, pipe.tokenizer, PROMPTS))
    assert np.abs(text - ref_text).max() <= 1e-5

    x = np.random.RandomState(0).randn(2, *pipe.sample_shape).astype(np.float32)
    t = np.array([10, 700])
    ref = _torch_unet_out(tp, x, t, ref_text)
    ours = np.asarray(pipe.unet.module.apply({"params": pipe.unet.params}, jnp.asarray(x), jnp.asarray(t),
                                             jnp.asarray(ref_text)))
    assert np.abs(ref).max() > 0.5  # a real signal, not a degenerate network
    assert np.abs(ours - ref).max() <= 1e-5


def test_plain_and_fused_attention_agree(tiny_pipe):
    pipe = tiny_pipe("sd1")
    x = jax.random.normal(jax.random.PRNGKey(0), (2,) + pipe.sample_shape)
    context = jax.random.normal(jax.random.PRNGKey(1), (2, 77, 32))
    plain = pipe.unet.module.clone(attention="plain")
    a = pipe.unet.module.apply({"params": pipe.unet.params}, x, jnp.array([5, 900]), context)
    b = plain.apply({"params": pipe.unet.params}, x, jnp.array([5, 900]), context)
    assert float(jnp.abs(a - b).max()) <= 1e-5


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


def test_bfloat16_params(tiny_dir):
    from finextract_jax.models.pipeline import load_pipeline

    pipe = load_pipeline(tiny_dir["sd1"], dtype="bfloat16", cache_dir=None)
    leaves = jax.tree_util.tree_leaves(pipe.unet.params)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    out = pipe.unet.module.apply({"params": pipe.unet.params}, jnp.zeros((1,) + pipe.sample_shape), jnp.array([3]),
                                 jnp.zeros((1, 77, 32)))
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
