"""The demo's grids and report: what a newcomer looks at to see extraction work (or not).

Two grids per fine-tune: `matches_<finetune>.png` puts each private training image beside its
best match among each method's extracted images (similarity below, green when it counts as
extracted), and `samples_<finetune>.png` shows each method's first generated images, so one
can see how often the raw samples already are training images.
"""
from __future__ import annotations

import os
from PIL import Image

from finextract_jax.grids import labelled_grid
from finextract_jax.imageio import list_images

def matches_grid(train_dir: str, run_dirs: dict, success_threshold: float) -> Image.Image:
    """Each training image, then its best match in each run's extracted/ (from metrics.json)."""
    import json

    methods = list(run_dirs)
    per_method = {}
    for method, folder in run_dirs.items():
        with open(os.path.join(folder, "metrics.json")) as f:
            per_method[method] = {p["train"]: p for p in json.load(f)["per_image"]}
    rows = []
    for name in sorted(next(iter(per_method.values()))):
        row = [(Image.open(os.path.join(train_dir, name)), name[:14], False)]
        for method in methods:
            match = per_method[method][name]
            image = Image.open(os.path.join(run_dirs[method], "extracted", match["match"]))
            row.append((image, f"{match['similarity']:.3f}", match["similarity"] > success_threshold))
        rows.append(row)
    return labelled_grid(rows, ["training image"] + [f"{m}: best match" for m in methods])


def samples_grid(run_dirs: dict, count: int = 8) -> Image.Image:
    """One row per method: its first `count` generated images (images/00000.png, ...)."""
    rows = []
    for method, folder in run_dirs.items():
        names = list_images(os.path.join(folder, "images"))[:count]
        rows.append([(Image.open(os.path.join(folder, "images", n)), (method if i == 0 else ""), False)
                     for i, n in enumerate(names)])
    return labelled_grid(rows, [f"#{i}" for i in range(count)], tile=64)
