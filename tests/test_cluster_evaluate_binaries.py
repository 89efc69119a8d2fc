"""The cluster and evaluate binaries end to end (pixel features, skimage photos)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]


def run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _photo(name, size=96):
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((size, size))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Like extract output: noisy copies of 3 'training' photos plus unrelated noise images."""
    root = tmp_path_factory.mktemp("run")
    images, train = root / "images", root / "train"
    images.mkdir()
    train.mkdir()
    rng = np.random.default_rng(0)
    for name in PHOTOS[:3]:
        _photo(name).save(train / f"{name}.png")
    idx = 0
    for copies, name in zip([5, 4, 3, 1], PHOTOS):
        base = np.asarray(_photo(name), np.float64)
        for _ in range(copies):
            noisy = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(images / f"{idx:05d}.png")
            idx += 1
    for _ in range(12):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
            images / f"{idx:05d}.png")
        idx += 1
    return root


def test_cluster_and_evaluate_on_images(generated, tmp_path):
    out = tmp_path / "out"
    r = run("experiments.cluster", f"--workdir={out}", f"--images={generated / 'images'}",
            "--num_train=3", "--features=pixel", "--select=topk", "--threshold=0.5")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "clusters.json").read_text())
    assert set(res) >= {"threshold", "cliques", "representatives", "images", "timing"}
    assert set(res["timing"]) >= {"similarity_s", "cliques_s"}
    assert res["cliques"][:3] == [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert len(res["representatives"]) == 3
    assert res["images"][0] == "00000.png" and len(res["images"]) == 25
    extracted = sorted(os.listdir(out / "extracted"))
    assert extracted == sorted(res["images"][i] for i in res["representatives"])
    ev = tmp_path / "eval"
    r = run("experiments.evaluate", f"--extracted={out / 'extracted'}",
            f"--train_dir={generated / 'train'}", f"--workdir={ev}", "--features=pixel")
    assert r.returncode == 0, r.stderr
    m = json.loads((ev / "metrics.json").read_text())
    assert m["A_ESR"] == 1.0 and m["AS"] > 0.9 and m["features"] == "pixel"
    assert m["success_threshold"] == 0.7 and len(m["per_image"]) == 3
    assert {p["train"] for p in m["per_image"]} == {"astronaut.png", "coffee.png", "chelsea.png"}
    assert Image.open(ev / "pairs.png").size[0] > 100
    # Reference schedule on the same images, and a rerun of the same command is identical.
    r1 = run("experiments.cluster", f"--workdir={tmp_path / 's1'}",
             f"--images={generated / 'images'}", "--num_train=3", "--features=pixel",
             "--schedule=reference")
    r2 = run("experiments.cluster", f"--workdir={tmp_path / 's2'}",
             f"--images={generated / 'images'}", "--num_train=3", "--features=pixel",
             "--schedule=reference")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    a = json.loads((tmp_path / "s1" / "clusters.json").read_text())
    b = json.loads((tmp_path / "s2" / "clusters.json").read_text())
    assert a["cliques"] == b["cliques"] and a["threshold"] == b["threshold"]
    assert len(a["cliques"]) >= 3


def test_cluster_from_similarity_and_features_files(tmp_path):
    rng = np.random.default_rng(1)
    f = rng.normal(size=(40, 16)).astype(np.float32)
    f[:6] = f[0] + 0.05 * rng.normal(size=(6, 16))
    np.save(tmp_path / "f.npy", f)
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    np.save(tmp_path / "s.npy", u @ u.T)
    r = run("experiments.cluster", f"--workdir={tmp_path / 'a'}",
            f"--features_file={tmp_path / 'f.npy'}", "--num_train=4")
    assert r.returncode == 0, r.stderr
    r = run("experiments.cluster", f"--workdir={tmp_path / 'b'}",
            f"--similarity={tmp_path / 's.npy'}", "--num_train=4")
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "a" / "clusters.json").read_text())
    b = json.loads((tmp_path / "b" / "clusters.json").read_text())
    assert a["cliques"] == b["cliques"] and a["representatives"] == b["representatives"]
    assert "images" not in a and not (tmp_path / "a" / "extracted").exists()


@pytest.mark.parametrize("setup, args, message", [
    ("empty", ["--images={d}/empty", "--num_train=2", "--features=pixel"], "holds no images"),
    ("unreadable", ["--images={d}/bad", "--num_train=1", "--features=pixel"],
     "cannot read image"),
    ("few", ["--similarity={d}/s.npy", "--num_train=5"], "larger than the number of images"),
    ("nonsquare", ["--similarity={d}/s.npy", "--num_train=1"], "square"),
    ("asym", ["--similarity={d}/s.npy", "--num_train=1"], "not symmetric"),
    ("nan", ["--similarity={d}/s.npy", "--num_train=1"], "NaN"),
    ("none", ["--num_train=1"], "exactly one of"),
    ("sscd", ["--images={d}/ok", "--num_train=1"], "feature_weights"),
])
def test_cluster_bad_inputs(tmp_path, setup, args, message):
    d = tmp_path
    (d / "empty").mkdir()
    (d / "bad").mkdir()
    (d / "bad" / "00000.png").write_bytes(b"nope")
    (d / "ok").mkdir()
    _photo("coffee").save(d / "ok" / "00000.png")
    mats = {"few": np.eye(3), "nonsquare": np.zeros((3, 4)),
            "asym": np.array([[0, 0.9], [0.1, 0]]), "nan": np.full((2, 2), np.nan)}
    if setup in mats:
        np.save(d / "s.npy", mats[setup])
    out = d / "out"
    r = run("experiments.cluster", f"--workdir={out}", *[a.format(d=d) for a in args])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and message in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_evaluate_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "ok").mkdir()
    _photo("coffee").save(tmp_path / "ok" / "a.png")
    r = run("experiments.evaluate", f"--extracted={tmp_path / 'empty'}",
            f"--train_dir={tmp_path / 'ok'}", f"--workdir={tmp_path / 'w'}", "--features=pixel")
    assert r.returncode == 2 and "--extracted folder" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w" / "metrics.json").exists()
