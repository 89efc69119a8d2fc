"""Hub ids as checkpoints, offline, against a Hugging Face cache laid out as huggingface_hub writes it
(models--org--name/blobs/<hash>, snapshots/<commit>/<files as links to the blobs>, refs/main) in a
temporary HF_HOME: resolution, pinned revisions, local paths winning, errors, and the extract
binary on a tiny pair given only as hub ids. Online, huggingface_hub itself downloads from a
local stand-in for the hub's API (HF_ENDPOINT), which records what was fetched."""
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

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
    # PEFT's save_pretrained: the adapter and the config with its scales, at the top or per model.
    peft = ["README.md", "adapter_model.safetensors", "adapter_config.json", "checkpoint-500/adapter_model.safetensors"]
    assert hub.select_files(peft, "finetuned", "org/p") == hub.Selection(peft[2:0:-1], "")
    peft = [f"{c}/adapter_{n}" for c in ("unet", "text_encoder") for n in ("config.json", "model.safetensors")]
    assert hub.select_files(["README.md", "logs/adapter_config.json"] + peft, "finetuned", "org/p").files == sorted(peft)
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


def test_audit_reads_hub_ids_as_their_pinned_snapshots(offline, tmp_path):
    """audit hashes and checks files, so it works on the snapshot folders hub ids stand for."""
    from finextract_jax.audit import job

    s = job.resolve_checkpoints(job.Settings(pretrained="org/tiny-sd", finetuned="org/tiny-lora",
                                             workdir=str(tmp_path / "audit")))
    assert s.pretrained == hub.resolve("org/tiny-sd", "pretrained") and os.path.isdir(s.pretrained)
    assert job.finetune_kind(s.finetuned) == "lora"
    record = job.provenance(s, "lora")
    lora_bytes = open(s.finetuned, "rb").read()
    assert record["finetuned"]["files"][0]["sha256"] == hashlib.sha256(lora_bytes).hexdigest()


def test_extract_binary_takes_hub_ids_offline(hf_home, tmp_path):
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "experiments.extract", "--pretrained=org/tiny-sd", f"--finetuned=org/tiny-lora@{OLD}",
           f"--workdir={workdir}", "--prompt=a photo of sks dog", "--num_images=2", "--batch_size=2",
           "--steps=3"]  # test_extract_binary's batch and steps: the compiled loop is cached across tests
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


REMOTE = "c" * 40


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The two routes huggingface_hub 0.36 uses to download a snapshot: the model info at a revision,
    and each file's resolve URL (HEAD for metadata, then GET)."""

    files: dict = {}
    fetched: list = []

    def _reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?")[0]
        info = "/api/models/org/remote-sd/revision/"
        resolve = f"/org/remote-sd/resolve/{REMOTE}/"
        if path in (info + "main", info + REMOTE):
            siblings = [{"rfilename": name} for name in sorted(self.files)]
            self._reply(200, json.dumps({"id": "org/remote-sd", "sha": REMOTE, "siblings": siblings}).encode(),
                        [("Content-Type", "application/json")])
        elif path.startswith(resolve) and path[len(resolve):] in self.files:
            name = path[len(resolve):]
            data = self.files[name]
            if self.command == "GET":
                self.fetched.append(name)
            self._reply(200, data, [("X-Repo-Commit", REMOTE), ("ETag", f'"{hashlib.sha256(data).hexdigest()}"')])
        else:
            self._reply(404, b"{}", [("X-Error-Code", "RepoNotFound")])

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_online_download_fetches_only_what_the_loaders_read(tiny_dir, tmp_path):
    """Through huggingface_hub against the stand-in: the selected files only (no .bin, single-file
    checkpoint or safety checker), at the commit main pointed to; an unknown repository is named."""
    decoys = {"unet/diffusion_pytorch_model.bin": b"pickle", "v1-5-pruned.safetensors": b"single file",
              "safety_checker/config.json": b"{}", "safety_checker/model.safetensors": b"checker"}
    _FakeHub.files = {**{name: open(path, "rb").read() for name, path in _tree(tiny_dir["sd1"]).items()}, **decoys}
    _FakeHub.fetched = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN"):
        env.pop(name, None)
    script = ("import sys\nfrom finextract_jax.models import hub\nfrom finextract_jax.errors import CheckpointError\n"
              "print(hub.resolve('org/remote-sd', 'pretrained'))\n"
              "try:\n    hub.resolve('org/unknown', 'pretrained')\nexcept CheckpointError as err:\n    print(err)\n")
    try:
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr[-2000:]
    folder, refused = result.stdout.strip().splitlines()[-2:]
    assert folder == os.path.join(str(tmp_path / "hf"), "hub", "models--org--remote-sd", "snapshots", REMOTE)
    expected = hub.select_files(list(_FakeHub.files), "pretrained", "org/remote-sd").files
    assert sorted(_FakeHub.fetched) == sorted(expected) == sorted(_tree(tiny_dir["sd1"]))
    assert refused == "org/unknown@main: no local path by that name, and the Hugging Face hub refuses it " \
                      "(RepositoryNotFoundError)"
    assert hub.pinned_revision(folder) == {"repo_id": "org/remote-sd", "revision": REMOTE}
    assert open(os.path.join(folder, "unet", "config.json"), "rb").read() == _FakeHub.files["unet/config.json"]
