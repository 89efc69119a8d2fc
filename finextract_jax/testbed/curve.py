"""The fine-tuning-strength curve: extraction AS per method against how far the fine-tune moved.

Each point is one `reproduce` run (fine-tune the testbed base on a private set for `steps` at
`learning_rate`, then extract with FineXtract / cfg / text2img from the same start noise, cluster
and score) in its own folder, so points resume and can be added. The curve is table rows plus a
PNG drawn with PIL (no plotting dependency).
"""
from __future__ import annotations

import dataclasses
import math
import os

COLORS = {"finextract": (200, 30, 30), "cfg": (30, 90, 200), "text2img": (40, 150, 40)}


@dataclasses.dataclass(frozen=True)
class Point:
    finetune: str  # dreambooth | lora
    steps: int
    learning_rate: float

    @property
    def name(self) -> str:
        return f"{self.finetune}_s{self.steps}_lr{self.learning_rate:g}"


def parse_points(text: str) -> list:
    """'dreambooth:5e-4:50,200,800;lora:2e-3:50,200' -> [Point, ...]."""
    from finextract_jax.errors import InputError
    from finextract_jax.finetune.config import METHODS as FINETUNE_METHODS

    points = []
    for group in filter(None, (g.strip() for g in text.split(";"))):
        try:
            finetune, lr, steps = group.split(":")
            points += [Point(finetune, int(s), float(lr)) for s in steps.split(",")]
        except ValueError:
            raise InputError(f"--points: {group!r} is not FINETUNE:LR:STEPS[,STEPS...]") from None
        if finetune not in FINETUNE_METHODS:
            raise InputError(f"--points: {finetune!r} is not one of {', '.join(FINETUNE_METHODS)}")
    if not points:
        raise InputError("--points is empty")
    return points


def run_point(point: Point, pretrained: str, dataset, workdir: str, num_images: int, steps: int, features: str,
              rank: int, seed: int) -> list:
    """reproduce() for one point; returns its table rows with the point's fields added."""
    from finextract_jax.reproduce import Settings, reproduce

    lr = {"dreambooth_learning_rate": point.learning_rate} if point.finetune == "dreambooth" else \
        {"lora_learning_rate": point.learning_rate}
    settings = Settings(pretrained=pretrained, workdir=os.path.join(workdir, point.name), datasets=(dataset,),
                        finetunes=(point.finetune,), num_images=num_images, steps=steps, features=features,
                        select="topk", finetune_steps=point.steps, rank=rank, checkpoint_every=0, seed=seed, **lr)
    return [dict(row, finetune_steps=point.steps, learning_rate=point.learning_rate, seed=seed)
            for row in reproduce(settings)]


def plot(rows: list, title: str, width: int = 420, height: int = 300):
    """PIL image: AS against fine-tuning steps (log x), one panel per fine-tune, one line per method."""
    from PIL import Image, ImageDraw, ImageFont

    finetunes = list(dict.fromkeys(r["finetune"] for r in rows))
    canvas = Image.new("RGB", (width * len(finetunes), height + 40), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.text((8, 4), title, fill="black", font=font)
    left, top, bottom = 40, 30, height - 30
    for p, finetune in enumerate(finetunes):
        ox = p * width
        mine = [r for r in rows if r["finetune"] == finetune]
        xs = sorted({r["finetune_steps"] for r in mine})
        lo, hi = math.log(xs[0]), math.log(xs[-1]) if xs[-1] > xs[0] else math.log(xs[0]) + 1
        x_of = lambda s: ox + left + (math.log(s) - lo) / (hi - lo) * (width - left - 20)
        y_of = lambda a: bottom - a * (bottom - top)
        draw.rectangle([ox + left, top, ox + width - 20, bottom], outline="black")
        draw.text((ox + left, top - 14), f"{finetune} (lr {mine[0]['learning_rate']:g})", fill="black", font=font)
        for a in (0.0, 0.5, 1.0):
            draw.text((ox + 8, y_of(a) - 6), f"{a:.1f}", fill="black", font=font)
        for s in xs:
            draw.text((x_of(s) - 8, bottom + 4), str(s), fill="black", font=font)
        draw.text((ox + width // 2 - 40, bottom + 18), "fine-tuning steps", fill="black", font=font)
        for m, method in enumerate(COLORS):
            line = sorted((r["finetune_steps"], r["AS"]) for r in mine if r["method"] == method)
            if not line:
                continue
            pts = [(x_of(s), y_of(a)) for s, a in line]
            if len(pts) > 1:
                draw.line(pts, fill=COLORS[method], width=2)
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[method])
            draw.text((ox + left + 8, top + 6 + 12 * m), f"AS {method}", fill=COLORS[method], font=font)
    return canvas
