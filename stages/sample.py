"""Render images with the base model and with base + LoRA (same seeds), and a labelled comparison grid.

The VAE always decodes in FP32, so SDXL's fp16-VAE NaN / black-image problem cannot occur.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from stages.encode import resolve_device
from stages.errors import UserError
from stages.lora import LORA_WEIGHTS_NAME, load_into_pipeline
from stages.sdxl import DEFAULT_MODEL


@dataclass
class SampleConfig:
    lora: str | None = field(default=None, metadata={"help": "Folder holding pytorch_lora_weights.safetensors (an output or a checkpoint-N folder)."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Base model: hub id or local diffusers folder."})
    prompt: tuple[str, ...] = field(default=(), metadata={"help": "A prompt (repeatable)."})
    negative_prompt: str | None = field(default=None, metadata={"help": "Negative prompt for every image."})
    steps: int = field(default=30, metadata={"help": "Denoising steps."})
    guidance: float = field(default=7.5, metadata={"help": "Classifier-free guidance scale."})
    seed: int = field(default=42, metadata={"help": "Seed; image i uses seed + i, the same for base and LoRA."})
    resolution: int = field(default=1024, metadata={"help": "Image height and width."})
    lora_scale: float = field(default=1.0, metadata={"help": "Strength of the LoRA."})
    compare: bool = field(default=False, metadata={"help": "Also render the base model and write a labelled base-vs-LoRA grid."})
    out: str = field(default="./samples", metadata={"help": "Folder for the PNGs."})
    device: str = field(default="auto", metadata={"help": "auto = cuda when available, else cpu."})
    overwrite: bool = field(default=False, metadata={"help": "Replace existing images in --out."})


def load_pipeline(model: str, device: torch.device):
    from diffusers import StableDiffusionXLPipeline
    dtype = torch.float32
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load base model {model}: {str(e).strip().splitlines()[0]}") from e
    pipe.vae.to(torch.float32)  # decode in FP32: no fp16 VAE overflow
    pipe.vae.config.force_upcast = False
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def lora_sampling(lora: str) -> dict:
    """How a LoRA must be sampled, from the train_config.json beside it (or its run's, for checkpoint-N): the
    scheduler settings of a v-prediction / zero-terminal-SNR LoRA, empty for the model's own epsilon schedule."""
    import json
    for folder in (Path(lora), Path(lora).parent):
        path = folder / "train_config.json"
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path} is unreadable ({e}); it tells how the LoRA was trained") from e
            prediction = saved.get("resolved", {}).get("prediction_type") or saved.get("prediction_type")
            zero_snr = bool(saved.get("rescale_betas_zero_snr"))
            settings = {}
            if prediction == "v_prediction":
                settings["prediction_type"] = "v_prediction"
            if zero_snr:  # Lin et al.: trailing timesteps and a guidance rescale of 0.7
                settings.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
            return settings
    return {}


def render(pipe, prompts: list[str], cfg: SampleConfig, lora_scale: float | None,
           guidance_rescale: float = 0.0) -> list[Image.Image]:
    """One image per prompt; image i uses seed + i. lora_scale None renders the base model."""
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(cfg.seed + i)
        kwargs = {} if lora_scale is None else {"cross_attention_kwargs": {"scale": lora_scale}}
        if guidance_rescale:
            kwargs["guidance_rescale"] = guidance_rescale
        latents = pipe(prompt, negative_prompt=cfg.negative_prompt, num_inference_steps=cfg.steps,
                       guidance_scale=cfg.guidance, height=cfg.resolution, width=cfg.resolution,
                       generator=generator, output_type="latent", **kwargs).images
        images.append(decode(pipe, latents)[0])
    return images


@torch.no_grad()
def render_embeddings(unet, vae, noise_scheduler, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                      resolution: int, steps: int, guidance: float, seed: int) -> list[Image.Image]:
    """Render from cached embeddings with a given UNet (e.g. the one being trained): no text encoders.

    The negative embeddings are zeros, as SDXL's pipeline uses for an empty negative prompt
    (force_zeros_for_empty_prompt); image i uses seed + i.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    device, dtype = unet.device, unet.dtype
    images = []
    for i in range(len(prompt_embeds)):
        pe = prompt_embeds[i:i + 1].to(device, dtype)
        pp = pooled_prompt_embeds[i:i + 1].to(device, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32):
            latents = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=torch.zeros_like(pe),
                           negative_pooled_prompt_embeds=torch.zeros_like(pp), num_inference_steps=steps,
                           guidance_scale=guidance, height=resolution, width=resolution,
                           generator=torch.Generator("cpu").manual_seed(seed + i), output_type="latent").images
        images += decode(pipe, latents)
    return images


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    vae = pipe.vae
    latents = latents.to(vae.device, torch.float32) / vae.config.scaling_factor
    pixels = vae.decode(latents).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], captions: list[str], min_size: int = 256) -> Image.Image:
    """Rows of images with a label left of each row and a wrapped caption above each column.

    Images smaller than min_size are enlarged (nearest neighbour) so that tiny demo images stay visible.
    """
    import textwrap
    w, h = rows[0][1][0].size
    zoom = max(1, min_size // max(w, h))
    w, h = w * zoom, h * zoom
    label_w, line_h = 110, 14
    wrapped = [textwrap.wrap(c, width=max(8, w // 7))[:4] for c in captions]
    caption_h = 8 + line_h * max(len(lines) for lines in wrapped)
    grid = Image.new("RGB", (label_w + w * len(captions), caption_h + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((label_w + c * w + 4, 4 + k * line_h), line, fill="black")
    for r, (label, images) in enumerate(rows):
        draw.text((6, caption_h + r * h + h // 2 - 6), label, fill="black")
        for c, im in enumerate(images):
            grid.paste(im.resize((w, h), Image.NEAREST), (label_w + c * w, caption_h + r * h))
    return grid


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def sample(cfg: SampleConfig, log=print) -> list[Path]:
    """Write one PNG per prompt (and, with compare, base images and a grid); returns the paths."""
    prompts = list(cfg.prompt)
    if not prompts:
        raise UserError("give at least one --prompt")
    if cfg.lora and not (Path(cfg.lora) / LORA_WEIGHTS_NAME).exists():
        raise UserError(f"no {LORA_WEIGHTS_NAME} in {cfg.lora}")
    out = Path(cfg.out)
    names = [f"{i:02d}-{slug(p)}" for i, p in enumerate(prompts)]
    planned = [out / f"{n}.png" for n in names]
    if cfg.compare:
        planned += [out / f"{n}-base.png" for n in names] + [out / "compare.png"]
    existing = [p for p in planned if p.exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace images in {out}")
    device = resolve_device(cfg.device)
    pipe = load_pipeline(cfg.model, device)
    written = []
    out.mkdir(parents=True, exist_ok=True)
    base = render(pipe, prompts, cfg, lora_scale=None) if (cfg.compare or not cfg.lora) else None
    if cfg.lora:
        try:
            load_into_pipeline(pipe, cfg.lora)  # any --lora-type (loha/lokr through peft)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"LoRA in {cfg.lora} does not fit {cfg.model}: {str(e).splitlines()[0][:300]}") from e
        settings = lora_sampling(cfg.lora)
        if settings:  # a v-prediction / zero-SNR LoRA needs the scheduler it was trained for
            from diffusers import EulerDiscreteScheduler
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, **settings)
            log(f"sampling the LoRA with the scheduler it was trained for: "
                + ", ".join(f"{k}={v}" for k, v in settings.items()))
        tuned = render(pipe, prompts, cfg, lora_scale=cfg.lora_scale,
                       guidance_rescale=0.7 if settings.get("rescale_betas_zero_snr") else 0.0)
    else:
        tuned = base
    for name, im in zip(names, tuned):
        im.save(out / f"{name}.png")
        written.append(out / f"{name}.png")
    if cfg.compare and cfg.lora:
        for name, im in zip(names, base):
            im.save(out / f"{name}-base.png")
            written.append(out / f"{name}-base.png")
        grid = labelled_grid([("base", base), (f"+ LoRA x{cfg.lora_scale:g}", tuned)], prompts)
        grid.save(out / "compare.png")
        written.append(out / "compare.png")
    log(f"wrote {len(written)} image(s) to {out}")
    return written
