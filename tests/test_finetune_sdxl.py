"""SDXL fine-tuning against diffusers PyTorch on the tiny SDXL pipeline: one batch's loss equals what
diffusers' train_dreambooth_lora_sdxl.py computes (its conditioning: both encoders' penultimate
states, the pooled projection, time ids from each image's original size and crop), the LoRA export
(UNet and both text encoders) loads with StableDiffusionXLPipeline.load_lora_weights and gives our
merged model's outputs, and the DreamBooth export of both text encoders loads with
StableDiffusionXLPipeline.from_pretrained. (The finetune binary adds nothing SDXL-specific to the
library call; its SD 1.x tests cover it, and an SDXL run through it costs a minute of compilation.)"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from finextract_jax.finetune import FinetuneConfig, Trainer, load_train_set
from finextract_jax.finetune import lora as ft_lora
from finextract_jax.finetune.train import denoising_loss

CAPTION = "a photo of sks dog"
SIZES = {"astronaut": (48, 40), "coffee": (40, 56)}  # (width, height): a crop on each axis
LORA = FinetuneConfig(method="lora", steps=2, learning_rate=1e-3, rank=4, lora_alpha=8, train_text_encoder=True,
                      seed=5)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    import skimage.data
    from PIL import Image

    folder = tmp_path_factory.mktemp("train_sdxl")
    for name, size in SIZES.items():
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size).save(folder / f"{name}.png")
    return str(folder)


@pytest.fixture(scope="module")
def pipes(tiny_sdxl_dir):
    """(our Pipeline, diffusers' StableDiffusionXLPipeline) of the tiny SDXL folder."""
    from diffusers import StableDiffusionXLPipeline

    from finextract_jax.models.pipeline import load_pipeline

    return load_pipeline(tiny_sdxl_dir, cache_dir=None), StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)


def _script_conditioning(tp, files, resolution):
    """train_dreambooth_lora_sdxl.py's conditioning, written out: each tokenizer padded to its max length,
    each encoder's hidden_states[-2] concatenated, the last encoder's output[0] pooled; time ids from
    the image's size before torchvision's Resize (shorter side, int-truncated longer side) and the
    top-left of the centre crop after it."""
    from PIL import Image

    embeds = []
    with torch.no_grad():
        for tokenizer, encoder in ((tp.tokenizer, tp.text_encoder), (tp.tokenizer_2, tp.text_encoder_2)):
            ids = tokenizer(CAPTION, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
    time_ids = []
    for path in files:
        with Image.open(path) as image:
            height, width = image.height, image.width
        short, long = min(height, width), max(height, width)
        resized = (resolution, int(resolution * long / short))
        resized_h, resized_w = resized if height <= width else resized[::-1]
        top = max(0, int(round((resized_h - resolution) / 2.0)))
        left = max(0, int(round((resized_w - resolution) / 2.0)))
        time_ids.append([height, width, top, left, resolution, resolution])
    return torch.cat(embeds, dim=-1), pooled, torch.tensor(time_ids, dtype=torch.float32)


def test_sdxl_loss_matches_diffusers_script(pipes, train_dir, tiny_sdxl_dir):
    from diffusers import DDPMScheduler

    pipe, tp = pipes
    train_set = load_train_set(train_dir, 16, CAPTION)
    assert train_set.original_sizes == [(40, 48), (56, 40)] and train_set.crop_top_lefts == [(0, 2), (3, 0)]
    trainer = Trainer(pipe, train_set, FinetuneConfig(method="dreambooth"))
    data, frozen = trainer.data(), trainer.frozen()
    files = [os.path.join(train_dir, f) for f in train_set.files]
    context, pooled, time_ids = _script_conditioning(tp, files, 16)
    np.testing.assert_array_equal(np.asarray(data["time_ids"]), time_ids.numpy())
    assert np.abs(np.asarray(data["context"]) - context.numpy()).max() <= 1e-5
    assert np.abs(np.asarray(data["text_embeds"]) - pooled.numpy()).max() <= 1e-5

    # The batch: the VAE posterior mean of the training pixels (the script samples it; both sides take the mean).
    indices = np.arange(2)
    with torch.no_grad():
        x0_ref = tp.vae.encode(torch.from_numpy(train_set.pixels)).latent_dist.mean * tp.vae.config.scaling_factor
    x0 = np.asarray(data["latent_mean"]) * pipe.latent_scale
    assert np.abs(x0 - x0_ref.numpy()).max() <= 1e-4
    noise = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)
    timesteps = np.array([10, 700])
    loss = jax.jit(functools.partial(denoising_loss, trainer.spec))(
        trainer.init_state().trainable, frozen, data, indices, jnp.asarray(x0_ref.numpy()), noise, timesteps)

    scheduler = DDPMScheduler.from_pretrained(tiny_sdxl_dir, subfolder="scheduler")
    noisy = scheduler.add_noise(x0_ref, torch.from_numpy(noise), torch.from_numpy(timesteps))
    with torch.no_grad():
        prediction = tp.unet(noisy, torch.from_numpy(timesteps), context.repeat(2, 1, 1), added_cond_kwargs={
            "time_ids": time_ids, "text_embeds": pooled.repeat(2, 1)}).sample
    reference = ((prediction - torch.from_numpy(noise)) ** 2).mean(dim=(1, 2, 3)).numpy()
    assert reference.min() > 0.1  # a real loss, not a degenerate network
    assert np.abs(np.asarray(loss) - reference).max() <= 1e-5 * reference.max()


def test_sdxl_lora_export_loads_in_diffusers(pipes, train_dir, tmp_path):
    from safetensors import safe_open

    from finextract_jax.models import sdxl
    from finextract_jax.models.pipeline import load_finetuned

    pipe, tp = pipes
    trainer = Trainer(pipe, load_train_set(train_dir, 16, CAPTION), LORA)
    state = trainer.fit(progress=False)
    assert set(state.trainable) == {"unet_lora", "text_lora", "text_2_lora"}
    assert all(np.isfinite(l) for _, l in trainer.losses) and len(trainer.losses) == LORA.steps
    # Every factor learned except those of text_encoder's last layer: SDXL conditions on its
    # penultimate hidden state, so that layer gets no gradient (in diffusers' script too).
    last = str(pipe.text_encoder.config["num_hidden_layers"] - 1)
    still_zero = {k[:5] for k, v in flatten_dict(state.trainable).items() if k[-1] == "up" and not np.any(np.asarray(v))}
    assert still_zero == {("text_lora", "text_model", "encoder", "layers", last)}, still_zero

    # Random factors, so that a wrong key, transpose or scale could not hide behind B ~ 0.
    rng = np.random.default_rng(0)
    factors = unflatten_dict({k: (rng.standard_normal(v.shape) * 0.2).astype(np.float32)
                              for k, v in flatten_dict(jax.device_get(state.trainable)).items()})
    state.trainable = factors
    out = trainer.export(state, str(tmp_path / "lora"))
    with safe_open(out, framework="np") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert metadata["text_encoder_2.r"] == 4 and metadata["text_encoder_2.lora_alpha"] == 8

    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(pipe.path)
    reference.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        ref_context, _, ref_pooled, _ = reference.encode_prompt(CAPTION, do_classifier_free_guidance=False)
    merged = {name: ft_lora.merge(getattr(pipe, name).params, factors[key], LORA.lora_scale)
              for name, key in (("text_encoder", "text_lora"), ("text_encoder_2", "text_2_lora"))}
    ids_1, ids_2 = sdxl.token_ids(pipe, [CAPTION])
    context, pooled = sdxl.encode_ids(pipe.text_encoder.module, merged["text_encoder"], ids_1,
                                      pipe.text_encoder_2.module, merged["text_encoder_2"], ids_2)
    plain_context, _ = sdxl.encode_prompts(pipe, [CAPTION])
    assert np.abs(np.asarray(context) - np.asarray(plain_context)).max() > 1e-2  # the text LoRAs act
    assert np.abs(np.asarray(context) - ref_context.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(pooled) - ref_pooled.numpy()).max() <= 1e-4

    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([10, 700])
    time_ids = np.array([[16, 16, 0, 0, 16, 16], [40, 48, 0, 2, 16, 16]], np.float32)
    added = {"text_embeds": np.repeat(np.asarray(pooled), 2, 0), "time_ids": time_ids}
    ctx = np.repeat(np.asarray(context), 2, 0)
    with torch.no_grad():
        ref = reference.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), added_cond_kwargs={
            k: torch.from_numpy(v) for k, v in added.items()}).sample.numpy()
    apply = jax.jit(lambda variables: pipe.unet.module.apply(variables, x, t, ctx, added_cond_kwargs=added))
    ours = np.asarray(apply({"params": pipe.unet.params, "lora": ft_lora.scaled(factors["unet_lora"],
                                                                                  LORA.lora_scale)}))
    assert np.abs(ours - np.asarray(apply({"params": pipe.unet.params}))).max() > 1e-2  # the UNet LoRA acts
    assert np.abs(ours - ref).max() <= 1e-4

    # Our own loader reads the file back to the same model.
    loaded = load_finetuned(pipe, str(tmp_path / "lora"), lora_mode="unmerged", cache_dir=None)
    assert np.abs(np.asarray(apply(loaded.unet_variables())) - ours).max() <= 1e-5
    assert np.abs(np.asarray(sdxl.encode_prompts(loaded, [CAPTION])[0]) - np.asarray(context)).max() <= 1e-5


def test_sdxl_dreambooth_export_of_both_text_encoders(pipes, tmp_path):
    """Trained text encoders (here perturbed) are written as safetensors StableDiffusionXLPipeline reads."""
    from diffusers import StableDiffusionXLPipeline

    from finextract_jax.finetune.export import save_dreambooth
    from finextract_jax.finetune.train import dreambooth_components

    pipe, _ = pipes
    perturb = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a) + 0.01, tree)
    text = {"text_encoder": perturb(pipe.text_encoder.params), "text_encoder_2": perturb(pipe.text_encoder_2.params)}
    out = save_dreambooth(str(tmp_path / "db"), pipe.path, dreambooth_components(pipe, pipe.unet.params, text))
    loaded = StableDiffusionXLPipeline.from_pretrained(out)
    for name in ("text_encoder", "text_encoder_2"):
        ours = flatten_dict(text[name])
        state = {k: v.numpy() for k, v in getattr(loaded, name).state_dict().items()}
        assert np.array_equal(state["text_model.final_layer_norm.bias"],
                              ours[("text_model", "final_layer_norm", "bias")]), name
    np.testing.assert_array_equal(loaded.text_encoder_2.state_dict()["text_projection.weight"].numpy(),
                                  np.asarray(text["text_encoder_2"]["text_projection"]["kernel"]).T)
