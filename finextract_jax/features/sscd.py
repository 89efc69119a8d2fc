"""SSCD copy-detection descriptors in Flax, and the converter from the published TorchScript.

SSCD (Pizzi et al., CVPR 2022) = a classy-vision ResNet/ResNeXt trunk, GeM pooling (p = 3),
a linear projection and L2 normalisation. The reference uses ``sscd_disc_large`` (ResNeXt-101
32x4d, 1024-d); ``sscd_disc_mixup`` is ResNet-50 (512-d).

TorchScript parameter names mapped (classy_vision ResNeXt inside SSCD's ``Model``)::

    backbone.initial_block._module.0.weight              7x7/2 stem conv  -> stem/conv
    backbone.initial_block._module.1.{weight,bias,running_mean,running_var}  -> stem/bn
    backbone.blocks.{s}.block{s}-{j}.convolutional_block.0.weight   1x1 conv  -> conv1
    backbone.blocks.{s}.block{s}-{j}.convolutional_block.1.*         BN        -> bn1
    backbone.blocks.{s}.block{s}-{j}.convolutional_block.3.weight   3x3 conv (stride, groups)
    backbone.blocks.{s}.block{s}-{j}.convolutional_block.4.*         BN        -> bn2
    backbone.blocks.{s}.block{s}-{j}.convolutional_block.6.weight   1x1 conv  -> conv3
    backbone.blocks.{s}.block{s}-{j}.bn.*                            BN (before the add) -> bn3
    backbone.blocks.{s}.block{s}-{j}.downsample.0.weight / .1.*      projection shortcut
    embeddings.1.weight, embeddings.1.bias                           linear   -> embed
    (embeddings.0 is GeM; its p is a constant, 3, unless stored as embeddings.0.p)

Block: out = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)).
The architecture (widths, blocks per stage, cardinality, output dims) is read from the
shapes, so tiny test models built with the same names convert too.

Preprocessing: "reference" = Resize(256) (shorter side, bilinear), CenterCrop(224),
Normalize(0.5, 0.5) as FineXtract's Cluster.py; "sscd" = Resize([320, 320]) and ImageNet
mean/std, SSCD's recommended "skew_320" evaluation transform.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Optional

import numpy as np
from PIL import Image

from finextract_jax import imageio
from finextract_jax.errors import CheckpointError, InputError
from finextract_jax.models.data_parallel import DataParallel

BN_EPS = 1e-5
# Input transforms: the reference's (Resize 256, CenterCrop 224, mean/std 0.5) or SSCD's own (320x320, ImageNet).
SSCD_PREPROCESSINGS = ("reference", "sscd")


@dataclasses.dataclass(frozen=True)
class SSCDConfig:
    num_blocks: tuple = (3, 4, 23, 3)
    init_planes: int = 64
    reduction: int = 4
    base_width_and_cardinality: Optional[tuple] = (4, 32)
    dims: int = 1024
    pool_param: float = 3.0

    def stage_planes(self):
        """(bottleneck planes, groups, out planes) per stage."""
        out = []
        for idx in range(len(self.num_blocks)):
            out_planes = self.init_planes * 2 ** idx * self.reduction
            if self.base_width_and_cardinality is None:
                mid, groups = -(-out_planes // self.reduction), 1
            else:
                w, c = self.base_width_and_cardinality
                mid, groups = w * 2 ** idx * c, c
            out.append((mid, groups, out_planes))
        return out

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_blocks"] = list(self.num_blocks)
        d["base_width_and_cardinality"] = (list(self.base_width_and_cardinality)
                                           if self.base_width_and_cardinality else None)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SSCDConfig":
        bwc = d.get("base_width_and_cardinality")
        return cls(num_blocks=tuple(d["num_blocks"]), init_planes=d["init_planes"],
                   reduction=d["reduction"], base_width_and_cardinality=tuple(bwc) if bwc else None,
                   dims=d["dims"], pool_param=d["pool_param"])


SSCD_DISC_MIXUP = SSCDConfig(num_blocks=(3, 4, 6, 3), base_width_and_cardinality=None, dims=512)
SSCD_DISC_LARGE = SSCDConfig()


def _modules():
    import flax.linen as nn
    import jax.numpy as jnp

    class FrozenBN(nn.Module):
        """Inference BatchNorm with the running statistics stored as parameters."""
        features: int

        @nn.compact
        def __call__(self, x):
            scale = self.param("scale", nn.initializers.ones, (self.features,))
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            mean = self.param("mean", nn.initializers.zeros, (self.features,))
            var = self.param("var", nn.initializers.ones, (self.features,))
            return (x - mean) * (scale / jnp.sqrt(var + BN_EPS)) + bias

    class Bottleneck(nn.Module):
        mid: int
        groups: int
        out: int
        stride: int
        project: bool

        @nn.compact
        def __call__(self, x):
            y = nn.Conv(self.mid, (1, 1), use_bias=False, name="conv1")(x)
            y = nn.relu(FrozenBN(self.mid, name="bn1")(y))
            y = nn.Conv(self.mid, (3, 3), strides=(self.stride, self.stride),
                        padding=((1, 1), (1, 1)), feature_group_count=self.groups,
                        use_bias=False, name="conv2")(y)
            y = nn.relu(FrozenBN(self.mid, name="bn2")(y))
            y = nn.Conv(self.out, (1, 1), use_bias=False, name="conv3")(y)
            y = FrozenBN(self.out, name="bn3")(y)
            if self.project:
                x = nn.Conv(self.out, (1, 1), strides=(self.stride, self.stride),
                            use_bias=False, name="down_conv")(x)
                x = FrozenBN(self.out, name="down_bn")(x)
            return nn.relu(y + x)

    class SSCD(nn.Module):
        config: SSCDConfig

        @nn.compact
        def __call__(self, images):
            """images: [B, H, W, 3] normalised -> [B, dims] unit descriptors."""
            cfg = self.config
            x = nn.Conv(cfg.init_planes, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                        use_bias=False, name="stem_conv")(images)
            x = nn.relu(FrozenBN(cfg.init_planes, name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
            in_planes = cfg.init_planes
            for s, ((mid, groups, out), count) in enumerate(zip(cfg.stage_planes(),
                                                                 cfg.num_blocks)):
                for j in range(count):
                    stride = 1 if (s == 0 or j > 0) else 2
                    x = Bottleneck(mid, groups, out, stride,
                                   project=(j == 0 and (stride != 1 or in_planes != out)),
                                   name=f"stage{s}_block{j}")(x)
                    in_planes = out
            p = cfg.pool_param
            x = jnp.mean(jnp.maximum(x, 1e-6) ** p, axis=(1, 2)) ** (1.0 / p)
            x = nn.Dense(cfg.dims, name="embed")(x)
            return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    return SSCD


def sscd_module(config: SSCDConfig):
    return _modules()(config)


# --------------------------------------------------------------------------------------------
# TorchScript -> Flax.

_BLOCK_RE = re.compile(r"^backbone\.blocks\.(\d+)\.block(\d+)-(\d+)\.")


def _conv(w):
    return {"kernel": np.transpose(w, (2, 3, 1, 0))}  # OIHW -> HWIO


def config_from_state_dict(sd: dict) -> SSCDConfig:
    """Read the architecture off the parameter names and shapes."""
    for key in ("backbone.initial_block._module.0.weight", "embeddings.1.weight"):
        if key not in sd:
            raise CheckpointError(
                f"not an SSCD TorchScript model: parameter {key!r} is missing (expected the "
                "published sscd_disc_mixup / sscd_disc_large files)")
    counts: dict = {}
    for key in sd:
        m = _BLOCK_RE.match(key)
        if m:
            s, j = int(m.group(1)), int(m.group(3))
            counts[s] = max(counts.get(s, 0), j + 1)
    if not counts or sorted(counts) != list(range(len(counts))):
        raise CheckpointError("SSCD TorchScript: cannot find backbone.blocks.* residual blocks")
    init_planes = sd["backbone.initial_block._module.0.weight"].shape[0]
    first = "backbone.blocks.0.block0-0.convolutional_block."
    mid0 = sd[first + "0.weight"].shape[0]
    out0 = sd[first + "6.weight"].shape[0]
    reduction = out0 // init_planes
    groups = mid0 // sd[first + "3.weight"].shape[1]
    bwc = None if groups == 1 else (mid0 // groups, groups)
    if bwc is None and mid0 != -(-out0 // reduction):
        raise CheckpointError("SSCD TorchScript: unexpected bottleneck width")
    dims = sd["embeddings.1.weight"].shape[0]
    p = float(np.asarray(sd["embeddings.0.p"]).reshape(-1)[0]) if "embeddings.0.p" in sd else 3.0
    return SSCDConfig(num_blocks=tuple(counts[s] for s in range(len(counts))),
                      init_planes=int(init_planes), reduction=int(reduction),
                      base_width_and_cardinality=bwc, dims=int(dims), pool_param=p)


def params_from_state_dict(sd: dict, config: SSCDConfig) -> dict:
    """Map the TorchScript state dict (numpy arrays) to the Flax parameter tree."""
    used = set()

    def get(key):
        if key not in sd:
            raise CheckpointError(f"SSCD TorchScript: parameter {key!r} is missing")
        used.add(key)
        return np.asarray(sd[key], np.float32)

    def bn(prefix):
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias"),
                "mean": get(prefix + ".running_mean"), "var": get(prefix + ".running_var")}

    params = {"stem_conv": _conv(get("backbone.initial_block._module.0.weight")),
              "stem_bn": bn("backbone.initial_block._module.1")}
    in_planes = config.init_planes
    for s, ((mid, groups, out), count) in enumerate(zip(config.stage_planes(),
                                                         config.num_blocks)):
        for j in range(count):
            pre = f"backbone.blocks.{s}.block{s}-{j}."
            block = {"conv1": _conv(get(pre + "convolutional_block.0.weight")),
                     "bn1": bn(pre + "convolutional_block.1"),
                     "conv2": _conv(get(pre + "convolutional_block.3.weight")),
                     "bn2": bn(pre + "convolutional_block.4"),
                     "conv3": _conv(get(pre + "convolutional_block.6.weight")),
                     "bn3": bn(pre + "bn")}
            stride = 1 if (s == 0 or j > 0) else 2
            if j == 0 and (stride != 1 or in_planes != out):
                block["down_conv"] = _conv(get(pre + "downsample.0.weight"))
                block["down_bn"] = bn(pre + "downsample.1")
            params[f"stage{s}_block{j}"] = block
            in_planes = out
    params["embed"] = {"kernel": get("embeddings.1.weight").T, "bias": get("embeddings.1.bias")}
    leftover = [k for k in sd if k not in used and not k.endswith("num_batches_tracked")
                and k != "embeddings.0.p"]
    if leftover:
        raise CheckpointError(
            f"SSCD TorchScript: {len(leftover)} unexpected parameters, e.g. {leftover[:3]}; "
            "this is not a supported SSCD architecture")
    return params


def _load_torchscript_state_dict(path: str) -> dict:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a test dependency
        raise CheckpointError(
            "converting SSCD TorchScript weights needs PyTorch once: pip install torch "
            "(the converted Flax weights are cached afterwards)") from None
    try:
        module = torch.jit.load(path, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - torch raises many types here
        raise CheckpointError(f"cannot load TorchScript file {path!r}: {err}") from None
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def default_cache_dir() -> str:
    return os.environ.get("FINEXTRACT_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "finextract_jax"))


def load_sscd(path: str, cache_dir: Optional[str] = None):
    """(config, params, digest) from a TorchScript file, via an orbax cache keyed by its hash.

    ``path`` may also be a folder written by this function (``config.json`` + ``params/``).
    """
    import orbax.checkpoint as ocp

    if not path:
        raise InputError("--features=sscd needs --feature_weights=PATH to an SSCD TorchScript "
                         "file (sscd_disc_large.torchscript.pt); or use --features=pixel")
    path = os.path.abspath(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        folder, digest = path, os.path.basename(path.rstrip("/"))
    elif os.path.isfile(path):
        digest = _file_digest(path)
        folder = os.path.join(cache_dir or default_cache_dir(), "sscd", digest)
    else:
        raise InputError(f"--feature_weights {path!r} does not exist")
    cfg_file = os.path.join(folder, "config.json")
    if os.path.exists(cfg_file) and os.path.isdir(os.path.join(folder, "params")):
        with open(cfg_file) as f:
            config = SSCDConfig.from_json(json.load(f))
        params = ocp.PyTreeCheckpointer().restore(os.path.join(folder, "params"))
        return config, params, digest
    sd = _load_torchscript_state_dict(path)
    config = config_from_state_dict(sd)
    params = params_from_state_dict(sd, config)
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"params.tmp{os.getpid()}")
        ocp.PyTreeCheckpointer().save(tmp, params, force=True)
        os.replace(tmp, os.path.join(folder, "params"))
        with open(cfg_file + ".tmp", "w") as f:
            json.dump(config.to_json(), f)
        os.replace(cfg_file + ".tmp", cfg_file)
    except OSError as err:  # a read-only cache is not fatal
        from absl import logging
        logging.warning("could not cache converted SSCD weights in %s: %s", folder, err)
    return config, params, digest


# --------------------------------------------------------------------------------------------
# Extractor.

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def preprocess(img: Image.Image, mode: str = "reference") -> np.ndarray:
    """PIL image -> [H, W, 3] float32, as the reference (or SSCD's own recommendation)."""
    img = img.convert("RGB")
    if mode == "reference":
        x = np.asarray(imageio.center_crop(imageio.resize_shorter(img, 256), 224), np.float32) / 255.0
        return (x - 0.5) / 0.5
    if mode == "sscd":
        x = np.asarray(img.resize((320, 320), Image.BILINEAR), np.float32) / 255.0
        return (x - IMAGENET_MEAN) / IMAGENET_STD
    raise InputError(f"SSCD preprocessing must be 'reference' or 'sscd', got {mode!r}")


class SSCDFeatures:
    name = "sscd"

    def __init__(self, weights: str, preprocessing: str = "reference",
                 cache_dir: Optional[str] = None):
        if preprocessing not in SSCD_PREPROCESSINGS:
            raise InputError(f"SSCD preprocessing must be one of {', '.join(SSCD_PREPROCESSINGS)}, got "
                             f"{preprocessing!r}")
        self.config, params, digest = load_sscd(weights, cache_dir)
        self.preprocessing = preprocessing
        self.fingerprint = f"sscd:{digest}:{preprocessing}:v1"
        module = sscd_module(self.config)
        self._forward = DataParallel(lambda p, x: module.apply({"params": p}, x), params)

    def preprocess(self, img: Image.Image) -> np.ndarray:
        return preprocess(img, self.preprocessing)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(batch)
