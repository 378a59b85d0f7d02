"""Render images with the base model and with base + LoRA (same seeds), and a labelled comparison grid.

The VAE always decodes in FP32, so SDXL's fp16-VAE NaN / black-image problem cannot occur.
"""
from __future__ import annotations

import contextlib
import json
import re
import unicodedata
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from stages.config import DEFAULT_MODEL, SampleConfig, parse_resolutions
from stages.device import resolve_device
from stages.errors import UserError
from stages.lora import LORA_WEIGHTS_NAME, load_into_pipeline
from stages.paths import check_input, check_output_folder, looks_like_path
from stages.sdxl import ModelSource, absolute_path


def load_pipeline(source: ModelSource, device: torch.device):
    """The SDXL pipeline of a hub id, diffusers folder or single-file checkpoint, its VAE in FP32."""
    from diffusers import StableDiffusionXLPipeline
    dtype = torch.float32
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        if source.kind == "single_file":
            pipe = StableDiffusionXLPipeline.from_single_file(source.model, config=source.model_config, torch_dtype=dtype)
        else:
            kw = {"revision": source.revision} if source.kind == "hub" and source.revision else {}
            pipe = StableDiffusionXLPipeline.from_pretrained(source.model, torch_dtype=dtype, variant=source.variant, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load base model {source.model}: {str(e).strip().splitlines()[0]}") from e
    pipe.vae.to(torch.float32)  # decode in FP32: no fp16 VAE overflow
    pipe.vae.config.force_upcast = False
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def train_record(lora: str) -> tuple[dict, Path | None]:
    """The train_config.json beside a LoRA (in its folder, or a LoRA file's; a checkpoint-N folder's run's): (its
    JSON, its path), or ({}, None) where there is none (a LoRA from elsewhere)."""
    start = Path(lora) if Path(lora).is_dir() else Path(lora).parent
    for folder in (start, start.parent) if start.name.startswith("checkpoint-") else (start,):
        path = folder / "train_config.json"
        if path.exists():
            try:
                return json.loads(path.read_text()), path
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path} is unreadable ({e}); it tells how the LoRA was trained") from e
    return {}, None


def recorded_base(saved: dict) -> ModelSource | None:
    """The base model a run's train_config.json records (what its UNet was loaded from)."""
    base = saved.get("resolved", {}).get("model") or ({"model": saved["model"]} if saved.get("model") else None)
    if not base or base.get("kind") == "random":
        return None
    return ModelSource(base["model"], base.get("revision"), base.get("variant"), base.get("model_config"))


def base_model(cfg: SampleConfig, log) -> ModelSource:
    """--model, else the base the LoRA was trained on (its train_config.json), else SDXL base 1.0; a --model other
    than the recorded base is used with a warning."""
    saved, record = train_record(cfg.lora) if cfg.lora else ({}, None)
    recorded = recorded_base(saved)
    if cfg.model is None and recorded is not None:
        if looks_like_path(recorded.model) and not Path(recorded.model).exists():
            raise UserError(f"the LoRA's base model {recorded.model} (recorded in {record}) is not there: pass --model "
                            "with its location")
        log(f"base model {recorded.model} (the one {cfg.lora} was trained on, from {record}; --model overrides it)")
        return recorded.check()
    source = ModelSource(cfg.model or DEFAULT_MODEL).check()
    if recorded is not None and absolute_path(source.model) != absolute_path(recorded.model):
        log(f"warning: {cfg.lora} was trained on {recorded.model}, not on {source.model}: a LoRA changes the model it "
            "was trained on, on another base its effect differs (leave --model out to use its own)")
    elif cfg.lora and recorded is None and cfg.model is None:
        log(f"note: no train_config.json beside {cfg.lora} names its base model: using {DEFAULT_MODEL} (--model "
            "chooses another)")
    return source


def lora_sampling(lora: str) -> dict:
    """How a LoRA must be sampled, from the train_config.json beside it (or its run's, for checkpoint-N): the
    scheduler settings of a v-prediction / zero-terminal-SNR LoRA, empty for the model's own epsilon schedule."""
    saved, _ = train_record(lora)
    prediction = saved.get("resolved", {}).get("prediction_type") or saved.get("prediction_type")
    settings = {}
    if prediction == "v_prediction":
        settings["prediction_type"] = "v_prediction"
    if saved.get("rescale_betas_zero_snr"):  # Lin et al.: trailing timesteps and a guidance rescale of 0.7
        settings.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return settings


def lora_file(lora: str) -> tuple[Path, str]:
    """--lora as (the .safetensors file, its format "diffusers" or "kohya"): a folder holding
    pytorch_lora_weights.safetensors (train's output or a checkpoint-N), that file, or a kohya file."""
    from safetensors import SafetensorError, safe_open
    path = check_input(lora, "--lora", kind="folder" if Path(lora).is_dir() else "file",
                       what=f"LoRA folder or file (a folder holding {LORA_WEIGHTS_NAME}, or a .safetensors file)")
    if path.is_dir():
        if not (path / LORA_WEIGHTS_NAME).is_file():
            others = sorted(p.name for p in path.glob("*.safetensors"))
            raise UserError(f"no {LORA_WEIGHTS_NAME} in {lora}" + (f"; pass one of its files: {', '.join(others[:3])}"
                                                                   if others else ": not a LoRA folder written by train"))
        path = path / LORA_WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(f"--lora {lora}: not a readable .safetensors file ({str(e).strip().splitlines()[0]})") from None
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return path, "kohya"
    if keys and all(k.startswith("unet.") for k in keys):
        return path, "diffusers"
    raise UserError(f"--lora {lora} is not an SDXL UNet LoRA (keys such as {keys[0] if keys else 'none'}): give a "
                    "folder written by train, or a kohya-format LoRA file")


def check_lora_fits(unet, file: Path, lora: str, model: str) -> None:
    """Refuse a LoRA whose layers are not in the UNet or have other sizes (trained for another architecture), in
    one line, before diffusers would print every mismatch."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in load_file(str(file)).items()})
    modules = dict(unet.named_modules())
    wrong = []
    for key, tensor in state.items():
        if not key.endswith(".lora_A.weight"):
            continue  # LoHa / LoKr and DoRA magnitudes: left to peft's own check
        name = key[: -len(".lora_A.weight")]
        layer = modules.get(name)
        width = getattr(layer, "in_features", getattr(layer, "in_channels", None))
        if layer is None:
            wrong.append(f"{name}: not in the model")
        elif width != tensor.shape[1]:
            wrong.append(f"{name}: input width {tensor.shape[1]} in the LoRA, {width} in the model")
    if wrong:
        raise UserError(f"LoRA {lora} does not fit {model}: {len(wrong)} layer(s) differ, e.g. {wrong[0]}; it was "
                        "trained for another model: pass the --model it was trained on")


def load_lora(pipe, lora: str, model: str, log) -> None:
    """Load --lora into the pipeline: a train output, or a kohya file imported (as `export --format diffusers`
    does) into a temporary folder that is removed once it is loaded."""
    import tempfile

    from stages.export import adapter_config, kohya_to_peft, read_kohya_lora
    from stages.lora import write_lora_file
    file, kind = lora_file(lora)
    elsewhere = kind == "kohya" or file.name != LORA_WEIGHTS_NAME  # loaded from a temporary folder
    with tempfile.TemporaryDirectory(prefix="sdxl-lora-") if elsewhere else contextlib.nullcontext() as tmp:
        if kind == "kohya":
            peft, ranks, alphas = kohya_to_peft(read_kohya_lora(file))
            file = write_lora_file(tmp, peft, adapter_config(ranks, alphas))
            log(f"imported the kohya LoRA {lora} ({len(ranks)} modules)")
        elif elsewhere:  # a diffusers LoRA file under another name
            (Path(tmp) / LORA_WEIGHTS_NAME).symlink_to(file.resolve())
            file = Path(tmp) / LORA_WEIGHTS_NAME
        check_lora_fits(pipe.unet, file, lora, model)
        try:
            load_into_pipeline(pipe, file.parent)  # any --lora-type (loha/lokr through peft)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"LoRA {lora} does not fit {model}: {' '.join(str(e).split())[:300]}") from e


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
    (force_zeros_for_empty_prompt); image i uses seed + i. The pipeline denoises without the VAE, which stays
    where it is (the CPU during training) and visits the UNet's device once, to decode every image.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(noise_scheduler.config))
    pipe.vae_scale_factor = vae_scale_factor(vae)  # the latents' size, as with the VAE
    pipe.set_progress_bar_config(disable=True)
    device, dtype = unet.device, unet.dtype
    latents = []
    for i in range(len(prompt_embeds)):
        pe = prompt_embeds[i:i + 1].to(device, dtype)
        pp = pooled_prompt_embeds[i:i + 1].to(device, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32):
            latents.append(pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=torch.zeros_like(pe),
                                negative_pooled_prompt_embeds=torch.zeros_like(pp), num_inference_steps=steps,
                                guidance_scale=guidance, height=resolution, width=resolution,
                                generator=torch.Generator("cpu").manual_seed(seed + i), output_type="latent").images)
    return decode_on(vae, torch.cat(latents), device)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    return decode_on(pipe.vae, latents, pipe.vae.device)


@torch.no_grad()
def decode_on(vae, latents: torch.Tensor, device: torch.device) -> list[Image.Image]:
    """FP32 VAE decode of `latents` on `device` (the VAE moved there for the decode only, then back; a VAE with
    slicing enabled, as validation's, decodes them one by one)."""
    from diffusers.image_processor import VaeImageProcessor
    home = vae.device
    vae.to(device)
    try:
        pixels = vae.decode(latents.to(device, torch.float32) / vae.config.scaling_factor).sample
    finally:
        vae.to(home)
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae)).postprocess(pixels, output_type="pil")


def vae_scale_factor(vae) -> int:  # pixels per latent, as diffusers' pipelines compute it
    return 2 ** (len(vae.config.block_out_channels) - 1)


# Fonts for grid labels, tried in this order after Pillow's own (which covers ASCII only): DejaVu Sans covers Latin,
# Greek, Cyrillic, Arabic, Hebrew, ...; the CJK ones Chinese, Japanese and Korean. The first that has a glyph for
# every character draws the labels; with none, characters no font has are transliterated (label_text).
LABEL_FONTS = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
               "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
               "/System/Library/Fonts/Supplemental/Arial Unicode.ttf", "C:/Windows/Fonts/arialuni.ttf",
               "C:/Windows/Fonts/msyh.ttc")
LABEL_SIZE = 11


def _fonts() -> list:
    """Pillow's default font, then every LABEL_FONTS file found (and matplotlib's DejaVu Sans, if installed)."""
    import importlib.util
    candidates = list(LABEL_FONTS)
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        candidates.insert(2, str(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"))
    fonts = [ImageFont.load_default(LABEL_SIZE)]
    for name in candidates:
        with contextlib.suppress(OSError):
            fonts.append(ImageFont.truetype(name, LABEL_SIZE))
    return fonts


def _has_glyph(font, ch: str) -> bool:
    """Whether `font` draws `ch` with a glyph of its own, not the missing-glyph box."""
    if ch.isspace() or not hasattr(font, "getmask") or ch.isascii():
        return True
    missing = font.getmask("\U000F0000")  # a private-use code point: no font has it
    mask = font.getmask(ch)
    return not (mask.size == missing.size and bytes(mask) == bytes(missing))


def label_text(texts: list[str]) -> tuple[object, list[str]]:
    """The font that draws every character of `texts`, or the one drawing the most of them, with the texts
    transliterated where it cannot (accents dropped: café -> cafe; else the code point, 猫 -> U+732B)."""
    chars = {ch for t in texts for ch in t}
    fonts = _fonts()
    font = max(fonts, key=lambda f: (sum(_has_glyph(f, ch) for ch in chars), -fonts.index(f)))

    def fallback(ch: str) -> str:
        if _has_glyph(font, ch):
            return ch
        plain = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        return plain if plain and all(_has_glyph(font, c) for c in plain) else f"U+{ord(ch):04X}"
    return font, ["".join(fallback(ch) for ch in t) for t in texts]


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], captions: list[str], min_size: int = 256) -> Image.Image:
    """Rows of images with a label left of each row and a wrapped caption above each column.

    Images smaller than min_size are enlarged (nearest neighbour) so that tiny demo images stay visible.
    """
    import textwrap
    w, h = rows[0][1][0].size
    zoom = max(1, min_size // max(w, h))
    w, h = w * zoom, h * zoom
    label_w, line_h = 110, 14
    font, texts = label_text(list(captions) + [label for label, _ in rows])
    captions, labels = texts[:len(captions)], texts[len(captions):]
    wrapped = [textwrap.wrap(c, width=max(8, w // 7))[:4] for c in captions]
    caption_h = 8 + line_h * max(len(lines) for lines in wrapped)
    grid = Image.new("RGB", (label_w + w * len(captions), caption_h + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((label_w + c * w + 4, 4 + k * line_h), line, fill="black", font=font)
    for r, ((_, images), label) in enumerate(zip(rows, labels)):
        draw.text((6, caption_h + r * h + h // 2 - 6), label, fill="black", font=font)
        for c, im in enumerate(images):
            grid.paste(im.resize((w, h), Image.NEAREST), (label_w + c * w, caption_h + r * h))
    return grid


class Validator:
    """Renders validation prompts' cached embeddings with the training UNet during training (a streamed UNet
    streams here too); the FP32 VAE waits on the CPU and visits the GPU only to decode, sliced and in tiles
    of TILE pixels so that its memory does not grow with the resolution. `embeddings` is CacheReader.validation()."""

    TILE = 256  # pixels (32 latents): diffusers' tiled decode blends overlapping tiles (a quarter of a tile)

    def __init__(self, embeddings: dict, vae, steps: int, guidance: float, seed: int):
        self.embeddings, self.vae = embeddings, vae.to(torch.float32).eval()
        self.vae.requires_grad_(False)
        self.vae.enable_tiling()
        self.vae.enable_slicing()
        self.vae.tile_sample_min_size, self.vae.tile_latent_min_size = self.TILE, self.TILE // 8
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
        try:  # the VAE stays on the CPU while the UNet denoises, and visits the GPU once to decode
            images = render_embeddings(unet, self.vae, noise_scheduler, self.embeddings["prompt_embeds"],
                                       self.embeddings["pooled_prompt_embeds"], resolution, self.steps,
                                       self.guidance, self.seed)
        finally:
            unet.train()
        (out / "samples").mkdir(parents=True, exist_ok=True)
        path = out / "samples" / f"step-{step:05d}.png"
        labelled_grid([(f"step {step}", images)], self.embeddings["prompts"]).save(path)
        row = {"validation_image": str(path.relative_to(out))}
        if device.type == "cuda":
            row["validation_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            row["validation_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)  # later rows' peak_gib: training steps only
        return row


def slug(text: str) -> str:
    """A file-name-safe form of a prompt: letters and digits of any script (NFKC, lower case), '-' between."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"[\W_]+", "-", text).strip("-")[:60].strip("-") or "prompt"


def sample(cfg: SampleConfig, log=print) -> list[Path]:
    """Write one PNG per prompt (and, with compare, base images and a grid); returns the paths."""
    prompts = list(cfg.prompt)
    if not prompts:
        raise UserError("give at least one --prompt (or --prompts-file)")
    parse_resolutions(cfg.resolution)  # SDXL renders multiples of 8
    if cfg.compare and not cfg.lora:
        raise UserError("--compare renders the base model beside a LoRA: pass --lora (without --compare, sample "
                        "renders the base model alone)")
    if cfg.lora:
        lora_file(cfg.lora)  # there, and a LoRA: before the model loads
    source = base_model(cfg, log)
    check_output_folder(cfg.out, "--out")
    out = Path(cfg.out)
    names = [f"{i:02d}-{slug(p)}" for i, p in enumerate(prompts)]
    planned = [out / f"{n}.png" for n in names]
    if cfg.compare:
        planned += [out / f"{n}-base.png" for n in names] + [out / "compare.png"]
    existing = [p for p in planned if p.exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace images in {out}")
    device = resolve_device(cfg.device)
    pipe = load_pipeline(source, device)
    written = []
    out.mkdir(parents=True, exist_ok=True)
    base = render(pipe, prompts, cfg, lora_scale=None) if (cfg.compare or not cfg.lora) else None
    if cfg.lora:
        load_lora(pipe, cfg.lora, source.model, log)
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
    if cfg.compare:
        for name, im in zip(names, base):
            im.save(out / f"{name}-base.png")
            written.append(out / f"{name}-base.png")
        grid = labelled_grid([("base", base), (f"+ LoRA x{cfg.lora_scale:g}", tuned)], prompts)
        grid.save(out / "compare.png")
        written.append(out / "compare.png")
    log(f"wrote {len(written)} image(s) to {out}")
    return written
