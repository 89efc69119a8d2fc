"""Does the base read its captions? Samples for fixed captions beside their training images.

Every caption is sampled from the same start noise (image i from (seed, i)), so a row that
differs from its neighbours differs because of its caption. cfg at scale `scale` for a
caption, plain sampling for "".
"""
from __future__ import annotations

import numpy as np


def probe_rows(split: tuple, count: int) -> list:
    """`count` (image, caption) pairs of a split, evenly spaced through it (a fixed, varied choice)."""
    images, captions, _ = split
    return [(images[i], captions[i]) for i in np.linspace(0, len(captions) - 1, count).astype(int)]


def sample_captions(model_dir: str, captions: list, per_caption: int = 6, steps: int = 25, scale: float = 3.0,
                    seed: int = 0) -> np.ndarray:
    """uint8 [len(captions), per_caption, H, W, 3]: DDIM samples of the model at `model_dir`."""
    from finextract_jax.models.pipeline import load_pipeline
    from finextract_jax.sampling import engine
    from finextract_jax.sampling.noise import batch_start_noise

    pipe = load_pipeline(model_dir)
    mesh = engine.data_mesh()
    sampler = engine.build_sampler("ddim", pipe.scheduler_config, steps)
    decode = engine.make_decoder(pipe, mesh)
    x_T = batch_start_noise(np.arange(per_caption), seed, pipe.sample_shape)
    compiled = {}
    out = []
    for caption in captions:
        method = "cfg" if caption else "text2img"
        model = engine.prepare(pipe, pipe, method, caption)
        if method not in compiled:
            compiled[method] = engine.make_batch_sampler(model, sampler, mesh)
        x0, _ = compiled[method](model.variables, model.contexts, x_T, scale, 0.0)
        out.append(np.asarray(decode({}, x0)))
    return np.stack(out)


def probe_grid(model_dir: str, splits: dict, per_caption: int = 6, scale: float = 3.0, seed: int = 0):
    """PIL grid: rows of (real image, samples) for 8 train and 3 held-out-concept captions, then ""."""
    from PIL import Image

    from finextract_jax.demo.report import labelled_grid

    probes = probe_rows(splits["train"], 8) + probe_rows(splits["held_out_concept"], 3)
    captions = [c for _, c in probes] + [""]
    samples = sample_captions(model_dir, captions, per_caption, scale=scale, seed=seed)
    rows = []
    for r, caption in enumerate(captions):
        real = Image.fromarray(probes[r][0]) if r < len(probes) else None
        label = caption[:18] if caption else '"" (unconditional)'
        rows.append([(real, label, False)] + [(Image.fromarray(s), "", False) for s in samples[r]])
    return labelled_grid(rows, ["real"] + [f"sample {i}" for i in range(per_caption)], tile=48)
