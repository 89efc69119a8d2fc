"""Images for the demo, all from scikit-image's bundled `skimage.data` (no downloads).

The private set (what the demo fine-tunes on and then tries to extract) and the base model's
training images come from disjoint source photos, so the base never saw a private image.
"""
from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

PRIVATE = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
PRIVATE_CAPTION = "a photo of sks"
# Base-model sources and the caption words that describe them.
BASE_SOURCES = {
    "brick": "brick wall texture", "camera": "man camera", "grass": "grass texture", "gravel": "gravel texture",
    "moon": "moon", "coins": "coins", "clock": "clock", "page": "text", "text": "text",
    "immunohistochemistry": "pattern", "colorwheel": "colorful pattern", "retina": "red photo", "logo": "logo",
    "horse": "horse", "checkerboard": "checkerboard", "binary_blobs": "pattern",
    "shepp_logan_phantom": "gray pattern",
}


def load_rgb(name: str) -> np.ndarray:
    """A skimage.data image as uint8 RGB."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        image = (255 * (image - image.min()) / max(float(image.max() - image.min()), 1e-8)).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def center_square(image: np.ndarray, resolution: int) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(crop.resize((resolution, resolution), Image.BICUBIC))


def write_folder(folder: str, images: dict, captions: dict):
    """PNG files plus metadata.csv (file_name, caption), the layout `finetune` reads."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption"])
        for name, image in images.items():
            Image.fromarray(image).save(os.path.join(folder, f"{name}.png"))
            writer.writerow([f"{name}.png", captions[name]])


def write_private_set(folder: str, resolution: int, names=PRIVATE) -> list:
    images = {name: center_square(load_rgb(name), resolution) for name in names}
    write_folder(folder, images, {name: PRIVATE_CAPTION for name in names})
    return [f"{name}.png" for name in names]


def _procedural(rng, resolution: int):
    """A gradient, stripes or dots image in random colours (keeps the base distribution broad)."""
    y, x = np.mgrid[0:resolution, 0:resolution] / resolution
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    kind = rng.integers(3)
    if kind == 0:
        t = (x * np.cos(rng.uniform(0, np.pi)) + y * np.sin(rng.uniform(0, np.pi))) % 1.0
        caption = "colorful gradient"
    elif kind == 1:
        t = (np.sin((x * rng.uniform(2, 8) + y * rng.uniform(-4, 4)) * 2 * np.pi) > 0).astype(float)
        caption = "stripes pattern"
    else:
        t = (np.sin(x * rng.uniform(4, 10) * 2 * np.pi) * np.sin(y * rng.uniform(4, 10) * 2 * np.pi) > 0.3) * 1.0
        caption = "dots pattern"
    image = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    return image.astype(np.uint8), caption


def write_base_training_set(folder: str, count: int, resolution: int, seed: int = 0, caption_dropout: float = 0.1):
    """Random crops (random scale, position, flip, colour tint) of the base sources + procedural images.

    A `caption_dropout` fraction gets the empty caption, as SD's training drops captions: without
    it the base never learns eps(x, ""), which FineXtract and cfg evaluate at every step.
    """
    rng = np.random.default_rng(seed)
    sources = {name: load_rgb(name) for name in BASE_SOURCES}
    images, captions = {}, {}
    for i in range(count):
        name = f"{i:05d}"
        if rng.random() < 0.2:
            images[name], caption = _procedural(rng, resolution)
        else:
            source = list(BASE_SOURCES)[rng.integers(len(BASE_SOURCES))]
            image = sources[source]
            h, w = image.shape[:2]
            side = int(min(h, w) * rng.uniform(0.3, 1.0))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = image[top:top + side, left:left + side].astype(np.float32)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            if np.allclose(crop[..., 0], crop[..., 1]):  # grayscale: tint it
                crop = crop * rng.uniform(0.5, 1.0, 3)[None, None]
            crop = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))
            images[name] = np.asarray(crop.resize((resolution, resolution), Image.BICUBIC))
            caption = BASE_SOURCES[source]
        captions[name] = "" if rng.random() < caption_dropout else f"a photo of {caption}"
    write_folder(folder, images, captions)
