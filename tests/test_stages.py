"""finextract_jax/stages.py: the cluster and evaluate steps from folders to their files, in process."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from finextract_jax import stages
from finextract_jax.errors import InputError
from finextract_jax.features import FeatureConfig


def _save(folder, name, pixels):
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(folder, name))


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """Two training images and 12 generated ones: 5 noisy copies of each, plus 2 unrelated ones."""
    root = tmp_path_factory.mktemp("stages")
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    for i, image in enumerate(train):
        _save(root / "train", f"t{i}.png", image)
    names = []
    for j in range(12):
        base = train[j % 2] if j < 10 else rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        noisy = np.clip(base.astype(int) + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
        names.append(f"{j:05d}.png")
        _save(root / "images", names[-1], noisy)
    return root


def test_cluster_then_evaluate_finds_both_training_images(copies, tmp_path):
    embedder = FeatureConfig(features="pixel", batch_size=4)
    record = stages.cluster_images(str(tmp_path / "c"), str(copies / "images"), 2, embedder.extractor(),
                                   embedder.batch_size, progress=False, select="topk", threshold=0.5)
    on_disk = json.loads((tmp_path / "c" / "clusters.json").read_text())
    assert on_disk == record
    assert sorted(len(c) for c in record["cliques"][:2]) == [5, 5]
    assert sorted(os.listdir(tmp_path / "c" / stages.EXTRACTED)) == sorted(record["extracted"])
    assert len(record["extracted"]) == 2
    result = stages.evaluate_to_workdir(str(tmp_path / "c" / stages.EXTRACTED), str(copies / "train"),
                                        str(tmp_path / "e"), embedder.extractor(), "pixel", 0.7, 4,
                                        progress=False)
    assert result["A_ESR"] == 1.0 and result["AS"] > 0.95
    assert {p["train"] for p in result["per_image"]} == {"t0.png", "t1.png"}
    assert (tmp_path / "e" / "pairs.png").is_file()


def test_cluster_refuses_files_it_did_not_write(copies, tmp_path):
    work = tmp_path / "c"
    stages.cluster_to_workdir(str(work), 2, features=np.eye(4, dtype=np.float32), threshold=0.5)
    os.makedirs(work / stages.EXTRACTED)
    (work / stages.EXTRACTED / "mine.png").write_bytes(b"not cluster's")
    with pytest.raises(InputError, match="holds files cluster did not write"):
        stages.check_cluster_output(str(work), str(copies / "images"))
    assert (work / stages.EXTRACTED / "mine.png").read_bytes() == b"not cluster's"


def test_evaluate_refuses_a_workdir_inside_an_input(copies):
    with pytest.raises(InputError, match="--workdir"):
        stages.check_evaluate_output(str(copies / "train" / "scores"), str(copies / "images"), str(copies / "train"))
    assert not (copies / "train" / "scores").exists()
