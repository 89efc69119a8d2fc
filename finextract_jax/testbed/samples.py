"""Does the base read its captions? Three probes.

- `probe_grid`: samples for fixed captions beside their training images. Every caption is
  sampled from the same start noise (image i from (seed, i)), so a row that differs from its
  neighbours differs because of its caption. cfg at scale `scale` for a caption, plain
  sampling for "".
- `caption_dependence`: the denoising error (eps-MSE) on images with their own caption, with
  another image's caption and with "" on the same noisy inputs (caption.PromptScorer). A
  model that reads its captions has own < other and own < empty; one that ignores them has all
  three equal.
- `start_noise_bias`: does sampling from pure noise give images as bright as the data? A
  schedule that leaves much of the image in the noisiest step lets a pixel model read the
  background off the noise, which pure noise does not carry.
- `caption_retrieval`: do a caption's samples look like that caption's image? Each cfg sample's
  nearest real image among the probed captions' images (cosine of an embedding); the rate at
  which it is its own caption's image, against chance. The number to watch while training.
"""
from __future__ import annotations

import numpy as np


def probe_rows(split: tuple, count: int) -> list:
    """`count` (image, caption) pairs of a split, evenly spaced through it (a fixed, varied choice)."""
    images, captions, _ = split
    return [(images[i], captions[i]) for i in np.linspace(0, len(captions) - 1, count).astype(int)]


def _pipeline(model):
    """A Pipeline, or the model folder to load one from (one load serves every probe)."""
    from finextract_jax.models.pipeline import load_pipeline

    return load_pipeline(model) if isinstance(model, str) else model


def sample_captions(model, captions: list, per_caption: int = 6, steps: int = 25, scale: float = 3.0,
                    seed: int = 0, start=None, chunk: int = 16) -> np.ndarray:
    """uint8 [len(captions), per_caption, H, W, 3]: DDIM samples of `model` (Pipeline or folder) from
    the start noise of images 0..per_caption-1 of `seed`, or from `start` [per_caption, C, H, W]: cfg at
    `scale` for a caption, plain sampling for "". Up to `chunk` captions run as one program (the
    sampler vmapped over their prompt encodings: one caption's batch of 4 leaves two cores idle)."""
    import jax

    from finextract_jax.sampling import engine
    from finextract_jax.sampling.noise import batch_start_noise

    pipe = _pipeline(model)
    mesh = engine.data_mesh()
    sampler = engine.build_sampler("ddim", pipe.scheduler_config, steps)
    decode = engine.make_decoder(pipe, mesh)
    x_T = batch_start_noise(np.arange(per_caption), seed, pipe.sample_shape) if start is None else start
    out = [None] * len(captions)
    for method in ("cfg", "text2img"):
        rows = [i for i, c in enumerate(captions) if bool(c) == (method == "cfg")]
        if not rows:
            continue
        guided = [engine.prepare(pipe, pipe, method, captions[i]) for i in rows]
        run = jax.vmap(engine.make_batch_sampler(guided[0], sampler, mesh), in_axes=(None, 0, None, None, None))
        size = min(chunk, len(rows))
        for first in range(0, len(rows), size):
            part = guided[first:first + size]
            part += part[-1:] * (size - len(part))  # the last chunk padded: one compilation per method
            contexts = jax.tree_util.tree_map(lambda *c: np.stack(c), *[g.contexts for g in part])
            x0, _ = run(part[0].variables, contexts, x_T, scale, 0.0)
            for i, images in zip(rows[first:first + size], np.asarray(x0)):
                out[i] = np.asarray(decode({}, images))
    return np.stack(out)


def probe_grid(model, splits: dict, per_caption: int = 6, scale: float = 3.0, seed: int = 0):
    """PIL grid: rows of (real image, samples) for 8 train and 3 held-out-concept captions, then ""."""
    from PIL import Image

    from finextract_jax.demo.report import labelled_grid

    probes = probe_rows(splits["train"], 8) + probe_rows(splits["held_out_concept"], 3)
    captions = [c for _, c in probes] + [""]
    samples = sample_captions(model, captions, per_caption, scale=scale, seed=seed)
    rows = []
    for r, caption in enumerate(captions):
        real = Image.fromarray(probes[r][0]) if r < len(probes) else None
        label = caption[:18] if caption else '"" (unconditional)'
        rows.append([(real, label, False)] + [(Image.fromarray(s), "", False) for s in samples[r]])
    return labelled_grid(rows, ["real"] + [f"sample {i}" for i in range(per_caption)], tile=48)


def caption_dependence(model, split: tuple, count: int = 16, timesteps=(300, 500, 700, 900),
                       draws: int = 2, seed: int = 0) -> dict:
    """Mean eps-MSE of `count` images of `split` under their own caption, the next probe image's
    caption, and "" (the same noise for all three)."""
    from finextract_jax.caption import PromptScorer, alphas_cumprod, images_to_model_space, make_pairs
    from finextract_jax.models.pipeline import tokenize

    rows = probe_rows(split, count)
    pipe = _pipeline(model)
    x0 = images_to_model_space(pipe, np.stack([image for image, _ in rows]))
    alphas = alphas_cumprod(pipe)
    per_image = [make_pairs(x0[i:i + 1], timesteps, draws, seed + i, alphas, pipe.prediction_type)
                 for i in range(count)]
    pairs = tuple(np.concatenate(parts) for parts in zip(*per_image))
    image_of = np.repeat(np.arange(count), len(timesteps) * draws)
    scorer = PromptScorer(pipe, pipe, pairs, batch_size=64, need_pretrained=False)
    errors, _ = scorer.errors(tokenize(pipe.tokenizer, [c for _, c in rows] + [""]))  # [count + 1, pairs]
    columns = np.arange(len(image_of))
    return {"own": float(errors[image_of, columns].mean()),
            "other": float(errors[(image_of + 1) % count, columns].mean()),
            "empty": float(errors[count, columns].mean()), "images": count, "pairs": int(len(image_of))}


def retrieval_rates(sample_features: np.ndarray, real_features: np.ndarray) -> dict:
    """Samples [K, P, D] of K >= 5 captions against their K real images [K, D]: the fraction of samples
    whose nearest real image (cosine) is their own caption's (top1), or among the 5 nearest (top5)."""
    from finextract_jax.errors import InputError

    count, per_caption = sample_features.shape[:2]
    if count < 5:
        raise InputError(f"the retrieval probe needs at least 5 captions, got {count}")
    unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    similarity = unit(sample_features.reshape(count * per_caption, -1)) @ unit(real_features).T  # [K*P, K]
    own = np.repeat(np.arange(count), per_caption)
    closer = (similarity > similarity[np.arange(len(own)), own][:, None]).sum(axis=1)  # real images nearer than own
    return {"top1": float(np.mean(closer == 0)), "top5": float(np.mean(closer < 5)), "chance_top1": 1.0 / count,
            "chance_top5": 5.0 / count, "captions": count, "samples": count * per_caption}


def caption_retrieval(model, split: tuple, count: int = 64, per_caption: int = 4, scale: float = 3.0,
                      seed: int = 0, steps: int = 25, features: str = "pixel") -> dict:
    """`retrieval_rates` of cfg samples for `count` captions of `split` (probe_rows) against their
    images, embedded with `features` (finextract_jax.features)."""
    from PIL import Image

    from finextract_jax.features import embed_images, get_extractor

    rows = probe_rows(split, count)
    samples = sample_captions(_pipeline(model), [c for _, c in rows], per_caption, steps, scale, seed)
    extractor = get_extractor(features)
    embed = lambda images: embed_images([Image.fromarray(i) for i in images], extractor, batch_size=64)
    sample_features = embed(samples.reshape(-1, *samples.shape[2:])).reshape(count, per_caption, -1)
    return retrieval_rates(sample_features, embed(np.stack([image for image, _ in rows])))


def start_noise_bias(model, images: np.ndarray, count: int = 64, steps: int = 25, seed: int = 0) -> dict:
    """Mean pixel (in [-1, 1]) of a pixel model's data `images` (uint8 [N, H, W, 3]) and of `count`
    unconditional samples of it from pure noise eps, and from sqrt(1 - abar_t) eps + sqrt(abar_t) x
    the data's mean image (what the first DDIM step's x_t holds of the data on average), and the
    spread (std) of the images' own means. Data and pure-noise means agree when the schedule hides
    the data from the noise; they differ when the model learned to read the image's brightness off
    the noise."""
    from finextract_jax.noise_schedule import alphas_cumprod_from_config
    from finextract_jax.sampling import engine
    from finextract_jax.sampling.noise import batch_start_noise

    pipe = _pipeline(model)
    data = images.astype(np.float32) / 127.5 - 1.0
    first_t = int(np.asarray(engine.build_sampler("ddim", pipe.scheduler_config, steps).timesteps)[0])
    alpha_bar = alphas_cumprod_from_config(pipe.scheduler_config)[first_t]
    mean_image = data.mean(axis=0).transpose(2, 0, 1)
    noise = batch_start_noise(np.arange(count), seed, pipe.sample_shape)
    plain = sample_captions(pipe, [""], count, steps, start=noise)
    carried = sample_captions(pipe, [""], count, steps, start=(np.sqrt(1.0 - alpha_bar) * noise + np.sqrt(
        alpha_bar) * mean_image[None]).astype(np.float32))
    per_image = lambda x: x.reshape(len(x), -1).astype(np.float64).mean(axis=1) / 127.5 - 1.0
    plain, carried = per_image(plain[0]), per_image(carried[0])
    return {"data": float(data.mean()), "pure_noise": float(plain.mean()), "with_mean_image": float(carried.mean()),
            # Spread of the images' own means: a base that draws every image grey has the data's mean
            # and none of its variety (the demo base on this schedule at 2000 steps: 0.013 vs 0.28).
            "data_spread": float(data.reshape(len(data), -1).mean(axis=1).std()),
            "pure_noise_spread": float(plain.std()), "timestep": first_t, "sqrt_alpha_bar": float(np.sqrt(alpha_bar))}
