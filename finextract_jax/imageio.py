"""Reading a folder of images: a sorted list, and clear errors for empty or unreadable input."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from finextract_jax.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(folder: str, what: str = "image folder") -> list[str]:
    """File names (not paths) of the images directly inside ``folder``, sorted.

    Sorted by name so that indices are stable (extract writes zero-padded NNNNN.png, whose
    name order is the index order). Other files (metadata.csv, caches) are ignored.
    """
    if not folder:
        raise InputError(f"no {what} given")
    if not os.path.isdir(folder):
        raise InputError(f"{what} {folder!r} does not exist or is not a directory")
    names = sorted(
        name for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
        and os.path.isfile(os.path.join(folder, name)))
    if not names:
        raise InputError(
            f"{what} {folder!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return names


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB (alpha dropped, palette/greyscale converted), fully decoded."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"image {path!r} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise InputError(f"cannot read image {path!r} ({err}); remove or replace it") from None


def load_images(folder: str, names: Sequence[str]) -> list[Image.Image]:
    return [load_rgb(os.path.join(folder, name)) for name in names]


def to_uint8_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), np.uint8)
