"""The audit job: a tiny audit end to end in-process (caption recovery, extraction, clustering),
then the same command with --train_dir (only scoring runs), a rerun that skips every stage, a
changed setting and a changed checkpoint refused, bad input at the binary, and report.html
rendered in headless Chromium.

The extraction and caption settings are test_caption's (tiny sd1 + its 'full' fine-tune, batch
2, 3 steps, the small caption search), so the session's compilation cache serves both.
"""
import base64
import dataclasses
import html
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from finextract_jax import caption as caption_lib
from finextract_jax.audit import Settings, audit, job
from finextract_jax.errors import InputError
from finextract_jax.testbed.data import read_committed, write_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# min_gain < 0: keep the best word although this random tiny fine-tune does not read captions.
SMALL_CAPTION = caption_lib.CaptionConfig(max_words=1, refine_sweeps=0, timesteps=(500,), max_candidates=16,
                                          num_images=2, sample_steps=3, min_gain=-1.0)
SECTIONS = ("Summary", "Training images and their best matches", "Candidate training images, by clique size",
            "Caption", "Settings", "Provenance")


def _snapshot(root):
    """{relative path: mtime_ns} of every file under root."""
    return {os.path.relpath(os.path.join(d, n), root): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(root) for n in names}


class _Page(html.parser.HTMLParser):
    """The report's <img> sources, headings and every tag name."""

    def __init__(self):
        super().__init__()
        self.images, self.headings, self.tags, self._heading = [], [], set(), None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.images.append(dict(attrs))
        if tag == "h2":
            self._heading = ""

    def handle_data(self, data):
        if self._heading is not None:
            self._heading += data

    def handle_endtag(self, tag):
        if tag == "h2":
            self.headings.append(self._heading)
            self._heading = None


def _parse(path):
    page = _Page()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    page.feed(text)
    return text, page


def _check_self_contained(path):
    """Every <img> decodes from a data URI or names a file inside the report's folder; nothing
    points outside (no URL, script, style sheet or frame)."""
    from PIL import Image

    text, page = _parse(path)
    assert page.images
    for attrs in page.images:
        src = attrs["src"]
        if src.startswith("data:"):
            header, _, data = src.partition(",")
            assert header == "data:image/png;base64", header
            with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as img:
                img.load()
                assert (img.width, img.height) == (int(attrs["width"]), int(attrs["height"]))
        else:
            target = os.path.realpath(os.path.join(os.path.dirname(path), src))
            assert target.startswith(os.path.realpath(os.path.dirname(path)) + os.sep) and os.path.isfile(target), src
        assert attrs.get("alt")
    outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", text)
    assert not re.search(r"(https?:|ftp:|file:|//[a-z])", outside, re.I)
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    return text, page


@pytest.fixture(scope="module")
def audited(tiny_dir, tiny_finetuned, tmp_path_factory):
    """The audit without --train_dir, then the same with it; each report kept as it was."""
    root = tmp_path_factory.mktemp("audit")
    settings = Settings(pretrained=tiny_dir["sd1"], finetuned=tiny_finetuned["full"], workdir=str(root / "work"),
                        num_images=4, batch_size=2, steps=3, features="pixel", num_train=2, caption=SMALL_CAPTION)
    first = audit(settings, progress=False)
    shutil.copy(first["report"], root / "first.html")
    images, captions, keys = read_committed("cat_faces")
    write_folder(str(root / "photos"), dict(zip(keys[:3], images[:3])), dict(zip(keys[:3], captions[:3])))
    scored = dataclasses.replace(settings, train_dir=str(root / "photos"))
    second = audit(scored, progress=False)
    return {"settings": settings, "scored": scored, "first": first, "second": second,
            "first_report": str(root / "first.html")}


def test_audit_without_train_dir_writes_a_self_contained_report(audited):
    s, first = audited["settings"], audited["first"]
    assert first["ran"] == ["extract", "cluster"] and first["report"] == os.path.join(s.workdir, "report.html")
    text, page = _check_self_contained(audited["first_report"])
    assert page.headings == list(SECTIONS)
    caption = json.load(open(os.path.join(s.workdir, "caption.json")))
    assert caption["caption"] and f"Recovered caption: <b>{html.escape(repr(caption['caption']))}</b>" in text
    assert "--train_dir=DIR" in text and "AS (mean" not in text  # scoring is offered, not shown
    clusters = json.load(open(os.path.join(s.workdir, "clusters.json")))
    ranked = sorted(clusters["cliques"], key=len, reverse=True)[: s.num_train]
    for rank, clique in enumerate(ranked, 1):
        assert f"<b>#{rank}</b>: clique of {len(clique)}<br>" in text
    # Provenance: every checkpoint file with its real sha256, and the versions run.json recorded.
    import hashlib

    unet = os.path.join(s.finetuned, "unet", "diffusion_pytorch_model.safetensors")
    assert hashlib.sha256(open(unet, "rb").read()).hexdigest() in text
    assert os.path.join("unet", "diffusion_pytorch_model.safetensors") in text
    run = json.load(open(os.path.join(s.workdir, "run.json")))
    assert f"<td>jax</td><td>{run['versions']['jax']}</td>" in text
    # The reference's DreamBooth guidance for a full fine-tune, resolved in the settings table.
    assert "<code>--guidance_scale</code></td><td><code>3.0</code>" in text
    assert "<code>--correction</code></td><td><code>-0.02</code>" in text


def test_adding_train_dir_only_scores(audited):
    s, second = audited["scored"], audited["second"]
    assert second["ran"] == ["evaluate"] and second["skipped"] == ["extract", "cluster"]
    text, page = _check_self_contained(second["report"])
    assert page.headings == list(SECTIONS)
    metrics = json.load(open(os.path.join(s.workdir, "metrics.json")))
    assert f"<b>{metrics['AS']:.4f}</b>" in text and f"<b>{metrics['A_ESR']:.4f}</b>" in text
    for m in metrics["per_image"]:
        assert f"<code>{m['train']}</code>" in text and f"<td>{m['similarity']:.3f}</td>" in text
    # three training images beside their matches, plus the candidates and their cliques' members
    clusters = json.load(open(os.path.join(s.workdir, "clusters.json")))
    shown = sorted(clusters["cliques"], key=len, reverse=True)[: s.num_train]  # fewer if fewer cliques
    members = sum(min(len(c), 16) for c in shown)
    assert len(page.images) == 2 * len(metrics["per_image"]) + len(shown) + members


def test_rerun_skips_every_stage(audited):
    s = audited["scored"]
    before = _snapshot(s.workdir)
    again = audit(s, progress=False)
    assert again["ran"] == [] and again["skipped"] == ["extract", "cluster", "evaluate"]
    after = _snapshot(s.workdir)
    assert {k: v for k, v in after.items() if k != "report.html"} == {
        k: v for k, v in before.items() if k != "report.html"}


@pytest.mark.parametrize("change, flag", [(dict(guidance_scale=4.0), "--guidance_scale"),
                                          (dict(num_train=3), "--num_train"),
                                          (dict(success_threshold=0.5), "--success_threshold")])
def test_changed_setting_is_refused_naming_the_flag(audited, change, flag):
    s = audited["scored"]
    before = _snapshot(s.workdir)
    with pytest.raises(InputError, match=re.escape(flag)):
        audit(dataclasses.replace(s, **change), progress=False)
    assert _snapshot(s.workdir) == before


def test_changed_checkpoint_file_is_refused(tmp_path):
    """provenance.json's hashes: a file touched but equal passes; changed content is refused."""
    for name in ("base", "ft"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.bin").write_bytes(b"0123")
    s = Settings(pretrained=str(tmp_path / "base"), finetuned=str(tmp_path / "ft"), workdir=str(tmp_path / "w"))
    record = job.provenance(s, "dreambooth")
    assert record["finetuned"]["files"][0]["sha256"] == __import__("hashlib").sha256(b"0123").hexdigest()
    os.utime(tmp_path / "ft" / "weights.bin", ns=(1, 1))
    assert job.provenance(s, "dreambooth", record)["finetuned"]["files"][0]["sha256"] == record["finetuned"]["files"][0]["sha256"]
    (tmp_path / "ft" / "weights.bin").write_bytes(b"0124")
    with pytest.raises(InputError, match="--finetuned .*weights.bin changed"):
        job.provenance(s, "dreambooth", record)


def test_reference_guidance_per_finetune_kind(tiny_finetuned):
    s = Settings(pretrained="p", finetuned="f", workdir="w")
    assert job.finetune_kind(tiny_finetuned["lora"]) == "lora"
    assert job.finetune_kind(tiny_finetuned["full"]) == "dreambooth"
    assert job.guidance(s, "lora") == (5.0, 0.0) and job.guidance(s, "dreambooth") == (3.0, -0.02)
    assert job.guidance(dataclasses.replace(s, method="cfg"), "lora") == (3.0, 0.0)
    assert job.guidance(dataclasses.replace(s, guidance_scale=7.0), "lora") == (7.0, 0.0)
    assert job.num_train(s) == job.DEFAULT_NUM_TRAIN


def test_match_correction_scales_the_reference_k_to_the_base_schedule():
    from finextract_jax.testbed.base import COMMITTED_BASE_DIR

    # The testbed base's DDPM pixel schedule at 25 DDIM steps: -0.02 x 13.12 / 108 (benchmarks/RESULTS.md).
    s = Settings(pretrained=COMMITTED_BASE_DIR, finetuned="f", workdir="w", steps=25, match_correction=True)
    assert job.guidance(s, "dreambooth") == (3.0, pytest.approx(-0.0024298, abs=1e-7))
    assert job.guidance(s, "lora") == (5.0, 0.0)  # nothing to scale
    assert job.guidance(dataclasses.replace(s, correction=-0.05), "dreambooth") == (3.0, -0.05)  # a given k wins


def test_guidance_interval_reaches_extract_and_the_report(tiny_dir, tiny_finetuned, tmp_path):
    from finextract_jax.audit.report import _summary

    s = Settings(pretrained=tiny_dir["sd1"], finetuned=tiny_finetuned["full"], workdir=str(tmp_path / "out"),
                 prompt="a photo of sks dog", num_images=4, num_train=2, features="pixel", guidance_max_timestep=500)
    assert job.check_inputs(s, 1) == "dreambooth"
    assert job.extract_config(s, "dreambooth").guidance_max_timestep == 500
    assert job.stage_settings(s, "dreambooth")["extract"]["guidance_max_timestep"] == 500
    every_step = dataclasses.replace(s, guidance_max_timestep=None)
    assert "guidance_max_timestep" not in job.stage_settings(every_step, "dreambooth")["extract"]
    assert "guided only at t &le; 500" in _summary(job.report_settings(s, "dreambooth"), None, None, None, None)
    assert "guided only" not in _summary(job.report_settings(every_step, "dreambooth"), None, None, None, None)
    with pytest.raises(InputError, match="--guidance_max_timestep must be >= 0"):
        job.check_inputs(dataclasses.replace(s, guidance_max_timestep=-1), 1)
    assert not (tmp_path / "out").exists()


def test_caption_candidates_reach_the_search_and_are_checked_first(tiny_dir, tiny_finetuned, tmp_path):
    listed = tmp_path / "templates.txt"
    listed.write_text("a photo of sks dog\n")
    s = Settings(pretrained=tiny_dir["sd1"], finetuned=tiny_finetuned["full"], workdir=str(tmp_path / "out"),
                 num_images=4, num_train=2, caption_candidates=str(listed), features="pixel")
    assert job.check_inputs(s, 1) == "dreambooth"
    assert job.caption_config(s, "dreambooth").candidates == str(listed)
    assert job.caption_config(dataclasses.replace(s, caption_candidates=None), "dreambooth").candidates == ""
    with pytest.raises(InputError, match="--caption_candidates .*not a file"):
        job.check_inputs(dataclasses.replace(s, caption_candidates=str(tmp_path / "none.txt")), 1)
    with pytest.raises(InputError, match="--caption_candidates is for --prompt=auto"):
        job.check_inputs(dataclasses.replace(s, prompt="a photo of sks dog"), 1)
    assert not (tmp_path / "out").exists()
    from finextract_jax.audit.report import _caption

    record = {"caption": "a photo of sks dog", "num_candidates": 40, "seconds": 1.0, "settings": {"min_gain": 0.002},
              "steps": [{"caption": "a photo of sks dog", "score": 0.1, "heldout_gain": 0.09, "accepted": True,
                         "candidates": 3}], "ranking": [{"caption": "a photo of sks dog", "score": 0.1}]}
    assert "The best of 3 listed candidate captions" in _caption({"prompt": "auto"}, record)
    grown = {k: v for k, v in record.items() if k != "ranking"}
    assert "grows one word at a time" in _caption({"prompt": "auto"}, grown)


def test_binary_bad_input_is_one_line_and_writes_nothing(tiny_dir, tmp_path):
    workdir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.audit", f"--pretrained={tiny_dir['sd1']}",
                           f"--finetuned={tmp_path / 'missing'}", f"--workdir={workdir}", "--features=pixel"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "missing" in proc.stderr
    assert not workdir.exists()


# ---- the report in a browser -------------------------------------------------------------------


def _chromium(page: str, out_png: str, size=(1200, 1600)) -> list:
    """Screenshot `page` in headless Chromium; returns the console messages it logged."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "headless Chromium is needed: apt-get install -y chromium (as .ci/run does)"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                               f"--screenshot={out_png}", f"--window-size={size[0]},{size[1]}",
                               "file://" + os.path.abspath(page)],
                              capture_output=True, text=True, timeout=120)
    assert os.path.isfile(out_png), proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def test_report_renders_in_headless_chromium(audited, tmp_path):
    from PIL import Image

    # The console capture sees errors: a page with one must report it.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('boom')</script></body></html>")
    assert any("boom" in line for line in _chromium(str(bad), str(tmp_path / "bad.png"), (400, 300)))

    shot = str(tmp_path / "report.png")
    console = _chromium(audited["second"]["report"], shot)
    assert console == []
    pixels = np.asarray(Image.open(shot).convert("L"), np.float64)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 20  # text and thumbnails, not a blank page
    assert (pixels < 128).mean() > 0.01  # a visible share of dark pixels (text, images)
