"""Image grids for people to look at: pairs.png, the demo's and the testbed's grids.

One layout: a line of column titles, then rows of cells, each cell an image scaled into a square
tile (small images enlarged with visible pixels, so a 32 px sample is not blurred into a guess)
with a caption under it, green when the cell is highlighted (e.g. a match that counts as
extracted).
"""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

PAD = 6
LABEL = 14
GREEN, BLACK, WHITE = (0, 120, 0), (0, 0, 0), (255, 255, 255)


def thumbnail(image: Image.Image, tile: int) -> Image.Image:
    """`image` as RGB, scaled so its longer side is `tile` (nearest-neighbour when enlarging)."""
    image = image.convert("RGB")
    scale = tile / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.NEAREST if scale > 1 else Image.BICUBIC)


def labelled_grid(rows: Sequence[Sequence[tuple]], column_titles: Sequence[str], tile: int = 96) -> Image.Image:
    """rows of (image or None, caption, highlight) cells under a line of column titles."""
    columns = max(len(column_titles), max((len(r) for r in rows), default=0))
    width = PAD + columns * (tile + PAD)
    height = LABEL + PAD + len(rows) * (tile + LABEL + PAD)
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, title in enumerate(column_titles):
        draw.text((PAD + c * (tile + PAD), 2), title, fill=BLACK, font=font)
    for r, row in enumerate(rows):
        y = LABEL + PAD + r * (tile + LABEL + PAD)
        for c, (image, caption, highlight) in enumerate(row):
            x = PAD + c * (tile + PAD)
            if image is not None:
                thumb = thumbnail(image, tile)
                canvas.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
            if caption:
                draw.text((x, y + tile + 1), caption, fill=GREEN if highlight else BLACK, font=font)
    return canvas
