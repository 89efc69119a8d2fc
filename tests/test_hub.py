"""Hub ids as checkpoints, offline, against a Hugging Face cache laid out as huggingface_hub writes it
(models--org--name/blobs/<hash>, snapshots/<commit>/<files as links to the blobs>, refs/main) in a
temporary HF_HOME: resolution, pinned revisions, local paths winning, errors, and the extract
binary on a tiny pair given only as hub ids."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from finextract_jax.errors import CheckpointError
from finextract_jax.models import hub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN, OLD = "a" * 40, "b" * 40  # two commits of the LoRA repository; MAIN is refs/main


def _add_snapshot(hf_home, repo, commit, files: dict, ref=None):
    """files: {path in the repository: local file to store}; blobs named by content hash, linked as the hub does."""
    root = os.path.join(hf_home, "hub", "models--" + repo.replace("/", "--"))
    for name, source in files.items():
        data = open(source, "rb").read()
        blob = os.path.join(root, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(root, "snapshots", commit, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    if ref:
        os.makedirs(os.path.join(root, "refs"), exist_ok=True)
        with open(os.path.join(root, "refs", ref), "w") as f:
            f.write(commit)


def _tree(folder):
    return {os.path.relpath(os.path.join(r, n), folder): os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns}


@pytest.fixture(scope="module")
def hf_home(tiny_dir, tiny_finetuned, tmp_path_factory):
    home = str(tmp_path_factory.mktemp("hf_home"))
    _add_snapshot(home, "org/tiny-sd", MAIN, _tree(tiny_dir["sd1"]), ref="main")
    _add_snapshot(home, "org/tiny-lora", MAIN, {hub.LORA_FILE: tiny_finetuned["lora"]}, ref="main")
    _add_snapshot(home, "org/tiny-lora", OLD, {"old_lora.safetensors": tiny_finetuned["lora"]})
    return home


@pytest.fixture
def offline(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HOME", hf_home)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


# A diffusers-layout repository as published (SD 1.5's file list: several weight formats per
# component, fp16 variants, a safety checker and single-file checkpoints the loaders never read).
SD_REPO = [
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors",
    "v1-inference.yaml", "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
    "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.bin",
]
TOKENIZER = ["tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
             "tokenizer/vocab.json"]


def test_only_the_files_the_loaders_read_are_selected():
    pretrained = hub.select_files(SD_REPO, "pretrained", "org/sd")
    assert pretrained.path == "" and sorted(pretrained.files) == sorted(
        ["model_index.json", "scheduler/scheduler_config.json", *TOKENIZER, "unet/config.json",
         "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
         "text_encoder/config.json", "text_encoder/model.safetensors"])
    finetuned = hub.select_files(SD_REPO + ["unet/diffusion_flax_model.msgpack"], "finetuned", "org/db")
    assert "unet/diffusion_flax_model.msgpack" in finetuned.files  # what find_weights would read first
    assert not any(f.startswith(("vae/", "safety_checker/")) or f.endswith(".bin") for f in finetuned.files)
    lora = hub.select_files([".gitattributes", "README.md", "image_0.png", hub.LORA_FILE], "finetuned", "org/l")
    assert lora == hub.Selection([hub.LORA_FILE], hub.LORA_FILE)
    assert hub.select_files(["README.md", "sks.safetensors"], "finetuned", "org/l").path == "sks.safetensors"
    with pytest.raises(CheckpointError, match="org/l: not a fine-tune.*name one file as org/l/FILE"):
        hub.select_files(["a.safetensors", "b.safetensors"], "finetuned", "org/l")
    with pytest.raises(CheckpointError, match="org/l: not a diffusers-layout model"):
        hub.select_files(["a.safetensors"], "pretrained", "org/l")


def test_offline_resolution_pins_the_commit(offline, tiny_pipe):
    from finextract_jax.models.pipeline import load_pipeline

    folder = hub.resolve("org/tiny-sd", "pretrained")
    assert folder.endswith(os.path.join("models--org--tiny-sd", "snapshots", MAIN))
    assert hub.resolve("org/tiny-sd@main", "pretrained") == hub.resolve(f"org/tiny-sd@{MAIN}", "pretrained") == folder
    assert hub.pinned_revision(os.path.join(folder, "unet")) == {"repo_id": "org/tiny-sd", "revision": MAIN}
    lora = hub.resolve("org/tiny-lora", "finetuned")
    assert lora == os.path.join(offline, "hub", "models--org--tiny-lora", "snapshots", MAIN, hub.LORA_FILE)
    old = hub.resolve(f"org/tiny-lora@{OLD}", "finetuned")  # the only .safetensors of that commit
    assert old.endswith(os.path.join(OLD, "old_lora.safetensors"))
    assert hub.resolve(f"org/tiny-lora/old_lora.safetensors@{OLD}", "finetuned") == old
    assert hub.pinned_revisions(pretrained=folder, finetuned=old, other="/tmp") == {
        "pretrained": {"repo_id": "org/tiny-sd", "revision": MAIN},
        "finetuned": {"repo_id": "org/tiny-lora", "revision": OLD}}
    pipe = load_pipeline("org/tiny-sd", cache_dir=None)
    assert pipe.path == folder and pipe.unet.config == tiny_pipe("sd1").unet.config


def test_local_path_wins_and_errors_name_both(offline, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("org")
    os.symlink(tiny_dir["sd1"], os.path.join("org", "tiny-sd"))
    assert hub.resolve("org/tiny-sd", "pretrained") == "org/tiny-sd"
    assert hub.as_recorded("org/tiny-sd") == os.path.abspath("org/tiny-sd")
    assert hub.as_recorded("org/elsewhere") == "org/elsewhere"
    with pytest.raises(CheckpointError, match=r"org/missing@main: no local path by that name, and not in the "
                                              r"Hugging Face cache .*HF_HUB_OFFLINE"):
        hub.resolve("org/missing", "pretrained")
    with pytest.raises(CheckpointError, match=r"^\./missing: not found: no such local file or folder, and not a "
                                              r"Hugging Face hub id"):
        hub.resolve("./missing", "pretrained")
    with pytest.raises(CheckpointError, match="org/tiny-lora: has no file nope.safetensors"):
        hub.resolve("org/tiny-lora/nope.safetensors", "finetuned")


def test_extract_binary_takes_hub_ids_offline(hf_home, tmp_path):
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "experiments.extract", "--pretrained=org/tiny-sd", f"--finetuned=org/tiny-lora@{OLD}",
           f"--workdir={workdir}", "--prompt=a photo of sks dog", "--num_images=2", "--batch_size=2", "--steps=2"]
    env = dict(os.environ, FINEXTRACT_CACHE="", HF_HOME=hf_home, HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.load(open(os.path.join(workdir, "run.json")))
    assert record["settings"]["pretrained"] == "org/tiny-sd"
    assert record["hub"] == {"pretrained": {"repo_id": "org/tiny-sd", "revision": MAIN},
                             "finetuned": {"repo_id": "org/tiny-lora", "revision": OLD}}
    assert sorted(os.listdir(os.path.join(workdir, "images"))) == ["00000.png", "00001.png"]
    shutil.rmtree(workdir)
    neither = subprocess.run(cmd[:3] + ["--pretrained=./no_such_model"] + cmd[4:], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    lines = neither.stderr.strip().splitlines()
    assert neither.returncode == 2 and len(lines) == 1
    assert "no_such_model: not found: no such local file or folder, and not a Hugging Face hub id" in lines[0]
