"""Hostile and unusual input to every binary: the README's promise, case by case.

Each case runs a binary with bad (or merely unusual) input and checks: the exit status (2: bad
input, 130: interrupted, 0: handled), exactly one line on stderr naming the problem, nothing
left behind (no new file or folder in the case's folder when the run failed), and every file the
user had there byte-identical afterwards.

Speed: the cases of one binary run in ONE worker process (this file run as a script), each through
the binary's absl flag parsing with the flags reset in between (`FLAGS.unparse_flags()`): eight
jax imports instead of ~80. Only Ctrl-C is tested with one subprocess per binary (a real SIGINT).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import selectors
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_TIMEOUT_S = 400


class _Evil:
    """Unpickling this creates the file it names: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    binary: str
    args: tuple  # "{d}" is the case's folder; "{sd1}", "{lora}", ... the shared assets
    code: int = 2
    message: str = ""  # in the one stderr line
    setup: tuple = ()  # (op, relative path[, arg]) building the user's files in {d}: see _setup
    pre: tuple = ()  # (expected code, args, [(op, path, arg), ...] applied after it) run first
    check: str = ""  # name of an extra check in CHECKS


# ---- the table --------------------------------------------------------------------------------

TINY = ("--pretrained={sd1}",)
EXTRACT = (*TINY, "--finetuned={lora}", "--prompt=a photo of sks dog", "--num_images=2", "--batch_size=2",
           "--steps=2")
FINETUNE = (*TINY, "--train_dir={train}", "--caption=a photo of sks", "--steps=1")
CAPTION = (*TINY, "--finetuned={lora}", "--max_words=1", "--refine_sweeps=0", "--max_candidates=4")
USER = (("file", "keep/user.txt", "the user's notes"),)  # a bystander file in every case folder
FOREIGN = (("file", "out/user.txt", "mine"), ("file", "out/images/00000.png", "png?"))
TRAIN_COPY = (("copytree", "train", "train"),)

CASES = [
    # make_tiny
    Case("tiny_out_unrelated_dir", "make_tiny", ("--out={d}/out",), message="not written by finextract",
         setup=FOREIGN),
    Case("tiny_out_is_file", "make_tiny", ("--out={d}/out",), message="not a folder",
         setup=(("file", "out", "x"),)),
    Case("tiny_out_under_file", "make_tiny", ("--out={d}/f/sub",), message="is a file", setup=(("file", "f", "x"),)),
    Case("tiny_out_virtual_fs", "make_tiny", ("--out=/proc/finextract_h15/tiny",)),
    Case("tiny_positional", "make_tiny", ("stray", "--out={d}/out"), message="positional"),
    Case("tiny_bad_enum", "make_tiny", ("--out={d}/out", "--kind=huge"), message="--kind"),
    Case("tiny_unknown_flag", "make_tiny", ("--out={d}/out", "--colour=red"), message="colour"),
    Case("tiny_missing_out", "make_tiny", (), message="--out"),
    Case("tiny_empty_dir_adopted", "make_tiny", ("--out={d}/out", "--kind=pixel"), code=0,
         setup=(("dir", "out"),)),
    Case("tiny_rerun_replaces_own", "make_tiny", ("--out={d}/out", "--kind=pixel"), code=0,
         pre=((0, ("--out={d}/out", "--kind=pixel"), ()),)),
    # finetune
    Case("ft_out_unrelated_dir", "finetune", (*FINETUNE, "--out={d}/out"), message="not written by finextract",
         setup=FOREIGN),
    Case("ft_out_is_train_dir", "finetune", (*TINY, "--train_dir={d}/train", "--caption=x", "--out={d}/train"),
         message="--out", setup=TRAIN_COPY),
    Case("ft_lora_out_is_train_dir", "finetune", (*TINY, "--train_dir={d}/train", "--caption=x", "--method=lora",
                                                  "--out={d}/train"), message="--out", setup=TRAIN_COPY),
    Case("ft_out_inside_train_dir", "finetune", (*TINY, "--train_dir={d}/train", "--caption=x",
                                                 "--out={d}/train/model"), message="overlap", setup=TRAIN_COPY),
    Case("ft_train_dir_inside_own_out", "finetune", (*TINY, "--train_dir={d}/out/train", "--caption=x",
                                                     "--out={d}/out"), message="overlap",
         setup=(("file", "out/.finextract", "created"), ("copytree", "train", "out/train"))),
    Case("ft_out_inside_pretrained", "finetune", ("--pretrained={d}/sd1", "--train_dir={train}", "--caption=x",
                                                  "--out={d}/sd1/ft"), message="overlap",
         setup=(("copytree", "sd1", "sd1"),)),
    Case("ft_checkpoint_dir_unrelated", "finetune", (*FINETUNE, "--out={d}/out", "--checkpoint_dir={d}/ck"),
         message="not written by finextract", setup=(("file", "ck/notes.txt", "mine"),)),
    Case("ft_default_checkpoint_dir_unrelated", "finetune", (*FINETUNE, "--out={d}/out"),
         message="--checkpoint_dir", setup=(("file", "out.checkpoints/notes.txt", "mine"),)),
    Case("ft_checkpoint_dir_is_train_dir", "finetune", (*TINY, "--train_dir={d}/train", "--caption=x",
                                                        "--out={d}/out", "--checkpoint_dir={d}/train"),
         message="--checkpoint_dir", setup=TRAIN_COPY),
    Case("ft_checkpoint_dir_inside_out", "finetune", (*FINETUNE, "--out={d}/out", "--checkpoint_dir={d}/out/ck"),
         message="overlap"),
    Case("ft_lora_file_unrelated", "finetune", (*FINETUNE, "--method=lora", "--out={d}/mine.safetensors"),
         message="not written by finextract", setup=(("safetensors", "mine.safetensors"),)),
    Case("ft_lora_file_is_dir", "finetune", (*FINETUNE, "--method=lora", "--out={d}/x.safetensors"),
         message="is a folder", setup=(("dir", "x.safetensors"),)),
    Case("ft_out_under_file", "finetune", (*FINETUNE, "--out={d}/f/model"), message="is a file",
         setup=(("file", "f", "x"),)),
    Case("ft_out_virtual_fs", "finetune", (*FINETUNE, "--out=/proc/finextract_h15/model")),
    Case("ft_lr_nan", "finetune", (*FINETUNE, "--out={d}/out", "--learning_rate=nan"), message="finite"),
    Case("ft_alpha_inf", "finetune", (*FINETUNE, "--method=lora", "--out={d}/out", "--lora_alpha=inf"),
         message="finite"),
    Case("ft_rank_zero", "finetune", (*FINETUNE, "--method=lora", "--out={d}/out", "--rank=0"), message="rank"),
    Case("ft_steps_negative", "finetune", (*FINETUNE, "--out={d}/out", "--steps=-1"), message="steps"),
    Case("ft_checkpoint_every_negative", "finetune", (*FINETUNE, "--out={d}/out", "--checkpoint_every=-1"),
         message="checkpoint_every"),
    Case("ft_train_dir_missing", "finetune", (*TINY, "--train_dir={d}/nope", "--caption=x", "--out={d}/out"),
         message="not a folder"),
    Case("ft_tiny_image", "finetune", (*TINY, "--train_dir={d}/train", "--caption=x", "--out={d}/out"),
         message="smaller than", setup=(("image", "train/a.png", (1, 1)),)),
    Case("ft_truncated_image", "finetune", (*TINY, "--train_dir={d}/train", "--caption=x", "--out={d}/out"),
         message="cannot read image", setup=(("image", "train/a.png", (16, 16)), ("truncate", "train/a.png", 60))),
    # extract
    Case("ex_workdir_unrelated_with_image0", "extract", (*EXTRACT, "--workdir={d}/out"),
         message="not written by finextract", setup=FOREIGN),
    Case("ex_workdir_is_file", "extract", (*EXTRACT, "--workdir={d}/out"), message="not a folder",
         setup=(("file", "out", "x"),)),
    Case("ex_workdir_under_file", "extract", (*EXTRACT, "--workdir={d}/f/run"), message="is a file",
         setup=(("file", "f", "x"),)),
    Case("ex_workdir_virtual_fs", "extract", (*EXTRACT, "--workdir=/proc/finextract_h15/run")),
    Case("ex_workdir_inside_pretrained", "extract", ("--pretrained={d}/sd1", *EXTRACT[1:], "--workdir={d}/sd1/run"),
         message="overlap", setup=(("copytree", "sd1", "sd1"),)),
    Case("ex_guidance_nan", "extract", (*EXTRACT, "--workdir={d}/out", "--guidance_scale=nan"),
         message="--guidance_scale must be a finite number"),
    Case("ex_guidance_inf", "extract", (*EXTRACT, "--workdir={d}/out", "--guidance_scale=inf"),
         message="--guidance_scale must be a finite number"),
    Case("ex_correction_nan", "extract", (*EXTRACT, "--workdir={d}/out", "--correction=nan"),
         message="--correction"),
    Case("ex_guidance_max_timestep_negative", "extract", (*EXTRACT, "--workdir={d}/out", "--guidance_max_timestep=-1"),
         message="--guidance_max_timestep must be >= 0"),
    Case("ex_lora_scale_nan", "extract", (*EXTRACT, "--workdir={d}/out", "--lora_scale=nan"),
         message="--lora_scale"),
    Case("ex_lora_with_nan", "extract", (*TINY, "--finetuned={d}/nan.safetensors", *EXTRACT[2:], "--workdir={d}/out"),
         message="holds NaN", setup=(("nan_lora", "nan.safetensors"),)),
    Case("ex_num_images_zero", "extract", (*EXTRACT, "--workdir={d}/out", "--num_images=0"), message="num_images"),
    Case("ex_batch_size_zero", "extract", (*EXTRACT, "--workdir={d}/out", "--batch_size=0"), message="batch_size"),
    Case("ex_finetuned_missing", "extract", (*TINY, "--finetuned={d}/nope", *EXTRACT[2:], "--workdir={d}/out"),
         message="not found"),
    Case("ex_init_latents_wrong_shape", "extract", (*EXTRACT, "--workdir={d}/out", "--init_latents={d}/z.npy"),
         message="init_latents", setup=(("npy", "z.npy", (3, 3)),)),
    Case("ex_pickled_bin_lora", "extract", (*TINY, "--finetuned={d}/evil.bin", *EXTRACT[2:], "--workdir={d}/out"),
         setup=(("evil_pickle", "evil.bin"),), check="no_marker"),
    Case("ex_pickled_ckpt_finetuned", "extract", (*TINY, "--finetuned={d}/evil.ckpt", *EXTRACT[2:],
                                                  "--workdir={d}/out"),
         setup=(("evil_pickle", "evil.ckpt"),), check="no_marker"),
    Case("ex_pickled_bin_in_pretrained", "extract", ("--pretrained={d}/sd1", *EXTRACT[1:], "--workdir={d}/out"),
         setup=(("copytree", "sd1", "sd1"), ("rm", "sd1/unet/diffusion_pytorch_model.safetensors"),
                ("evil_pickle", "sd1/unet/diffusion_pytorch_model.bin")), check="no_marker"),
    Case("ex_pickled_init_latents", "extract", (*EXTRACT, "--workdir={d}/out", "--init_latents={d}/evil.npy"),
         message="init_latents", setup=(("evil_npy", "evil.npy"),), check="no_marker"),
    Case("ex_resume_redoes_truncated_png", "extract", (*EXTRACT, "--workdir={d}/out"), code=0,
         pre=((0, (*EXTRACT, "--workdir={d}/out"), (("truncate", "out/images/00001.png", 40),)),),
         check="images_complete"),
    Case("ex_failed_run_then_corrected", "extract", (*EXTRACT, "--workdir={d}/out"), code=0,
         pre=((2, (*EXTRACT, "--workdir={d}/out", "--guidance_scale=1e30"), ()),), check="images_complete"),
    Case("ex_empty_workdir_adopted", "extract", (*EXTRACT, "--workdir={d}/out"), code=0, setup=(("dir", "out"),),
         check="images_complete"),
    Case("ex_changed_setting_refused", "extract", (*EXTRACT, "--workdir={d}/out", "--seed=5"), message="seed",
         pre=((0, (*EXTRACT, "--workdir={d}/out"), ()),)),
    # cluster
    Case("cl_user_file_in_extracted", "cluster", ("--workdir={d}/w", "--images={images}", "--num_train=2",
                                                  "--features=pixel"),
         message="did not write", pre=((0, ("--workdir={d}/w", "--images={images}", "--num_train=2",
                                            "--features=pixel"), (("write", "w/extracted/mine.png", "x"),)),)),
    Case("cl_rerun_replaces_only_own", "cluster", ("--workdir={d}/w", "--images={images}", "--num_train=3",
                                                   "--features=pixel"), code=0,
         pre=((0, ("--workdir={d}/w", "--images={images}", "--num_train=2", "--features=pixel"), ()),),
         check="extracted_is_representatives"),
    Case("cl_workdir_unrelated", "cluster", ("--workdir={d}/out", "--images={images}", "--num_train=2",
                                             "--features=pixel"), message="not written by finextract", setup=FOREIGN),
    Case("cl_workdir_inside_images", "cluster", ("--workdir={d}/imgs/w", "--images={d}/imgs", "--num_train=2",
                                                 "--features=pixel"), message="overlap",
         setup=(("copytree", "images", "imgs"),)),
    Case("cl_workdir_under_file", "cluster", ("--workdir={d}/f/w", "--similarity={sim}", "--num_train=2"),
         message="is a file", setup=(("file", "f", "x"),)),
    Case("cl_threshold_nan", "cluster", ("--workdir={d}/w", "--similarity={sim}", "--num_train=2", "--threshold=nan"),
         message="finite"),
    Case("cl_threshold_out_of_range", "cluster", ("--workdir={d}/w", "--similarity={sim}", "--num_train=2",
                                                  "--threshold=2"), message="[-1, 1]"),
    Case("cl_num_train_zero", "cluster", ("--workdir={d}/w", "--similarity={sim}", "--num_train=0"),
         message="num_train"),
    Case("cl_num_train_too_large", "cluster", ("--workdir={d}/w", "--similarity={sim}", "--num_train=99"),
         message="larger than"),
    Case("cl_two_inputs", "cluster", ("--workdir={d}/w", "--similarity={sim}", "--images={images}", "--num_train=2"),
         message="exactly one"),
    Case("cl_similarity_not_npy", "cluster", ("--workdir={d}/w", "--similarity={d}/s.npy", "--num_train=2"),
         message="not a readable .npy", setup=(("file", "s.npy", "not numpy"),)),
    Case("cl_pickled_features_file", "cluster", ("--workdir={d}/w", "--features_file={d}/evil.npy", "--num_train=2"),
         message="features_file", setup=(("evil_npy", "evil.npy"),), check="no_marker"),
    Case("cl_pickled_similarity", "cluster", ("--workdir={d}/w", "--similarity={d}/evil.npy", "--num_train=2"),
         message="similarity", setup=(("evil_npy", "evil.npy"),), check="no_marker"),
    Case("cl_truncated_image", "cluster", ("--workdir={d}/w", "--images={d}/imgs", "--num_train=2",
                                           "--features=pixel"),
         message="cannot read image", setup=(("copytree", "images", "imgs"), ("truncate", "imgs/00001.png", 50))),
    Case("cl_batch_size_zero", "cluster", ("--workdir={d}/w", "--images={images}", "--num_train=2",
                                           "--features=pixel", "--batch_size=0"), message="batch_size"),
    # evaluate
    Case("ev_workdir_inside_train_dir", "evaluate", ("--extracted={images}", "--train_dir={d}/train",
                                                     "--workdir={d}/train/eval", "--features=pixel"),
         message="overlap", setup=TRAIN_COPY),
    Case("ev_workdir_is_extracted", "evaluate", ("--extracted={d}/ex", "--train_dir={train}", "--workdir={d}/ex",
                                                 "--features=pixel"), message="--workdir",
         setup=(("copytree", "images", "ex"),)),
    Case("ev_workdir_unrelated", "evaluate", ("--extracted={images}", "--train_dir={train}", "--workdir={d}/out",
                                              "--features=pixel"), message="not written by finextract", setup=FOREIGN),
    Case("ev_threshold_nan", "evaluate", ("--extracted={images}", "--train_dir={train}", "--workdir={d}/w",
                                          "--features=pixel", "--success_threshold=nan"), message="finite"),
    Case("ev_threshold_out_of_range", "evaluate", ("--extracted={images}", "--train_dir={train}", "--workdir={d}/w",
                                                   "--features=pixel", "--success_threshold=5"), message="[-1, 1]"),
    Case("ev_extracted_empty", "evaluate", ("--extracted={d}/empty", "--train_dir={train}", "--workdir={d}/w",
                                            "--features=pixel"), message="holds no images", setup=(("dir", "empty"),)),
    Case("ev_train_dir_missing", "evaluate", ("--extracted={images}", "--train_dir={d}/nope", "--workdir={d}/w",
                                              "--features=pixel"), message="not a folder"),
    Case("ev_batch_size_zero", "evaluate", ("--extracted={images}", "--train_dir={train}", "--workdir={d}/w",
                                            "--features=pixel", "--batch_size=0"), message="batch_size"),
    Case("ev_workdir_under_file", "evaluate", ("--extracted={images}", "--train_dir={train}", "--workdir={d}/f/w",
                                               "--features=pixel"), message="is a file", setup=(("file", "f", "x"),)),
    Case("ev_odd_images_scored", "evaluate", ("--extracted={images}", "--train_dir={d}/train", "--workdir={d}/w",
                                              "--features=pixel"), code=0,
         setup=(("image16", "train/grey16.png"), ("image_rgba", "train/rgba.png"), ("image_palette", "train/p.png"))),
    # caption
    Case("ca_workdir_unrelated", "caption", (*CAPTION, "--workdir={d}/out"), message="not written by finextract",
         setup=FOREIGN),
    Case("ca_workdir_inside_images", "caption", (*CAPTION, "--images={d}/imgs", "--workdir={d}/imgs/w"),
         message="overlap", setup=(("copytree", "images", "imgs"),)),
    Case("ca_timesteps_not_int", "caption", (*CAPTION, "--workdir={d}/w", "--timesteps=a,b"), message="timesteps"),
    Case("ca_finetuned_missing", "caption", (*TINY, "--finetuned={d}/nope", "--workdir={d}/w"), message="not found"),
    Case("ca_min_gain_nan", "caption", (*CAPTION, "--workdir={d}/w", "--min_gain=nan"), message="finite"),
    Case("ca_lora_scale_inf", "caption", (*CAPTION, "--workdir={d}/w", "--lora_scale=inf"), message="finite"),
    Case("ca_workdir_is_file", "caption", (*CAPTION, "--workdir={d}/out"), message="not a folder",
         setup=(("file", "out", "x"),)),
    # reproduce
    Case("re_workdir_unrelated", "reproduce", (*TINY, "--workdir={d}/out", "--datasets={train}:a photo of sks"),
         message="not written by finextract", setup=FOREIGN),
    Case("re_workdir_inside_dataset", "reproduce", (*TINY, "--workdir={d}/train/runs",
                                                    "--datasets={d}/train:a photo of sks"), message="overlap",
         setup=TRAIN_COPY),
    Case("re_guidance_nan", "reproduce", (*TINY, "--workdir={d}/w", "--datasets={train}:x", "--guidance_scale=nan"),
         message="finite"),
    Case("re_cfg_scale_inf", "reproduce", (*TINY, "--workdir={d}/w", "--datasets={train}:x", "--cfg_scale=inf"),
         message="finite"),
    Case("re_dataset_missing", "reproduce", (*TINY, "--workdir={d}/w", "--datasets={d}/nope:x"),
         message="is not a folder"),
    Case("re_bad_finetune_name", "reproduce", (*TINY, "--workdir={d}/w", "--datasets={train}:x", "--finetunes=full"),
         message="finetunes"),
    # demo
    Case("de_workdir_unrelated", "demo", ("--workdir={d}/out", "--quick"), message="not written by finextract",
         setup=FOREIGN),
    Case("de_workdir_is_file", "demo", ("--workdir={d}/out", "--quick"), message="not a folder",
         setup=(("file", "out", "x"),)),
    Case("de_too_few_images", "demo", ("--workdir={d}/w", "--num_images=3"), message="--num_images=3"),
    Case("de_workdir_virtual_fs", "demo", ("--workdir=/sys/finextract_h15", "--quick")),
]
BINARIES = sorted({c.binary for c in CASES})


# ---- assets and case folders ----------------------------------------------------------------


def _png(path, size, mode="RGB", seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "I;16":
        Image.fromarray((np.linspace(0, 65535, w * h).reshape(h, w)).astype(np.uint16)).save(path)
    else:
        pixels = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if len(mode) == 1 else pixels, mode).save(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_dir, tiny_finetuned):
    root = tmp_path_factory.mktemp("hostile_assets")
    train, images = root / "train", root / "images"
    for i in range(3):
        _png(str(train / f"t{i}.png"), (16, 16), seed=i)
    for i in range(6):  # two near-copies of each training image
        _png(str(images / f"{i:05d}.png"), (16, 16), seed=i // 2)
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 4))
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    np.save(root / "sim.npy", (u @ u.T).astype(np.float32))
    return {"sd1": tiny_dir["sd1"], "lora": tiny_finetuned["lora"], "full": tiny_finetuned["full"],
            "train": str(train), "images": str(images), "sim": str(root / "sim.npy")}


def _setup(d: str, op: tuple, assets: dict):
    kind, rel, *arg = op
    path = os.path.join(d, rel)
    if kind != "rm":
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "file":
        with open(path, "w") as f:
            f.write(arg[0])
    elif kind == "dir":
        os.makedirs(path)
    elif kind == "copytree":
        shutil.copytree(assets[rel] if rel in assets else os.path.join(d, rel), os.path.join(d, arg[0]))
    elif kind == "rm":
        os.remove(path)
    elif kind == "truncate":
        with open(path, "r+b") as f:
            f.truncate(arg[0])
    elif kind == "image":
        _png(path, arg[0])
    elif kind == "image16":
        _png(path, (16, 16), "I;16")
    elif kind == "image_rgba":
        _png(path, (16, 16), "RGBA")
    elif kind == "image_palette":
        from PIL import Image

        Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L").convert("P").save(path)
    elif kind == "npy":
        np.save(path, np.zeros(arg[0], np.float32))
    elif kind == "safetensors":
        from safetensors.numpy import save_file

        save_file({"w": np.zeros((2, 2), np.float32)}, path)
    elif kind == "nan_lora":
        from safetensors.numpy import load_file, save_file

        tensors = load_file(assets["lora"])
        first = sorted(tensors)[0]
        tensors[first] = np.full_like(tensors[first], np.nan)
        save_file(tensors, path, metadata={"format": "pt"})
    elif kind == "evil_pickle":
        with open(path, "wb") as f:
            pickle.dump({"weight": _Evil(os.path.join(d, "MARKER"))}, f)
    elif kind == "evil_npy":
        np.save(path, np.array([_Evil(os.path.join(d, "MARKER"))], dtype=object), allow_pickle=True)
    else:
        raise ValueError(kind)


def _snapshot(d: str) -> dict:
    """{relative path: bytes (files) or None (folders)} of everything under d."""
    out = {}
    for folder, dirs, files in os.walk(d):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), d)] = None
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), d)] = f.read()
    return out


def _fill(args, d, assets):
    return [a.format(d=d, **assets) for a in args]


def _worker_job(case: Case, d: str, assets: dict) -> dict:
    fill = lambda args: _fill(args, d, assets)
    return {"pre": [{"code": code, "argv": fill(args), "ops": [[op, os.path.join(d, p), arg] for op, p, arg in ops]}
                    for code, args, ops in case.pre],
            "argv": fill(case.args)}


@functools.lru_cache(maxsize=None)
def _env():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(scope="module")
def outcomes(assets, tmp_path_factory):
    """Run every case, one worker process per binary; {case id: (folder, snapshot, result)}."""
    root = tmp_path_factory.mktemp("hostile")
    done = {}

    def run(binary):
        cases = [c for c in CASES if c.binary == binary]
        jobs, dirs, snaps = [], [], []
        for case in cases:
            d = str(root / case.id)
            os.makedirs(d)
            for op in USER + case.setup:
                _setup(d, op, assets)
            dirs.append(d)
            snaps.append(_snapshot(d))
            jobs.append(_worker_job(case, d, assets))
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), binary], input=json.dumps(jobs),
                              capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=WORKER_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        for case, d, snap, result in zip(cases, dirs, snaps, results):
            done[case.id] = (d, snap, result)

    failed = {}

    def get(case):
        if case.binary in failed:
            pytest.fail(f"the {case.binary} worker failed: {failed[case.binary]}")
        if case.id not in done:
            try:
                run(case.binary)
            except BaseException as err:
                failed[case.binary] = repr(err)[:3000]
                raise
        return done[case.id]

    return get


def _images_complete(d, assets):
    from PIL import Image

    record = json.load(open(os.path.join(d, "out", "run.json")))
    assert record["status"] == "complete" and "error" not in record
    for name in ("00000.png", "00001.png"):
        with Image.open(os.path.join(d, "out", "images", name)) as img:
            img.load()
            assert [img.height, img.width] == record["image_size"]


def _extracted_is_representatives(d, assets):
    record = json.load(open(os.path.join(d, "w", "clusters.json")))
    assert sorted(os.listdir(os.path.join(d, "w", "extracted"))) == sorted(record["extracted"])
    assert len(record["extracted"]) == len(record["representatives"])


def _no_marker(d, assets):
    assert not os.path.exists(os.path.join(d, "MARKER")), "loading the pickle ran its code"


CHECKS = {"images_complete": _images_complete, "extracted_is_representatives": _extracted_is_representatives,
          "no_marker": _no_marker}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case, outcomes, assets):
    d, before, result = outcomes(case)
    assert result["pre"] == [p["code"] for p in _worker_job(case, d, assets)["pre"]], result
    lines = result["stderr"].splitlines()
    assert result["code"] == case.code, result
    if case.code:
        assert len(lines) == 1 and lines[0].startswith("error: "), result
        assert case.message in lines[0], result
    else:
        assert lines == [], result
    after = _snapshot(d)
    kept = {k: v for k, v in after.items() if k in before}
    assert kept == before, "a file the user had was changed or removed"
    if case.code and not case.pre:
        assert sorted(after) == sorted(before), f"left behind: {sorted(set(after) - set(before))}"
    if case.check:
        CHECKS[case.check](d, assets)


def test_table_covers_every_binary():
    assert len(CASES) >= 60
    assert set(BINARIES) == {"make_tiny", "finetune", "extract", "cluster", "evaluate", "caption", "reproduce",
                             "demo"}


# ---- pickles read by the library directly ---------------------------------------------------


@pytest.mark.parametrize("suffix,allow", [(".bin", False), (".ckpt", False), (".ckpt", True), (".pt", True)])
def test_weight_pickles_never_run_code(tmp_path, suffix, allow):
    from finextract_jax.errors import CheckpointError
    from finextract_jax.models.weights import read_state_dict

    marker = tmp_path / "MARKER"
    path = tmp_path / f"evil{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Evil(str(marker))}, f)
    with pytest.raises(CheckpointError):
        read_state_dict(str(path), allow_pickle=allow)
    assert not marker.exists()


def test_feature_cache_pickle_never_runs_code(tmp_path):
    """The feature cache (.npz) is read with allow_pickle=False: a planted pickle is recomputed over."""
    from finextract_jax import features, fileio

    folder = tmp_path / "imgs"
    for i in range(2):
        _png(str(folder / f"{i:05d}.png"), (16, 16), seed=i)
    fileio.mark_own(str(folder))  # caches live only in folders finextract wrote (extract's images/)
    extractor = features.get_extractor("pixel", None)
    features.compute_features(str(folder), extractor, 2, progress=False)
    caches = [os.path.join(dp, n) for dp, _, ns in os.walk(folder) for n in ns if n.endswith(".npz")]
    assert caches
    marker = tmp_path / "MARKER"
    evil = np.array([_Evil(str(marker))], dtype=object)
    for cache in caches:
        np.savez(cache, fingerprint=evil, digests=evil, features=evil)
    features.compute_features(str(folder), extractor, 2, progress=False)
    assert not marker.exists()


# ---- Ctrl-C: a real SIGINT, one subprocess per binary ------------------------------------------

SIGINT_ARGS = {
    "make_tiny": ("--out={d}/out", "--kind=sdxl"),
    "finetune": (*FINETUNE, "--out={d}/out", "--steps=50"),
    "extract": (*EXTRACT[:4], "--num_images=40", "--batch_size=2", "--steps=20", "--workdir={d}/out"),
    "cluster": ("--workdir={d}/w", "--images={many}", "--num_train=2", "--features=pixel", "--batch_size=4"),
    "evaluate": ("--extracted={many}", "--train_dir={train}", "--workdir={d}/w", "--features=pixel",
                 "--batch_size=4"),
    "caption": (*CAPTION, "--workdir={d}/w", "--num_images=4"),
    "reproduce": (*TINY, "--workdir={d}/w", "--datasets={train}:x", "--finetune_steps=50", "--num_images=4",
                  "--features=pixel"),
    "demo": ("--workdir={d}/w", "--quick"),
}


def test_ctrl_c_is_one_line_and_status_130(assets, tmp_path):
    """SIGINT while every binary works (sent once its main has said something on stdout, where all its
    chatter goes): status 130, one stderr line, the user's files untouched, no temp file left."""
    many = tmp_path / "many"
    for i in range(1500):
        _png(str(many / f"{i:05d}.png"), (16, 16), seed=i)
    procs = {}
    for binary, args in SIGINT_ARGS.items():
        d = tmp_path / binary
        d.mkdir()
        _setup(str(d), USER[0], assets)
        procs[binary] = (str(d), _snapshot(str(d)), subprocess.Popen(
            [sys.executable, "-m", f"experiments.{binary}", *_fill(args, str(d), {**assets, "many": str(many)})],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    waiting = selectors.DefaultSelector()
    for binary, (_, _, proc) in procs.items():
        waiting.register(proc.stdout, selectors.EVENT_READ, binary)
    deadline = time.monotonic() + 240
    while waiting.get_map() and time.monotonic() < deadline:
        for key, _ in waiting.select(timeout=5):
            proc = procs[key.data][2]
            got = os.read(key.fileobj.fileno(), 1)  # main has started: nothing reaches stdout before it
            assert got, (key.data, proc.wait(), proc.stderr.read().decode()[-2000:])
            proc.send_signal(signal.SIGINT)
            waiting.unregister(key.fileobj)
    assert not waiting.get_map(), f"no output from {[k.data for k in waiting.get_map().values()]}"
    for binary, (d, before, proc) in procs.items():
        _, err = proc.communicate(timeout=180)
        err = err.decode()
        assert proc.returncode == 130, (binary, proc.returncode, err[-2000:])
        assert len(err.splitlines()) == 1 and err.startswith("error: interrupted"), (binary, err)
        after = _snapshot(d)
        assert {k: v for k, v in after.items() if k in before} == before, binary
        assert not [k for k in after if os.path.basename(k).endswith(".tmp")], (binary, sorted(after))


# ---- the worker: this file run as a script ------------------------------------------------------


def _apply(op, path, arg):
    if op == "truncate":
        with open(path, "r+b") as f:
            f.truncate(arg)
    elif op == "write":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(arg)
    else:
        raise ValueError(op)


def _run_in_process(module, binary: str, argv: list) -> dict:
    import contextlib
    import io
    import traceback

    from absl import flags

    from experiments import _app

    flags.FLAGS.unparse_flags()
    sys.argv = [binary, *argv]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            _app.run(module.main)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # noqa: BLE001 - a traceback is what the case must show
            code = 1
            err.write(traceback.format_exc())
    return {"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()[-3000:]}


def _worker(binary: str):
    import importlib

    module = importlib.import_module(f"experiments.{binary}")
    results = []
    for job in json.load(sys.stdin):
        pre = []
        for step in job["pre"]:
            pre.append(_run_in_process(module, binary, step["argv"])["code"])
            for op, path, arg in step["ops"]:
                _apply(op, path, arg)
        results.append({**_run_in_process(module, binary, job["argv"]), "pre": pre})
    sys.__stdout__.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _worker(sys.argv[1])
