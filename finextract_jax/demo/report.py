"""The demo's grids and report: what a newcomer looks at to see extraction work (or not).

Two grids per fine-tune: `matches_<finetune>.png` puts each private training image beside its
best match among each method's extracted images (similarity below, green when it counts as
extracted), and `samples_<finetune>.png` shows each method's first generated images, so one
can see how often the raw samples already are training images.
"""
from __future__ import annotations

import os
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from finextract_jax.imageio import list_images

TILE = 96  # the demo's 32 px images, enlarged with visible pixels
PAD = 6
LABEL = 14


def _tile(image: Image.Image, tile: int) -> Image.Image:
    image = image.convert("RGB")
    scale = tile / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.NEAREST if scale > 1 else Image.BICUBIC)


def labelled_grid(rows: Sequence[Sequence[tuple]], column_titles: Sequence[str], tile: int = TILE) -> Image.Image:
    """rows of (image or None, caption, highlight) cells under a line of column titles."""
    columns = max(len(column_titles), max((len(r) for r in rows), default=0))
    width = PAD + columns * (tile + PAD)
    height = LABEL + PAD + len(rows) * (tile + LABEL + PAD)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, title in enumerate(column_titles):
        draw.text((PAD + c * (tile + PAD), 2), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = LABEL + PAD + r * (tile + LABEL + PAD)
        for c, (image, caption, highlight) in enumerate(row):
            x = PAD + c * (tile + PAD)
            if image is not None:
                thumb = _tile(image, tile)
                canvas.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
            if caption:
                draw.text((x, y + tile + 1), caption, fill=(0, 120, 0) if highlight else (0, 0, 0), font=font)
    return canvas


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
