"""Generated scenes for the demo model: coloured shapes in a few compositions and the captions that describe them;
the demo's style (thick dark outlines) and its score.

Scenes are drawn with torch, in batches, on any device: the pretraining script (bench/pretrain_demo_model.py) draws
a fresh batch on the GPU every step, the demo draws its small style set on the CPU. A scene's caption fixes what
is drawn (shapes, colours, background, size and place words); the exact geometry is drawn at random within what
the words allow.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "orange": (240, 140, 30),
          "purple": (140, 60, 190), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("", "small", "big")  # "": any size
PLACES = ("", "on the left", "on the right", "at the top", "at the bottom", "in the middle")  # "": anywhere
STYLE_TRIGGER = "in zk style"
INK = (30, 25, 25)        # the style's outline colour
INK_MAX_CHANNEL = 80      # a pixel is ink when none of its channels exceeds this (every colour of COLORS does)
OUTLINE_WIDTH = 1 / 20    # the style's outline width, a fraction of the image side (3 px at 64 px)

# (centre x range, centre y range) per place word, in [0, 1] image coordinates (x to the right, y down)
_PLACE_BOX = {"": ((0.25, 0.75), (0.25, 0.75)), "on the left": ((0.18, 0.32), (0.35, 0.65)),
              "on the right": ((0.68, 0.82), (0.35, 0.65)), "at the top": ((0.35, 0.65), (0.18, 0.32)),
              "at the bottom": ((0.35, 0.65), (0.68, 0.82)), "in the middle": ((0.44, 0.56), (0.44, 0.56))}
_RADIUS = {"": (0.10, 0.30), "small": (0.09, 0.14), "big": (0.26, 0.34)}  # a shape's half-size
_PAIR_BOXES = (((0.2, 0.34), (0.3, 0.7)), ((0.66, 0.8), (0.3, 0.7)))     # a pair: the first named on the left
_PAIR_RADIUS = (0.11, 0.18)


@dataclass(frozen=True)
class Scene:
    """One or two (shape, colour) on a background colour; a single shape may have a size and a place word."""
    shapes: tuple[tuple[str, str], ...]
    background: str
    size: str = ""
    place: str = ""

    @property
    def caption(self) -> str:
        things = " and ".join(_a(f"{c} {s}") for s, c in self.shapes)
        if len(self.shapes) == 1:
            (shape, color), = self.shapes
            things = _a(" ".join(w for w in (self.size, color, shape, self.place) if w))
        return f"{things} on {_a(self.background)} background"


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def all_scenes() -> list[Scene]:
    """Every scene the captions can describe: one shape (any size and place words) or two side by side, in a
    colour other than the background's."""
    scenes = []
    for bg in COLORS:
        fgs = [c for c in COLORS if c != bg]
        for (shape, color), size, place in itertools.product(itertools.product(SHAPES, fgs), SIZES, PLACES):
            scenes.append(Scene(((shape, color),), bg, size, place))
        for left, right in itertools.product(itertools.product(SHAPES, fgs), repeat=2):
            scenes.append(Scene((left, right), bg))
    return scenes


def caption_words() -> list[str]:
    """Every word a demo caption uses, the style trigger's included."""
    words = {w for s in all_scenes() for w in s.caption.split()} | set(STYLE_TRIGGER.split())
    return sorted(words)


# Held-out prompts: the demo renders these, before and after its LoRA; its style set has no scene with any of their
# (shape colour, background) pairs, so the style must carry over to colour pairs the LoRA never saw.
HELD_OUT = (Scene((("square", "green"),), "yellow"), Scene((("circle", "red"),), "blue"),
            Scene((("triangle", "purple"),), "orange", size="big"),
            Scene((("circle", "blue"), ("triangle", "yellow")), "red"))
HELD_OUT_PROMPTS = tuple(f"{s.caption} {STYLE_TRIGGER}" for s in HELD_OUT)


def style_scenes() -> list[Scene]:
    """The scenes the demo's style set may show: all but those sharing a (colour, background) pair with HELD_OUT."""
    held = {(c, s.background) for s in HELD_OUT for _, c in s.shapes}
    return [s for s in all_scenes() if not any((c, s.background) in held for _, c in s.shapes)]


def scene_table(scenes: list[Scene], device=None) -> torch.Tensor:
    """(N, 2, 14) float, per scene and shape slot: present, shape index, RGB (0-1), x range, y range, radius range,
    background RGB. What `draw` needs to draw any batch of the scenes on `device`."""
    rows = []
    for s in scenes:
        bg = [v / 255 for v in COLORS[s.background]]
        slots = []
        for i in range(2):
            if i >= len(s.shapes):
                slots.append([0.0] * 11 + bg)
                continue
            shape, color = s.shapes[i]
            (x, y), r = (_PAIR_BOXES[i], _PAIR_RADIUS) if len(s.shapes) == 2 else (_PLACE_BOX[s.place], _RADIUS[s.size])
            slots.append([1.0, SHAPES.index(shape), *(v / 255 for v in COLORS[color]), *x, *y, *r, *bg])
        rows.append(slots)
    return torch.tensor(rows, dtype=torch.float32, device=device)


def _uniform(lo: torch.Tensor, hi: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(lo.shape, generator=generator, device=lo.device)


def draw(table: torch.Tensor, size: int, generator: torch.Generator, outline: torch.Tensor | float = 0.0,
         ink: torch.Tensor | None = None, colors: torch.Tensor | None = None) -> torch.Tensor:
    """Draw the scenes of `table` (rows of scene_table) at size x size: (B, 3, size, size) in [-1, 1].

    outline: outline width as a fraction of the side, one for all or per image (B,) (0: none), drawn centred on each
    shape's edge in `ink` (B, 3) RGB 0-1 (default INK). colors: (B, 3, 3) RGB of shape 1, shape 2 and background,
    instead of the caption's (the VAE's training draws any colours). Drawn at twice the size, then averaged down, so
    edges are antialiased. `generator` lives on table's device and draws the geometry.
    """
    B, ss = table.shape[0], 2
    side = size * ss
    present, kind = table[:, :, 0, None, None] > 0, table[:, :, 1, None, None]                  # (B, 2, 1, 1)
    cx, cy, r = (_uniform(table[:, :, i], table[:, :, i + 1], generator)[:, :, None, None] for i in (5, 7, 9))
    cx, cy = cx.clamp(r, 1 - r), cy.clamp(r, 1 - r)  # the whole shape in the picture
    grid = (torch.arange(side, device=table.device, dtype=torch.float32) + 0.5) / side
    dx, dy = grid[None, None, None, :] - cx, grid[None, None, :, None] - cy                     # (B, 2, 1|S, S|1)
    circle = dx ** 2 + dy ** 2 <= r ** 2
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r
    height = (dy + r) / (1.8 * r)  # a triangle, apex up: 0 at its apex (cy - r), 1 at its base (cy + 0.8 r)
    triangle = (height >= 0) & (height <= 1) & (dx.abs() <= 1.1 * r * height)
    masks = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)) & present   # (B, 2, S, S)
    fill = (table[:, :, 2:5] if colors is None else colors[:, :2])[:, :, :, None, None]          # (B, 2, 3, 1, 1)
    image = (table[:, 0, 11:14] if colors is None else colors[:, 2])[:, :, None, None].expand(B, 3, side, side)
    outline = torch.as_tensor(outline, dtype=torch.float32, device=table.device).expand(B)
    ink = torch.tensor(INK, device=table.device) / 255 if ink is None else ink
    ink = ink.expand(B, 3)[:, :, None, None]
    k = int(torch.ceil(outline.max() * side / 2).item())  # the widest half-outline, in drawn pixels
    for i in range(2):
        mask = masks[:, i, None]
        image = torch.where(mask, fill[:, i], image)
        if k:  # an outline: dilation minus erosion of the shape, to each image's own width
            m = mask.float()
            ring = torch.zeros_like(m, dtype=torch.bool)
            for w in range(1, k + 1):
                dilated = F.max_pool2d(m, 2 * w + 1, 1, w) > 0
                eroded = -F.max_pool2d(-m, 2 * w + 1, 1, w) > 0
                ring |= (dilated & ~eroded) & (outline * side / 2 >= w)[:, None, None, None]
            image = torch.where(ring, ink, image)
    return F.avg_pool2d(image, ss) * 2 - 1


def style_score(images: torch.Tensor) -> torch.Tensor:
    """The share of ink pixels (none of R, G, B above INK_MAX_CHANNEL of 255) per image of (B, 3, H, W) in [-1, 1]:
    the demo's style draws thick dark outlines, while the plain scenes' colours are all brighter than that."""
    rgb = (images.clamp(-1, 1) + 1) * 127.5
    return (rgb.amax(dim=1) <= INK_MAX_CHANNEL).float().mean(dim=(1, 2))
