"""Image embedders (a small registry) and a feature cache kept beside the images.

Each extractor has ``name``, ``fingerprint`` (changes when its weights or preprocessing
change), ``preprocess(PIL) -> [H, W, 3] float32`` and ``embed([B, H, W, 3]) -> [B, D]``
(jitted). ``compute_features`` runs them in fixed-size batches (the last one padded, so one
compilation serves a whole folder) and, in folders finextract wrote (extract's ``images/``),
caches the result in ``FOLDER/.finextract_features/``,
keyed per image by a hash of its bytes, so an edited or added image is recomputed alone and
a different extractor gets its own cache file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Optional

import numpy as np
from absl import logging

from finextract_jax import fileio, imageio
from finextract_jax.errors import InputError
from finextract_jax.features.sscd import SSCD_PREPROCESSINGS
from finextract_jax.options import check_choices, option

CACHE_DIRNAME = ".finextract_features"


def _sscd(weights=None, sscd_preprocessing="reference", **_):
    from finextract_jax.features.sscd import SSCDFeatures
    return SSCDFeatures(weights, preprocessing=sscd_preprocessing)


def _sscd_onnx(weights=None, sscd_preprocessing="reference", **_):
    from finextract_jax.features.sscd_onnx import SSCDOnnxFeatures
    return SSCDOnnxFeatures(weights, preprocessing=sscd_preprocessing)


def _pixel(weights=None, pixel_size=32, **_):
    from finextract_jax.features.pixel import PixelFeatures
    if weights:
        raise InputError("--features=pixel takes no --feature_weights")
    return PixelFeatures(pixel_size)


def _dino(weights=None, **_):
    from finextract_jax.models.vision import VisionEncoder
    return VisionEncoder(weights, "dino")


def _clip(weights=None, **_):
    from finextract_jax.models.vision import VisionEncoder
    return VisionEncoder(weights, "clip")


EXTRACTORS: dict[str, Callable] = {"sscd": _sscd, "sscd_onnx": _sscd_onnx, "dino": _dino, "clip": _clip,
                                   "pixel": _pixel}


def get_extractor(name: str, weights: Optional[str] = None, **options):
    if name not in EXTRACTORS:
        raise InputError(f"--features must be one of {', '.join(EXTRACTORS)}, got {name!r}")
    return EXTRACTORS[name](weights=weights, **options)


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Which embedder the clustering and the scoring use (the cluster and evaluate flags)."""

    features: str = option("sscd", "Image embedder.", choices=EXTRACTORS)
    feature_weights: str | None = option(None, "SSCD TorchScript file, or a local transformers folder for "
                                         "dino/clip (sscd_onnx and pixel need none).")
    sscd_preprocessing: str = option("reference", "SSCD input transform: the reference's (Resize 256, "
                                     "CenterCrop 224, mean/std 0.5) or SSCD's recommended one (320x320, "
                                     "ImageNet mean/std).", choices=SSCD_PREPROCESSINGS)
    batch_size: int = option(16, "Feature extraction batch size.")

    def __post_init__(self):
        check_choices(self)
        if self.batch_size < 1:
            raise InputError(f"--batch_size must be >= 1, got {self.batch_size}")

    def extractor(self):
        return get_extractor(self.features, self.feature_weights, sscd_preprocessing=self.sscd_preprocessing)


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_path(folder: str, extractor) -> str:
    key = hashlib.sha256(extractor.fingerprint.encode()).hexdigest()[:16]
    return os.path.join(folder, CACHE_DIRNAME, f"{extractor.name}-{key}.npz")


def _read_cache(path: str, fingerprint: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint:
                return {}
            return dict(zip(data["digests"].tolist(), data["features"]))
    except (OSError, KeyError, ValueError):
        return {}


def _write_cache(path: str, fingerprint: str, digests, features) -> None:
    try:
        with fileio.atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.array(fingerprint), digests=np.array(digests),
                     features=np.asarray(features, np.float32))
    except OSError as err:
        logging.warning("feature cache not written (%s): %s", path, err)


def embed_images(images, extractor, batch_size: int = 16, progress: bool = False,
                 desc: str = "features") -> np.ndarray:
    """Embed PIL images in fixed-size batches."""
    from tqdm import tqdm

    out = []
    bar = tqdm(total=len(images), desc=desc, disable=not progress, unit="img")
    for start in range(0, len(images), batch_size):
        chunk = [extractor.preprocess(img) for img in images[start:start + batch_size]]
        batch = np.stack(chunk).astype(np.float32)
        real = batch.shape[0]
        if real < batch_size and len(images) > batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, 0)])
        out.append(np.asarray(extractor.embed(batch))[:real])
        bar.update(real)
    bar.close()
    return np.concatenate(out).astype(np.float32)


def compute_features(folder: str, extractor, batch_size: int = 16, cache: bool = True,
                     progress: bool = False, what: str = "image folder"):
    """(sorted file names, [N, D] features) for the images in ``folder``."""
    names = imageio.list_images(folder, what)
    paths = [os.path.join(folder, n) for n in names]
    digests = [_digest(p) for p in paths]
    # Only in a folder of ours (extract's images/, whose workdir holds run.json): a user's own
    # folder is an input, and nothing is written into inputs.
    cache = cache and (fileio.is_owned(folder) or fileio.is_owned(os.path.dirname(os.path.abspath(folder))))
    cpath = _cache_path(folder, extractor)
    known = _read_cache(cpath, extractor.fingerprint) if cache else {}
    todo = [i for i, d in enumerate(digests) if d not in known]
    if todo:
        images = [imageio.load_rgb(paths[i]) for i in todo]
        new = embed_images(images, extractor, batch_size, progress, desc=f"{extractor.name} "
                           f"features")
        for i, f in zip(todo, new):
            known[digests[i]] = f
    feats = np.stack([known[d] for d in digests]).astype(np.float32)
    if cache and todo:
        _write_cache(cpath, extractor.fingerprint, digests, feats)
    logging.info("%s features for %d images in %s (%d from cache)", extractor.name,
                 len(names), folder, len(names) - len(todo))
    return names, feats
