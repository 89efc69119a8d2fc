"""Weight-free features: the image resized to a small square, as normalised pixels.

Useful for runs without any embedding weights (tests, the tiny demo). Cosine similarity of
mean-centred pixels behaves like a (crude) correlation between images.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


class PixelFeatures:
    name = "pixel"

    def __init__(self, size: int = 32):
        self.size = int(size)
        self.fingerprint = f"pixel:size={self.size}:bilinear:centred:v1"

    def preprocess(self, img: Image.Image) -> np.ndarray:
        small = img.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(small, np.float32) / 127.5 - 1.0

    def embed(self, batch: np.ndarray) -> np.ndarray:
        flat = batch.reshape(batch.shape[0], -1).astype(np.float32)
        # Centre each image so that cosine similarity compares structure, not brightness.
        # A tiny constant component keeps a uniform image from being the zero vector.
        flat = flat - flat.mean(axis=1, keepdims=True)
        return np.concatenate([flat, np.full((flat.shape[0], 1), 1e-3, np.float32)], axis=1)
