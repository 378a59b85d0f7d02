"""The demo data: a small generated set of captioned images (shapes in colors), and the demo flow."""
from __future__ import annotations

import getpass
import json
import random
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from stages.config import DEMO_MODEL, DEMO_STEPS
from stages.data import to_pixels
from stages.errors import UserError
from stages.paths import check_output_folder
from stages.scenes import (COLORS, HELD_OUT_PROMPTS, INK_MAX_CHANNEL, OUTLINE_WIDTH, SHAPES, STYLE_TRIGGER, draw,
                           scene_table, style_scenes, style_score)


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


DEMO_PARTS = {"images": "images", "cache": "cache", "lora": "lora", "samples": "samples"}
EARLIER_PARTS = ("tiny-sdxl",)  # what earlier demos also wrote (their random-weight model): replaced by nothing
DEMO_MARKER = ".sdxl-lora-demo"  # in a workdir the demo made: a rerun may replace what is in it

# The demo's LoRA, chosen by measurement on a 2-core CPU (README, "The demo"): adapters on the self-attention and
# feed-forward layers only, so that the LoRA learns how things are drawn while the cross-attention keeps reading the
# caption (with to_k / to_v of the cross-attention too, the held-out scenes' shapes and colours drift); 600 steps of
# 4 images at 2e-3 draw the outlines on every held-out prompt in about a minute of training.
STYLE_IMAGES = 96
DEMO_LORA = {"rank": 16, "alpha": 16.0, "learning_rate": 2e-3, "batch_size": 4, "grad_accum": 1, "optimizer": "adamw",
             "target_modules": "attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0,ff.net.0.proj,ff.net.2"}
SAMPLE_STEPS, SAMPLE_GUIDANCE = 20, 5.0


def check_workdir(workdir: Path) -> None:
    """The demo replaces its own outputs, so it writes only into a new or empty folder, or one an earlier demo
    made that holds nothing else; anything it did not create is refused, untouched."""
    check_output_folder(str(workdir), "--workdir")
    names = {p.name for p in workdir.iterdir()} if workdir.exists() else set()
    own = set(DEMO_PARTS.values()) | set(EARLIER_PARTS) | {DEMO_MARKER}
    foreign = sorted(names - own) if DEMO_MARKER in names else sorted(names)
    if foreign:
        raise UserError(f"demo --workdir {workdir} holds {', '.join(foreign[:3])}"
                        + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                        + ", which the demo did not create: choose a new or empty folder (or leave --workdir out)")


def style_scores(paths: list[Path]) -> list[float]:
    """scenes.style_score of each PNG: the share of its pixels that are the style's dark ink."""
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(to_pixels(im.convert("RGB")))
    return style_score(torch.stack(images)).tolist()


def run_demo(workdir: str | Path | None = None, steps: int = DEMO_STEPS, images: int = STYLE_IMAGES, log=print) -> dict:
    """The demo model learns a style: style set -> encode -> train a LoRA -> base vs base + LoRA on held-out
    prompts, with their style scores (workdir None: one folder per user in the temporary folder)."""
    from stages.config import EncodeConfig, SampleConfig, TrainConfig
    from stages.encode import encode
    from stages.sample import sample
    from stages.sdxl import ModelSource
    from stages.train import train

    if workdir is not None and not str(workdir).strip():
        raise UserError("--workdir is empty: give a folder, or leave the option out")
    if workdir is None:  # one folder per user, replaced by every run: runs do not pile up in the temporary folder
        workdir = Path(tempfile.gettempdir()) / f"sdxl-lora-demo-{getpass.getuser()}"
    workdir = Path(workdir)
    check_workdir(workdir)
    ModelSource(DEMO_MODEL).check()  # its weights are there, before anything is written
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DEMO_MARKER).write_text("made by `python pipeline.py demo`; a rerun replaces its outputs here\n")
    for name in EARLIER_PARTS:
        shutil.rmtree(workdir / name, ignore_errors=True)
    paths = {name: workdir / folder for name, folder in DEMO_PARTS.items()}
    log(f"[1/4] writing {images} scenes in the demo's style (thick dark outlines), captioned \"... {STYLE_TRIGGER}\", "
        f"to {paths['images']}")
    make_style_images(paths["images"], count=images)
    log("[2/4] encode: images and captions -> cache, with the demo model (--model demo)")
    encode(EncodeConfig(model=DEMO_MODEL, dataset=str(paths["images"]), cache=str(paths["cache"]), resolution=64,
                        flip=False, num_workers=0, overwrite=True), log=log)  # no flips: captions say left and right
    log(f"[3/4] train: a LoRA from the cache (UNet only), {steps} steps")
    summary = train(TrainConfig(cache=str(paths["cache"]), output=str(paths["lora"]), max_steps=steps,
                                warmup_steps=max(1, steps // 10), checkpoint_every=0, num_workers=0, overwrite=True,
                                **DEMO_LORA), log=log)
    log("[4/4] sample: base vs base + LoRA on held-out prompts (scenes the style set never shows), same seeds")
    prompts = list(HELD_OUT_PROMPTS)
    written = sample(SampleConfig(lora=str(paths["lora"]), model=DEMO_MODEL, prompt=tuple(prompts), steps=SAMPLE_STEPS,
                                  guidance=SAMPLE_GUIDANCE, resolution=64, compare=True, out=str(paths["samples"]),
                                  overwrite=True), log=log)
    n = len(prompts)
    scores = {"base": style_scores(written[n:2 * n]), "lora": style_scores(written[:n])}  # sample: LoRA, base, grid
    log("\nstyle score = share of dark outline pixels (no channel above "
        f"{INK_MAX_CHANNEL}/255); the style set's images score 0.07 on average, plain scenes 0:")
    log(f"  {'base':>6s} {'+ LoRA':>6s}  held-out prompt")
    for base, tuned, prompt in zip(scores["base"], scores["lora"], prompts):
        log(f"  {base:6.3f} {tuned:6.3f}  {prompt}")
    mean = {k: sum(v) / n for k, v in scores.items()}
    log(f"  {mean['base']:6.3f} {mean['lora']:6.3f}  mean")
    log("\ndone. What went where:")
    for name, path in paths.items():
        log(f"  {name:8s} {path}")
    log(f"  LoRA     {paths['lora'] / 'pytorch_lora_weights.safetensors'} (final loss {summary['final_loss']:.4f})")
    log(f"  grid     {paths['samples'] / 'compare.png'}: top row the demo model, bottom row with the LoRA")
    log(f"Try other settings on the same LoRA: python pipeline.py sample --model demo --lora {paths['lora']} "
        f"--prompt \"{prompts[0]}\" --compare --resolution 64 --out ./demo-samples")
    size = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file())
    log(f"The demo's files take {size / 1e6:.0f} MB in {workdir}; the next demo run replaces them (rm -rf {workdir} "
        "removes them).")
    return {**{k: str(v) for k, v in paths.items()}, "final_loss": summary["final_loss"], "scores": scores}
