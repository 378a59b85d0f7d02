"""The demo data: a small generated set of captioned images (shapes in colors), and the demo flow."""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "orange": (240, 140, 30),
          "purple": (140, 60, 190), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")


def make_images(folder: str | Path, count: int = 12, size: tuple[int, int] = (80, 64), seed: int = 0,
                captions: str = "metadata") -> Path:
    """Write `count` images of a colored shape, captioned "a <color> <shape> on a <color> background".

    captions="metadata" writes metadata.jsonl (imagefolder); "txt" writes a .txt beside each image (kohya).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        fg, bg = rng.sample(list(COLORS), 2)
        shape = SHAPES[i % len(SHAPES)]
        w, h = size
        im = Image.new("RGB", (w, h), COLORS[bg])
        draw = ImageDraw.Draw(im)
        x0, y0 = rng.randint(0, w // 3), rng.randint(0, h // 3)
        x1, y1 = x0 + rng.randint(w // 3, w // 2), y0 + rng.randint(h // 3, h // 2)
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=COLORS[fg])
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=COLORS[fg])
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=COLORS[fg])
        name = f"img_{i:03d}.png"
        im.save(folder / name)
        caption = f"a {fg} {shape} on a {bg} background"
        if captions == "txt":
            (folder / name).with_suffix(".txt").write_text(caption)
        rows.append({"file_name": name, "text": caption})
    if captions == "metadata":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
