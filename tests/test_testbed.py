"""The testbed's data recipe (on a package-shaped fixture, no npm) and its caption-dropout sampler."""
import json
import os
import shutil

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


def test_base_sizes(tmp_path):
    """--size: each preset writes a UNet with its config (the larger ones grow the 16x16 and 8x8 levels, keep
    attention at 8x8 only); an unknown size is refused by name."""
    from finextract_jax.errors import InputError
    from finextract_jax.testbed import base

    out = base.make_init(str(tmp_path / "medium"), ["cat face"], size="medium")
    with open(os.path.join(out, "unet", "config.json")) as f:
        unet = json.load(f)
    assert {k: unet[k] for k in base.TESTBED_UNETS["medium"]} == base.TESTBED_UNETS["medium"]
    for preset in base.TESTBED_UNETS.values():
        assert preset["down_block_types"] == base.TESTBED_UNET["down_block_types"]
    with pytest.raises(InputError, match="huge"):
        base.make_init(str(tmp_path / "huge"), [], size="huge")
    assert not os.path.exists(tmp_path / "huge")


def test_base_training_continues_from_a_trained_pipeline(fake_root, tiny_dir, tmp_path):
    """--init: a new run starts from given weights (a committed base or an orphaned snapshot), builds
    no random init, exports a loadable model, and records the pipeline it started from."""
    from experiments.testbed_base import train
    from finextract_jax.models.pipeline import load_pipeline

    npz = str(tmp_path / "data.npz")
    data.load_splits(npz, root=fake_root)
    workdir = str(tmp_path / "work")
    out = train(workdir, npz, tiny_dir["pixel"], str(tmp_path / "base"), steps=2, batch_size=2, learning_rate=1e-3,
                ema_decay=0.9, caption_dropout=0.1, checkpoint_every=1, export_every=0, seed=1)
    assert not os.path.exists(os.path.join(workdir, "init"))
    with open(os.path.join(workdir, "checkpoints", "run.json")) as f:
        assert json.load(f)["pretrained"] == os.path.abspath(tiny_dir["pixel"])
    start, trained = load_pipeline(tiny_dir["pixel"]), load_pipeline(out)
    moved = [not np.allclose(a, b) for a, b in zip(jax_leaves(start.unet.params), jax_leaves(trained.unet.params))]
    assert any(moved)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_curve_points_seeds_and_sweep_parse():
    from finextract_jax.errors import InputError
    from finextract_jax.testbed import curve

    points = curve.parse_points("dreambooth:5e-4:50,200; lora:2e-3:100;dreambooth:5e-4:200:cutout;lora:2e-3:100")
    assert points == [curve.Point("dreambooth", 50, 5e-4), curve.Point("dreambooth", 200, 5e-4),
                      curve.Point("lora", 100, 2e-3), curve.Point("dreambooth", 200, 5e-4, "cutout")]
    assert points[0].name == "dreambooth_s50_lr0.0005" and points[3].name == "dreambooth_s200_lr0.0005_cutout"
    for bad in ("", "dreambooth:5e-4", "full:1e-3:10", "lora:x:10", "lora:1e-3:10:blur", "lora:1e-3:0",
                "lora:1e-3:10:cutout:x", "lora:-1:10"):
        with pytest.raises(InputError, match="--points"):
            curve.parse_points(bad)
    assert curve.parse_points(" ; ", allow_empty=True) == []  # the curve's --points='': only the sweep runs
    assert curve.parse_point("lora:1e-3:10:randaugment") == curve.Point("lora", 10, 1e-3, "randaugment")
    with pytest.raises(InputError, match="--point must name one point"):
        curve.parse_point("lora:1e-3:10,20")
    assert curve.parse_sweep("3:-0.02, 1:0,3:-0.02") == [(3.0, -0.02), (1.0, 0.0)] and curve.parse_sweep("") == []
    assert curve.parse_sweep("fit:-0.002,fit:-0.002") == [("fit", -0.002)]
    for bad in ("3", "3:x", "1:2:3", "fitted:0", "fit"):
        with pytest.raises(InputError, match="--sweep"):
            curve.parse_sweep(bad)
    assert curve.parse_seeds("0, 2,0") == [0, 2]
    for bad in ("", "a", "-1"):
        with pytest.raises(InputError, match="--seeds"):
            curve.parse_seeds(bad)


def _rows(values, **fields):
    base = dict(set="object", finetune="dreambooth", finetune_steps=50, learning_rate=5e-4, augment="none")
    return [dict(base, **fields, seed=seed, method=m, AS=a, A_ESR=e) for seed, (m, a, e) in enumerate(values)]


def test_curve_aggregates_seeds_and_plots():
    from finextract_jax.testbed import curve

    rows = (_rows([("finextract", 0.2, 0.0), ("finextract", 0.5, 0.5), ("finextract", 0.8, 1.0)])
            + _rows([("cfg", 0.3, 0.25)]) + _rows([("finextract", 0.4, 0.0)], augment="cutout")
            + _rows([("finextract", 0.7, 0.5), ("finextract", 0.1, 0.0)], finetune_steps=200))
    summary = curve.aggregate(rows, curve.POINT_KEYS)
    assert [(r["finetune_steps"], r["augment"], r["method"], r["n"]) for r in summary] == [
        (50, "none", "finextract", 3), (50, "none", "cfg", 1), (50, "cutout", "finextract", 1),
        (200, "none", "finextract", 2)]
    first, last = summary[0], summary[-1]
    assert first["AS_mean"] == pytest.approx(0.5) and (first["AS_min"], first["AS_max"]) == (0.2, 0.8)
    assert first["A_ESR_mean"] == pytest.approx(0.5) and (first["A_ESR_min"], first["A_ESR_max"]) == (0.0, 1.0)
    assert last["AS_mean"] == pytest.approx(0.4) and (last["AS_min"], last["AS_max"]) == (0.1, 0.7)
    table = curve.markdown(summary, curve.POINT_KEYS, "t")
    assert "| object | dreambooth | 50 | 0.0005 | none | finextract | 0.500 [0.200, 0.800] | 0.50 [0.00, 1.00] | 3 |" \
        in table
    dropped = curve.aggregate([dict(r, error_drop=0.1 * (1 + r["seed"])) for r in rows[:3]], curve.POINT_KEYS)
    assert dropped[0]["error_drop"] == pytest.approx(0.2)
    assert "| none | 0.200 | finextract | 0.500 [0.200, 0.800] |" in curve.markdown(dropped, curve.POINT_KEYS, "t")
    sweep = curve.aggregate([dict(r, guidance_scale=3.0, correction=-0.02) for r in rows[:3]], curve.SWEEP_KEYS)
    assert len(sweep) == 1 and sweep[0]["correction"] == -0.02 and sweep[0]["n"] == 3
    lora = [dict(r, finetune="lora", set="style") for r in rows]
    image = np.asarray(curve.plot(summary + curve.aggregate(lora, curve.POINT_KEYS), "t"))
    assert image.shape == (340, 840, 3)  # one panel per (set, fine-tune)
    assert (np.abs(image.astype(int) - curve.COLORS["finextract"]).sum(-1) == 0).sum() > 50  # its line is drawn
    negative = np.asarray(curve.plot(curve.aggregate([dict(r, AS=r["AS"] - 1.2) for r in rows], curve.POINT_KEYS), "t"))
    drawn = np.nonzero((np.abs(negative.astype(int) - curve.COLORS["finextract"]).sum(-1) == 0).any(axis=1))[0]
    assert drawn.size and drawn.max() <= 300 - 30  # AS below 0 stays inside the panel, above the axis labels
    floored = np.asarray(curve.plot(summary, "t", floors={"object": 0.6}))
    assert (np.abs(floored.astype(int) - curve.FLOOR_COLOR).sum(-1) == 0).sum() > 100  # the floor's line


def test_sweep_reuses_the_points_finetune(tiny_dir, tmp_path, monkeypatch):
    """The sweep's FineXtract runs on the point's finished fine-tune: nothing of it is trained or
    written again. The point's fine-tune is stood in for by the base itself (a DreamBooth model of
    zero steps) with the done record reproduce writes for it, so that only one extraction runs.
    w = 'fit' needs that fine-tune finished and samples at its 1/λ."""
    from finextract_jax import reproduce
    from finextract_jax.testbed.data import write_folder
    from finextract_jax.errors import InputError
    from finextract_jax.testbed import curve

    rng = np.random.default_rng(0)
    images = {f"im{i}": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for i in range(2)}
    write_folder(str(tmp_path / "private"), images, {k: "sks cat" for k in images})
    dataset = reproduce.Dataset("object", str(tmp_path / "private"), "sks cat")
    point, run, work = curve.Point("dreambooth", 2, 1e-4), dict(num_images=2, steps=2, features="pixel"), str(tmp_path)
    settings = curve.point_settings(point, 1, "object", dataset, tiny_dir["pixel"], work, run)
    assert settings.match_correction  # the curve's reference k follows the base's schedule; the sweep's k is as given
    stage = reproduce.plan(settings)[0]
    assert stage.name == "finetune" and stage.record is None
    with pytest.raises(InputError, match="fine-tune has not finished"):
        curve.run_sweep(point, 1, curve.FIT, 0.0, "object", dataset, tiny_dir["pixel"], work, run)
    shutil.copytree(tiny_dir["pixel"], reproduce.model_path(settings, dataset, "dreambooth"))
    reproduce.mark_done(stage.folder, "finetune", stage.settings, 1.0)
    before = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
              for d, _, files in os.walk(stage.folder) for f in files}
    sweep = curve.run_sweep(point, 1, 2.0, 0.0, "object", dataset, tiny_dir["pixel"], work, run)
    after = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
             for d, _, files in os.walk(stage.folder) for f in files}
    assert after == before  # the fine-tune untouched, nothing written into the point's folder
    assert [(r["method"], r["guidance_scale"], r["correction"], r["seed"], r["set"]) for r in sweep] == [
        ("finextract", 2.0, 0.0, 1, "object")]
    folder = os.path.join(work, "object", "sweep", point.name, "w2_k0", "seed1", "object", "dreambooth")
    assert os.listdir(folder) == ["finextract"]  # no fine-tune of its own
    with open(os.path.join(folder, "finextract", "extract.done.json")) as f:
        assert json.load(f)["settings"]["guidance_scale"] == 2.0
    with open(os.path.join(folder, "finextract", "run.json")) as f:
        assert reproduce.model_path(settings, dataset, "dreambooth") in f.read()
    guided = curve.run_sweep(point, 1, 2.0, 0.0, "object", dataset, tiny_dir["pixel"], work, run,
                             guidance_max_timestep=500)
    assert guided[0]["guidance_max_timestep"] == 500
    with open(os.path.join(work, "object", "sweep", point.name, "w2_k0_t500", "seed1", "object", "dreambooth",
                           "finextract", "extract.done.json")) as f:
        assert json.load(f)["settings"]["guidance_max_timestep"] == 500

    from finextract_jax.guidance_fit import GuidanceFit

    fitted = []
    monkeypatch.setattr(curve, "fit_scale", lambda pre, model, ds: fitted.append(model) or GuidanceFit(0.4, {}, 1.0, 2.5))
    sweep = curve.run_sweep(point, 1, curve.FIT, 0.0, "object", dataset, tiny_dir["pixel"], work, run)
    assert fitted == [reproduce.model_path(settings, dataset, "dreambooth")]  # fitted to the point's own fine-tune
    assert [(r["guidance_scale"], r["fitted_w"]) for r in sweep] == [("fit", 2.5)]
    with open(os.path.join(work, "object", "sweep", point.name, "wfit_k0", "seed1", "object", "dreambooth",
                           "finextract", "extract.done.json")) as f:
        assert json.load(f)["settings"]["guidance_scale"] == 2.5
    fixed = {k: v for k, v in sweep[0].items() if k != "fitted_w"} | {"guidance_scale": 2.0}
    table = curve.markdown(curve.aggregate(sweep + [fixed], curve.SWEEP_KEYS), curve.SWEEP_KEYS, "t")
    assert "| fitted w | method |" in table and "| fit | 0 | 2.500 | finextract |" in table
    assert "| 2 | 0 |  | finextract |" in table  # a fixed w has no fitted one


def test_error_drop_is_zero_for_the_base_and_grows_with_fine_tuning(tiny_dir, tmp_path):
    """error_drop reads how far a fine-tune moved toward the private images: the base against
    itself has not moved (exactly 0); a few DreamBooth steps at a high rate on those images cut
    their denoising error under the caption, more with more steps."""
    from finextract_jax import reproduce
    from finextract_jax.testbed.data import write_folder
    from finextract_jax.finetune import FinetuneConfig, finetune
    from finextract_jax.testbed import curve

    rng = np.random.default_rng(0)
    images = {f"im{i}": np.kron(rng.integers(0, 255, (4, 4, 3)), np.ones((4, 4, 1))).astype(np.uint8) for i in range(3)}
    write_folder(str(tmp_path / "private"), images, {k: "sks cat" for k in images})
    dataset = reproduce.Dataset("object", str(tmp_path / "private"), "sks cat")
    assert curve.error_drop(tiny_dir["pixel"], tiny_dir["pixel"], dataset) == 0.0
    drops = []
    for steps in (4, 24):
        out = finetune(tiny_dir["pixel"], dataset.train_dir, str(tmp_path / f"db{steps}"),
                       FinetuneConfig(method="dreambooth", steps=steps, learning_rate=1e-3, batch_size=3),
                       caption=dataset.caption, checkpoint_every=0, progress=False)
        drops.append(curve.error_drop(tiny_dir["pixel"], out, dataset))
    assert 0.0 < drops[0] < drops[1] < 1.0, drops


def test_copy_floor_scores_the_base_training_images(tmp_path):
    """A private image that is one of the base's training images is matched exactly; the floor is
    what copying the base's training data scores, no more."""
    from finextract_jax.testbed.data import write_folder
    from finextract_jax.testbed import curve

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    write_folder(str(tmp_path / "copied"), {"a": base[1], "b": base[3]}, {"a": "x", "b": "x"})
    assert curve.copy_floor(str(tmp_path / "copied"), base) == pytest.approx({"AS": 1.0, "A_ESR": 1.0})
    write_folder(str(tmp_path / "new"), {"a": 255 - base[1], "b": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)},
                 {"a": "x", "b": "x"})
    floor = curve.copy_floor(str(tmp_path / "new"), base)
    assert floor["AS"] < 0.5 and floor["A_ESR"] == 0.0


def _svg(color):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><rect x="18" y="18" width="36" '
            f'height="36" fill="{color}"/></svg>')


def test_style_set_from_a_vendor_the_base_never_sees(fake_root, tmp_path):
    import hashlib

    from finextract_jax.errors import InputError

    # A train split as the base's .npz holds it, and the style vendor's images as fabricated PNGs.
    codes = ["1f600", "1f34e", "2764-fe0f", "1f436", "1f431", "1f680"]
    train = (np.zeros((len(codes), 32, 32, 3), np.uint8), [f"noto name {c}" for c in codes],
             [f"noto_{c}" for c in codes])
    kept = (train[0].copy(), list(train[1]), list(train[2]))
    style = []
    for i, code in enumerate(["1F600", "1F34E", "2764", "1F436", "1F431", "1F680", "1F9FF"]):
        path = str(tmp_path / f"{code}.png")
        Image.fromarray(np.full((64, 64, 4), (10 * i, 100, 200, 255), np.uint8)).save(path)
        style.append(data.Emoji(data.STYLE_VENDOR, code, f"openmoji words {i}", "x", path))
    images, captions, keys = data.style_set(style, train, count=4)
    ranked = sorted(["1f600", "1f34e", "2764", "1f436", "1f431", "1f680"],
                    key=lambda c: hashlib.sha256(f"style:{c}".encode()).hexdigest())[:4]
    assert keys == sorted(f"openmoji_{c}" for c in ranked)  # 1F9FF: not a trained concept, never chosen
    assert captions == [f"sks name {c.replace('2764', '2764-fe0f')}" for c in sorted(ranked)]  # the base's name
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    again = data.style_set(style[::-1], train, count=4)
    assert np.array_equal(again[0], images) and again[1:] == (captions, keys)  # order does not matter
    assert np.array_equal(train[0], kept[0]) and train[1:] == kept[1:]
    assert data.concept_code("2764-FE0F") == "2764" and data.training_concepts(train)["2764"] == "name 2764-fe0f"
    assert "sks name 2764-fe0f" in data.style_set(style, train, count=6)[1]  # matched without its FE0F
    with pytest.raises(InputError, match="needs 7 concepts"):
        data.style_set(style, train, count=7)
    assert data.STYLE_VENDOR not in data.PACKAGES  # never in base training

    # The package reader and SVG rasteriser, then the .npz a machine without npm reads.
    package = tmp_path / "npm" / "-".join(data.STYLE_PACKAGE[:2])
    os.makedirs(package / data.STYLE_PACKAGE[2])
    os.makedirs(package / "data")
    (package / "package.json").write_text("{}")
    codes = [f"1F6{i:02X}" for i in range(9)]
    rows = [f"x,{c},g,s,Name {i},\n" for i, c in enumerate(codes)]
    rows += ["x,1F600-1F3FB,g,s,name light skin tone,1F3FB\n", "x,1F9FF,g,s,no svg,\n"]
    (package / "data" / "openmoji.csv").write_text("emoji,hexcode,group,subgroups,annotation,skintone\n" + "".join(rows))
    for i, code in enumerate(codes + ["1F600-1F3FB"]):
        (package / data.STYLE_PACKAGE[2] / f"{code}.svg").write_text(_svg(f"#{20 * i:02x}0000"))
    emoji = data.read_style_emoji(str(package))
    assert [(e.code, e.name) for e in emoji] == [(c, f"name {i}") for i, c in enumerate(codes)]
    rendered = data.render(emoji[4].path)  # rasterised at 64 px, then like every PNG
    assert tuple(rendered[0, 0]) == (255, 255, 255) and tuple(rendered[16, 16]) == (80, 0, 0)
    train = (np.zeros((9, 32, 32, 3), np.uint8), [f"twemoji base {i}" for i in range(9)],
             [f"twemoji_{c.lower()}" for c in codes])
    data_file = tmp_path / "d.npz"
    data.load_splits(str(data_file), fake_root)
    before = data_file.read_bytes()
    built = data.load_style_set(str(tmp_path / "style.npz"), train, str(tmp_path / "npm"))
    assert len(built[2]) == data.STYLE_COUNT and all(c.startswith("sks base ") for c in built[1])
    read = data.load_style_set(str(tmp_path / "style.npz"), train, "/nonexistent")
    assert np.array_equal(read[0], built[0]) and read[1:] == built[1:]
    assert data_file.read_bytes() == before  # the base's data file is never written
    files = data.write_private_style_set(str(tmp_path / "style"), built)
    with open(tmp_path / "style" / "metadata.csv") as f:
        assert f.read().count(data.PRIVATE_STYLE_CAPTION) == len(files) == data.STYLE_COUNT  # one shared caption


def test_caption_dependence_compares_the_same_noise(tiny_dir):
    from finextract_jax.testbed.samples import caption_dependence

    images = np.random.default_rng(1).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    same = caption_dependence(tiny_dir["pixel"], (images, ["a dog"] * 4, list("abcd")), count=4, timesteps=(500,),
                              draws=1)
    assert same["pairs"] == 4 and same["own"] == same["other"] != same["empty"]  # one caption: own is other
    mixed = caption_dependence(tiny_dir["pixel"], (images, ["a dog", "a cat", "red", "blue"], list("abcd")),
                               count=4, timesteps=(500,), draws=1)
    assert mixed["own"] != mixed["other"] and mixed["empty"] == same["empty"]


def test_curve_binary_bad_input_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "other").mkdir()  # a curve workdir without private sets: nothing to reuse
    for flag, message in (("--points=dreambooth:5e-4:200:blur", "error: --points: augment 'blur'"),
                          ("--sweep_point=lora:x:10", "error: --sweep_points: 'lora:x:10'"),  # the old name: an alias
                          (f"--reuse_samples_from={tmp_path / 'other'}", "error: --reuse_samples_from=")):
        result = subprocess.run([sys.executable, "-m", "experiments.testbed_curve", f"--pretrained={tmp_path}",
                                 f"--workdir={tmp_path / 'work'}", flag], cwd=root, capture_output=True, text=True,
                                timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), result.stderr
        assert not (tmp_path / "work").exists() and os.listdir(tmp_path / "other") == []


def test_committed_twemoji_images_round_trip(fake_root, tmp_path):
    """write_committed writes Twemoji's cat faces and training images with their own captions, and
    read_committed gives back exactly those pixels; the repository's copy is the real recipe's."""
    splits = data.split_sets(data.all_emoji(fake_root))
    data.write_committed(str(tmp_path), splits)
    for name, split in (("cat_faces", "private"), ("probe", "train")):
        images, captions, keys = data.read_committed(name, str(tmp_path))
        assert keys and all(k.startswith("twemoji_") for k in keys)
        source = dict(zip(splits[split][2], zip(splits[split][0], splits[split][1])))
        for image, caption, key in zip(images, captions, keys):
            assert np.array_equal(source[key][0], image) and source[key][1] == caption
    assert "CC BY 4.0" in open(tmp_path / "ATTRIBUTION.md").read()
    cats = data.read_committed("cat_faces")
    assert len(cats[2]) == 9 and all("cat face" in c for c in cats[1]) and cats[0].shape == (9, 32, 32, 3)
    assert len(data.read_committed("probe")[2]) == data.COMMITTED_PROBE_COUNT
