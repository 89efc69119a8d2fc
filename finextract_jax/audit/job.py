"""The audit job: settings -> caption, extraction, clusters, scores and report.html in one workdir.

Layout (one folder, like one method folder of `reproduce`, whose stage machinery it reuses):

    DIR/caption.json                 the recovered caption and its search (--prompt=auto)
    DIR/images/, DIR/run.json        extract's samples and run record (versions, devices)
    DIR/provenance.json              sha256 of every checkpoint file the samples came from
    DIR/clusters.json, extracted/    cluster's cliques and their representatives
    DIR/metrics.json, pairs.png      evaluate's scores (with --train_dir)
    DIR/<stage>.done.json            a finished stage's settings and seconds
    DIR/report.html                  everything above as one page (rewritten by every run)

Resumable: a rerun skips the stages with a done record and refuses, naming the flag, settings that
differ from a finished stage's, or checkpoint files that changed since the extraction. A stage that
runs again makes every later one run again too (their inputs changed).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time

from absl import logging

from finextract_jax import fileio
from finextract_jax.cluster import ClusterConfig
from finextract_jax.errors import InputError
from finextract_jax.features import FeatureConfig
from finextract_jax.guidance import get_guidance, schedule_matched_correction
from finextract_jax.metrics import ScoreConfig
from finextract_jax.models.weights import ALLOW_PICKLE_HELP
from finextract_jax.options import check_choices, option, same_as
from finextract_jax.reproduce import REFERENCE_CFG_SCALE, REFERENCE_GUIDANCE, first_alpha_bar, finished, mark_done
from finextract_jax.reproduce import Settings as ReproduceSettings
from finextract_jax.sampling.run import AUTO_PROMPT, ExtractConfig

# Candidates shown without --train_dir: above the 3-6 photos of a typical DreamBooth subject, so
# that each has a chance to appear; extra ones are only further down the ranking.
DEFAULT_NUM_TRAIN = 10
REPORT = "report.html"
PROVENANCE = "provenance.json"
STAGES = ("extract", "cluster", "evaluate")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every flag of an audit (field names are the flag names, so messages can name them).

    None means "the reference's choice": guidance_scale/correction per fine-tune kind (DreamBooth
    w=3, k=-0.02; LoRA w=5, k=0; cfg s=3), num_train = the number of --train_dir images, else
    DEFAULT_NUM_TRAIN. `caption` (no flag) replaces the caption search's settings (`caption_config`).
    The fields shared with the stages' configs take their help and choices from there.
    """

    pretrained: str = same_as(ExtractConfig, "pretrained")
    finetuned: str = same_as(ExtractConfig, "finetuned")
    workdir: str = option(help="Output folder (report.html and the stages' files).")
    prompt: str = same_as(ExtractConfig, "prompt", default=AUTO_PROMPT)
    train_dir: str | None = option(None, "Folder of the suspected training images: scores the candidates "
                                   "(AS, A-ESR).")
    num_images: int = same_as(ExtractConfig, "num_images")
    method: str = same_as(ExtractConfig, "method")
    guidance_scale: float | None = same_as(ExtractConfig, "guidance_scale", default=None,
                                           help="w (s for cfg); default: the reference's for the fine-tune's kind.")
    correction: float | None = same_as(ExtractConfig, "correction", default=None,
                                       help="k of finextract; default: the reference's for the fine-tune's kind.")
    match_correction: bool = same_as(ReproduceSettings, "match_correction")
    guidance_max_timestep: int | None = same_as(ExtractConfig, "guidance_max_timestep")
    steps: int = same_as(ExtractConfig, "steps", help="Denoising steps (also of the caption search's samples).")
    batch_size: int = same_as(ExtractConfig, "batch_size")
    sampler: str = same_as(ExtractConfig, "sampler")
    features: str = same_as(FeatureConfig, "features", default="sscd_onnx",
                            help="Image embedder for clustering and scoring (sscd_onnx needs no weights file).")
    feature_weights: str | None = same_as(FeatureConfig, "feature_weights")
    select: str = same_as(ClusterConfig, "select")
    num_train: int | None = option(None, "Candidates looked for and shown: default the number of --train_dir "
                                   f"images, else {DEFAULT_NUM_TRAIN}.")
    success_threshold: float = same_as(ScoreConfig, "success_threshold")
    seed: int = option(0, "Seed of the start noise, the caption search and the clustering.")
    dtype: str = same_as(ExtractConfig, "dtype")
    lora_scale: float = same_as(ExtractConfig, "lora_scale")
    finetuned_format: str = same_as(ExtractConfig, "finetuned_format")
    allow_pickle: bool = option(False, ALLOW_PICKLE_HELP)
    caption_candidates: str | None = option(None, "With --prompt=auto: a file of whole candidate captions, one per "
                                            "line, ranked before the word-by-word refinement (caption --candidates).")
    caption: object = option(None, flag=False)  # a caption.CaptionConfig, or None for caption_config(s, kind)

    def __post_init__(self):
        check_choices(self)


# ---- resolved settings ------------------------------------------------------------------------


def resolve_checkpoints(s: Settings) -> Settings:
    """Hub ids replaced by the pinned snapshot folders they stand for (models/hub.py), so that the
    checks, the hashes and the stages all see local files, and a branch that moved on since the
    last run shows up as a changed --pretrained/--finetuned."""
    from finextract_jax.models import hub

    return dataclasses.replace(s, pretrained=hub.resolve(s.pretrained, "pretrained"),
                               finetuned=hub.resolve(s.finetuned, "finetuned"))


def finetune_kind(path: str, finetuned_format: str = "auto") -> str:
    """'lora' or 'dreambooth' (any full fine-tune), as extract reads --finetuned."""
    from finextract_jax.models.pipeline import detect_format

    fmt = detect_format(path) if finetuned_format == "auto" else finetuned_format
    return "lora" if fmt == "lora" else "dreambooth"


def guidance(s: Settings, kind: str) -> tuple:
    """(w, k) for extract: the flags, else the reference's for this method and fine-tune kind."""
    default = (REFERENCE_GUIDANCE[kind] if get_guidance(s.method).model_guidance
               else {"cfg": (REFERENCE_CFG_SCALE, 0.0)}.get(s.method, (1.0, 0.0)))
    k = default[1]
    if s.correction is None and s.match_correction and k:
        k = schedule_matched_correction(k, first_alpha_bar(s.pretrained, s.sampler, s.steps))
    return (default[0] if s.guidance_scale is None else s.guidance_scale, k if s.correction is None else s.correction)


def num_train(s: Settings) -> int:
    if s.num_train is not None:
        return s.num_train
    if s.train_dir:
        from finextract_jax.imageio import list_images

        return len(list_images(s.train_dir, "--train_dir folder"))
    return DEFAULT_NUM_TRAIN


def extract_config(s: Settings, kind: str):
    from finextract_jax.sampling.run import ExtractConfig

    w, k = guidance(s, kind)
    return ExtractConfig(pretrained=s.pretrained, finetuned=s.finetuned, prompt=s.prompt, method=s.method,
                         guidance_scale=w, correction=k, guidance_max_timestep=s.guidance_max_timestep,
                         num_images=s.num_images, batch_size=s.batch_size, steps=s.steps, sampler=s.sampler,
                         seed=s.seed, dtype=s.dtype, lora_scale=s.lora_scale, finetuned_format=s.finetuned_format)


def caption_config(s: Settings, kind: str):
    """The caption search for --prompt=auto: the caption binary's advice for a real CLIP vocabulary
    (screen the 10,000 most frequent words on 4 pairs, keep 64), its samples drawn with the
    reference's guidance for this fine-tune kind, with --steps and --seed."""
    from finextract_jax.caption import CaptionConfig

    if s.caption is not None:
        return s.caption
    w, k = REFERENCE_GUIDANCE[kind]
    return CaptionConfig(screen_pairs=4, keep=64, max_candidates=10000, sample_steps=s.steps, guidance_scale=w,
                         correction=k, seed=s.seed, candidates=_absolute(s.caption_candidates) or "")


def _absolute(path):
    return os.path.abspath(path) if path else None


def stage_settings(s: Settings, kind: str) -> dict:
    """{stage: the flags (resolved to the values used) its outputs depend on}, in run order."""
    w, k = guidance(s, kind)
    out = {"extract": dict(pretrained=_absolute(s.pretrained), finetuned=_absolute(s.finetuned), prompt=s.prompt,
                           method=s.method, guidance_scale=w, correction=k, num_images=s.num_images,
                           steps=s.steps, batch_size=s.batch_size, sampler=s.sampler, seed=s.seed, dtype=s.dtype,
                           lora_scale=s.lora_scale, finetuned_format=s.finetuned_format),
           "cluster": dict(features=s.features, feature_weights=_absolute(s.feature_weights), select=s.select,
                           num_train=num_train(s), seed=s.seed)}
    if s.guidance_max_timestep is not None:  # absent otherwise: records made before it existed still match
        out["extract"]["guidance_max_timestep"] = s.guidance_max_timestep
    if s.train_dir:
        out["evaluate"] = dict(train_dir=_absolute(s.train_dir), features=s.features,
                               feature_weights=_absolute(s.feature_weights), success_threshold=s.success_threshold)
    return out


def report_settings(s: Settings, kind: str) -> dict:
    """The settings the report lists: every flag, with the defaults resolved."""
    w, k = guidance(s, kind)
    out = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name != "caption"}
    out.update(guidance_scale=w, correction=k, num_train=num_train(s), finetune_kind=kind)
    return out


# ---- checks (write nothing) -------------------------------------------------------------------


def check_inputs(s: Settings, num_devices: int) -> str:
    """Everything a stage would refuse, before anything runs or is written. Returns the kind."""
    from finextract_jax.sampling.run import _validate

    for flag in ("pretrained", "finetuned", "workdir"):
        if not getattr(s, flag):
            raise InputError(f"--{flag} is required")
    if not os.path.exists(s.pretrained):
        raise InputError(f"--pretrained {s.pretrained} does not exist; give the base model's folder")
    kind = finetune_kind(s.finetuned, s.finetuned_format)
    _validate(extract_config(s, kind), num_devices)
    if s.train_dir:
        from finextract_jax.imageio import list_images

        list_images(s.train_dir, "--train_dir folder")
    if s.caption_candidates and s.prompt != AUTO_PROMPT:
        raise InputError(f"--caption_candidates is for --prompt={AUTO_PROMPT} (the caption search); the prompt was "
                         "given")
    if s.caption_candidates and not os.path.isfile(s.caption_candidates):
        raise InputError(f"--caption_candidates {s.caption_candidates} is not a file; give one caption per line")
    count = num_train(s)
    if not 1 <= count <= s.num_images:
        raise InputError(f"--num_train={count} must be between 1 and --num_images={s.num_images}")
    fileio.check_output_dir(s.workdir, "--workdir")
    fileio.check_not_inside(s.workdir, "--workdir", {"--pretrained": s.pretrained, "--finetuned": s.finetuned,
                                                     "--train_dir": s.train_dir,
                                                     "--feature_weights": s.feature_weights,
                                                     "--caption_candidates": s.caption_candidates}, both_ways=True)
    return kind


def plan(s: Settings, kind: str) -> list:
    """[(stage, settings, done record or None)] in run order; refuses a finished stage whose
    settings differ (reproduce.finished names the flag)."""
    return [(name, settings, finished(s.workdir, name, settings))
            for name, settings in stage_settings(s, kind).items()]


# ---- provenance ---------------------------------------------------------------------------------


def _files(path: str) -> list:
    """(relative name, path) of the files of a checkpoint file or folder (hidden ones skipped)."""
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    out = []
    for folder, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [(os.path.relpath(os.path.join(folder, n), path), os.path.join(folder, n))
                for n in sorted(names) if not n.startswith(".")]
    return out


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _listing(path: str, known: dict | None = None) -> list:
    """[{file, bytes, mtime_ns, sha256}]; a file whose size and mtime match `known` keeps its hash."""
    out = []
    for name, full in _files(path):
        stat = os.stat(full)
        entry = {"file": name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        old = (known or {}).get(name)
        same = old and (old["bytes"], old["mtime_ns"]) == (entry["bytes"], entry["mtime_ns"])
        out.append({**entry, "sha256": old["sha256"] if same else _sha256(full)})
    return out


def provenance(s: Settings, kind: str, previous: dict | None = None) -> dict:
    """The checkpoints' files and hashes; refuses files that differ from `previous` (the record
    of the run whose images are in the workdir): its samples came from other weights."""
    out = {"finetune_kind": kind}
    for flag in ("pretrained", "finetuned"):
        path = os.path.abspath(getattr(s, flag))
        old = (previous or {}).get(flag, {})
        known = {f["file"]: f for f in old.get("files", [])}
        files = _listing(path, known)
        if previous:
            changed = sorted({f["file"] for f in files} ^ set(known)
                             | {f["file"] for f in files if f["file"] in known and f["sha256"] != known[f["file"]]["sha256"]})
            if changed:
                raise InputError(f"--{flag} {path}: {', '.join(changed[:3])} changed since this audit extracted its "
                                 f"images (see {PROVENANCE}); use a new --workdir")
        out[flag] = {"path": path, "files": files}
    return out


# ---- running ----------------------------------------------------------------------------------


def _run_stage(s: Settings, kind: str, stage: str, tools: dict, progress: bool):
    from finextract_jax import stages as stages_lib

    if stage == "extract":
        from finextract_jax.sampling.run import extract

        recover = None
        if s.prompt == AUTO_PROMPT:
            from finextract_jax.caption import auto_prompt_resolver

            recover = auto_prompt_resolver(s.workdir, caption_config(s, kind), progress=progress)
        extract(extract_config(s, kind), s.workdir, progress=progress, devices=tools["devices"], recover_caption=recover,
                allow_pickle=s.allow_pickle)
    elif stage == "cluster":
        stages_lib.cluster_images(s.workdir, os.path.join(s.workdir, "images"), num_train(s), tools["extractor"],
                                  select=s.select, seed=s.seed, progress=progress)
    else:
        stages_lib.evaluate_to_workdir(os.path.join(s.workdir, stages_lib.EXTRACTED), s.train_dir, s.workdir,
                                       tools["extractor"], s.features, s.success_threshold, progress=progress)


def audit(s: Settings, devices=None, progress: bool = True) -> dict:
    """Run every unfinished stage, then (re)write DIR/report.html. Returns {"report", "ran", "skipped"}."""
    import jax

    from finextract_jax import features as feats_lib
    from finextract_jax.audit.report import write_report

    devices = devices if devices is not None else jax.devices()
    s = resolve_checkpoints(s)
    kind = check_inputs(s, len(devices))
    stages = plan(s, kind)
    path = os.path.join(s.workdir, PROVENANCE)
    previous = fileio.read_record(path, f"delete {path} to hash the checkpoints again") if os.path.exists(path) else None
    record = provenance(s, kind, previous)  # hashes only files that are new or touched
    tools = {"devices": devices}
    if any(done is None for name, _, done in stages if name != "extract"):
        tools["extractor"] = feats_lib.get_extractor(s.features, s.feature_weights)  # bad weights fail here
    ran, skipped = [], []
    with fileio.claimed(s.workdir, "--workdir"):
        for name, settings, done in stages:
            if done is not None and not ran:
                logging.info("%s: done (%.1f s), skipped", name, done["seconds"])
                skipped.append(name)
                continue
            logging.info("%s ...", name)
            start = time.perf_counter()
            _run_stage(s, kind, name, tools, progress)
            if name == "extract":
                fileio.atomic_write_json(path, record)
            done = mark_done(s.workdir, name, settings, time.perf_counter() - start)
            logging.info("%s: done in %.1f s", name, done["seconds"])
            ran.append(name)
        if not os.path.exists(path) or previous != record:
            fileio.atomic_write_json(path, record)  # mtimes touched, or a record deleted by hand
        report = write_report(s.workdir, report_settings(s, kind))
    logging.info("wrote %s", report)
    return {"report": report, "ran": ran, "skipped": skipped}
