"""Image intake: one set of rules for every image a tool reads (training images, extracted and
generated images, caption-recovery images), so that all of them see the same pixels.

Rules, applied in `to_rgb` and logged when they change anything (docs/cli.md, "Images"):
- 16-bit and 32-bit greyscale ("I;16", "I", "F") is scaled to 8 bits by its bit depth (65535 -> 255),
  not clipped (clipping turned a 16-bit photo almost white).
- Transparency (RGBA, LA, a palette with a transparent entry) is composited on white.
- Palette, greyscale, bilevel, CMYK and YCbCr images are converted to RGB.
- Images with a side under `MIN_SIDE` pixels are refused; an aspect ratio over `MAX_ASPECT` is
  warned about (a centre crop of it keeps little of the image).
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from finextract_jax.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_SIDE = 8
MAX_ASPECT = 4.0

log = logging.getLogger(__name__)


def list_images(folder: str, what: str = "image folder") -> list[str]:
    """File names (not paths) of the images directly inside ``folder``, sorted.

    Sorted by name so that indices are stable (extract writes zero-padded NNNNN.png, whose
    name order is the index order). Other files (metadata.csv, caches) and hidden files are ignored.
    """
    if not folder:
        raise InputError(f"no {what} given")
    if not os.path.isdir(folder):
        raise InputError(f"{what} {folder} does not exist or is not a folder")
    names = sorted(
        name for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
        and os.path.isfile(os.path.join(folder, name)))
    if not names:
        raise InputError(
            f"{what} {folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return names


def _scaled_to_8_bits(img: Image.Image) -> Image.Image:
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if values.size and values.max() <= 1.0 else 255.0
    else:  # "I;16*" or "I": 16-bit unless a value says 32
        top = 65535.0 if not values.size or values.max() <= 65535 else float(2 ** 32 - 1)
    return Image.fromarray(np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """A decoded PIL image as 8-bit RGB under the module's rules (see the docstring above)."""
    width, height = img.size
    if min(width, height) < MIN_SIDE:
        raise InputError(f"{name}: {width}x{height} pixels is smaller than {MIN_SIDE} on a side; remove it")
    if max(width, height) > MAX_ASPECT * min(width, height):
        log.warning("%s: aspect ratio %dx%d is over %g:1; its centre crop keeps little of it", name, width, height,
                    MAX_ASPECT)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        log.info("%s: %s greyscale scaled to 8 bits", name, mode)
        return _scaled_to_8_bits(img).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        log.info("%s: transparency composited on white", name)
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    log.info("%s: %s converted to RGB", name, mode)
    return img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open an image fully decoded, as 8-bit RGB under the intake rules."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img, path)
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(f"cannot read image {path} ({type(err).__name__}: {err}); remove or replace it") from None


def load_images(folder: str, names: Sequence[str]) -> list[Image.Image]:
    return [load_rgb(os.path.join(folder, name)) for name in names]


def to_uint8_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), np.uint8)


def resize_shorter(image: Image.Image, size: int, resample=Image.BILINEAR) -> Image.Image:
    """Shorter side to `size`, aspect kept (the other side truncated, as torchvision and HF processors do)."""
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return image if new == (w, h) else image.resize(new, resample)


def center_crop_origin(width: int, height: int, size: int) -> tuple[int, int]:
    """(top, left) of the centre `size` x `size` square of a width x height image."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centre `size` x `size` square."""
    top, left = center_crop_origin(*image.size, size)
    return image.crop((left, top, left + size, top + size))


def load_square_and_geometry(path: str, resolution: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """`load_square`'s image, with the file's (height, width) and the (top, left) of the crop in the
    resized image (what SDXL's micro-conditioning is trained on)."""
    image = load_rgb(path)
    resized = resize_shorter(image, resolution)
    square = np.asarray(center_crop(resized, resolution), dtype=np.uint8)
    return square, (image.height, image.width), center_crop_origin(*resized.size, resolution)


def load_square(path: str, resolution: int) -> np.ndarray:
    """An image file under the intake rules, shorter side resized to `resolution` and centre-cropped:
    uint8 [R, R, 3] (what fine-tuning trains on and caption recovery scores)."""
    return load_square_and_geometry(path, resolution)[0]
