"""The demo at a small setting (the README's first command runs the full one): the embedded base
model loads, both fine-tunes and all three methods run, and metrics.json, report.md and the
grids are well formed; a rerun redoes nothing; bad flags exit 2 before writing anything."""
import json
import os
import subprocess
import sys
import time

import pytest

from finextract_jax.demo import run as demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("demo"))
    return workdir, demo.run_demo(workdir, demo.DemoSettings.quick(), progress=False)


def test_quick_demo_writes_metrics_report_and_grids(quick_demo):
    workdir, report = quick_demo
    runs = json.load(open(os.path.join(workdir, "metrics.json")))["runs"]
    assert [(r["finetune"], r["method"]) for r in runs] == [
        (f, m) for f in ("dreambooth", "lora") for m in ("finextract", "cfg", "text2img")]
    for r in runs:
        assert set(r) == {"finetune", "method", "AS", "A_ESR", "num_guesses", "num_extracted"}
        assert -1 <= r["AS"] <= 1 and 0 <= r["A_ESR"] <= 1 and r["num_guesses"] == 9  # topk: N0 guesses
        assert r["num_extracted"] == round(r["A_ESR"] * 9)  # training images past the threshold
    text = open(report).read()
    assert text.count("\n| dreambooth |") == 3 and text.count("\n| lora |") == 3
    for finetune in ("dreambooth", "lora"):
        for grid in (f"matches_{finetune}.png", f"samples_{finetune}.png"):
            assert f"]({grid})" in text and os.path.getsize(os.path.join(workdir, grid)) > 1000
    # The base is left in SD layout for users, and the private images beside it.
    assert os.path.exists(os.path.join(workdir, "base", "model_index.json"))
    assert len([n for n in os.listdir(os.path.join(workdir, "private")) if n.endswith(".png")]) == 9


def test_rerun_skips_every_stage(quick_demo):
    workdir, report = quick_demo
    before = open(os.path.join(workdir, "metrics.json")).read()
    start = time.perf_counter()
    demo.run_demo(workdir, demo.DemoSettings.quick(), progress=False)
    assert time.perf_counter() - start < 20  # no fine-tuning, sampling or compilation
    assert open(os.path.join(workdir, "metrics.json")).read() == before


def test_binary_bad_flags_exit_2_and_write_nothing(tmp_path):
    workdir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.demo", f"--workdir={workdir}", "--num_images=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--num_images=3" in proc.stderr and not workdir.exists()
