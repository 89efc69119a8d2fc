"""SDXL pairs made in diffusers PyTorch (full fine-tune and PEFT LoRA) extract through the CLI with
the images of a plain PyTorch loop of the same guidance on the same start noise."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of sks dog"
STEPS = 3


@pytest.fixture(scope="module")
def sdxl_torch_pair(tiny_sdxl_dir, tmp_path_factory):
    """{"base", "full", "lora", "x_T"}: the tiny SDXL folder re-saved by diffusers, a full fine-tune
    (every UNet weight perturbed by 20% of its tensor's spread) and a PEFT LoRA (rank 4, alpha 8, on
    all attention projections) as diffusers' SDXL DreamBooth-LoRA script saves it, and start noise."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("sdxl_pair")
    torch.manual_seed(0)
    StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir).save_pretrained(root / "base")
    pipe = StableDiffusionXLPipeline.from_pretrained(root / "base")
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.2 * p.std() * torch.randn_like(p))
    pipe.save_pretrained(root / "full")
    pipe = StableDiffusionXLPipeline.from_pretrained(root / "base")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    StableDiffusionXLPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    x_T = str(root / "x_T.npy")
    np.save(x_T, np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
    return {"base": str(root / "base"), "full": str(root / "full"), "lora": str(root / "lora"), "x_T": x_T}


def _torch_loop(pair, kind, w, k):
    """FineXtract's guidance written out in diffusers PyTorch: DDIM ending at abar = 1, SDXL conditioning
    from StableDiffusionXLPipeline.encode_prompt (zeros for the empty prompt) and its default time ids."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pre = StableDiffusionXLPipeline.from_pretrained(pair["base"])
    if kind == "lora":
        post = StableDiffusionXLPipeline.from_pretrained(pair["base"])
        post.load_lora_weights(pair["lora"])
    else:
        post = StableDiffusionXLPipeline.from_pretrained(pair["full"])
    scheduler = DDIMScheduler.from_config(pre.scheduler.config, set_alpha_to_one=True)
    scheduler.set_timesteps(STEPS)
    x = torch.from_numpy(np.load(pair["x_T"]))
    rows = lambda a: a.expand(x.shape[0], *a.shape[1:])
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = post.encode_prompt(PROMPT, do_classifier_free_guidance=True)
        time_ids = pre._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                         text_encoder_projection_dim=pre.text_encoder_2.config.projection_dim)
        unet = lambda model, c, p: model.unet(x, t, rows(c), added_cond_kwargs={
            "text_embeds": rows(p), "time_ids": rows(time_ids)}).sample
        for t in scheduler.timesteps:
            eps_uncond = unet(pre, uncond, uncond_pooled)
            eps_cond = unet(post, cond, pooled)
            eps = eps_uncond + w * (eps_cond - eps_uncond) + k * eps_uncond
            x = scheduler.step(eps, t, x).prev_sample
        images = pre.vae.decode(x / pre.vae.config.scaling_factor).sample
    return ((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _extract(pair, kind, workdir, through_cli, **flags):
    """Images and run.json of an extraction: through the extract binary, or its library call."""
    args = dict(pretrained=pair["base"], finetuned=pair[kind], prompt=PROMPT, num_images=2, batch_size=2,
                steps=STEPS, init_latents=pair["x_T"], **flags)
    if through_cli:
        subprocess.run([sys.executable, "-m", "experiments.extract", f"--workdir={workdir}"]
                       + [f"--{k}={v}" for k, v in args.items()],
                       check=True, cwd=ROOT, env=dict(os.environ, FINEXTRACT_CACHE=""), capture_output=True)
    else:
        from finextract_jax.sampling.run import ExtractConfig, extract

        extract(ExtractConfig(**args), workdir, progress=False)
    images = np.stack([np.asarray(Image.open(os.path.join(workdir, "images", f"{i:05d}.png"))) for i in range(2)])
    with open(os.path.join(workdir, "run.json")) as f:
        return images, json.load(f)


# Both reference settings (LoRA w=5, k=0; DreamBooth w=3, k=-0.02); the LoRA through the binary (one
# doubled-batch pass), the full fine-tune through the library (two applies; no second process start).
@pytest.mark.parametrize("kind, w, k, fusion, through_cli", [
    ("lora", 5.0, 0.0, "lora_batch", True),
    ("full", 3.0, -0.02, "two_applies", False),
])
def test_sdxl_pair_extracts_like_pytorch(sdxl_torch_pair, tmp_path, kind, w, k, fusion, through_cli):
    ours, record = _extract(sdxl_torch_pair, kind, str(tmp_path / "run"), through_cli, guidance_scale=w, correction=k)
    reference = _torch_loop(sdxl_torch_pair, kind, w, k)
    assert ((reference > 10) & (reference < 245)).mean() > 0.5  # images, not saturated noise
    assert np.abs(reference[0].astype(int) - reference[1]).max() > 50  # the start noise matters
    assert np.abs(ours.astype(int) - reference).max() <= 2
    assert record["fusion"] == fusion
    assert record["sdxl"] == {"original_size": [16, 16], "crops_coords_top_left": [0, 0], "target_size": [16, 16],
                              "unconditional": "zeros"}


_SHARDED = """
import sys, jax
from finextract_jax.sampling.run import ExtractConfig, extract
pre, ft, out = sys.argv[1:4]
assert len(jax.devices()) == 2
base = dict(pretrained=pre, finetuned=ft, prompt="a photo of sks dog", num_images=4, steps=3, seed=5,
            guidance_scale=5.0, correction=0.0)
extract(ExtractConfig(**base, batch_size=4), out + "/two", progress=False)  # 2 per device
extract(ExtractConfig(**base, batch_size=2), out + "/one", progress=False, devices=jax.devices()[:1])
extract(ExtractConfig(**base, batch_size=2, sdxl_original_size=("8", "12"), sdxl_crops_coords_top_left=(2, 4)),
        out + "/micro", progress=False, devices=jax.devices()[:1])
"""


def test_sdxl_sharded_run_equals_one_device_and_micro_conditioning_is_a_setting(sdxl_torch_pair, tmp_path):
    """The SDXL LoRA pair (one doubled-batch pass) on 2 devices gives one device's images bit for bit;
    other micro-conditioning settings give other images and are recorded in run.json."""
    env = dict(os.environ, FINEXTRACT_CACHE="", JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    subprocess.run([sys.executable, "-c", _SHARDED, sdxl_torch_pair["base"], sdxl_torch_pair["lora"], str(tmp_path)],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    read = lambda name: [(tmp_path / name / "images" / f"{i:05d}.png").read_bytes() for i in range(4)]
    record = lambda name: json.loads((tmp_path / name / "run.json").read_text())
    assert read("two") == read("one")
    assert record("two")["devices"]["count"] == 2 and record("two")["fusion"] == "lora_batch"
    assert read("micro") != read("one")
    assert record("micro")["sdxl"] == {"original_size": [8, 12], "crops_coords_top_left": [2, 4],
                                       "target_size": [16, 16], "unconditional": "zeros"}
    assert record("micro")["settings"]["sdxl_original_size"] == [8, 12]


def test_micro_conditioning_settings_are_checked(tiny_pipe):
    from finextract_jax.errors import InputError
    from finextract_jax.models import sdxl
    from finextract_jax.sampling.run import ExtractConfig

    assert sdxl.micro_conditioning_setting(tiny_pipe("sd1")) is None
    with pytest.raises(InputError, match="SDXL models only"):
        sdxl.micro_conditioning_setting(tiny_pipe("sd1"), original_size=(8, 8))
    assert ExtractConfig("a", "b", sdxl_target_size=["32", "48"]).sdxl_target_size == (32, 48)
    with pytest.raises(InputError, match="two integers"):
        ExtractConfig("a", "b", sdxl_original_size=("big", "1"))
