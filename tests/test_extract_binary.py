"""The extract binary: resume after SIGKILL is bit-identical, changed settings are refused,
and image i does not depend on the device count or batch size."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(tiny_dir, finetuned, workdir, **flags):
    args = dict(pretrained=tiny_dir["sd1"], finetuned=finetuned, workdir=workdir, prompt="a photo of sks dog",
                num_images=6, batch_size=2, steps=3, seed=3)
    args.update(flags)
    return [sys.executable, "-m", "experiments.extract"] + [f"--{k}={v}" for k, v in args.items()]


def _env(**extra):
    return dict(os.environ, FINEXTRACT_CACHE="", **extra)


def _images(workdir):
    folder = os.path.join(workdir, "images")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


# Enough batches that the kill lands mid-run: with a warm compile cache one tiny batch takes
# milliseconds, and 6 images once finished before the first PNG was seen.
KILL_RUN_IMAGES = 200


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tiny_finetuned, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    subprocess.run(_cmd(tiny_dir, tiny_finetuned["lora"], workdir, num_images=KILL_RUN_IMAGES), check=True, cwd=ROOT,
                   env=_env(), capture_output=True)
    return _images(workdir)


def test_resume_after_sigkill_is_bit_identical(tiny_dir, tiny_finetuned, uninterrupted, tmp_path):
    workdir = str(tmp_path / "killed")
    proc = subprocess.Popen(_cmd(tiny_dir, tiny_finetuned["lora"], workdir, num_images=KILL_RUN_IMAGES), cwd=ROOT,
                            env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    images = os.path.join(workdir, "images")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(images) and any(n.endswith(".png") for n in os.listdir(images)):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [n for n in os.listdir(images) if n.endswith(".png")]
    assert 0 < len(done) < KILL_RUN_IMAGES, "the run must be killed mid-way"
    subprocess.run(_cmd(tiny_dir, tiny_finetuned["lora"], workdir, num_images=KILL_RUN_IMAGES), check=True, cwd=ROOT,
                   env=_env(), capture_output=True)
    assert not [n for n in os.listdir(images) if not n.endswith(".png")]  # no temp files left
    assert _images(workdir) == uninterrupted


def test_changed_settings_are_refused(tiny_dir, tiny_finetuned, tmp_path):
    workdir = str(tmp_path / "run")
    subprocess.run(_cmd(tiny_dir, tiny_finetuned["lora"], workdir, num_images=2), check=True, cwd=ROOT,
                   env=_env(), capture_output=True)
    result = subprocess.run(_cmd(tiny_dir, tiny_finetuned["lora"], workdir, num_images=2, seed=4), cwd=ROOT,
                            env=_env(), capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "seed: 3 -> 4" in lines[0]


def test_bad_input_exits_2_with_one_line_and_no_output(tiny_dir, tmp_path):
    workdir = str(tmp_path / "run")
    result = subprocess.run(_cmd(tiny_dir, str(tmp_path / "missing"), workdir), cwd=ROOT, env=_env(),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "missing: not found" in result.stderr
    assert not os.path.exists(workdir)


_SHARDED = """
import sys, jax, numpy as np
from finextract_jax.sampling.run import ExtractConfig, extract
pre, ft, out = sys.argv[1:4]
assert len(jax.devices()) == 4
base = dict(pretrained=pre, finetuned=ft, prompt="a photo of sks dog", num_images=8, steps=3, seed=5)
extract(ExtractConfig(**base, batch_size=8), out + "/four", progress=False)               # 2 per device
extract(ExtractConfig(**base, batch_size=2), out + "/one", progress=False, devices=jax.devices()[:1])
extract(ExtractConfig(**base, batch_size=3), out + "/one_b3", progress=False, devices=jax.devices()[:1])
"""


def test_image_i_is_independent_of_devices_and_batch_size(tiny_dir, tiny_finetuned, tmp_path):
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    subprocess.run([sys.executable, "-c", _SHARDED, tiny_dir["sd1"], tiny_finetuned["full"], str(tmp_path)],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    four, one = _images(str(tmp_path / "four")), _images(str(tmp_path / "one"))
    assert len(four) == 8 and four == one  # same per-device batch: bit-identical PNGs
    other = _images(str(tmp_path / "one_b3"))
    diffs = [np.abs(np.asarray(Image.open(os.path.join(tmp_path, "one", "images", n)), np.int16)
                    - np.asarray(Image.open(os.path.join(tmp_path, "one_b3", "images", n)), np.int16)).max()
             for n in other]
    print("max pixel difference between batch sizes 2 and 3:", max(diffs))
    assert max(diffs) <= 1  # float noise at most: one 8-bit level
