"""SDXL: our UNet (text_time addition embedding, per-block transformer depth, linear projections,
down blocks without attention) against diffusers PyTorch, on a tiny SDXL-shaped config (fp32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from finextract_jax.errors import InputError
from finextract_jax.models import components
from finextract_jax.models.convert import flax_to_pytorch
from finextract_jax.models.tiny import SDXL_UNET


@pytest.fixture(scope="module")
def sdxl_dir(tiny_sdxl_dir):
    return tiny_sdxl_dir


def _added_cond(batch, seed=0):
    rng = np.random.default_rng(seed)
    text_embeds = rng.standard_normal((batch, 32), dtype=np.float32)
    # (original h, w, crop top, left, target h, w): realistic magnitudes, different per row.
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 1024]][:batch], np.float32)
    return text_embeds, time_ids


def test_sdxl_param_tree_is_diffusers_flax_tree():
    """Same names and shapes as diffusers' FlaxUNet2DConditionModel with text_time."""
    from diffusers import FlaxUNet2DConditionModel

    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in SDXL_UNET.items() if k != "norm_num_groups"}
    reference = FlaxUNet2DConditionModel(**fields)
    theirs = flatten_dict(jax.eval_shape(reference.init_weights, jax.random.PRNGKey(0)))
    module = components.unet_from_config(SDXL_UNET)
    ours = components.expected_shapes("unet", module, SDXL_UNET)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.items()}


@pytest.mark.parametrize("change, match", [
    ({"addition_embed_type": "text"}, "addition_embed_type"),
    ({"addition_time_embed_dim": None}, "addition_time_embed_dim"),
])
def test_sdxl_config_refusals(change, match):
    from finextract_jax.errors import CheckpointError

    with pytest.raises(CheckpointError, match=match):
        components.unet_from_config(dict(SDXL_UNET, **change))


def test_make_tiny_sdxl_loads_in_diffusers(sdxl_dir):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.unet.config.addition_embed_type == "text_time"
    assert isinstance(DDIMScheduler.from_pretrained(sdxl_dir, subfolder="scheduler"), DDIMScheduler)
    with torch.no_grad():
        prompt_embeds, negative, pooled, _ = pipe.encode_prompt("a photo of sks dog", do_classifier_free_guidance=True)
        image = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, num_inference_steps=2,
                     output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert prompt_embeds.shape == (1, 77, 80) and pooled.shape == (1, 32) and image.shape == (1, 16, 16, 3)
    assert float(negative.abs().max()) == 0.0  # force_zeros_for_empty_prompt, as SDXL base ships


@pytest.fixture(scope="module")
def sdxl_pair(sdxl_dir):
    """(our Pipeline, diffusers' StableDiffusionXLPipeline) of the tiny SDXL folder."""
    from diffusers import StableDiffusionXLPipeline

    from finextract_jax.models.pipeline import load_pipeline

    return load_pipeline(sdxl_dir, cache_dir=None), StableDiffusionXLPipeline.from_pretrained(sdxl_dir)


def test_sdxl_prompt_encoding_matches_encode_prompt(sdxl_pair):
    from finextract_jax.models import sdxl

    pipe, tp = sdxl_pair
    assert sdxl.is_sdxl(pipe) and pipe.force_zeros_for_empty_prompt
    prompts = ["a photo of sks dog", ""]
    context, pooled = sdxl.encode_prompts(pipe, prompts)
    with torch.no_grad():
        ref_context, ref_negative, ref_pooled, ref_negative_pooled = tp.encode_prompt(
            prompts, do_classifier_free_guidance=True)
    assert context.shape == (2, 77, 80) and pooled.shape == (2, 32)
    assert np.abs(np.asarray(context) - ref_context.numpy()).max() <= 1e-5
    assert np.abs(np.asarray(pooled) - ref_pooled.numpy()).max() <= 1e-5
    assert np.abs(ref_context.numpy()[0] - ref_context.numpy()[1]).max() > 0.1  # the prompt matters
    uncond = sdxl.conditioning(pipe, "", empty=True, micro=sdxl.micro_conditioning(pipe))
    assert np.array_equal(np.asarray(uncond["context"]), ref_negative.numpy()[:1])
    assert np.array_equal(np.asarray(uncond["text_embeds"]), ref_negative_pooled.numpy()[:1])

    micro = sdxl.micro_conditioning(pipe, original_size=(64, 48), crops_coords_top_left=(4, 2))
    ref_ids = tp._get_add_time_ids((64, 48), (4, 2), (16, 16), dtype=torch.float32,
                                   text_encoder_projection_dim=tp.text_encoder_2.config.projection_dim)
    assert np.array_equal(micro.time_ids()[None], ref_ids.numpy())
    assert sdxl.micro_conditioning(pipe).to_json() == {
        "original_size": [16, 16], "crops_coords_top_left": [0, 0], "target_size": [16, 16]}


def test_sdxl_unet_matches_pytorch_and_converts_both_ways(sdxl_pair):
    """Loaded from make_tiny's safetensors (flax_to_pytorch wrote them, pytorch_to_flax read them)."""
    pipe, tp = sdxl_pair
    assert pipe.unet.module.added_cond_shapes() == {"text_embeds": 32, "time_ids": 6}
    flat = flatten_dict(pipe.unet.params)
    assert any(k[0] == "add_embedding" for k in flat)
    state = {k: v.numpy() for k, v in tp.unet.state_dict().items()}
    back = flax_to_pytorch(flat)
    assert back.keys() == state.keys() and all(np.array_equal(back[k], state[k]) for k in state)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    t = np.array([10, 700])
    context = rng.standard_normal((2, 77, 80), dtype=np.float32)
    text_embeds, time_ids = _added_cond(2)
    with torch.no_grad():
        ref = tp.unet(torch.tensor(x), torch.tensor(t), torch.tensor(context), added_cond_kwargs={
            "text_embeds": torch.tensor(text_embeds), "time_ids": torch.tensor(time_ids)}).sample.numpy()
    module = pipe.unet.module
    apply = jax.jit(lambda p, added: module.apply({"params": p}, x, t, context, added_cond_kwargs=added))
    ours = np.asarray(apply(pipe.unet.params, {"text_embeds": text_embeds, "time_ids": time_ids}))
    assert np.abs(ref).max() > 0.5  # a real signal, not a degenerate network
    assert np.abs(ours - ref).max() <= 1e-5
    # The micro-conditioning matters: other time ids give another output.
    moved = np.asarray(apply(pipe.unet.params, {"text_embeds": text_embeds, "time_ids": time_ids[::-1]}))
    assert np.abs(moved - ours).max() > 1e-3
    with pytest.raises(InputError, match="added_cond_kwargs"):
        jax.eval_shape(lambda p: module.apply({"params": p}, x, t, context), pipe.unet.params)


def test_sdxl_needs_its_second_text_encoder(sdxl_dir, tmp_path):
    import shutil

    from finextract_jax.errors import CheckpointError
    from finextract_jax.models.pipeline import load_pipeline

    broken = shutil.copytree(sdxl_dir, tmp_path / "no_te2")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(CheckpointError, match="text_encoder_2"):
        load_pipeline(str(broken), cache_dir=None)


def test_sdxl_guidance_conditioning_layout(sdxl_pair):
    """Each method's evaluations get SDXL's conditioning: zeros for the empty prompt, the caption
    encoded, the same time ids; a caption "" is encoded (it is not the unconditional slot)."""
    from finextract_jax.models import sdxl
    from finextract_jax.sampling import engine

    pipe, _ = sdxl_pair
    context, pooled = sdxl.encode_prompts(pipe, ["a photo of sks dog", ""])
    ids = sdxl.micro_conditioning(pipe).time_ids()
    cfg = engine.prepare(pipe, pipe, "cfg", "a photo of sks dog", "two_applies")
    assert cfg.evaluations == (("finetuned", None), ("finetuned", "a photo of sks dog"))
    assert not np.asarray(cfg.contexts["context"][0]).any() and not np.asarray(cfg.contexts["text_embeds"][0]).any()
    # (encoded alone vs in a batch of two: equal up to float rounding)
    assert np.allclose(cfg.contexts["context"][1], context[0], atol=1e-5)
    assert np.allclose(cfg.contexts["text_embeds"][1], pooled[0], atol=1e-5)
    assert all(np.array_equal(np.asarray(row), ids) for row in cfg.contexts["time_ids"])
    unconditional = engine.prepare(pipe, pipe, "finextract", "", "two_applies")
    assert unconditional.evaluations == (("pretrained", None), ("finetuned", ""))
    assert np.allclose(unconditional.contexts["context"][1], context[1], atol=1e-5)
    text2img = engine.prepare(pipe, pipe, "text2img", "a photo of sks dog")
    assert text2img.contexts["context"].shape == (1, 77, 80) and text2img.sdxl["unconditional"] == "zeros"
