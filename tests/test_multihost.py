"""Two processes on localhost (JAX CPU collectives) produce the same images as one process,
and a rerun after one process died completes only what is missing.

The one-process reference is the library call the binary makes, run in this process (same
environment): an interpreter start and a pipeline load fewer than a third binary run."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _settings(tiny_dir, tiny_finetuned, batch_size):
    return dict(pretrained=tiny_dir["sd1"], finetuned=tiny_finetuned["lora"], prompt="a photo of sks dog",
                num_images=6, batch_size=batch_size, steps=3, seed=11, guidance_scale=5.0, correction=0.0)


def _cmd(tiny_dir, tiny_finetuned, workdir, batch_size, **extra):
    flags = dict(_settings(tiny_dir, tiny_finetuned, batch_size), workdir=workdir, **extra)
    return [sys.executable, "-m", "experiments.extract"] + [f"--{k}={v}" for k, v in flags.items()]


def _run_two(tiny_dir, tiny_finetuned, workdir):
    port = _free_port()
    env = dict(os.environ, FINEXTRACT_CACHE="")
    procs = [subprocess.Popen(_cmd(tiny_dir, tiny_finetuned, workdir, 4, coordinator_address=f"localhost:{port}",
                                   num_processes=2, process_id=i), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]


def _images(workdir):
    folder = os.path.join(workdir, "images")
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_two_processes_equal_one_and_resume(tiny_dir, tiny_finetuned, tmp_path):
    from finextract_jax.sampling.run import ExtractConfig, extract

    single = str(tmp_path / "single")
    extract(ExtractConfig(**_settings(tiny_dir, tiny_finetuned, 2)), single, progress=False)
    multi = str(tmp_path / "multi")
    _run_two(tiny_dir, tiny_finetuned, multi)
    import json

    record = json.load(open(os.path.join(multi, "run.json")))
    assert record["devices"]["process_count"] == 2 and record["status"] == "complete"
    assert _images(multi) == _images(single)  # 2 processes x 1 device x 2 images == 1 device x 2 images

    # Process 1 (rows 2-3 of each batch of 4) "died" before writing batch 0: the rerun redoes
    # batch 0 only; batch 1 (images 4, 5) is complete and left alone.
    for name in ("00002.png", "00003.png"):
        os.remove(os.path.join(multi, "images", name))
    before = {n: os.stat(os.path.join(multi, "images", n)).st_mtime_ns for n in ("00004.png", "00005.png")}
    _run_two(tiny_dir, tiny_finetuned, multi)
    assert _images(multi) == _images(single)
    after = {n: os.stat(os.path.join(multi, "images", n)).st_mtime_ns for n in before}
    assert after == before  # complete batches were not recomputed
