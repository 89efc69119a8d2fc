"""The paper-table runner as a library: fine-tune, extract per method, cluster, evaluate, tabulate.

experiments/reproduce.py is its command line (and says what it writes); the demo
(finextract_jax/demo/run.py) runs it on the embedded model. Kept out of the binary because absl
flags are global: another binary could not import it without clashing on --workdir and others.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time

from absl import logging

from finextract_jax.cluster import ClusterConfig
from finextract_jax.errors import InputError
from finextract_jax.features import FeatureConfig
from finextract_jax.fileio import changed_settings, read_record
from finextract_jax.finetune.config import DEFAULT_LEARNING_RATE, FinetuneConfig
from finextract_jax.finetune.config import METHODS as FINETUNE_METHODS
from finextract_jax.guidance import METHODS as GUIDANCE_METHODS, PAPER_METHODS, get_guidance
from finextract_jax.guidance import schedule_matched_correction
from finextract_jax.metrics import ScoreConfig
from finextract_jax.models.weights import ALLOW_PICKLE_HELP
from finextract_jax.options import check_choices, option, same_as
from finextract_jax.sampling.run import ExtractConfig

FINETUNES = FINETUNE_METHODS
METHODS = GUIDANCE_METHODS
# docs/method.md §2: the reference's model-guidance (w, k) per fine-tuning method, and CFG's s.
REFERENCE_GUIDANCE = {"dreambooth": (3.0, -0.02), "lora": (5.0, 0.0)}
REFERENCE_CFG_SCALE = 3.0
STAGES = ("finetune", "extract", "cluster", "evaluate")
TABLE_COLUMNS = ("dataset", "finetune", "method", "AS", "A_ESR", "num_train", "num_guesses", "num_extracted",
                 "finetune_s", "extract_s", "cluster_s", "evaluate_s")



@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train_dir: str  # absolute
    caption: str | None  # None: every image is captioned in metadata.csv


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every flag of the run (field names are the flag names, so messages can name them); the fields
    shared with the stages' configs take their help and choices from there."""

    pretrained: str = option(help="Base SD folder (diffusers layout) that every dataset is fine-tuned from.")
    workdir: str = option(help="Output folder (see the layout above).")
    datasets: tuple = option(flag=False)  # of Dataset; the binary's --datasets/--datasets_file
    finetunes: tuple = option(FINETUNES, "Fine-tuning methods.", choices=FINETUNES)
    methods: tuple = option(PAPER_METHODS, "Extraction methods.", choices=METHODS)
    num_images: int = same_as(ExtractConfig, "num_images", help="N: images generated per (fine-tune, method).")
    guidance_scale: float | None = same_as(ExtractConfig, "guidance_scale", default=None, help="w of finextract "
                                           "(default: the reference's, 3.0 DreamBooth, 5.0 LoRA).")
    correction: float | None = same_as(ExtractConfig, "correction", default=None, help="k of finextract "
                                       "(default: the reference's, -0.02 DreamBooth, 0.0 LoRA).")
    match_correction: bool = option(False, "Where --correction is not given, scale the reference's k to the base's "
                                    "noise schedule: k x 13.12 / (sigma/alpha at the sampler's first step), so that "
                                    "the first step moves x0 as far as in the reference's SD sampler "
                                    "(docs/method.md §2; identity for SD's schedule at 50 steps).")
    guidance_max_timestep: int | None = same_as(ExtractConfig, "guidance_max_timestep",
                                                help="finextract only: guide at timesteps t <= this (default: all).")
    cfg_scale: float = option(REFERENCE_CFG_SCALE, "s of the cfg baseline.")
    steps: int = same_as(ExtractConfig, "steps")
    batch_size: int = same_as(ExtractConfig, "batch_size")
    sampler: str = same_as(ExtractConfig, "sampler")
    features: str = same_as(FeatureConfig, "features", help="Image embedder for cluster and evaluate.")
    feature_weights: str | None = same_as(FeatureConfig, "feature_weights")
    select: str = same_as(ClusterConfig, "select")
    # The paper's stopping rule (docs/method.md §4), so that the table is the paper's; "chance"
    # (the cluster binary's default) is the stricter rule.
    schedule: str = same_as(ClusterConfig, "schedule", default="reference")
    success_threshold: float = same_as(ScoreConfig, "success_threshold")
    finetune_steps: int = same_as(FinetuneConfig, "steps")
    dreambooth_learning_rate: float | None = option(None, "DreamBooth learning rate (default: the reference's "
                                                    f"{DEFAULT_LEARNING_RATE['dreambooth']:g}).")
    lora_learning_rate: float | None = option(None, "LoRA learning rate (default: the reference's "
                                              f"{DEFAULT_LEARNING_RATE['lora']:g}).")
    rank: int = same_as(FinetuneConfig, "rank")
    lora_alpha: float | None = same_as(FinetuneConfig, "lora_alpha")
    finetune_batch_size: int = same_as(FinetuneConfig, "batch_size", help="Fine-tuning images per step.")
    resolution: int | None = option(None, "Fine-tuning resolution (default: the model's).")
    augment: str = same_as(FinetuneConfig, "augment")
    checkpoint_every: int = option(100, "Fine-tuning checkpoint interval in steps (0: none).")
    seed: int = option(0, "Seed of fine-tuning, start noise and the clustering threshold sample.")
    dtype: str = same_as(FinetuneConfig, "dtype", help="Fine-tuning and sampling compute dtype.")
    devices: int = option(0, "Use the first N devices (0: all).")
    allow_pickle: bool = option(False, ALLOW_PICKLE_HELP)
    # Where the fine-tune stages live (default: workdir). Another run's workdir shares its finished
    # fine-tunes (checked against their settings as always), so that extraction settings (w, k) can
    # be swept in new workdirs without fine-tuning again (finextract_jax/testbed/curve.py).
    finetune_workdir: str | None = option(None, flag=False)
    # The extraction prompt (default: the dataset's caption): extract a fine-tune with another prompt
    # than the one it was trained on, e.g. a recovered caption (finextract_jax/testbed/caption_table.py).
    prompt: str | None = option(None, flag=False)

    def __post_init__(self):
        check_choices(self)


# ---- inputs -----------------------------------------------------------------------------------


def parse_choices(values, choices, flag) -> tuple:
    """A flag's comma list, checked against `choices`, duplicates dropped (order kept)."""
    out = []
    for value in values:
        if value not in choices:
            raise InputError(f"--{flag}: unknown {value!r}; choose from {', '.join(choices)}")
        if value not in out:
            out.append(value)
    if not out:
        raise InputError(f"--{flag} is empty; choose from {', '.join(choices)}")
    return tuple(out)


def parse_dataset(entry: str, base: str = "", name: str | None = None) -> Dataset:
    """TRAIN_DIR:CAPTION (or TRAIN_DIR alone) -> Dataset; the folder's name names it by default."""
    train_dir, sep, caption = entry.partition(":")
    train_dir = os.path.abspath(os.path.join(base, os.path.expanduser(train_dir.strip())))
    name = name or os.path.basename(os.path.normpath(train_dir))
    return Dataset(name, train_dir, caption.strip() if sep else None)


def read_datasets_file(path: str) -> list:
    """Datasets from a CSV with columns train_dir,caption[,name]."""
    if not os.path.isfile(path):
        raise InputError(f"--datasets_file {path!r} does not exist")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"--datasets_file {path!r}: not a readable CSV file ({err})") from None
    if not rows or "train_dir" not in rows[0]:
        raise InputError(f"--datasets_file {path!r}: needs a header row train_dir,caption[,name] and one "
                         "row per dataset")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for row in rows:
        caption = row.get("caption")
        entry = (row["train_dir"] or "") + ("" if caption is None else ":" + caption)
        out.append(parse_dataset(entry, base, (row.get("name") or "").strip() or None))
    return out


def check_datasets(datasets) -> None:
    """Every dataset a folder of readable, captioned images under a distinct, usable name."""
    from finextract_jax.finetune.data import load_train_set

    if not datasets:
        raise InputError("no datasets: give --datasets=TRAIN_DIR:CAPTION or --datasets_file=FILE.csv")
    names = [d.name for d in datasets]
    for ds in datasets:
        if not ds.name or ds.name.startswith(".") or os.sep in ds.name or names.count(ds.name) > 1:
            raise InputError(f"dataset name {ds.name!r} ({ds.train_dir}) is empty, hidden or not unique; name "
                             "them in a --datasets_file name column")
        if not os.path.isdir(ds.train_dir):
            raise InputError(f"--datasets: {ds.train_dir} is not a folder; give folders of training images")
        load_train_set(ds.train_dir, 8, ds.caption)  # every image readable and captioned (tiny, so cheap)


# ---- the stages: configs, settings and what each writes -----------------------------------------


def finetune_config(s: Settings, finetune: str):
    return FinetuneConfig(method=finetune, steps=s.finetune_steps, learning_rate=getattr(s, f"{finetune}_learning_rate"),
                          batch_size=s.finetune_batch_size, rank=s.rank, lora_alpha=s.lora_alpha, augment=s.augment,
                          seed=s.seed, dtype=s.dtype)


def guidance(s: Settings, finetune: str, method: str) -> tuple:
    """(guidance_scale, correction) given to extract. Baselines get fixed values for the terms
    they ignore, so that changing w or k does not invalidate a finished baseline."""
    if get_guidance(method).model_guidance:
        w, k = REFERENCE_GUIDANCE[finetune]
        if s.correction is None and s.match_correction and k:
            k = schedule_matched_correction(k, first_alpha_bar(s.pretrained, s.sampler, s.steps))
        return (w if s.guidance_scale is None else s.guidance_scale, k if s.correction is None else s.correction)
    if method == "cfg":
        return s.cfg_scale, 0.0
    return 1.0, 0.0


def first_alpha_bar(pretrained: str, sampler: str, steps: int) -> float:
    """abar (float64) at the first timestep `sampler` takes in `steps` steps on the base folder's schedule."""
    from finextract_jax.models.weights import read_json
    from finextract_jax.noise_schedule import alphas_cumprod_from_config
    from finextract_jax.sampling.schedulers import make_sampler

    config = read_json(os.path.join(pretrained, "scheduler", "scheduler_config.json"))
    first = int(make_sampler(sampler, config, steps).timesteps[0])
    return float(alphas_cumprod_from_config(config)[first])


def extract_config(s: Settings, ds: Dataset, finetune: str, method: str):
    w, k = guidance(s, finetune, method)
    prompt = (ds.caption or "") if s.prompt is None else s.prompt
    interval = s.guidance_max_timestep if get_guidance(method).model_guidance else None
    return ExtractConfig(pretrained=s.pretrained, finetuned=model_path(s, ds, finetune), prompt=prompt,
                         method=method, guidance_scale=w, correction=k, guidance_max_timestep=interval,
                         num_images=s.num_images, batch_size=s.batch_size, steps=s.steps, sampler=s.sampler,
                         seed=s.seed, dtype=s.dtype)


def finetune_dir(s: Settings, ds: Dataset, finetune: str) -> str:
    return os.path.join(s.finetune_workdir or s.workdir, ds.name, finetune)


def method_dir(s: Settings, ds: Dataset, finetune: str, method: str) -> str:
    return os.path.join(s.workdir, ds.name, finetune, method)


def model_path(s: Settings, ds: Dataset, finetune: str) -> str:
    return os.path.join(finetune_dir(s, ds, finetune), "model")


def stage_settings(s: Settings, stage: str, ds: Dataset, finetune: str, method: str | None, num_train: int) -> dict:
    """The flags (resolved to the values used) that a stage's outputs depend on, keyed by flag name."""
    if stage == "finetune":
        config = finetune_config(s, finetune)
        out = dict(pretrained=os.path.abspath(s.pretrained),
                   datasets=f"{ds.train_dir}:{ds.caption}" if ds.caption is not None else ds.train_dir,
                   finetune_steps=config.total_steps(num_train), **{f"{finetune}_learning_rate": config.lr},
                   finetune_batch_size=s.finetune_batch_size, resolution=s.resolution, augment=s.augment,
                   seed=s.seed, dtype=s.dtype)
        if finetune == "lora":
            out.update(rank=s.rank, lora_alpha=config.alpha)
        return out
    if stage == "extract":
        w, k = guidance(s, finetune, method)
        out = dict(num_images=s.num_images, steps=s.steps, batch_size=s.batch_size, sampler=s.sampler, seed=s.seed,
                   dtype=s.dtype)
        if get_guidance(method).model_guidance:
            out.update(guidance_scale=w, correction=k)
            if s.guidance_max_timestep is not None:  # absent otherwise: records made before it existed still match
                out.update(guidance_max_timestep=s.guidance_max_timestep)
        elif method == "cfg":
            out.update(cfg_scale=w)
        if s.prompt is not None:
            out.update(prompt=s.prompt)
        return out
    weights = os.path.abspath(s.feature_weights) if s.feature_weights else None
    if stage == "cluster":
        return dict(features=s.features, feature_weights=weights, select=s.select, schedule=s.schedule, seed=s.seed)
    return dict(features=s.features, feature_weights=weights, success_threshold=s.success_threshold)


def stage_output(folder: str, stage: str) -> str:
    """The file or folder whose absence means the stage has to run again."""
    return os.path.join(folder, {"finetune": "model", "extract": "run.json", "cluster": "clusters.json",
                                 "evaluate": "metrics.json"}[stage])


def marker_path(folder: str, stage: str) -> str:
    return os.path.join(folder, f"{stage}.done.json")


def mark_done(folder: str, stage: str, settings: dict, seconds: float) -> dict:
    """Write the stage's done record (what `finished` reads on a rerun) and return it."""
    from finextract_jax.fileio import atomic_write_json

    record = {"settings": settings, "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(marker_path(folder, stage), record)
    return record


def finished(folder: str, stage: str, settings: dict) -> dict | None:
    """The stage's done record, None if it has to run; refuses a finished stage with other settings."""
    path = marker_path(folder, stage)
    if not os.path.exists(path):
        return None
    record = read_record(path, f"delete {folder} to redo it")
    detail = changed_settings(record.get("settings", {}), settings, prefix="--")
    if detail:
        raise InputError(f"{folder}: {stage} finished with other settings ({detail}); rerun with the same flags, "
                         f"use a new --workdir, or delete {folder} to redo it")
    return record if os.path.exists(stage_output(folder, stage)) else None


@dataclasses.dataclass
class Stage:
    name: str
    folder: str
    dataset: Dataset
    finetune: str
    method: str | None
    num_train: int
    settings: dict
    record: dict | None  # the done record; None while it has to run


def plan(s: Settings) -> list:
    """Every stage in run order, with its done record; checks settings against finished stages."""
    from finextract_jax.finetune.data import list_images

    stages = []
    for ds in s.datasets:
        num_train = len(list_images(ds.train_dir))
        for finetune in s.finetunes:
            folder = finetune_dir(s, ds, finetune)
            names = [("finetune", folder, None)] + [(stage, method_dir(s, ds, finetune, method), method)
                                                    for method in s.methods for stage in STAGES[1:]]
            for stage, stage_folder, method in names:
                settings = stage_settings(s, stage, ds, finetune, method, num_train)
                stages.append(Stage(stage, stage_folder, ds, finetune, method, num_train, settings,
                                    finished(stage_folder, stage, settings)))
    return stages


def check_settings(s: Settings, devices) -> None:
    """Everything a stage would refuse, checked before anything runs or is written."""
    from finextract_jax.finetune.data import list_images
    from finextract_jax.sampling import run as extract_lib

    check_datasets(s.datasets)
    if not os.path.isdir(s.pretrained):
        raise InputError(f"--pretrained {s.pretrained!r} is not a folder; give a base SD folder (diffusers layout)")
    for finetune in s.finetunes:
        finetune_config(s, finetune)
    for method in s.methods:
        extract_lib._validate(extract_config(s, s.datasets[0], s.finetunes[0], method), len(devices))
    for ds in s.datasets:
        num_train = len(list_images(ds.train_dir))
        if s.num_images < num_train:
            raise InputError(f"--num_images={s.num_images} is smaller than the {num_train} training images of "
                             f"{ds.name}; clustering looks for that many")
    if s.checkpoint_every < 0:
        raise InputError(f"--checkpoint_every must be >= 0, got {s.checkpoint_every}")


def select_devices(count: int) -> list:
    import jax

    devices = jax.devices()
    if not 0 <= count <= len(devices):
        raise InputError(f"--devices={count}: there are {len(devices)} devices; give 0 (all) to {len(devices)}")
    return devices[:count] if count else devices


# ---- running ----------------------------------------------------------------------------------


def run_stage(s: Settings, stage: Stage, tools: dict) -> None:
    """Run one stage into its folder (library calls, no subprocesses)."""
    from finextract_jax import stages as stages_lib

    ds, folder = stage.dataset, stage.folder
    if stage.name == "finetune":
        from finextract_jax.finetune import finetune, make_mesh

        finetune(tools["pipeline"](), ds.train_dir, model_path(s, ds, stage.finetune), finetune_config(s, stage.finetune),
                 caption=ds.caption, resolution=s.resolution, checkpoint_every=s.checkpoint_every,
                 mesh=make_mesh(s.finetune_batch_size, tools["devices"]))
    elif stage.name == "extract":
        from finextract_jax.sampling.run import extract

        extract(extract_config(s, ds, stage.finetune, stage.method), folder, devices=tools["devices"],
                allow_pickle=s.allow_pickle)
    elif stage.name == "cluster":
        stages_lib.cluster_images(folder, os.path.join(folder, "images"), stage.num_train, tools["extractor"](),
                                  select=s.select, schedule=s.schedule, seed=s.seed)
    else:
        stages_lib.evaluate_to_workdir(os.path.join(folder, "extracted"), ds.train_dir, folder, tools["extractor"](),
                                       s.features, s.success_threshold)


def run_recorded(s: Settings, stage: Stage, tools: dict) -> dict:
    """run_stage, then the stage's done record written (and set on `stage`): what a rerun skips by."""
    start = time.perf_counter()
    run_stage(s, stage, tools)
    stage.record = mark_done(stage.folder, stage.name, stage.settings, time.perf_counter() - start)
    return stage.record


def _lazy(make):
    """make() once, on first use: a rerun that skips every stage loads no model."""
    box = []
    return lambda: box[0] if box else box.append(make()) or box[0]


def reproduce(s: Settings, devices=None) -> list:
    """Run every unfinished stage, then (re)write the tables; returns the table rows."""
    from finextract_jax import features as feats_lib
    from finextract_jax.models.pipeline import load_pipeline

    devices = devices if devices is not None else select_devices(s.devices)
    check_settings(s, devices)
    stages = plan(s)
    todo = [st for st in stages if st.record is None]
    tools = {"devices": devices, "pipeline": _lazy(lambda: load_pipeline(s.pretrained, allow_pickle=s.allow_pickle)),
             "extractor": _lazy(lambda: feats_lib.get_extractor(s.features, s.feature_weights))}
    # Load what will be needed now, so that bad weights fail before anything is written.
    if any(st.name == "finetune" for st in todo):
        tools["pipeline"]()
    if any(st.name in ("cluster", "evaluate") for st in todo):
        tools["extractor"]()
    logging.info("%d of %d stages to run", len(todo), len(stages))
    for st in stages:
        where = os.path.relpath(st.folder, s.workdir)
        if st.record is not None:
            logging.info("%s: %s done (%.1f s), skipped", where, st.name, st.record["seconds"])
            continue
        logging.info("%s: %s", where, st.name)
        run_recorded(s, st, tools)
        logging.info("%s: %s done in %.1f s", where, st.name, st.record["seconds"])
    rows = table_rows(s, stages)
    write_tables(s, rows)
    return rows


# ---- the table --------------------------------------------------------------------------------


def table_rows(s: Settings, stages) -> list:
    """One row per (dataset, finetune, method), from the stages' records and outputs."""
    seconds = {(st.dataset.name, st.finetune, st.method, st.name): st.record["seconds"] for st in stages}
    rows = []
    for st in stages:
        if st.name != "evaluate":
            continue
        with open(os.path.join(st.folder, "metrics.json")) as f:
            metrics = json.load(f)
        with open(os.path.join(st.folder, "clusters.json")) as f:
            num_guesses = len(json.load(f)["representatives"])
        key = (st.dataset.name, st.finetune)
        rows.append(dict(dataset=st.dataset.name, finetune=st.finetune, method=st.method, AS=metrics["AS"],
                         A_ESR=metrics["A_ESR"], num_train=st.num_train, num_guesses=num_guesses,
                         num_extracted=count_extracted(metrics),
                         finetune_s=seconds[key + (None, "finetune")],
                         **{f"{stage}_s": seconds[key + (st.method, stage)] for stage in STAGES[1:]}))
    return rows


def count_extracted(metrics: dict) -> int:
    """Training images whose best match passes the success threshold (what A-ESR averages)."""
    return sum(m["similarity"] > metrics["success_threshold"] for m in metrics["per_image"])


def table_csv(rows) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def table_markdown(s: Settings, rows) -> str:
    """The paper's main-table layout: one line per (dataset, fine-tune, method)."""
    header = ["Dataset", "Fine-tune", "Method", "AS", "A-ESR", "Guesses", "Extracted", "Fine-tune (s)",
              "Extract (s)", "Cluster (s)", "Evaluate (s)"]
    lines = ["# FineXtract extraction results", "",
             f"N = {s.num_images} images per run, {s.steps} {s.sampler} steps; {s.features} features, "
             f"A-ESR at similarity > {s.success_threshold}; Guesses = images clustering hands back; "
             f"Extracted = training images whose best match passes the threshold (of N0).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for r in rows:
        cells = [r["dataset"], r["finetune"], r["method"], f"{r['AS']:.3f}", f"{r['A_ESR']:.3f}",
                 str(r["num_guesses"]), f"{r['num_extracted']} (of {r['num_train']})"]
        cells += [f"{r[f'{stage}_s']:.1f}" for stage in STAGES]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(s: Settings, rows) -> None:
    """table.md and table.csv, rewritten only when their content changes."""
    from finextract_jax.fileio import atomic_write_bytes

    for name, text in (("table.md", table_markdown(s, rows)), ("table.csv", table_csv(rows))):
        path = os.path.join(s.workdir, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        atomic_write_bytes(path, text.encode("utf-8"))
    logging.info("wrote %s", os.path.join(s.workdir, "table.md"))
