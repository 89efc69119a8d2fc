"""Fine-tuning images: a folder of images, optional metadata.csv captions, resize + centre crop.

Preprocessing follows diffusers' DreamBooth script on PIL images (torchvision's
Resize(resolution, BILINEAR) of the shorter side, then CenterCrop(resolution)), so that our
victims see the same pixels as the reference's.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import os

import numpy as np

from finextract_jax import imageio
from finextract_jax.errors import InputError

METADATA_FILE = "metadata.csv"


@dataclasses.dataclass
class TrainSet:
    """Training images as float32 NCHW in [-1, 1], with one caption per image, and where each was
    cut from (SDXL's micro-conditioning; default: images already R x R)."""

    pixels: np.ndarray  # [N, 3, R, R]
    captions: list
    files: list
    original_sizes: list | None = None  # (height, width) of each file
    crop_top_lefts: list | None = None  # (top, left) of each centre crop in the resized image

    def __post_init__(self):
        resolution = self.pixels.shape[-1]
        if self.original_sizes is None:
            self.original_sizes = [(resolution, resolution)] * len(self.files)
        if self.crop_top_lefts is None:
            self.crop_top_lefts = [(0, 0)] * len(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """Content hash of what training sees (decoded pixels and captions), for resume checks."""
        digest = hashlib.sha256(np.ascontiguousarray(self.pixels).tobytes())
        digest.update("\0".join(self.files + self.captions).encode())
        return digest.hexdigest()[:16]


def list_images(train_dir: str) -> list:
    return imageio.list_images(train_dir, "--train_dir")


def read_metadata(train_dir: str) -> dict:
    """{file_name: caption} from metadata.csv (columns file_name, caption), or {} without one."""
    path = os.path.join(train_dir, METADATA_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: not a readable CSV file ({err})") from None
    if rows and not {"file_name", "caption"} <= set(rows[0].keys()):
        raise InputError(f"{path}: needs the columns file_name,caption (found {list(rows[0].keys())})")
    captions = {}
    for row in rows:
        name = (row.get("file_name") or "").strip()
        if not name:
            continue
        captions[os.path.basename(name)] = row.get("caption") or ""
    return captions


def load_train_set(train_dir: str, resolution: int, caption: str | None = None) -> TrainSet:
    """The images of `train_dir`, captions from metadata.csv where listed, else `caption`."""
    if resolution <= 0:
        raise InputError(f"--resolution must be positive, got {resolution}")
    files = list_images(train_dir)
    metadata = read_metadata(train_dir)
    missing = sorted(set(metadata) - set(files))
    if missing:
        raise InputError(f"{os.path.join(train_dir, METADATA_FILE)} lists files that are not in --train_dir "
                         f"(e.g. {missing[:3]}); fix the file_name column")
    captions = []
    for name in files:
        if name in metadata:
            captions.append(metadata[name])
        elif caption is not None:
            captions.append(caption)
        else:
            raise InputError(f"{name} has no caption: pass --caption or list it in {METADATA_FILE}")
    images, sizes, crops = zip(*(imageio.load_square_and_geometry(os.path.join(train_dir, name), resolution)
                                 for name in files))
    pixels = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return TrainSet(pixels, captions, files, list(sizes), list(crops))
