"""The trained testbed base the repository carries (finextract_jax/testbed/base_model, CARD.md there)."""
import json
import os

import numpy as np

from finextract_jax.testbed import base, data, samples


def test_committed_base_reads_its_captions():
    """On 16 of its training images (committed with it), the base's denoising error under each image's
    own caption is clearly below the error under the empty caption and under another image's: it
    reads its captions (CARD.md records the margins measured when it was committed)."""
    errors = samples.caption_dependence(base.COMMITTED_BASE_DIR, data.read_committed("probe"))
    assert errors["own"] < 0.9 * errors["empty"] and errors["own"] < 0.9 * errors["other"], errors


def test_committed_base_is_the_testbed_architecture():
    with open(os.path.join(base.COMMITTED_BASE_DIR, "unet", "config.json")) as f:
        unet = json.load(f)
    assert {k: unet[k] for k in base.TESTBED_UNET} == base.TESTBED_UNET
    with open(os.path.join(base.COMMITTED_BASE_DIR, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["prediction_type"] == "v_prediction"


def test_committed_base_draws_its_captions_under_guidance():
    """cfg at s = 3 (FineXtract's reference w) on the committed base: a caption's samples are nearest its own
    image among the 16 committed probe images far above chance (1/16). With the unclipped epsilon in DDIM's
    step (diffusers' default) every caption became the same dark-framed square and this fell to chance;
    with the re-derived epsilon it was 0.75 on 32 training captions (benchmarks/RESULTS.md)."""
    rates = samples.caption_retrieval(base.COMMITTED_BASE_DIR, data.read_committed("probe"), count=16,
                                      per_caption=2, scale=3.0)
    assert rates["top1"] >= 0.4, rates


STEPS = 5


def _torch_finextract(base_dir, finetuned_dir, prompt, x_T, w, k):
    """FineXtract's guidance written out in diffusers PyTorch on a pixel-space, v-prediction model:
    both UNets' outputs turned into epsilon (eps = alpha_t v + sigma_t x_t), combined as
    eps_pre("") + w (eps_ft(c) - eps_pre("")) + k eps_pre(""), and stepped by diffusers' DDIMScheduler
    ending at abar = 1, clipping x0 to [-1, 1] and re-deriving epsilon from it (use_clipped_model_output)."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    load = lambda folder: (UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")),
                           CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")))
    (unet_pre, text_pre), (unet_ft, text_ft) = load(base_dir), load(finetuned_dir)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(base_dir, "tokenizer"))
    scheduler = DDIMScheduler.from_pretrained(os.path.join(base_dir, "scheduler"), set_alpha_to_one=True,
                                              prediction_type="epsilon")
    scheduler.set_timesteps(STEPS)
    abar = scheduler.alphas_cumprod
    ids = lambda text: tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length,
                                 return_tensors="pt").input_ids
    x = torch.from_numpy(x_T)
    with torch.no_grad():
        empty, cond = text_pre(ids(""))[0], text_ft(ids(prompt))[0]
        rows = lambda c: c.expand(x.shape[0], *c.shape[1:])
        for t in scheduler.timesteps:
            alpha, sigma = abar[t].sqrt(), (1 - abar[t]).sqrt()
            eps = lambda unet, c: alpha * unet(x, t, rows(c)).sample + sigma * x
            eps_pre, eps_ft = eps(unet_pre, empty), eps(unet_ft, cond)
            x = scheduler.step(eps_pre + w * (eps_ft - eps_pre) + k * eps_pre, t, x,
                               use_clipped_model_output=True).prev_sample
    return ((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def test_extraction_on_the_committed_base_matches_a_diffusers_loop(tmp_path):
    """The whole sampling chain on the trained base (its v-prediction, DDPM pixel schedule and clipped
    DDIM step, the guidance, the text encoders): `extract` gives the images of the PyTorch loop above,
    for a DreamBooth-style fine-tune (every UNet weight moved by 5% of its tensor's spread, saved by
    diffusers) at the reference w = 3 and the schedule-matched k."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from finextract_jax.sampling.run import ExtractConfig, extract

    finetuned = tmp_path / "finetuned"
    shutil.copytree(base.COMMITTED_BASE_DIR, finetuned, ignore=shutil.ignore_patterns("CARD.md"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(base.COMMITTED_BASE_DIR, "unet"))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p) if p.numel() > 1 else 0)
    unet.save_pretrained(finetuned / "unet")
    x_T = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x_T.npy", x_T)
    prompt, w, k = "twemoji grinning cat face", 3.0, -0.0024298
    extract(ExtractConfig(pretrained=base.COMMITTED_BASE_DIR, finetuned=str(finetuned), prompt=prompt, num_images=2,
                          batch_size=2, steps=STEPS, guidance_scale=w, correction=k,
                          init_latents=str(tmp_path / "x_T.npy")), str(tmp_path / "run"), progress=False)
    ours = np.stack([np.asarray(Image.open(tmp_path / "run" / "images" / f"{i:05d}.png")) for i in range(2)])
    reference = _torch_finextract(base.COMMITTED_BASE_DIR, str(finetuned), prompt, x_T, w, k)
    assert ((reference > 10) & (reference < 245)).mean() > 0.3  # images, not clipped noise
    assert np.abs(reference[0].astype(int) - reference[1]).max() > 50  # the start noise matters
    assert np.abs(ours.astype(int) - reference).max() <= 2
