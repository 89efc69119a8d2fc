"""The fine-tuning-strength curve: extraction AS per method against how far the fine-tune moved.

Each (point, seed) is one `reproduce` run (fine-tune the testbed base on a private set for `steps`
at `learning_rate`, optionally under a defence augment, then extract with FineXtract / cfg /
text2img from the same start noise, cluster and score) in its own folder, so points and seeds
resume and can be added. The guidance sweep runs FineXtract alone at one point for several (w, k),
each in its own workdir whose fine-tunes are the point's (`Settings.finetune_workdir`): the
fine-tune is trained once per seed, and reproduce's settings check still guards it. Tables give
the mean and min-max spread over seeds; the plot is drawn with PIL (no plotting dependency).
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from finextract_jax.errors import InputError

COLORS = {"finextract": (200, 30, 30), "cfg": (30, 90, 200), "text2img": (40, 150, 40)}
POINT_KEYS = ("set", "finetune", "finetune_steps", "learning_rate", "augment")
SWEEP_KEYS = POINT_KEYS + ("guidance_scale", "correction")
SCORES = ("AS", "A_ESR")
MEASURES = ("error_drop", "fitted_w")  # per-fine-tune numbers a table averages over seeds, where every row has them
FLOOR_COLOR = (140, 140, 140)


@dataclasses.dataclass(frozen=True)
class Point:
    finetune: str  # dreambooth | lora
    steps: int
    learning_rate: float
    augment: str = "none"  # a defence (finetune/augment.py AUGMENTS)

    @property
    def name(self) -> str:
        name = f"{self.finetune}_s{self.steps}_lr{self.learning_rate:g}"
        return name if self.augment == "none" else f"{name}_{self.augment}"


def parse_points(text: str, flag: str = "points", allow_empty: bool = False) -> list:
    """'dreambooth:5e-4:50,200,800;lora:2e-3:50,200;dreambooth:5e-4:200:cutout' -> [Point, ...]; '' -> []
    where `allow_empty` (the curve's --points when only the sweep should run)."""
    from finextract_jax.finetune.augment import AUGMENTS
    from finextract_jax.finetune.config import METHODS as FINETUNE_METHODS

    points = []
    for group in filter(None, (g.strip() for g in text.split(";"))):
        fields = group.split(":")
        try:
            finetune, lr, steps, augment = fields + ["none"] if len(fields) == 3 else fields
            mine = [Point(finetune, int(s), float(lr), augment) for s in steps.split(",")]
        except ValueError:
            raise InputError(f"--{flag}: {group!r} is not FINETUNE:LR:STEPS[,STEPS...][:AUGMENT]") from None
        if finetune not in FINETUNE_METHODS:
            raise InputError(f"--{flag}: {finetune!r} is not one of {', '.join(FINETUNE_METHODS)}")
        if augment not in AUGMENTS:
            raise InputError(f"--{flag}: augment {augment!r} is not one of {', '.join(AUGMENTS)}")
        if any(p.steps < 1 for p in mine) or not float(lr) > 0:
            raise InputError(f"--{flag}: {group!r} needs steps >= 1 and a learning rate > 0")
        points += [p for p in mine if p not in points]
    if not points and not allow_empty:
        raise InputError(f"--{flag} is empty")
    return points


def parse_point(text: str, flag: str = "point") -> Point:
    points = parse_points(text, flag)
    if len(points) != 1:
        raise InputError(f"--{flag} must name one point (FINETUNE:LR:STEPS[:AUGMENT]), got {len(points)}")
    return points[0]


FIT = "fit"  # a sweep's w: 1/λ fitted to each seed's fine-tune on its private images (guidance_fit.py)


def parse_sweep(text: str) -> list:
    """'3:-0.02,1:0,fit:0' -> [(3.0, -0.02), (1.0, 0.0), ('fit', 0.0)]: FineXtract's (w, k) pairs, w 'fit' for
    the least-squares w of each fine-tune (`fit_scale`); '' -> no sweep."""
    pairs = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        try:
            w, k = item.split(":")
            w, k = (w if w == FIT else float(w)), float(k)
        except ValueError:
            raise InputError(f"--sweep: {item!r} is not W:K (guidance scale w or 'fit', correction k)") from None
        if (w, k) not in pairs:
            pairs.append((w, k))
    return pairs


def parse_seeds(text: str) -> list:
    """'0,1,2' -> [0, 1, 2] (duplicates dropped)."""
    try:
        seeds = list(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    except ValueError:
        raise InputError(f"--seeds: {text!r} is not a comma list of integers") from None
    if not seeds or min(seeds) < 0:
        raise InputError(f"--seeds: {text!r}: give one or more seeds >= 0")
    return seeds


# ---- running ------------------------------------------------------------------------------------


def write_once(folder: str, write) -> str:
    """`folder` as `write(staging)` fills it (a fine-tuning folder: images + metadata.csv), written whole
    the first time, inside a workdir the caller claimed; later calls find it finished."""
    from finextract_jax.fileio import atomic_dir

    if not os.path.isfile(os.path.join(folder, "metadata.csv")):
        with atomic_dir(folder, "--workdir", verified=True, marker=False) as staging:
            write(staging)
    return folder


def private_set(name: str, workdir: str, splits, style_file: str):
    """The private set `name` (object | style) as a fine-tuning folder WORKDIR/private/NAME and its
    Dataset. splits() gives the testbed's splits (read only when the folder is built); the style set
    is read from `style_file`, or built from npm and written there."""
    from finextract_jax.reproduce import Dataset
    from finextract_jax.testbed import data

    if name == "object":
        write = lambda staging: data.write_private_object_set(staging, splits())
    else:
        write = lambda staging: data.write_private_style_set(staging,
                                                             data.load_style_set(style_file, splits()["train"]))
    folder = write_once(os.path.join(workdir, "private", name), write)
    return Dataset(name, folder, data.PRIVATE_OBJECT_CAPTION if name == "object" else data.PRIVATE_STYLE_CAPTION)


def point_dir(workdir: str, set_name: str, point: Point, seed: int) -> str:
    return os.path.join(workdir, set_name, point.name, f"seed{seed}")


def reproduce_settings(point: Point, seed: int, dataset, pretrained: str, workdir: str, run: dict, **extra):
    """FineXtract's reference k is scaled to the base's schedule (`match_correction`: -0.02 -> -0.00243 on the
    testbed's pixel schedule at 25 steps; benchmarks/RESULTS.md, "k matched to the schedule")."""
    from finextract_jax.reproduce import Settings

    fields = {"match_correction": True, f"{point.finetune}_learning_rate": point.learning_rate, **run, **extra}
    return Settings(pretrained=pretrained, workdir=workdir, datasets=(dataset,), finetunes=(point.finetune,),
                    select="topk", finetune_steps=point.steps, augment=point.augment, checkpoint_every=0, seed=seed,
                    **fields)


def _rows(settings, set_name: str, point: Point, seed: int, **fields) -> list:
    from finextract_jax.reproduce import reproduce

    return [dict(row, set=set_name, finetune_steps=point.steps, learning_rate=point.learning_rate,
                 augment=point.augment, seed=seed, **fields) for row in reproduce(settings)]


def point_settings(point: Point, seed: int, set_name: str, dataset, pretrained: str, workdir: str, run: dict):
    """The reproduce Settings of one (point, seed). `run`: the Settings fields every point shares
    (num_images, steps, features, rank, ...)."""
    return reproduce_settings(point, seed, dataset, pretrained, point_dir(workdir, set_name, point, seed), run)


def error_drop(pretrained: str, finetuned: str, dataset, timesteps=(100, 300, 500, 700, 900), draws: int = 4,
               seed: int = 0) -> float:
    """How far a fine-tune moved toward its private set, read off the models alone (no sampling, no
    extraction score): 1 - E_ft / E_pre, the fine-tuned model's mean denoising error on the private
    images under their captions over the base's, on the same noisy inputs. 0: not moved; 1: it
    denoises them perfectly. A strength axis that DreamBooth and LoRA share, unlike steps x lr."""
    from finextract_jax.caption import alphas_cumprod, make_pairs
    from finextract_jax.caption_scoring import PromptScorer
    from finextract_jax.finetune.data import read_metadata
    from finextract_jax.models.pipeline import load_finetuned, load_pipeline, tokenize

    pre = load_pipeline(pretrained)
    ft = load_finetuned(pre, finetuned)
    metadata = read_metadata(dataset.train_dir)
    names = sorted(metadata)
    captions = sorted({dataset.caption or metadata[n] for n in names})
    x0 = private_images(pre, dataset)
    per_image = [make_pairs(x0[i:i + 1], timesteps, draws, seed + i, alphas_cumprod(pre), pre.prediction_type)
                 for i in range(len(names))]
    pairs = tuple(np.concatenate(parts) for parts in zip(*per_image))
    row_of = np.repeat([captions.index(dataset.caption or metadata[n]) for n in names], len(timesteps) * draws)
    e_ft, e_pre = PromptScorer(pre, ft, pairs, batch_size=64).errors(tokenize(ft.tokenizer, captions))
    columns = np.arange(len(row_of))
    return float(1.0 - e_ft[row_of, columns].mean() / e_pre[row_of, columns].mean())


def private_images(pipe, dataset) -> np.ndarray:
    """The private set's images in `pipe`'s model space, [N, C, H, W], in file-name order."""
    from finextract_jax.caption import images_to_model_space
    from finextract_jax.finetune.data import read_metadata
    from finextract_jax.imageio import load_rgb, to_uint8_array

    names = sorted(read_metadata(dataset.train_dir))
    return images_to_model_space(pipe, np.stack([to_uint8_array(load_rgb(os.path.join(dataset.train_dir, n)))
                                                 for n in names]))


def fit_scale(pretrained: str, finetuned: str, dataset):
    """guidance_fit.fit_guidance of a fine-tune on its own private images and caption: the GuidanceFit whose
    w = 1/λ is the least-squares FineXtract scale for that fine-tune (an oracle: it reads the private set)."""
    from finextract_jax.guidance_fit import fit_guidance
    from finextract_jax.models.pipeline import load_finetuned, load_pipeline

    pre = load_pipeline(pretrained)
    return fit_guidance(pre, load_finetuned(pre, finetuned), private_images(pre, dataset), dataset.caption)


def copy_floor(private_dir: str, base_images: np.ndarray, features: str = "pixel") -> dict:
    """AS and A-ESR of an 'extraction' that returns the base's own training images (uint8 [N, H, W, 3]):
    for each private image, its most similar base training image. It takes no fine-tune and no
    sampling, so a method must beat it before its score says anything about the private set; with
    pixel features a drawing of a similar emoji already scores high."""
    from PIL import Image

    from finextract_jax.features import embed_images, get_extractor
    from finextract_jax.finetune.data import read_metadata
    from finextract_jax.imageio import load_rgb
    from finextract_jax.metrics import extraction_scores

    extractor = get_extractor(features)
    names = sorted(read_metadata(private_dir))
    private = embed_images([load_rgb(os.path.join(private_dir, n)) for n in names], extractor, batch_size=64)
    base = embed_images([Image.fromarray(i) for i in base_images], extractor, batch_size=64)
    scores = extraction_scores(private, base, names, [str(i) for i in range(len(base))], features=features)
    return {"AS": scores["AS"], "A_ESR": scores["A_ESR"]}


def run_point(point: Point, seed: int, set_name: str, dataset, pretrained: str, workdir: str, run: dict) -> list:
    """reproduce() for one (point, seed) in its own folder; its rows with the point's fields and the
    fine-tune's `error_drop` added."""
    from finextract_jax.reproduce import model_path

    settings = point_settings(point, seed, set_name, dataset, pretrained, workdir, run)
    rows = _rows(settings, set_name, point, seed)
    drop = error_drop(pretrained, model_path(settings, dataset, point.finetune), dataset)
    return [dict(row, error_drop=drop) for row in rows]


def run_sweep(point: Point, seed: int, w, k: float, set_name: str, dataset, pretrained: str, workdir: str,
              run: dict, method: str = "finextract", guidance_max_timestep: int | None = None) -> list:
    """FineXtract (or its ablation `method`, finextract_caption) alone at (w, k), in a workdir of its own that
    uses the point's fine-tune (trained there first if the point has not run yet). w = FIT: each seed's
    `fit_scale`, which needs the point's fine-tune finished (run the point first); its rows carry the fitted w.
    guidance_max_timestep: guide only at t <= it (sampling/engine.py), a workdir of its own again."""
    from finextract_jax.reproduce import finetune_dir, marker_path, model_path

    name = f"w{w if w == FIT else format(w, 'g')}_k{k:g}"
    if guidance_max_timestep is not None:
        name += f"_t{guidance_max_timestep}"
    folder = os.path.join(workdir, set_name, "sweep", point.name, name if method == "finextract" else f"{method}_{name}",
                          f"seed{seed}")
    finetune_workdir = point_dir(workdir, set_name, point, seed)
    fields = {}
    scale = w
    if w == FIT:
        trained = point_settings(point, seed, set_name, dataset, pretrained, workdir, run)
        if not os.path.isfile(marker_path(finetune_dir(trained, dataset, point.finetune), "finetune")):
            raise InputError(f"--sweep=fit at {point.name}, seed {seed}: the point's fine-tune has not finished "
                             "(give the point in --points too)")
        scale = fit_scale(pretrained, model_path(trained, dataset, point.finetune), dataset).guidance_scale
        fields["fitted_w"] = scale
    settings = reproduce_settings(point, seed, dataset, pretrained, folder, run, methods=(method,),
                                  guidance_scale=scale, correction=k, guidance_max_timestep=guidance_max_timestep,
                                  finetune_workdir=finetune_workdir)
    return _rows(settings, set_name, point, seed, guidance_scale=w, correction=k,
                 guidance_max_timestep=guidance_max_timestep, **fields)


# What a run's fine-tune and extract stages leave (reproduce.stage_output, their done records, the folders'
# ownership markers); clustering and scoring outputs are not among them, so those stages run again.
REUSED_FOLDERS = ("model", "images")
REUSED_FILES = ("finetune.done.json", "extract.done.json", "run.json", ".finextract")
DONE_RECORDS = ("finetune.done.json", "extract.done.json")


def _finished_stage(source: str, rel_parts: list) -> bool:
    """Whether the stage folder holding `rel_parts` (the folder above its model/ or images/, or the folder
    itself) finished: an interrupted stage's partial files record the source's paths, which the settings
    check would refuse in the new workdir, so such a stage samples again there instead."""
    cut = next((i for i, part in enumerate(rel_parts) if part in REUSED_FOLDERS), len(rel_parts))
    stage = os.path.join(source, *rel_parts[:cut])
    return any(os.path.isfile(os.path.join(stage, name)) for name in DONE_RECORDS)


def reuse_samples(source: str, workdir: str) -> int:
    """Hard-link (copy, across file systems) every finished fine-tune and extraction of the curve workdir
    `source` into `workdir`, so that the curve run there with other --features only clusters and scores
    again: the same samples judged by another embedder. Files already in `workdir` are kept; returns how
    many were added. reproduce's settings check still refuses a reused stage whose settings differ."""
    import shutil

    if not os.path.isdir(source):
        raise InputError(f"--reuse_samples_from={source}: not a folder")
    added = 0
    for folder, _, files in os.walk(source):
        rel = os.path.relpath(folder, source)
        parts = rel.split(os.sep)
        if parts[0] == "private":
            continue
        in_reused = any(part in REUSED_FOLDERS for part in parts)
        for name in files:
            target = os.path.join(workdir, rel, name)
            if not (in_reused or name in REUSED_FILES) or os.path.exists(target):
                continue
            if name != ".finextract" and not _finished_stage(source, parts):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.link(os.path.join(folder, name), target)
            except OSError:
                shutil.copy2(os.path.join(folder, name), target)
            added += 1
    return added


# ---- tables -------------------------------------------------------------------------------------


def aggregate(rows: list, keys: tuple) -> list:
    """One row per distinct `keys` (+ method), in first-seen order: n and the mean, min and max of
    AS and A-ESR over the seeds, and the mean of each of MEASURES that all its rows have."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys + ("method",)), []).append(r)
    out = []
    for key, members in groups.items():
        row = dict(zip(keys + ("method",), key), n=len(members))
        for score in SCORES:
            values = [m[score] for m in members]
            row.update({f"{score}_mean": sum(values) / len(values), f"{score}_min": min(values),
                        f"{score}_max": max(values)})
        for measure in MEASURES:
            if all(measure in m for m in members):
                row[measure] = sum(m[measure] for m in members) / len(members)
        out.append(row)
    return out


def _spread(row: dict, score: str, digits: int) -> str:
    return (f"{row[f'{score}_mean']:.{digits}f} [{row[f'{score}_min']:.{digits}f}, "
            f"{row[f'{score}_max']:.{digits}f}]")


def markdown(summary: list, keys: tuple, header: str) -> str:
    """A table: the keys, the MEASURES some rows have (the fine-tune's mean error drop, the mean fitted w;
    blank where a row has none), the method, then AS and A-ESR as mean [min, max] over n seeds."""
    names = {"set": "set", "finetune": "fine-tune", "finetune_steps": "steps", "learning_rate": "lr",
             "augment": "augment", "guidance_scale": "w", "correction": "k", "error_drop": "error drop",
             "fitted_w": "fitted w"}
    shown = [m for m in MEASURES if any(m in r for r in summary)]
    lines = [header, "", "| " + " | ".join([names[k] for k in keys] + [names[m] for m in shown] + [
        "method", "AS mean [min, max]", "A-ESR mean [min, max]", "n"]) + " |",
             "|" + "---|" * len(keys) + "---:|" * len(shown) + "---|" + "---:|" * 3]
    for r in summary:
        cells = [f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        cells += [f"{r[m]:.3f}" if m in r else "" for m in shown]
        cells += [r["method"], _spread(r, "AS", 3), _spread(r, "A_ESR", 2), str(r["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- the plot -----------------------------------------------------------------------------------


def plot(summary: list, title: str, width: int = 420, height: int = 300, floors: dict | None = None):
    """PIL image, one panel per (set, fine-tune): mean AS (y from 0, or from the lowest AS rounded
    down to a half) against fine-tuning strength (steps x lr, log x) per method, a min-max bar over
    seeds at each point; a defence's points hollow, joined by their own line. floors: {set: AS} of
    `copy_floor`, drawn as a grey line across that set's panels."""
    from PIL import Image, ImageDraw, ImageFont

    panels = list(dict.fromkeys((r["set"], r["finetune"]) for r in summary))
    floors = floors or {}
    lowest = min([r["AS_min"] for r in summary] + list(floors.values()))
    floor = min(0.0, math.floor(2 * lowest) / 2)  # AS is a cosine: it can be < 0
    canvas = Image.new("RGB", (width * len(panels), height + 40), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.text((8, 4), title, fill="black", font=font)
    left, top, bottom = 40, 30, height - 30
    for p, (set_name, finetune) in enumerate(panels):
        ox = p * width
        mine = [r for r in summary if (r["set"], r["finetune"]) == (set_name, finetune)]
        xs = sorted({r["finetune_steps"] * r["learning_rate"] for r in mine})
        lo, hi = math.log(xs[0]), math.log(xs[-1])
        lo, hi = (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)
        x_at = lambda strength: ox + left + 10 + (math.log(strength) - lo) / (hi - lo) * (width - left - 40)
        x_of = lambda r: x_at(r["finetune_steps"] * r["learning_rate"])
        y_of = lambda a: bottom - (a - floor) / (1.0 - floor) * (bottom - top)
        draw.rectangle([ox + left, top, ox + width - 20, bottom], outline="black")
        draw.text((ox + left, top - 14), f"{set_name}: {finetune}", fill="black", font=font)
        for a in sorted({floor, 0.0, 0.5, 1.0}):
            draw.text((ox + 8, y_of(a) - 6), f"{a:.1f}", fill="black", font=font)
        for x in xs:
            draw.text((x_at(x) - 10, bottom + 4), f"{x:.2g}", fill="black", font=font)
        draw.text((ox + width // 2 - 60, bottom + 18), "steps x learning rate", fill="black", font=font)
        if set_name in floors:
            y = y_of(floors[set_name])
            draw.line([(ox + left, y), (ox + width - 20, y)], fill=FLOOR_COLOR, width=1)
            draw.text((ox + width - 150, y - 12), "base's nearest training images", fill=FLOOR_COLOR, font=font)
        lines = list(dict.fromkeys((r["method"], r["augment"]) for r in mine if r["method"] in COLORS))
        for m, (method, augment) in enumerate(lines):
            color, dx = COLORS[method], 4 * (list(COLORS).index(method) - 1)  # bars side by side, not on top
            line = sorted((r for r in mine if (r["method"], r["augment"]) == (method, augment)), key=x_of)
            pts = [(x_of(r) + dx, y_of(r["AS_mean"])) for r in line]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2 if augment == "none" else 1)
            for r, (x, y) in zip(line, pts):
                draw.line([(x, y_of(r["AS_min"])), (x, y_of(r["AS_max"]))], fill=color, width=1)
                for a in (r["AS_min"], r["AS_max"]):
                    draw.line([(x - 3, y_of(a)), (x + 3, y_of(a))], fill=color, width=1)
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=color,
                             fill=color if augment == "none" else "white")
            label = f"AS {method}" + ("" if augment == "none" else f" +{augment}")
            draw.text((ox + left + 8, top + 6 + 12 * m), label, fill=color, font=font)
    return canvas
