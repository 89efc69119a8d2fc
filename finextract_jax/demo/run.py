"""The demo as a function: the testbed base + its private cat faces -> reproduce -> report (experiments/demo.py)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import time

import numpy as np

from finextract_jax.demo.report import matches_grid, samples_grid
from finextract_jax.errors import InputError
from finextract_jax.fileio import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_png
from finextract_jax.testbed.base import COMMITTED_BASE_DIR as BASE_DIR
from finextract_jax.testbed.data import PRIVATE_OBJECT_CAPTION as PRIVATE_CAPTION
from finextract_jax.testbed.data import read_committed, write_private_object_set

METRICS_KEYS = ("finetune", "method", "AS", "A_ESR", "num_guesses", "num_extracted")
DATASET = "private"  # DIR/private/ holds the private images, DIR/runs/private/ the runs on them
NUM_PRIVATE = 9  # Twemoji's cat faces (finextract_jax/testbed/twemoji/cat_faces)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The demo's knobs. The fine-tuning point is one of the testbed curve's (benchmarks/RESULTS.md), chosen
    by a rule that reads no extraction score (RESULTS says which scores had been seen when it was written):
    per fine-tuning method, the weakest point of the curve's grid (smallest steps x learning rate) whose
    error drop on the object set (1 - the fine-tune's denoising error on the private images over the
    base's) reaches 0.3: moved toward the private images, not copying them. DreamBooth 5e-6 x 800 steps
    (error drop 0.33), LoRA 2e-4 x 800 (0.37)."""

    num_images: int = 64
    steps: int = 25
    batch_size: int = 16
    finetune_steps: int = 800
    dreambooth_learning_rate: float = 5e-6
    lora_learning_rate: float = 2e-4
    rank: int = 16
    # topk: every method gets the same budget of N0 guesses (its N0 largest cliques), so AS and
    # A-ESR compare methods fairly; "reference" keeps every clique at the final threshold.
    select: str = "topk"
    seed: int = 0

    def __post_init__(self):  # checked before anything is written
        if self.num_images < NUM_PRIVATE:
            raise InputError(f"--num_images={self.num_images}: the demo extracts {NUM_PRIVATE} images, so it needs "
                             f"at least {NUM_PRIVATE} images per method")
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
        raise InputError(f"the testbed base model is missing ({source}); train one with "
                         "`python -m experiments.testbed_base` (finextract_jax/testbed/base_model/CARD.md)")
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
                    rank=s.rank, checkpoint_every=0, seed=s.seed, match_correction=True)


def run_demo(workdir: str, s: DemoSettings = DemoSettings(), progress: bool = True) -> str:
    """Run (or resume) the demo in `workdir`; returns the path of report.md."""
    from finextract_jax.reproduce import reproduce

    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    install_base(os.path.join(workdir, "base"))
    private = os.path.join(workdir, DATASET)
    if not os.path.exists(os.path.join(private, "metadata.csv")):
        with atomic_dir(private, "--workdir", marker=False) as staging:  # refuses a folder it did not write
            # The committed cat faces are the testbed's private split's Twemoji rows: the curve's object set.
            write_private_object_set(staging, {"private": read_committed("cat_faces")})
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
    from finextract_jax.reproduce import guidance

    lines = ["# finextract_jax demo", "",
             "Base: the testbed base (`base/`: a 32 px pixel-space model of the SD family trained on 3,017 "
             "Twemoji and Noto emoji with their names as captions). Private set: Twemoji's "
             f"{NUM_PRIVATE} cat faces, which the base never saw, caption \"{PRIVATE_CAPTION}\". "
             f"Fine-tunes: DreamBooth (full UNet, lr {s.dreambooth_learning_rate:g}) and LoRA (rank {s.rank}, "
             f"lr {s.lora_learning_rate:g}), {s.finetune_steps or 200 * NUM_PRIVATE} steps each, batch 1. "
             f"Extraction: N = {s.num_images} images per method, {s.steps} DDIM steps, the same start noise for "
             "every method; FineXtract w=3 and the reference k=-0.02 scaled to the base's noise schedule, "
             f"k={guidance(settings, 'dreambooth', 'finextract')[1]:.5f} (DreamBooth; docs/method.md §2), and w=5, "
             "k=0 (LoRA); cfg s=3; text2img s=1. "
             f"Clustering and scoring with `pixel` features (correlation of 32 px images); `{s.select}` keeps "
             f"{'the ' + str(NUM_PRIVATE) + ' largest cliques' if s.select == 'topk' else 'every clique'}; "
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
                  "Each private image beside its best match among each method's extracted images "
                  "(similarity below; green = extracted):", "", f"![{finetune} matches]({matches})", "",
                  "The first generated images of each method:", "", f"![{finetune} samples]({samples})", ""]
    return "\n".join(lines)
