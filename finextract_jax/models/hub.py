"""Hugging Face hub ids as checkpoints: `org/name[@revision]` or `org/name/FILE[@revision]`.

A path that exists locally always wins; any other string shaped like a hub id is fetched through
huggingface_hub into its usual cache ($HF_HUB_CACHE, else $HF_HOME/hub), downloading only what
the loaders read: for a diffusers-layout model the configs, tokenizers and one weight file per
component (in the order `weights.find_weights` prefers them; never safety_checker/ or the other
weight formats), for a LoRA repo its one `.safetensors` file, for a PEFT save its
adapter_model.safetensors and adapter_config.json (at the top, or in unet/ and text_encoder[_2]/). The revision (a branch, tag or
commit; `main` by default) is pinned to its commit once, so every file comes from the same
commit, and the resolved path ends in `snapshots/<commit>/`, which `pinned_revision` reads back
for run records. With HF_HUB_OFFLINE set (or the hub unreachable), the cached snapshot is used.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re

from finextract_jax.errors import CheckpointError
from finextract_jax.models.weights import weight_file_names

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:/(?P<file>[\w./-]+?))?"
                    r"(?:@(?P<revision>[\w./-]+))?$")
_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})")
LORA_FILE = "pytorch_lora_weights.safetensors"
# Component folder -> weight family, for what each role loads.
_PRETRAINED = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers",
               "text_encoder_2": "transformers"}
_FINETUNED = {"unet": "diffusers", "text_encoder": "transformers", "text_encoder_2": "transformers"}
_EXTRA_FILES = ("model_index.json", "scheduler/scheduler_config.json")
_TOKENIZERS = ("tokenizer/", "tokenizer_2/")
_PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclasses.dataclass(frozen=True)
class Selection:
    files: list  # repository paths to download
    path: str  # what the loader is handed, relative to the snapshot ('' = the snapshot folder)


def is_hub_id(spec: str) -> bool:
    return bool(spec) and not os.path.exists(spec) and HUB_ID.match(spec) is not None


def select_files(files: list, role: str, repo: str, file: str | None = None) -> Selection:
    """What to download of a repository holding `files`, for role 'pretrained' or 'finetuned'."""
    files = set(files)
    if file:
        if file not in files:
            raise CheckpointError(f"{repo}: has no file {file}")
        return Selection([file], file)
    if "unet/config.json" in files:
        selected = [f for f in _EXTRA_FILES if f in files] + [f for f in sorted(files) if f.startswith(_TOKENIZERS)]
        for component, family in (_PRETRAINED if role == "pretrained" else _FINETUNED).items():
            if f"{component}/config.json" not in files:
                continue
            weights = [f"{component}/{n}" for n in weight_file_names(family) if f"{component}/{n}" in files]
            selected += [f"{component}/config.json"] + weights[:1]
        return Selection(selected, "")
    if role == "finetuned" and LORA_FILE in files:
        return Selection([LORA_FILE], LORA_FILE)
    # PEFT's save_pretrained: adapter weights and the adapter_config.json giving their scales.
    peft = [f for f in sorted(files) if f.rsplit("/", 1)[-1] in _PEFT_FILES
            and ("/" not in f or f.split("/")[0] in _FINETUNED and f.count("/") == 1)]
    if role == "finetuned" and any(f.endswith(_PEFT_FILES[0]) for f in peft):
        return Selection(peft, "")
    top = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
    if role == "finetuned" and len(top) == 1:
        return Selection(top, top[0])
    what = "a diffusers-layout model (no unet/config.json)" if role == "pretrained" else \
        f"a fine-tune (no unet/config.json or {LORA_FILE})"
    hint = f"; name one file as {repo}/FILE, e.g. {repo}/{top[0]}" if top else ""
    raise CheckpointError(f"{repo}: not {what}{hint}")


def pinned_revision(path: str) -> dict | None:
    """{'repo_id', 'revision' (the commit)} of a path inside a hub cache snapshot, else None."""
    match = _SNAPSHOT.search(os.path.abspath(path)) if path else None
    return {"repo_id": f"{match['org']}/{match['name']}", "revision": match["commit"]} if match else None


def pinned_revisions(**paths) -> dict:
    """{role: pinned_revision(path)} for the loaded paths that came from the hub."""
    return {role: pin for role, pin in ((role, pinned_revision(path)) for role, path in paths.items()) if pin}


def _cache_dir() -> str:
    """huggingface_hub's cache, read now (its own constant is fixed when it is first imported)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _listing(folder: str) -> list:
    return [os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            for root, _, names in os.walk(folder) for name in names]


def _fetch(repo: str, revision: str, role: str, file: str | None) -> str:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    cache = _cache_dir()
    info = None
    if not _offline():
        try:
            info = HfApi().model_info(repo, revision=revision)
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as err:
            raise CheckpointError(f"{repo}@{revision}: no local path by that name, and the Hugging Face hub "
                                  f"refuses it ({type(err).__name__})") from None
        except Exception as err:  # noqa: BLE001 - unreachable hub: fall back to the cache, as huggingface_hub does
            log.warning("%s: the Hugging Face hub is unreachable (%s); using the local cache", repo,
                        type(err).__name__)
    if info is None:
        try:
            folder = snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True)
        except LocalEntryNotFoundError:
            raise CheckpointError(f"{repo}@{revision}: no local path by that name, and not in the Hugging Face "
                                  f"cache {cache} ({'HF_HUB_OFFLINE is set' if _offline() else 'hub unreachable'})"
                                  ) from None
        return _inside(folder, select_files(_listing(folder), role, repo, file))
    selection = select_files([s.rfilename for s in info.siblings], role, repo, file)
    folder = snapshot_download(repo, revision=info.sha, cache_dir=cache, allow_patterns=selection.files)
    return _inside(folder, selection)


def _inside(folder: str, selection: Selection) -> str:
    return os.path.join(folder, selection.path) if selection.path else folder


def resolve(spec: str, role: str) -> str:
    """The local path a --pretrained/--finetuned value stands for (role 'pretrained' or 'finetuned')."""
    if not spec or os.path.exists(spec):
        return spec
    match = HUB_ID.match(spec)
    if match is None:
        raise CheckpointError(f"{spec}: not found: no such local file or folder, and not a Hugging Face hub id "
                              "(org/name[@revision])")
    path = _fetch(match["repo"], match["revision"] or "main", role, match["file"])
    log.info("%s -> %s", spec, path)
    return path


def as_recorded(spec: str) -> str:
    """A --pretrained/--finetuned value as run records keep it: local paths absolute, hub ids as given."""
    return spec if not spec or is_hub_id(spec) else os.path.abspath(spec)
