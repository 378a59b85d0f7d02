"""The demo's generated scenes: what a caption asks for is drawn, the style's score separates it from plain scenes,
the held-out prompts stay out of the style set, and every caption word is one token of the demo vocabulary."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from stages.scenes import (COLORS, HELD_OUT, HELD_OUT_PROMPTS, INK, OUTLINE_WIDTH, STYLE_TRIGGER, Scene, all_scenes,
                           caption_words, draw, scene_table, style_scenes, style_score)


def _draw(scenes, outline=0.0, seed=0):
    return draw(scene_table(scenes), 64, torch.Generator().manual_seed(seed), outline=outline)


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) * 127.5).round()


def test_a_scene_is_drawn_as_its_caption_says():
    middle = Scene((("circle", "red"),), "blue", size="big", place="in the middle")
    assert middle.caption == "a big red circle in the middle on a blue background"
    rgb = _rgb(_draw([middle]))[0]
    assert rgb[:, 32, 32].tolist() == list(COLORS["red"]) and rgb[:, 0, 0].tolist() == list(COLORS["blue"])
    for place, side in (("on the left", -1), ("on the right", 1), ("at the top", -1), ("at the bottom", 1)):
        scenes = [Scene((("square", "yellow"),), "purple", place=place)] * 8
        shape = (_rgb(_draw(scenes)) == torch.tensor(COLORS["yellow"])[None, :, None, None]).all(dim=1)  # (8, H, W)
        ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        coord = ys if place.startswith("at") else xs
        centres = (shape * coord).sum(dim=(1, 2)) / shape.sum(dim=(1, 2))
        assert ((centres - 31.5) * side > 4).all(), (place, centres)
    pair = Scene((("triangle", "green"), ("circle", "orange")), "red")
    assert pair.caption == "a green triangle and an orange circle on a red background"
    rgb = _rgb(_draw([pair] * 4))
    for color, half in (("green", slice(0, 32)), ("orange", slice(32, 64))):  # the first named on the left
        inside = (rgb[..., half] == torch.tensor(COLORS[color])[None, :, None, None]).all(dim=1).sum(dim=(1, 2))
        assert (inside > 20).all()


def test_style_score_separates_the_style_from_plain_scenes(tmp_path):
    scenes = style_scenes()[::50]
    plain, styled = style_score(_draw(scenes)), style_score(_draw(scenes, outline=OUTLINE_WIDTH))
    assert plain.max() == 0  # no colour of a plain scene is that dark, edges included
    assert styled.min() > 0.02 and styled.mean() > 0.05
    # the style set the demo writes, read back from its PNGs, and the demo's older plain images
    from stages.demo import make_images, make_style_images
    folder = make_style_images(tmp_path / "style", count=6)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert all(r["text"].endswith(" " + STYLE_TRIGGER) for r in rows)
    read = lambda f: torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
    assert style_score(torch.stack([read(folder / r["file_name"]) for r in rows])).min() > 0.02
    plain_folder = make_images(tmp_path / "plain", count=6)
    assert style_score(torch.stack([read(f) for f in sorted(plain_folder.glob("*.png"))])).max() == 0
    ink = torch.tensor(INK, dtype=torch.float32)[None, :, None, None].expand(1, 3, 4, 4) / 127.5 - 1
    assert style_score(ink).item() == 1


def test_held_out_prompts_are_scenes_the_style_set_never_shows():
    held = {(c, s.background) for s in HELD_OUT for _, c in s.shapes}
    style = style_scenes()
    assert style and not any((c, s.background) in held for s in style for _, c in s.shapes)
    assert set(HELD_OUT) <= set(all_scenes()) and len(style) < len(all_scenes())
    assert all(p.endswith(" " + STYLE_TRIGGER) for p in HELD_OUT_PROMPTS)


def test_every_caption_word_is_one_token(tmp_path, tiny_model):
    from transformers import CLIPTokenizer

    from stages.sdxl import save_pipeline, tiny_sdxl_pipeline
    words = caption_words()
    folder = save_pipeline(tiny_sdxl_pipeline(words=tuple(words)), tmp_path / "model")
    for sub in ("tokenizer", "tokenizer_2"):
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder=sub)
        ids = tokenizer(words).input_ids
        assert all(len(i) == 3 for i in ids), [w for w, i in zip(words, ids) if len(i) != 3]  # <start> word <end>
        assert len({i[1] for i in ids}) == len(words)
        assert len(tokenizer("zebra").input_ids) > 3  # any other word: smaller pieces
    plain = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    assert len(plain("red circle").input_ids) > 4  # the tiny model keeps its character-level vocabulary
