"""Defences of docs/method.md §6: Cutout and RandAugment on the training images, in jnp.

Pure functions of (key, image), so they run inside the jitted train step and a run is
reproducible from its seed: the key of each image is derived from (seed, step, sample index),
never from the device layout. Images are NCHW float in [-1, 1] at the API; the ops work on HWC
in [0, 1].

RandAugment follows torchvision's `RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31)`:
the same 14 operations, magnitude tables and random signs; geometric ops use nearest
interpolation and fill with black like torchvision's defaults.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

from finextract_jax.errors import InputError

AUGMENTS = ("none", "cutout", "randaugment")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    name: str = "none"
    cutout_fraction: float = 0.5  # side of the Cutout square, as a fraction of the image side
    num_ops: int = 2
    magnitude: int = 9
    num_bins: int = 31

    def __post_init__(self):
        if self.name not in AUGMENTS:
            raise InputError(f"--augment={self.name!r} is not one of {', '.join(AUGMENTS)}")
        if not 0 < self.cutout_fraction <= 1:
            raise InputError(f"cutout_fraction must be in (0, 1], got {self.cutout_fraction}")
        if self.num_ops < 0 or not 0 <= self.magnitude < self.num_bins:
            raise InputError(f"RandAugment needs num_ops >= 0 and 0 <= magnitude < {self.num_bins}")


# --------------------------------------------------------------------------------------------
# Cutout


def cutout(key, image, size: int):
    """One size x size square (centre uniform over the image, clipped at the border) set to grey."""
    height, width = image.shape[:2]
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    y = jnp.arange(height)[:, None]
    x = jnp.arange(width)[None, :]
    inside = (y >= cy - size // 2) & (y < cy - size // 2 + size) & (x >= cx - size // 2) & (x < cx - size // 2 + size)
    return jnp.where(inside[..., None], 0.5, image)


# --------------------------------------------------------------------------------------------
# RandAugment ops on HWC float images in [0, 1]


def _grey(image):
    return (0.2989 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2])[..., None]


def _blend(image, other, factor):
    return jnp.clip(other + factor * (image - other), 0.0, 1.0)


def _warp(image, matrix, offset):
    """Output pixel (y, x) samples the input at matrix @ (y, x) + offset (nearest; black outside)."""
    height, width = image.shape[:2]
    yy, xx = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij")
    src_y = matrix[0, 0] * yy + matrix[0, 1] * xx + offset[0]
    src_x = matrix[1, 0] * yy + matrix[1, 1] * xx + offset[1]
    # map_coordinates' order=0 rounds half away from zero; exact for the integral translations.
    return jnp.stack([map_coordinates(image[..., c], [src_y, src_x], order=0, mode="constant", cval=0.0)
                      for c in range(image.shape[-1])], axis=-1)


def _shear_x(image, m):
    return _warp(image, jnp.array([[1.0, 0.0], [-m, 1.0]]), jnp.zeros(2))


def _shear_y(image, m):
    return _warp(image, jnp.array([[1.0, -m], [0.0, 1.0]]), jnp.zeros(2))


def _translate_x(image, m):
    return _warp(image, jnp.eye(2), jnp.stack([0.0, -jnp.round(m)]))


def _translate_y(image, m):
    return _warp(image, jnp.eye(2), jnp.stack([-jnp.round(m), 0.0]))


def _rotate(image, degrees):
    height, width = image.shape[:2]
    theta = degrees * math.pi / 180.0
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    center = jnp.array([(height - 1) / 2.0, (width - 1) / 2.0])
    matrix = jnp.stack([jnp.stack([cos, -sin]), jnp.stack([sin, cos])])
    return _warp(image, matrix, center - matrix @ center)


def _brightness(image, m):
    return _blend(image, jnp.zeros_like(image), 1.0 + m)


def _color(image, m):
    return _blend(image, jnp.broadcast_to(_grey(image), image.shape), 1.0 + m)


def _contrast(image, m):
    return _blend(image, jnp.full_like(image, jnp.mean(_grey(image))), 1.0 + m)


def _sharpness(image, m):
    kernel = jnp.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    height, width = image.shape[:2]
    smooth = sum(kernel[dy, dx] * image[dy:height - 2 + dy, dx:width - 2 + dx] for dy in range(3) for dx in range(3))
    blurred = image.at[1:-1, 1:-1].set(smooth)  # torchvision keeps the border pixels
    return _blend(image, blurred, 1.0 + m)


def _to_uint8(image):
    return jnp.clip(jnp.round(image * 255.0), 0, 255).astype(jnp.int32)


def _posterize(image, bits):
    mask = 255 - (2 ** (8 - bits.astype(jnp.int32)) - 1)
    return (_to_uint8(image) & mask).astype(jnp.float32) / 255.0


def _solarize(image, threshold):
    return jnp.where(image >= threshold, 1.0 - image, image)


def _autocontrast(image, _):
    low = image.min(axis=(0, 1), keepdims=True)
    high = image.max(axis=(0, 1), keepdims=True)
    span = jnp.where(high > low, high - low, 1.0)
    return jnp.where(high > low, jnp.clip((image - low) / span, 0.0, 1.0), image)


def _equalize_channel(channel):
    values = _to_uint8(channel).reshape(-1)
    hist = jnp.bincount(values, length=256)
    last_nonzero = hist[jnp.max(jnp.where(hist > 0, jnp.arange(256), -1))]
    step = (values.size - last_nonzero) // 255
    safe_step = jnp.maximum(step, 1)
    lut = (jnp.cumsum(hist) + safe_step // 2) // safe_step
    lut = jnp.clip(jnp.concatenate([jnp.zeros(1, lut.dtype), lut[:-1]]), 0, 255)
    equalized = lut[values].reshape(channel.shape).astype(jnp.float32) / 255.0
    return jnp.where(step == 0, _to_uint8(channel).astype(jnp.float32) / 255.0, equalized)


def _equalize(image, _):
    return jnp.stack([_equalize_channel(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def _identity(image, _):
    return image


def _op_table(height: int, width: int, num_bins: int):
    """(name, op, magnitudes over the bins, signed) in torchvision's order."""
    bins = lambda hi: np.linspace(0.0, hi, num_bins)
    return (
        ("Identity", _identity, np.zeros(num_bins), False),
        ("ShearX", _shear_x, bins(0.3), True),
        ("ShearY", _shear_y, bins(0.3), True),
        ("TranslateX", _translate_x, bins(150.0 / 331.0 * width), True),
        ("TranslateY", _translate_y, bins(150.0 / 331.0 * height), True),
        ("Rotate", _rotate, bins(30.0), True),
        ("Brightness", _brightness, bins(0.9), True),
        ("Color", _color, bins(0.9), True),
        ("Contrast", _contrast, bins(0.9), True),
        ("Sharpness", _sharpness, bins(0.9), True),
        ("Posterize", _posterize, 8 - np.round(np.arange(num_bins) / ((num_bins - 1) / 4)), False),
        ("Solarize", _solarize, np.linspace(1.0, 0.0, num_bins), False),
        ("AutoContrast", _autocontrast, np.zeros(num_bins), False),
        ("Equalize", _equalize, np.zeros(num_bins), False),
    )


RANDAUGMENT_OPS = tuple(name for name, *_ in _op_table(8, 8, 31))


def randaugment_op(image, op_index, negate, magnitude: int = 9, num_bins: int = 31):
    """One RandAugment op (index into RANDAUGMENT_OPS) on an HWC [0, 1] image; traceable index."""
    table = _op_table(image.shape[0], image.shape[1], num_bins)
    branches = []
    for _, op, magnitudes, signed in table:
        value = float(magnitudes[magnitude])
        branches.append(lambda img, neg, op=op, value=value, signed=signed:
                        op(img, jnp.where(neg, -value, value) if signed else jnp.float32(value)))
    return jax.lax.switch(op_index, branches, image, negate)


def randaugment(key, image, num_ops: int = 2, magnitude: int = 9, num_bins: int = 31):
    """`num_ops` ops drawn uniformly (with replacement), each with a random sign, like torchvision."""
    for key_op in jax.random.split(key, num_ops):
        k_index, k_sign = jax.random.split(key_op)
        index = jax.random.randint(k_index, (), 0, len(RANDAUGMENT_OPS))
        negate = jax.random.bernoulli(k_sign)
        image = randaugment_op(image, index, negate, magnitude, num_bins)
    return image


# --------------------------------------------------------------------------------------------


def augment_one(config: AugmentConfig, key, image_chw):
    """One NCHW-layout image in [-1, 1] -> the augmented image, same layout and range."""
    if config.name == "none":
        return image_chw
    image = (jnp.transpose(image_chw, (1, 2, 0)).astype(jnp.float32) + 1.0) / 2.0
    if config.name == "cutout":
        size = max(1, int(round(config.cutout_fraction * image.shape[0])))
        image = cutout(key, image, size)
    else:
        image = randaugment(key, image, config.num_ops, config.magnitude, config.num_bins)
    return jnp.transpose(image, (2, 0, 1)) * 2.0 - 1.0


def augment_batch(config: AugmentConfig, keys, images_nchw):
    """Per-image keys [B] and images [B, C, H, W] in [-1, 1]."""
    if config.name == "none":
        return images_nchw
    return jax.vmap(lambda k, x: augment_one(config, k, x))(keys, images_nchw)
