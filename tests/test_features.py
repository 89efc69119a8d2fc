"""Feature extractors: SSCD TorchScript conversion parity, preprocessing, cache, encoders."""
import json
import os
import shutil

import numpy as np
import pytest
import skimage.data
from PIL import Image

from finextract_jax import features as F
from finextract_jax import fileio, imageio
from finextract_jax.errors import CheckpointError, InputError
from finextract_jax.features import sscd as S

import torch  # noqa: E402  (the test extra installs it; CI never skips these)
nn = torch.nn


# ---------------------------------------------------------------------------------------------
# A torch SSCD with the TorchScript parameter names (classy-vision ResNeXt trunk, GeM, linear,
# L2 norm), at any width: the real architectures are the default configs.


class _Stem(nn.Module):
    def __init__(self, planes):
        super().__init__()
        self._module = nn.Sequential(
            nn.Conv2d(3, planes, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))

    def forward(self, x):
        return self._module(x)


class _Layer(nn.Module):
    def __init__(self, cin, mid, groups, out, stride):
        super().__init__()
        self.convolutional_block = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=groups, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, out, 1, bias=False))
        self.bn = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn(self.convolutional_block(x)) + residual)


class _Trunk(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        from collections import OrderedDict
        self.initial_block = _Stem(cfg.init_planes)
        stages, cin = [], cfg.init_planes
        for s, ((mid, groups, out), count) in enumerate(zip(cfg.stage_planes(), cfg.num_blocks)):
            layers = OrderedDict()
            for j in range(count):
                layers[f"block{s}-{j}"] = _Layer(cin if j == 0 else out, mid, groups, out,
                                                  (1 if s == 0 else 2) if j == 0 else 1)
            cin = out
            stages.append(nn.Sequential(layers))
        self.blocks = nn.Sequential(*stages)

    def forward(self, x):
        return self.blocks(self.initial_block(x))


class _GeM(nn.Module):
    def forward(self, x):
        return x.clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)


class _L2(nn.Module):
    def forward(self, x):
        return nn.functional.normalize(x)


class TorchSSCD(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.backbone = _Trunk(cfg)
        self.embeddings = nn.Sequential(_GeM(), nn.Linear(cfg.stage_planes()[-1][2], cfg.dims),
                                        _L2())

    def forward(self, x):
        return self.embeddings(self.backbone(x))


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype != torch.float32:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("weight") and t.ndim == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / max(1, t[0].numel())) ** 0.5)
    return model.eval()


TINY_RESNET = S.SSCDConfig(num_blocks=(1, 2, 1, 1), init_planes=8,
                           base_width_and_cardinality=None, dims=16)
TINY_RESNEXT = S.SSCDConfig(num_blocks=(2, 1, 1, 1), init_planes=8,
                            base_width_and_cardinality=(2, 4), dims=24)


def test_real_architectures_have_the_published_names():
    for cfg, n_params in [(S.SSCD_DISC_MIXUP, 267), (S.SSCD_DISC_LARGE, 522)]:
        sd = TorchSSCD(cfg).state_dict()
        names = [k for k in sd if not k.endswith("num_batches_tracked")]
        assert "backbone.blocks.2.block2-5.convolutional_block.3.weight" in names
        assert S.config_from_state_dict({k: v.numpy() for k, v in sd.items()}) == cfg
        assert len(names) == n_params
    conv = TorchSSCD(S.SSCD_DISC_LARGE).state_dict()[
        "backbone.blocks.3.block3-0.convolutional_block.3.weight"]
    assert tuple(conv.shape) == (1024, 32, 3, 3)  # 32 groups of 4*8 channels


@pytest.fixture(scope="module")
def torchscript_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sscd")
    out = {}
    for name, cfg, seed in [("resnet", TINY_RESNET, 0), ("resnext", TINY_RESNEXT, 1)]:
        model = _randomise(TorchSSCD(cfg), seed)
        scripted = torch.jit.script(model)
        path = str(folder / f"{name}.torchscript.pt")
        scripted.save(path)
        out[name] = (path, model, cfg)
    return out


@pytest.mark.parametrize("name", ["resnet", "resnext"])
def test_sscd_conversion_parity(name, torchscript_files, tmp_path, monkeypatch):
    monkeypatch.setenv("FINEXTRACT_CACHE", str(tmp_path / "cache"))
    path, model, cfg = torchscript_files[name]
    ext = S.SSCDFeatures(path)
    assert ext.config == cfg
    images = [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee())]
    batch = np.stack([ext.preprocess(im) for im in images])
    assert batch.shape == (2, 224, 224, 3)
    got = ext.embed(batch)
    with torch.no_grad():
        want = model(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())).numpy()
    assert got.shape == (2, cfg.dims)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Second load comes from the orbax cache, without torch.
    monkeypatch.setattr(S, "_load_torchscript_state_dict",
                        lambda p: (_ for _ in ()).throw(AssertionError("not cached")))
    again = S.SSCDFeatures(path)
    np.testing.assert_allclose(again.embed(batch), got, atol=1e-6)


def test_sscd_bad_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("FINEXTRACT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="feature_weights"):
        S.SSCDFeatures(None)
    with pytest.raises(InputError, match="does not exist"):
        S.SSCDFeatures(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="TorchScript"):
        S.SSCDFeatures(str(junk))
    other = torch.jit.script(nn.Linear(3, 2))
    other.save(str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="not an SSCD"):
        S.SSCDFeatures(str(tmp_path / "other.pt"))


def test_reference_preprocessing_matches_torchvision_recipe():
    img = Image.fromarray(skimage.data.chelsea())  # 451 x 300
    x = S.preprocess(img, "reference")
    assert x.shape == (224, 224, 3)
    resized = img.resize((int(256 * 451 / 300), 256), Image.BILINEAR)
    left, top = int(round((resized.width - 224) / 2)), int(round((256 - 224) / 2))
    want = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32) / 127.5 - 1
    np.testing.assert_allclose(x, want, atol=1e-6)
    assert S.preprocess(img, "sscd").shape == (320, 320, 3)
    with pytest.raises(InputError):
        S.preprocess(img, "other")


def _write_images(folder, arrays):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(os.path.join(folder, f"{i:05d}.png"))


def test_pixel_features_and_cache(tmp_path):
    folder = str(tmp_path / "imgs")
    _write_images(folder, [skimage.data.astronaut(), skimage.data.coffee(),
                           skimage.data.chelsea()])
    (tmp_path / "imgs" / "metadata.csv").write_text("file_name,caption\n")
    ext = F.get_extractor("pixel")
    F.compute_features(folder, ext, batch_size=2)  # a user's folder: an input, nothing written into it
    assert not os.path.exists(os.path.join(folder, F.CACHE_DIRNAME))
    (tmp_path / "imgs" / fileio.MARKER).touch()  # a folder of ours (as extract's images/ under run.json)
    names, feats = F.compute_features(folder, ext, batch_size=2)
    assert names == ["00000.png", "00001.png", "00002.png"]
    assert feats.shape == (3, 32 * 32 * 3 + 1)
    cache_files = os.listdir(os.path.join(folder, F.CACHE_DIRNAME))
    assert len(cache_files) == 1
    calls = []
    real_embed = ext.embed
    ext.embed = lambda b: calls.append(len(b)) or real_embed(b)
    names2, feats2 = F.compute_features(folder, ext, batch_size=2)
    assert calls == [] and np.array_equal(feats, feats2)
    # Changing one image recomputes that image only.
    Image.fromarray(skimage.data.rocket()).save(os.path.join(folder, "00001.png"))
    _, feats3 = F.compute_features(folder, ext, batch_size=2)
    assert calls == [1]
    assert np.array_equal(feats3[[0, 2]], feats[[0, 2]]) and not np.allclose(feats3[1], feats[1])
    # Another extractor (different fingerprint) gets its own cache file.
    F.compute_features(folder, F.get_extractor("pixel", pixel_size=16))
    assert len(os.listdir(os.path.join(folder, F.CACHE_DIRNAME))) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        imageio.list_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        imageio.list_images(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "00000.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot read image"):
        F.compute_features(str(tmp_path / "bad"), F.get_extractor("pixel"))
    with pytest.raises(InputError, match="must be one of"):
        F.get_extractor("resnet")


def test_vision_encoders_from_local_folders(tmp_path):
    """Tiny random DINO (ViT, Flax weights) and CLIP (PyTorch weights) folders."""
    import transformers

    from finextract_jax.models.vision import VisionEncoder

    vit_cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, image_size=32, patch_size=16)
    vit = transformers.FlaxViTModel(vit_cfg, seed=0)
    vit.save_pretrained(str(tmp_path / "dino"))
    with open(tmp_path / "dino" / "preprocessor_config.json", "w") as f:
        json.dump({"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32},
                   "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, f)
    clip_cfg = transformers.CLIPVisionConfig(hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32,
                                             image_size=32, patch_size=16, projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPVisionModel(clip_cfg).save_pretrained(str(tmp_path / "clip"))
    with open(tmp_path / "clip" / "preprocessor_config.json", "w") as f:
        json.dump({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}, f)
    img = Image.fromarray(skimage.data.astronaut())
    dino = VisionEncoder(str(tmp_path / "dino"), "dino")
    x = dino.preprocess(img)[None]
    assert x.shape == (1, 32, 32, 3)
    out = dino.embed(x)
    want = vit(pixel_values=x.transpose(0, 3, 1, 2)).last_hidden_state[:, 0]
    np.testing.assert_allclose(out, np.asarray(want), atol=1e-5)
    clip = F.get_extractor("clip", str(tmp_path / "clip"))
    y = clip.preprocess(img)[None]
    got = clip.embed(y)
    with torch.no_grad():
        pt = transformers.CLIPVisionModel.from_pretrained(str(tmp_path / "clip"))
        ref = pt(pixel_values=torch.from_numpy(y.transpose(0, 3, 1, 2).copy())).pooler_output
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)
    folder = tmp_path / "images"  # through compute_features and its cache, as cluster/evaluate use it
    folder.mkdir()
    (folder / fileio.MARKER).touch()
    img.resize((40, 40)).save(folder / "a.png")
    names, feats = F.compute_features(str(folder), clip, batch_size=1)
    assert names == ["a.png"] and feats.shape == (1, got.shape[1])
    assert any(n.startswith("clip-") for n in os.listdir(folder / F.CACHE_DIRNAME))
    with pytest.raises(InputError, match="feature_weights"):
        F.get_extractor("dino", None)
    with pytest.raises(InputError, match="config.json"):
        F.get_extractor("dino", str(tmp_path))


_SHARDED_FEATURES = """
import sys, jax, numpy as np
from finextract_jax import features as F
assert jax.local_device_count() == 4
dino = F.get_extractor("dino", sys.argv[1])
assert dino._forward.mesh.size == 4
for batch_size in (4, 8, 3):  # split over the 4 devices; 3 runs replicated
    np.save(f"{sys.argv[3]}/b{batch_size}.npy", F.compute_features(sys.argv[2], dino, batch_size, cache=False)[1])
"""


def test_features_split_over_local_devices_equal_one_device(tmp_path):
    """Embedders run their batches over every local device (models/data_parallel.py); the features
    do not depend on the device count or the batch size."""
    import subprocess
    import sys

    import transformers

    vit_cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, image_size=32, patch_size=16)
    transformers.FlaxViTModel(vit_cfg, seed=0).save_pretrained(str(tmp_path / "dino"))
    with open(tmp_path / "dino" / "preprocessor_config.json", "w") as f:
        json.dump({"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}}, f)
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(10):
        _save_png(images / f"{i:05d}.png", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    subprocess.run([sys.executable, "-c", _SHARDED_FEATURES, str(tmp_path / "dino"), str(images), str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=600)
    one_device = F.compute_features(str(images), F.get_extractor("dino", str(tmp_path / "dino")), 5, cache=False)[1]
    for batch_size in (4, 8, 3):
        np.testing.assert_allclose(np.load(tmp_path / f"b{batch_size}.npy"), one_device, rtol=0, atol=1e-6)


def _save_png(path, pixels):
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(pixels).save(path)
