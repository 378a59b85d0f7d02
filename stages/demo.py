"""The demo data: a small generated set of captioned images (shapes in colors), and the demo flow."""
from __future__ import annotations

import getpass
import json
import random
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from stages.errors import UserError
from stages.paths import check_output_folder
from stages.scenes import COLORS, OUTLINE_WIDTH, SHAPES, STYLE_TRIGGER, draw, scene_table, style_scenes


def make_images(folder: str | Path, count: int = 12, size: tuple[int, int] = (80, 64), seed: int = 0,
                captions: str = "metadata") -> Path:
    """Write `count` images of a colored shape, captioned "a <color> <shape> on a <color> background".

    captions="metadata" writes metadata.jsonl (imagefolder); "txt" writes a .txt beside each image (kohya).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images, texts = [], []
    for i in range(count):
        fg, bg = rng.sample(list(COLORS), 2)
        shape = SHAPES[i % len(SHAPES)]
        w, h = size
        im = Image.new("RGB", (w, h), COLORS[bg])
        pen = ImageDraw.Draw(im)
        x0, y0 = rng.randint(0, w // 3), rng.randint(0, h // 3)
        x1, y1 = x0 + rng.randint(w // 3, w // 2), y0 + rng.randint(h // 3, h // 2)
        if shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=COLORS[fg])
        elif shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=COLORS[fg])
        else:
            pen.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=COLORS[fg])
        images.append(im)
        texts.append(f"a {fg} {shape} on a {bg} background")
    return _write_captioned(folder, images, texts, captions)


def make_style_images(folder: str | Path, count: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Write `count` scenes of scenes.style_scenes() in the demo's style (thick dark outlines), captioned with the
    scene's caption and the trigger phrase ("a red circle on a green background in zk style"); metadata.jsonl."""
    generator = torch.Generator().manual_seed(seed)
    scenes = style_scenes()
    picked = [scenes[i] for i in torch.randperm(len(scenes), generator=generator)[:count]]
    pixels = draw(scene_table(picked), size, generator, outline=OUTLINE_WIDTH)
    arrays = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return _write_captioned(folder, [Image.fromarray(a) for a in arrays],
                            [f"{s.caption} {STYLE_TRIGGER}" for s in picked], "metadata")


def _write_captioned(folder: Path, images: list, texts: list[str], captions: str) -> Path:
    """img_NNN.png files with their captions: metadata.jsonl (imagefolder) or a .txt beside each image (kohya)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (im, caption) in enumerate(zip(images, texts)):
        name = f"img_{i:03d}.png"
        im.save(folder / name)
        if captions == "txt":
            (folder / name).with_suffix(".txt").write_text(caption)
        rows.append({"file_name": name, "text": caption})
    if captions == "metadata":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


DEMO_PROMPTS = ("a red circle on a blue background", "a green square on a yellow background")
DEMO_PARTS = {"model": "tiny-sdxl", "images": "images", "cache": "cache", "lora": "lora", "samples": "samples"}
DEMO_MARKER = ".sdxl-lora-demo"  # in a workdir the demo made: a rerun may replace what is in it


def check_workdir(workdir: Path) -> None:
    """The demo replaces its own outputs, so it writes only into a new or empty folder, or one an earlier demo
    made that holds nothing else; anything it did not create is refused, untouched."""
    check_output_folder(str(workdir), "--workdir")
    names = {p.name for p in workdir.iterdir()} if workdir.exists() else set()
    foreign = sorted(names - set(DEMO_PARTS.values()) - {DEMO_MARKER}) if DEMO_MARKER in names else sorted(names)
    if foreign:
        raise UserError(f"demo --workdir {workdir} holds {', '.join(foreign[:3])}"
                        + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                        + ", which the demo did not create: choose a new or empty folder (or leave --workdir out)")


def run_demo(workdir: str | Path | None = None, steps: int = 30, log=print) -> dict:
    """Tiny model + generated images -> encode -> train -> before/after images, all on CPU (workdir None: a new
    temporary folder)."""
    from stages.config import EncodeConfig, SampleConfig, TrainConfig
    from stages.encode import encode
    from stages.sample import sample
    from stages.sdxl import build_tiny_sdxl
    from stages.train import train

    if workdir is not None and not str(workdir).strip():
        raise UserError("--workdir is empty: give a folder, or leave the option out")
    if workdir is None:  # one folder per user, replaced by every run: runs do not pile up in the temporary folder
        workdir = Path(tempfile.gettempdir()) / f"sdxl-lora-demo-{getpass.getuser()}"
    workdir = Path(workdir)
    check_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DEMO_MARKER).write_text("made by `python pipeline.py demo`; a rerun replaces its outputs here\n")
    paths = {name: workdir / folder for name, folder in DEMO_PARTS.items()}
    log(f"[1/5] building a tiny random-weight SDXL-architecture model in {paths['model']}")
    build_tiny_sdxl(paths["model"])
    log(f"[2/5] writing 12 captioned images to {paths['images']}")
    make_images(paths["images"], count=12)
    log("[3/5] encode: images and captions -> cache")
    encode(EncodeConfig(model=str(paths["model"]), dataset=str(paths["images"]), cache=str(paths["cache"]),
                        resolution=64, num_workers=0, overwrite=True), log=log)
    log("[4/5] train: LoRA from the cache (UNet only)")
    summary = train(TrainConfig(cache=str(paths["cache"]), output=str(paths["lora"]), max_steps=steps,
                                warmup_steps=max(1, steps // 10), learning_rate=1e-3, checkpoint_every=0,
                                num_workers=0, overwrite=True), log=log)
    log("[5/5] sample: base vs base + LoRA, same seeds")
    sample(SampleConfig(lora=str(paths["lora"]), model=str(paths["model"]), prompt=DEMO_PROMPTS, steps=10,
                        guidance=5.0, resolution=64, compare=True, out=str(paths["samples"]), overwrite=True), log=log)
    log("\ndone. What went where:")
    for name, path in paths.items():
        log(f"  {name:8s} {path}")
    log(f"  LoRA     {paths['lora'] / 'pytorch_lora_weights.safetensors'} (final loss {summary['final_loss']:.4f})")
    log(f"  grid     {paths['samples'] / 'compare.png'}")
    log("The tiny model has random weights, so every image is noise: the grid shows that training changed what the "
        "model renders, not what a LoRA of real SDXL looks like.")
    size = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file())
    log(f"The demo's files take {size / 1e6:.0f} MB in {workdir}; the next demo run replaces them (rm -rf {workdir} "
        "removes them).")
    return {**{k: str(v) for k, v in paths.items()}, "final_loss": summary["final_loss"]}
