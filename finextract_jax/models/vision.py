"""DINO (ViT / DINOv2) and CLIP vision encoders through transformers' Flax classes.

The only module that imports transformers' Flax vision classes. Weights come from a local
folder (``config.json`` plus ``flax_model.msgpack``, or PyTorch ``model.safetensors`` /
``pytorch_model.bin``, which transformers converts; PyTorch is then needed). Nothing is
downloaded. Features: DINO = the CLS token of the last hidden state; CLIP = the projected
image embedding when the folder is a full CLIP model, else the pooled CLS output.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np
from PIL import Image

from finextract_jax import imageio
from finextract_jax.errors import CheckpointError, InputError
from finextract_jax.models.data_parallel import DataParallel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _import_transformers():
    with warnings.catch_warnings():
        # transformers 4.5x warns that its Flax classes are deprecated; we pin that version.
        warnings.simplefilter("ignore")
        import transformers
        from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    return transformers


def _folder_digest(folder: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            st = os.stat(path)
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _weights_format(folder: str) -> bool:
    """True if the folder holds Flax weights, False for PyTorch ones."""
    if os.path.exists(os.path.join(folder, "flax_model.msgpack")):
        return True
    if any(os.path.exists(os.path.join(folder, n))
           for n in ("model.safetensors", "pytorch_model.bin")):
        return False
    raise CheckpointError(
        f"{folder!r} has no flax_model.msgpack, model.safetensors or pytorch_model.bin")


def _preprocessing(folder: str, kind: str) -> dict:
    defaults = ({"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resize": 256, "crop": 224,
                 "resample": Image.BICUBIC} if kind == "dino" else
                {"mean": CLIP_MEAN, "std": CLIP_STD, "resize": 224, "crop": 224,
                 "resample": Image.BICUBIC})
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.exists(path):
        return defaults
    with open(path) as f:
        pc = json.load(f)
    out = dict(defaults)
    if "image_mean" in pc:
        out["mean"] = tuple(pc["image_mean"])
    if "image_std" in pc:
        out["std"] = tuple(pc["image_std"])
    size = pc.get("size")
    if isinstance(size, dict):
        size = size.get("shortest_edge") or size.get("height")
    if isinstance(size, int):
        out["resize"] = size
    crop = pc.get("crop_size")
    if isinstance(crop, dict):
        crop = crop.get("height")
    if pc.get("do_center_crop", True) is False:
        crop = None
    out["crop"] = crop if isinstance(crop, int) or crop is None else out["crop"]
    if out["crop"] is None:
        out["crop"] = out["resize"]
    return out


class VisionEncoder:
    """A jitted transformers Flax vision encoder: preprocess(PIL) and embed(batch)."""

    def __init__(self, folder: str, kind: str):
        if kind not in ("dino", "clip"):
            raise InputError(f"vision encoder kind must be 'dino' or 'clip', got {kind!r}")
        if not folder:
            raise InputError(f"--features={kind} needs --feature_weights=FOLDER (a local "
                             "transformers model folder)")
        if not os.path.isdir(folder) or not os.path.exists(os.path.join(folder, "config.json")):
            raise InputError(f"--feature_weights {folder!r} is not a model folder with "
                             "config.json")
        tf = _import_transformers()
        with open(os.path.join(folder, "config.json")) as f:
            model_type = json.load(f).get("model_type")
        from_flax = _weights_format(folder)
        classes = {"vit": tf.FlaxViTModel, "dinov2": tf.FlaxDinov2Model,
                   "clip": tf.FlaxCLIPModel, "clip_vision_model": tf.FlaxCLIPVisionModel}
        if model_type not in classes:
            raise CheckpointError(
                f"{folder!r}: model_type {model_type!r} is not a supported {kind} encoder "
                "(vit, dinov2, clip, clip_vision_model)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = classes[model_type].from_pretrained(folder, from_pt=not from_flax)
        except (OSError, ValueError, ImportError) as err:
            raise CheckpointError(f"cannot load {kind} weights from {folder!r}: {err}") from None
        self.name = self.kind = kind  # name: the feature cache's file prefix
        self.model_type = model_type
        self.pre = _preprocessing(folder, kind)
        self.fingerprint = f"{kind}:{model_type}:{_folder_digest(folder)}:v1"

        def apply(params, pixels):  # pixels: [B, H, W, 3] -> NCHW, as transformers expects
            pixels = pixels.transpose(0, 3, 1, 2)
            if model_type == "clip":
                return model.get_image_features(pixel_values=pixels, params=params)
            out = model(pixel_values=pixels, params=params)
            if model_type == "clip_vision_model":
                return out.pooler_output
            return out.last_hidden_state[:, 0]

        self._forward = DataParallel(apply, model.params)

    def preprocess(self, img: Image.Image) -> np.ndarray:
        img = imageio.center_crop(imageio.resize_shorter(img.convert("RGB"), self.pre["resize"], self.pre["resample"]),
                                  self.pre["crop"])
        x = np.asarray(img, np.float32) / 255.0
        return (x - np.asarray(self.pre["mean"], np.float32)) / np.asarray(self.pre["std"],
                                                                            np.float32)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(batch)
