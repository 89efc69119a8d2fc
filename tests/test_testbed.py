"""The testbed's data recipe (on a package-shaped fixture, no npm) and its caption-dropout sampler."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from finextract_jax.testbed import data


def _fake_package(root, vendor_dir, entries):
    """A folder shaped like emoji-datasource-*: emoji.json + img/<vendor>/64/<image>."""
    os.makedirs(os.path.join(root, vendor_dir))
    for i, e in enumerate(entries):
        rgba = np.zeros((64, 64, 4), np.uint8)
        rgba[16:48, 16:48] = (200, 10 * i, 30, 255)  # an opaque square on a transparent ground
        Image.fromarray(rgba).save(os.path.join(root, vendor_dir, e["image"]))
    with open(os.path.join(root, "emoji.json"), "w") as f:
        json.dump(entries, f)
    with open(os.path.join(root, "package.json"), "w") as f:
        f.write("{}")


def _entry(code, name, subcategory, has=True):
    return {"unified": code, "name": name, "short_name": name.lower().replace(" ", "_"), "image": f"{code}.png",
            "subcategory": subcategory, "has_img_twitter": has, "has_img_google": has}


ENTRIES = [_entry("1F600", "GRINNING FACE", "face-smiling"), _entry("1F638", "GRINNING CAT FACE", "cat-face"),
           _entry("1F1EB-1F1F7", "France Flag", "country-flag"), _entry("1F34E", "RED APPLE", "food-fruit"),
           _entry("1F9FF", "NAZAR AMULET", "other-object", has=False)]


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("npm"))
    for vendor, (name, version, image_dir) in data.PACKAGES.items():
        _fake_package(os.path.join(root, f"{name}-{version}"), image_dir, ENTRIES)
    return root


def test_recipe_reads_names_splits_and_renders(fake_root, tmp_path):
    emoji = data.all_emoji(fake_root)
    assert [e.key for e in emoji] == sorted(e.key for e in emoji)
    assert {e.code for e in emoji} == {"1F600", "1F638", "1F1EB-1F1F7", "1F34E"}  # no image: left out
    by_key = {e.key: e for e in emoji}
    assert by_key["twemoji_1f600"].caption == "twemoji grinning face"
    assert data.split_of(by_key["noto_1f638"]) == "private"
    assert data.split_of(by_key["noto_1f1eb-1f1f7"]) == "excluded"
    sets = data.split_sets(emoji)
    assert "excluded" not in sets and "private" in sets
    assert sum(len(keys) for _, _, keys in sets.values()) == 6
    images = np.concatenate([im for im, _, _ in sets.values()])
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    image = data.render(by_key["twemoji_1f600"].path)
    assert tuple(image[0, 0]) == (255, 255, 255) and tuple(image[16, 16]) == (200, 0, 30)  # on white
    assert {"twemoji", "noto", "grinning", "sks"} <= set(data.caption_words(emoji))
    files = data.write_private_object_set(str(tmp_path / "private"), sets)
    assert files == ["twemoji_1f638.png"]
    with open(tmp_path / "private" / "metadata.csv") as f:
        assert data.PRIVATE_OBJECT_CAPTION in f.read()
    # The .npz that carries the recipe's output to a machine without npm reads back the same.
    saved, words = data.load_splits(str(tmp_path / "d.npz"), fake_root)
    loaded, words_again = data.load_splits(str(tmp_path / "d.npz"), root="/nonexistent")
    assert words == words_again and sorted(loaded) == sorted(saved)
    for split, (images, captions, keys) in saved.items():
        assert np.array_equal(loaded[split][0], images) and loaded[split][1:] == (captions, keys)


def test_splits_do_not_depend_on_order():
    e = data.Emoji("noto", "1F34E", "red apple", "food-fruit", "x.png")
    assert data.split_of(e) == data.split_of(data.Emoji("noto", "1F34E", "other words", "food-fruit", "y.png"))


def test_caption_dropout_sampler(tiny_pipe):
    from finextract_jax.finetune.train import FinetuneConfig
    from finextract_jax.testbed.base import DropoutTrainer, dropout_train_set

    n = 10
    images = np.random.default_rng(0).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
    train_set = dropout_train_set(images, [f"cap {i}" for i in range(n)], [f"k{i}" for i in range(n)])
    assert train_set.captions[n:] == [""] * n and np.array_equal(train_set.pixels[:n], train_set.pixels[n:])
    config = FinetuneConfig(method="dreambooth", steps=50, batch_size=5, learning_rate=1e-3)
    trainer = DropoutTrainer(tiny_pipe("pixel"), train_set, config, caption_dropout=0.3)
    rows = np.concatenate([trainer.batch_indices(s).ravel() for s in range(50)])
    assert trainer.total_steps == 50 and rows.max() < 2 * n
    images_seen = rows % n
    for epoch in range(25):  # every image once per epoch, whichever row it was drawn as
        assert sorted(images_seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert 0.2 < np.mean(rows >= n) < 0.4
    again = DropoutTrainer(tiny_pipe("pixel"), train_set, config, caption_dropout=0.3)
    assert np.array_equal(again.batch_indices(7), trainer.batch_indices(7))
    assert trainer.run_identity()["caption_dropout"] == 0.3
    from finextract_jax.errors import InputError
    with pytest.raises(InputError, match="caption_dropout"):
        DropoutTrainer(tiny_pipe("pixel"), train_set, config, caption_dropout=1.0)


def test_curve_points_and_plot():
    from finextract_jax.errors import InputError
    from finextract_jax.testbed import curve

    points = curve.parse_points("dreambooth:5e-4:50,200; lora:2e-3:100")
    assert points == [curve.Point("dreambooth", 50, 5e-4), curve.Point("dreambooth", 200, 5e-4),
                      curve.Point("lora", 100, 2e-3)]
    assert points[0].name == "dreambooth_s50_lr0.0005"
    for bad in ("", "dreambooth:5e-4", "full:1e-3:10", "lora:x:10"):
        with pytest.raises(InputError, match="--points"):
            curve.parse_points(bad)
    rows = [dict(finetune=f, finetune_steps=s, learning_rate=1e-3, method=m, AS=a)
            for f in ("dreambooth", "lora") for s in (50, 200) for m, a in (("finextract", 0.6), ("cfg", 0.3))]
    image = np.asarray(curve.plot(rows, "t"))
    assert image.shape == (340, 840, 3)
    assert (np.abs(image.astype(int) - curve.COLORS["finextract"]).sum(-1) == 0).sum() > 50  # its line is drawn


def test_caption_dependence_compares_the_same_noise(tiny_dir):
    from finextract_jax.testbed.samples import caption_dependence

    images = np.random.default_rng(1).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    same = caption_dependence(tiny_dir["pixel"], (images, ["a dog"] * 4, list("abcd")), count=4, timesteps=(500,),
                              draws=1)
    assert same["pairs"] == 4 and same["own"] == same["other"] != same["empty"]  # one caption: own is other
    mixed = caption_dependence(tiny_dir["pixel"], (images, ["a dog", "a cat", "red", "blue"], list("abcd")),
                               count=4, timesteps=(500,), draws=1)
    assert mixed["own"] != mixed["other"] and mixed["empty"] == same["empty"]
