"""The reproduce runner: one tiny dataset through every stage, a rerun that skips them all,
well-formed tables, refused setting changes and bad inputs that write nothing.

Runs in-process (compilations are shared with the rest of the session) on the tiny sd1 model,
with one fine-tuning method (each fine-tune is one long compilation) and all three extraction
methods; the DreamBooth path differs only in the FinetuneConfig and the checkpoint kind, both
covered by test_finetune and test_extract_binary.
"""
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from finextract_jax import reproduce
from finextract_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION = "a photo of sks"


def _photos(folder, names=("astronaut", "coffee", "chelsea")):
    import skimage.data
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name in names:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((32, 32)).save(
            os.path.join(folder, f"{name}.png"))
    return str(folder)


def _settings(tiny_dir, workdir, train_dir, **overrides):
    values = dict(pretrained=tiny_dir["sd1"], workdir=str(workdir),
                  datasets=(reproduce.parse_dataset(f"{train_dir}:{CAPTION}"),), finetunes=("lora",),
                  num_images=6, batch_size=2, steps=3, features="pixel", finetune_steps=2, rank=4,
                  checkpoint_every=0, seed=3)
    values.update(overrides)
    return reproduce.Settings(**values)


def _snapshot(root):
    """{relative path: mtime_ns} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
    return out


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    """(settings, table rows, seconds) of one complete run."""
    root = tmp_path_factory.mktemp("reproduce")
    settings = _settings(tiny_dir, root / "work", _photos(root / "photos"))
    start = time.perf_counter()
    rows = reproduce.reproduce(settings)
    return settings, rows, time.perf_counter() - start


def test_every_stage_writes_its_outputs(finished):
    settings, rows, _ = finished
    ft = os.path.join(settings.workdir, "photos", "lora")
    assert os.path.isfile(os.path.join(ft, "model", "pytorch_lora_weights.safetensors"))
    assert os.path.isfile(os.path.join(ft, "finetune.done.json"))
    assert not os.path.exists(os.path.join(ft, "model.checkpoints"))
    assert settings.methods == ("finextract", "cfg", "text2img")  # the paper's table; the ablation only when asked
    for method in settings.methods:
        folder = os.path.join(ft, method)
        images = sorted(n for n in os.listdir(os.path.join(folder, "images")) if not n.startswith("."))
        assert images == [f"{i:05d}.png" for i in range(6)]
        for name in ("run.json", "clusters.json", "metrics.json", "pairs.png", "extract.done.json",
                     "cluster.done.json", "evaluate.done.json"):
            assert os.path.isfile(os.path.join(folder, name)), (method, name)
        assert [n for n in os.listdir(os.path.join(folder, "extracted")) if n.endswith(".png")]
        with open(os.path.join(folder, "clusters.json")) as f:
            assert json.load(f)["schedule"] == "reference"  # the paper's rule, whatever cluster's default
    assert [(r["dataset"], r["finetune"], r["method"]) for r in rows] == [
        ("photos", "lora", m) for m in settings.methods]
    for row in rows:
        assert 0 <= row["A_ESR"] <= 1 and -1 <= row["AS"] <= 1 and row["num_train"] == 3
        assert 1 <= row["num_guesses"] <= 6
        assert row["num_extracted"] == round(row["A_ESR"] * row["num_train"])
        assert all(row[f"{stage}_s"] >= 0 for stage in reproduce.STAGES)


def test_tables_are_well_formed(finished):
    settings, rows, _ = finished
    with open(os.path.join(settings.workdir, "table.csv"), newline="") as f:
        parsed = list(csv.DictReader(f))
    assert list(parsed[0]) == list(reproduce.TABLE_COLUMNS) and len(parsed) == 3
    for row, written in zip(rows, parsed):
        assert float(written["AS"]) == pytest.approx(row["AS"])
        assert int(written["num_extracted"]) == row["num_extracted"] and written["method"] == row["method"]
        assert int(written["num_guesses"]) == row["num_guesses"]
    lines = open(os.path.join(settings.workdir, "table.md")).read().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 3
    widths = {line.count("|") for line in table}
    assert widths == {12}  # 11 columns on every line
    assert set(table[1]) <= set("|-:")
    assert table[2].startswith("| photos | lora | finextract | ")


def test_rerun_skips_every_stage(finished):
    settings, rows, seconds = finished
    before = _snapshot(settings.workdir)
    start = time.perf_counter()
    again = reproduce.reproduce(settings)
    elapsed = time.perf_counter() - start
    assert again == rows
    assert _snapshot(settings.workdir) == before  # tables too: rewritten only when they change
    assert elapsed < min(5.0, seconds / 5), (elapsed, seconds)


def test_changed_setting_of_a_finished_stage_is_refused(finished):
    settings, _, _ = finished
    before = _snapshot(settings.workdir)
    with pytest.raises(InputError, match=r"finextract: extract finished with other settings "
                                         r"\(--guidance_scale: 5\.0 -> 4\.0\)"):
        reproduce.reproduce(dataclasses.replace(settings, guidance_scale=4.0))
    with pytest.raises(InputError, match=r"--finetune_steps: 2 -> 3"):
        reproduce.reproduce(dataclasses.replace(settings, finetune_steps=3))
    with pytest.raises(InputError, match=r"cluster finished with other settings \(--select"):
        reproduce.reproduce(dataclasses.replace(settings, select="topk"))
    assert _snapshot(settings.workdir) == before


def test_reused_samples_are_scored_again_without_sampling(finished, tmp_path):
    """testbed_curve --reuse_samples_from: another workdir's fine-tunes and samples, linked into a new one,
    are reused as they are; only clustering and scoring run again (here under another --select), and the
    source is left untouched."""
    from finextract_jax.testbed.curve import reuse_samples

    settings, rows, _ = finished
    before = _snapshot(settings.workdir)
    workdir = tmp_path / "rescored"
    assert reuse_samples(settings.workdir, str(workdir)) > 6
    ft = os.path.join("photos", "lora")
    assert not os.path.exists(workdir / ft / "finextract" / "clusters.json")
    start = time.perf_counter()
    again = reproduce.reproduce(dataclasses.replace(settings, workdir=str(workdir), select="topk"))
    assert time.perf_counter() - start < 60  # no fine-tuning or sampling compilations
    for old, new in zip(rows, again):
        assert (new["finetune_s"], new["extract_s"]) == (old["finetune_s"], old["extract_s"])
        assert new["num_guesses"] <= 3  # topk: as many guesses as training images
    image = os.path.join(ft, "cfg", "images", "00000.png")
    assert os.path.samefile(os.path.join(settings.workdir, image), workdir / image)
    assert _snapshot(settings.workdir) == before
    with pytest.raises(InputError, match="not a folder"):
        reuse_samples(str(tmp_path / "nowhere"), str(workdir))


def test_reuse_skips_interrupted_stages(tmp_path):
    """An extraction cut short in the source (no done record) records the source's paths in its run.json;
    linking it would make the new workdir refuse to resume it, so it is left to sample again there."""
    from finextract_jax.testbed.curve import reuse_samples

    source = tmp_path / "source"
    for method, done in (("cfg", True), ("text2img", False)):
        stage = source / "set" / "dreambooth" / method
        (stage / "images").mkdir(parents=True)
        (stage / "images" / "00000.png").write_bytes(b"png")
        (stage / "run.json").write_text("{}")
        if done:
            (stage / "extract.done.json").write_text("{}")
    (source / "set" / "dreambooth" / "model").mkdir()
    (source / "set" / "dreambooth" / "model" / "unet.safetensors").write_bytes(b"w")  # no finetune.done.json
    workdir = tmp_path / "rescored"
    assert reuse_samples(str(source), str(workdir)) == 3
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file()) == [
        "set/dreambooth/cfg/extract.done.json", "set/dreambooth/cfg/images/00000.png", "set/dreambooth/cfg/run.json"]


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a folder"),
    ("empty", "holds no images"),
    ("few", "--num_images=2 is smaller than the 3 training images"),
    ("duplicate", "not unique"),
    ("batch", "--batch_size=0"),
])
def test_bad_inputs_write_nothing(tiny_dir, tmp_path, case, message):
    photos = _photos(tmp_path / "photos")
    (tmp_path / "empty").mkdir()
    datasets = {"missing": [str(tmp_path / "missing")], "empty": [str(tmp_path / "empty")],
                "duplicate": [photos, _photos(tmp_path / "b" / "photos", ("coffee",))]}.get(case, [photos])
    overrides = {"few": dict(num_images=2), "batch": dict(batch_size=0)}.get(case, {})
    settings = _settings(tiny_dir, tmp_path / "work", photos, **overrides)
    settings = dataclasses.replace(settings, datasets=tuple(reproduce.parse_dataset(f"{d}:{CAPTION}")
                                                            for d in datasets))
    with pytest.raises(InputError, match=message):
        reproduce.reproduce(settings)
    assert not (tmp_path / "work").exists()


def test_dataset_parsing(tmp_path):
    ds = reproduce.parse_dataset("/data/dogs:a photo of sks dog: close-up, outdoors")
    assert ds == reproduce.Dataset("dogs", "/data/dogs", "a photo of sks dog: close-up, outdoors")
    assert reproduce.parse_dataset("/data/dogs/").caption is None  # captions from metadata.csv
    (tmp_path / "sets.csv").write_text('train_dir,caption,name\nmonet,"art style of monet, oil",paintings\n'
                                       "/abs/cats,a photo of sks cat,\n")
    first, second = reproduce.read_datasets_file(str(tmp_path / "sets.csv"))
    assert first == reproduce.Dataset("paintings", str(tmp_path / "monet"), "art style of monet, oil")
    assert second == reproduce.Dataset("cats", "/abs/cats", "a photo of sks cat")
    assert reproduce.parse_choices(["lora", "dreambooth", "lora"], reproduce.FINETUNES, "finetunes") == (
        "lora", "dreambooth")
    with pytest.raises(InputError, match="--methods: unknown 'guided'"):
        reproduce.parse_choices(["finextract", "guided"], reproduce.METHODS, "methods")


def test_binary_bad_input_is_one_line_exit_2(tiny_dir, tmp_path):
    photos = _photos(tmp_path / "photos")
    for flag, message in (("--methods=finextract,guided", "--methods: unknown 'guided'"),
                          (f"--datasets={tmp_path / 'nope'}:x", "is not a folder")):
        args = [f"--pretrained={tiny_dir['sd1']}", f"--workdir={tmp_path / 'work'}",
                f"--datasets={photos}:{CAPTION}", "--features=pixel", flag]
        result = subprocess.run([sys.executable, "-m", "experiments.reproduce", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
        assert not (tmp_path / "work").exists()


def test_match_correction_scales_only_the_reference_k(tiny_dir, tmp_path):
    """--match_correction scales DreamBooth's reference k to the base's schedule (the testbed's pixel DDPM
    schedule at 25 DDIM steps: -0.02 -> -0.00243) and leaves SD's 50-step sampler, LoRA's k = 0, a given
    --correction and the baselines as they were."""
    from finextract_jax.testbed.base import COMMITTED_BASE_DIR

    (tmp_path / "photos").mkdir()
    pixel = _settings(tiny_dir, tmp_path / "w", tmp_path / "photos", pretrained=COMMITTED_BASE_DIR, steps=25,
                      match_correction=True)
    w, k = reproduce.guidance(pixel, "dreambooth", "finextract")
    assert w == 3.0 and k == pytest.approx(-0.0024298, abs=1e-7)
    assert reproduce.guidance(pixel, "lora", "finextract") == (5.0, 0.0)
    assert reproduce.guidance(pixel, "dreambooth", "cfg") == (3.0, 0.0)
    assert reproduce.guidance(pixel, "dreambooth", "finextract_caption") == (w, k)  # the ablation takes FineXtract's
    assert reproduce.guidance(dataclasses.replace(pixel, correction=-0.01), "dreambooth", "finextract")[1] == -0.01
    assert reproduce.guidance(dataclasses.replace(pixel, match_correction=False), "dreambooth", "finextract")[1] == -0.02
    sd = _settings(tiny_dir, tmp_path / "w", tmp_path / "photos", steps=50, match_correction=True)
    assert reproduce.guidance(sd, "dreambooth", "finextract") == (3.0, -0.02)
    assert reproduce.guidance(dataclasses.replace(sd, sampler="reference_ddim"), "dreambooth", "finextract")[1] == -0.02
