"""The demo as a function: embedded base + private photos -> reproduce -> report (see experiments/demo.py)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import time

import numpy as np

from finextract_jax.demo.data import PRIVATE, PRIVATE_CAPTION, write_private_set
from finextract_jax.demo.report import matches_grid, samples_grid
from finextract_jax.errors import InputError
from finextract_jax.fileio import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_png

BASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base")
METRICS_KEYS = ("finetune", "method", "AS", "A_ESR", "num_guesses", "num_extracted")
DATASET = "private"  # DIR/private/ holds the photos, DIR/runs/private/ the runs on them
RESOLUTION = 32  # the base model's


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The demo's knobs. Fine-tuning rates are far above the reference's (2e-6 / 1e-4): those suit
    an 860M-parameter SD; this 1.4M-parameter base needs larger steps to memorise in 1000 steps."""

    num_images: int = 128
    steps: int = 25
    batch_size: int = 16
    finetune_steps: int = 0  # 0: 200 per training image, the reference
    dreambooth_learning_rate: float = 5e-4
    lora_learning_rate: float = 2e-3
    rank: int = 16
    # topk: every method gets the same budget of N0 guesses (its N0 largest cliques), so AS and
    # A-ESR compare methods fairly; "reference" keeps every clique at the final threshold.
    select: str = "topk"
    seed: int = 0

    def __post_init__(self):  # checked before anything is written
        if self.num_images < len(PRIVATE):
            raise InputError(f"--num_images={self.num_images}: the demo extracts {len(PRIVATE)} photos, so it needs "
                             f"at least {len(PRIVATE)} images per method")
        if self.steps < 1 or self.batch_size < 1 or self.finetune_steps < 0:
            raise InputError(f"--steps ({self.steps}) and the batch size ({self.batch_size}) must be >= 1")

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(num_images=10, steps=4, batch_size=5, finetune_steps=20)


def install_base(out: str, source: str | None = None) -> str:
    """Copy the embedded base model to `out` (whole or not at all), so users can fine-tune it."""
    source = source or BASE_DIR
    if os.path.exists(os.path.join(out, "model_index.json")):
        return out
    if not os.path.exists(os.path.join(source, "model_index.json")):
        raise InputError(f"the embedded demo base model is missing ({source}); rebuild it with "
                         "`python -m experiments.demo_base`")
    with atomic_dir(out, "--workdir", marker=False) as staging:  # a unique staging folder, removed on failure
        shutil.copytree(source, staging, dirs_exist_ok=True)
    return out


def reproduce_settings(workdir: str, s: DemoSettings):
    from finextract_jax.reproduce import Dataset, Settings

    dataset = Dataset(DATASET, os.path.join(workdir, DATASET), PRIVATE_CAPTION)
    return Settings(pretrained=os.path.join(workdir, "base"), workdir=os.path.join(workdir, "runs"),
                    datasets=(dataset,), num_images=s.num_images, steps=s.steps, batch_size=s.batch_size,
                    features="pixel", select=s.select, finetune_steps=s.finetune_steps,
                    dreambooth_learning_rate=s.dreambooth_learning_rate, lora_learning_rate=s.lora_learning_rate,
                    rank=s.rank, checkpoint_every=0, seed=s.seed)


def run_demo(workdir: str, s: DemoSettings = DemoSettings(), progress: bool = True) -> str:
    """Run (or resume) the demo in `workdir`; returns the path of report.md."""
    from finextract_jax.reproduce import reproduce

    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    install_base(os.path.join(workdir, "base"))
    private = os.path.join(workdir, DATASET)
    if not os.path.exists(os.path.join(private, "metadata.csv")):
        with atomic_dir(private, "--workdir", marker=False) as staging:  # refuses a folder it did not write
            write_private_set(staging, RESOLUTION)
    setup_s = time.perf_counter() - start
    settings = reproduce_settings(workdir, s)
    rows = reproduce(settings)
    runs = [{k: row[k] for k in METRICS_KEYS} for row in rows]
    atomic_write_json(os.path.join(workdir, "metrics.json"), {"runs": runs})
    grids = write_grids(workdir, settings)
    report = os.path.join(workdir, "report.md")
    atomic_write_bytes(report, report_markdown(s, settings, rows, grids, setup_s).encode("utf-8"))
    return report


def write_grids(workdir: str, settings) -> dict:
    """matches_<finetune>.png and samples_<finetune>.png; returns {finetune: (matches, samples)}."""
    grids = {}
    for finetune in settings.finetunes:
        runs = {m: os.path.join(settings.workdir, DATASET, finetune, m) for m in settings.methods}
        names = (f"matches_{finetune}.png", f"samples_{finetune}.png")
        for name, grid in zip(names, (matches_grid(os.path.join(workdir, DATASET), runs,
                                                   settings.success_threshold), samples_grid(runs))):
            atomic_write_png(os.path.join(workdir, name), np.asarray(grid))
        grids[finetune] = names
    return grids


def report_markdown(s: DemoSettings, settings, rows, grids, setup_s: float) -> str:
    lines = ["# finextract_jax demo", "",
             f"Base: the embedded 32 px pixel-space model (`base/`). Private set: {len(PRIVATE)} scikit-image "
             f"photos the base never saw ({', '.join(PRIVATE)}), caption \"{PRIVATE_CAPTION}\". "
             f"Fine-tunes: DreamBooth (full UNet, lr {s.dreambooth_learning_rate:g}) and LoRA (rank {s.rank}, "
             f"lr {s.lora_learning_rate:g}), {s.finetune_steps or 200 * len(PRIVATE)} steps each, batch 1. "
             f"Extraction: N = {s.num_images} images per method, {s.steps} DDIM steps, the same start noise for "
             "every method; FineXtract w=3, k=-0.02 (DreamBooth) and w=5, k=0 (LoRA); cfg s=3; text2img s=1. "
             f"Clustering and scoring with `pixel` features (correlation of 32 px images); `{s.select}` keeps "
             f"{'the ' + str(len(PRIVATE)) + ' largest cliques' if s.select == 'topk' else 'every clique'}; "
             f"a training image counts as extracted when its best match's similarity > "
             f"{settings.success_threshold}.", "",
             "| fine-tune | method | AS | A-ESR | guesses | extracted | fine-tune s | extract s | cluster s | evaluate s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['finetune']} | {r['method']} | {r['AS']:.3f} | {r['A_ESR']:.2f} | {r['num_guesses']} | "
                     f"{r['num_extracted']} of {r['num_train']} | "
                     f"{r['finetune_s']:.1f} | {r['extract_s']:.1f} | {r['cluster_s']:.1f} | {r['evaluate_s']:.1f} |")
    total = setup_s + sum(r["extract_s"] + r["cluster_s"] + r["evaluate_s"] for r in rows) + \
        sum({r["finetune"]: r["finetune_s"] for r in rows}.values())
    lines += ["", f"Stage seconds as first run (a resumed run reports the original times); total {total:.0f} s.",
              ""]
    for finetune, (matches, samples) in grids.items():
        lines += [f"## {finetune}", "",
                  "Each private photo beside its best match among each method's extracted images "
                  "(similarity below; green = extracted):", "", f"![{finetune} matches]({matches})", "",
                  "The first generated images of each method:", "", f"![{finetune} samples]({samples})", ""]
    return "\n".join(lines)
