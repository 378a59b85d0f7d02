"""Render images with the base model and with base + LoRA (same seeds), and a labelled comparison grid.

The VAE always decodes in FP32, so SDXL's fp16-VAE NaN / black-image problem cannot occur.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from stages.config import SampleConfig
from stages.device import resolve_device
from stages.errors import UserError
from stages.lora import LORA_WEIGHTS_NAME, load_into_pipeline


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


class Validator:
    """Renders validation prompts' cached embeddings with the training UNet during training; the FP32 VAE
    waits on the CPU and visits the GPU only to decode (tiled). `embeddings` is CacheReader.validation()."""

    def __init__(self, embeddings: dict, vae, steps: int, guidance: float, seed: int):
        self.embeddings, self.vae = embeddings, vae.to(torch.float32).eval()
        self.vae.requires_grad_(False)
        self.vae.enable_tiling()
        self.steps, self.guidance, self.seed = steps, guidance, seed

    @classmethod
    def from_cache(cls, reader, source, steps: int, guidance: float, seed: int) -> "Validator":
        """The cache's validation prompts, decoded by the model's FP32 VAE (or the cache's VAE override)."""
        from stages.sdxl import load_decoder_vae
        return cls(reader.validation(), load_decoder_vae(source, reader.manifest.encoder.get("vae")), steps, guidance, seed)

    def __call__(self, unet, noise_scheduler, step: int, out: Path, resolution: int) -> dict:
        """Render into out/samples/step-<step>.png; returns the metrics row's validation columns."""
        device = unet.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        unet.eval()
        self.vae.to(device)
        try:
            images = render_embeddings(unet, self.vae, noise_scheduler, self.embeddings["prompt_embeds"],
                                       self.embeddings["pooled_prompt_embeds"], resolution, self.steps,
                                       self.guidance, self.seed)
        finally:
            self.vae.to("cpu")
            unet.train()
        (out / "samples").mkdir(parents=True, exist_ok=True)
        path = out / "samples" / f"step-{step:05d}.png"
        labelled_grid([(f"step {step}", images)], self.embeddings["prompts"]).save(path)
        row = {"validation_image": str(path.relative_to(out))}
        if device.type == "cuda":
            row["validation_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)  # later rows' peak_gib: training steps only
        return row


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
            log("sampling the LoRA with the scheduler it was trained for: "
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
