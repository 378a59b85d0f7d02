"""Pretrain the demo model: a small model with SDXL's architecture that draws the demo's scenes from their captions.

    python3 bench/pretrain_demo_model.py --minutes 7 --out /tmp/demo --archive $OUT/demo_model.tar   # one H200
    python3 bench/pretrain_demo_model.py --minutes 0.5 --out /tmp/demo-smoke                         # CPU smoke

The model: diffusers' AutoencoderKL and UNet2DConditionModel (SDXL's down/up block types and text_time added
conditioning), transformers' CLIPTextModel + CLIPTextModelWithProjection with a word-level vocabulary of the captions'
words, SDXL's noise schedule; about 6.9 M parameters, 14 MB in fp16. The data: scenes of stages/scenes.py, drawn on
the training device every step (no dataset, no download). First the VAE (a quarter of the time; any colours and
outlines, so that it also encodes the demo's style), then the UNet on its latents (epsilon prediction, 10% of
captions dropped to zeros as the pipeline's empty negative prompt is, EMA weights saved). The text encoders keep
their seeded random init (embeddings scaled up, see EMBEDDING_SCALE): their per-token states tell the caption words
apart well enough for the UNet's cross-attention, and a frozen encoder lets every caption be encoded once.

Outputs in --out: model/ (a diffusers folder StableDiffusionXLPipeline.from_pretrained loads, fp16 safetensors, a
model card README.md), replaced whole at every save (each --save-every seconds and at the end: a run stopped early
leaves its last save), grid.png (captions x seeds rendered from the saved model at the end); --archive FILE.tar
holds model/ as demo_model/ (`tar -xf FILE.tar -C stages` puts it where `--model demo` finds it).
"""
from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stages.data import time_ids  # noqa: E402
from stages.encode import encode_token_ids  # noqa: E402
from stages.scenes import HELD_OUT, STYLE_TRIGGER, all_scenes, caption_words, draw, scene_table  # noqa: E402
from stages.sdxl import SDXL_SCHEDULER_CONFIG, save_pipeline, tiny_sdxl_pipeline  # noqa: E402

TEXT_1 = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2, projection_dim=64,
              hidden_act="quick_gelu")
TEXT_2 = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2, projection_dim=64,
              hidden_act="gelu")
TIME_EMBED_DIM = 32
STYLE_WORDS = ("plain", "flat", "simple")  # "... in plain style": the base knows the ending; "zk" it never sees
VAE_SHARE = 0.25      # of --minutes
DROP_CAPTIONS = 0.1   # share of captions replaced by zeros (the unconditional branch of guidance)
WARMUP_STEPS = 200
EMBEDDING_SCALE = 25  # token and position embeddings at std 0.5 instead of CLIP's 0.02: the caption's words then move
                      # the prompt embeddings by about 0.5 (0.2 unscaled), so the UNet reads them sooner


def vae_config(resolution: int) -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64, 64, 64],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=1, norm_num_groups=16, sample_size=resolution, scaling_factor=1.0, force_upcast=True)


def unet_config(resolution: int) -> dict:
    return dict(sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=[48, 96, 128],
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                attention_head_dim=[3, 6, 8], transformer_layers_per_block=1,
                cross_attention_dim=TEXT_1["hidden_size"] + TEXT_2["hidden_size"], use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
                projection_class_embeddings_input_dim=TEXT_2["projection_dim"] + 6 * TIME_EMBED_DIM,
                norm_num_groups=16)


def captions_and_table(device) -> tuple[list[str], torch.Tensor]:
    """Every scene's caption, and once more with an ending "in <plain|flat|simple> style", with their scene rows."""
    scenes = all_scenes()
    endings = [f"{s.caption} in {STYLE_WORDS[i % len(STYLE_WORDS)]} style" for i, s in enumerate(scenes)]
    table = scene_table(scenes, device)
    return [s.caption for s in scenes] + endings, torch.cat([table, table])


@torch.no_grad()
def encode_captions(pipe, captions: list[str], chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt_embeds (N, 77, 128) and pooled (N, 64) of every caption, as the project's encode computes them."""
    embeds, pooled = [], []
    for i in range(0, len(captions), chunk):
        ids = [tok(captions[i:i + chunk], padding="max_length", max_length=77, truncation=True,
                   return_tensors="pt").input_ids for tok in (pipe.tokenizer, pipe.tokenizer_2)]
        e, p = encode_token_ids((pipe.text_encoder, pipe.text_encoder_2), ids)
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def lr_at(step: int, elapsed: float, budget: float, peak: float) -> float:
    """Linear warmup, then a cosine over the wall-clock budget down to a tenth of the peak."""
    frac = min(1.0, elapsed / budget)
    return peak * min(1.0, (step + 1) / WARMUP_STEPS) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def vae_batch(table: torch.Tensor, n: int, resolution: int, g: torch.Generator) -> torch.Tensor:
    """Scenes in any colours, half of them outlined in any width and colour: the VAE learns to encode more than the
    base's plain scenes (the demo's style set among them)."""
    dev = table.device
    idx = torch.randint(len(table), (n,), generator=g, device=dev)
    rows = table[idx]
    captioned = torch.stack([rows[:, 0, 2:5], rows[:, 1, 2:5], rows[:, 0, 11:14]], dim=1)  # (n, 3, 3)
    colors = torch.where(torch.rand(n, 1, 1, generator=g, device=dev) < 0.5,
                         torch.rand(n, 3, 3, generator=g, device=dev), captioned)
    outline = torch.where(torch.rand(n, generator=g, device=dev) < 0.5, 0.0,
                          0.01 + 0.07 * torch.rand(n, generator=g, device=dev))
    ink = torch.rand(n, 3, generator=g, device=dev) * torch.where(torch.rand(n, 1, generator=g, device=dev) < 0.5, 0.3, 1.0)
    return draw(rows, resolution, g, outline=outline, ink=ink, colors=colors)


def train_vae(vae, table, args, g, seconds: float, log) -> int:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start, step, last = time.time(), 0, time.time()
    while (elapsed := time.time() - start) < seconds or step == 0:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, elapsed, seconds, args.vae_lr)
        x = vae_batch(table, args.vae_batch, args.resolution, g)  # (B, 3, H, W)
        with autocast(args.device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=g)).sample.float()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if time.time() - last > args.log_every or step == 1:
            last = time.time()
            log(f"vae  step {step:6d}  loss {loss.item():.4f}  {step / (time.time() - start):.1f} it/s")
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # the scaling factor that gives the latents unit variance, as SD's VAEs do
        std = vae.encode(vae_batch(table, 256, args.resolution, g)).latent_dist.sample(generator=g).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"vae  done: {step} steps, final loss {loss.item():.4f}, latent std {std:.3f} -> scaling_factor {1 / std:.4f}")
    return step


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_unet(pipe, ema, table, embeds, pooled, args, g, seconds: float, save, log) -> dict:
    from diffusers import DDPMScheduler

    unet, vae, dev = pipe.unet, pipe.vae, args.device
    noise_scheduler = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    add_time_ids = time_ids((args.resolution,) * 2, (0, 0), args.resolution).to(dev)[None].expand(args.batch, 6)
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    start, step, last_log, last_save, losses = time.time(), 0, time.time(), time.time(), []
    while (elapsed := time.time() - start) < seconds or step == 0:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, elapsed, seconds, args.lr)
        idx = torch.randint(len(table), (args.batch,), generator=g, device=dev)
        with torch.no_grad():
            x = draw(table[idx], args.resolution, g)
            latents = vae.encode(x).latent_dist.sample(generator=g) * vae.config.scaling_factor  # (B, 4, H/8, W/8)
        keep = (torch.rand(args.batch, generator=g, device=dev) >= DROP_CAPTIONS).float()
        noise = torch.randn(latents.shape, generator=g, device=dev)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=g, device=dev)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        with autocast(dev):
            pred = unet(noisy, t, embeds[idx] * keep[:, None, None],
                        added_cond_kwargs={"text_embeds": pooled[idx] * keep[:, None], "time_ids": add_time_ids}).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        step += 1
        losses.append(loss.detach())
        if time.time() - last_log > args.log_every or step == 1:
            last_log = time.time()
            log(f"unet step {step:6d}  loss {mean(losses[-20:]):.4f}  "
                f"{step / (time.time() - start):.1f} it/s  {step * args.batch / (time.time() - start):.0f} samples/s")
        if time.time() - last_save > args.save_every:
            last_save = time.time()
            save({"unet_steps": step, "unet_loss": mean(losses[-100:])})
    return {"unet_steps": step, "unet_loss": mean(losses[-100:])}


def mean(values: list[torch.Tensor]) -> float:
    return torch.stack(values).mean().item()


def model_card(args, stats: dict, params: dict, device_name: str) -> str:
    total = sum(params.values())
    lines = "\n".join(f"| {k} | {v / 1e6:.2f} M |" for k, v in params.items())
    return f"""# The demo model

A small model with SDXL's architecture that draws the demo's generated scenes (stages/scenes.py: one or two
circles, squares or triangles in six colours on a coloured background, with size and place words) from their
captions, at {args.resolution} px. It exists so that `python pipeline.py demo` shows a LoRA learning a style; it
knows nothing else. `--model demo` loads it.

- Architecture: diffusers AutoencoderKL (4 latent channels, /8), UNet2DConditionModel (SDXL's block types and
  text_time added conditioning), transformers CLIPTextModel + CLIPTextModelWithProjection (hidden 64 each,
  penultimate states concatenated: 128 wide; pooled 64), a word-level CLIP vocabulary of the captions' words
  (any other word falls back to characters), SDXL's noise schedule (EulerDiscreteScheduler for sampling).
- The text encoders are their seeded random init (seed {args.seed}; token and position embeddings scaled by
  {EMBEDDING_SCALE}), not trained: the UNet learned to read them.
- Parameters: {total / 1e6:.2f} M in all; UNet and VAE stored in fp16, the text encoders in fp32 (0.5 MB).

| part | parameters |
|---|---|
{lines}

- Training: `python3 bench/pretrain_demo_model.py --minutes {args.minutes:g} --seed {args.seed} --resolution {args.resolution}`
  on {device_name}: VAE {stats.get('vae_steps', 0)} steps of batch {args.vae_batch}; UNet {stats.get('unet_steps', 0)}
  steps of batch {args.batch} (final loss {stats.get('unet_loss', float('nan')):.4f}), EMA weights.
- Data: scenes generated by the script on the fly; no dataset, no third-party weights.
- License: Apache-2.0, as the project.
"""


def save_model(pipe, ema, out: Path, archive: Path | None, card: str) -> None:
    """Write out/model (the EMA UNet) through a temporary folder, so that a stopped run keeps its last save. UNet and
    VAE in fp16; the text encoders (0.5 MB) in fp32, since transformers loads weights in their stored dtype: the
    project's encode and the pipeline then compute prompt embeddings alike, in fp32."""
    half, full = torch.float16, torch.float32
    parts = {k: copy.deepcopy(m).to("cpu", dtype) for k, m, dtype in (
        ("vae", pipe.vae, half), ("unet", ema, half), ("text_encoder", pipe.text_encoder, full),
        ("text_encoder_2", pipe.text_encoder_2, full))}
    fp16 = type(pipe)(**parts, tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, scheduler=pipe.scheduler)
    partial, final, old = out / "model.partial", out / "model", out / "model.old"
    for folder in (partial, old):  # left by a run stopped while saving
        shutil.rmtree(folder, ignore_errors=True)
    save_pipeline(fp16, partial)
    (partial / "README.md").write_text(card)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    if archive:
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive.with_name(archive.name + ".partial"), "w") as tar:
            tar.add(final, arcname="demo_model")
        archive.with_name(archive.name + ".partial").replace(archive)


def render_grid(folder: Path, resolution: int, device: torch.device, seeds=(0, 1, 2)):
    """Captions x seeds from the saved model, through the project's sampling pipeline loader."""
    from stages.sample import decode, labelled_grid, load_pipeline
    from stages.sdxl import ModelSource

    pipe = load_pipeline(ModelSource(str(folder)), device)
    prompts = [s.caption for s in all_scenes()[::743]] + [s.caption for s in HELD_OUT]
    prompts.append(f"{HELD_OUT[0].caption} {STYLE_TRIGGER}")
    rows = []
    for seed in seeds:
        images = [decode(pipe, pipe(p, num_inference_steps=25, guidance_scale=5.0, height=resolution, width=resolution,
                                    generator=torch.Generator(device).manual_seed(seed), output_type="latent").images)[0]
                  for p in prompts]  # the FP32 VAE decodes (the pipeline's own decode wants the UNet's dtype)
        rows.append((f"seed {seed}", images))
    return labelled_grid(rows, prompts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, required=True, help="wall-clock training budget (VAE + UNet)")
    ap.add_argument("--out", type=Path, required=True, help="folder for model/ and grid.png")
    ap.add_argument("--archive", type=Path, help="also write model/ as this .tar at every save")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resolution", type=int, default=64, choices=(64, 128))
    ap.add_argument("--batch", type=int, help="UNet batch (default 512 on CUDA, 8 on CPU)")
    ap.add_argument("--vae-batch", type=int, help="VAE batch (default 128 on CUDA, 4 on CPU)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--vae-lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved UNet weights")
    ap.add_argument("--save-every", type=float, default=60, help="seconds between saves")
    ap.add_argument("--log-every", type=float, default=10, help="seconds between progress lines")
    args = ap.parse_args(argv)
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.type == "cuda"
    args.batch = args.batch or (512 if cuda else 8)
    args.vae_batch = args.vae_batch or (128 if cuda else 4)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name() if cuda else "CPU"

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = tiny_sdxl_pipeline(args.seed, words=tuple(caption_words()) + STYLE_WORDS, text_configs=(TEXT_1, TEXT_2),
                              vae_config=vae_config(args.resolution), unet_config=unet_config(args.resolution))
    with torch.no_grad():
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            for name, module in encoder.named_modules():
                if name.endswith(("token_embedding", "position_embedding")):
                    module.weight.mul_(EMBEDDING_SCALE)
    pipe.to(args.device)
    params = {k: sum(p.numel() for p in getattr(pipe, k).parameters())
              for k in ("vae", "unet", "text_encoder", "text_encoder_2")}
    log(f"device {device_name}; parameters " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in params.items())
        + f"; {sum(params.values()) * 2 / 1e6:.1f} MB in fp16")
    g = torch.Generator(args.device).manual_seed(args.seed)
    captions, table = captions_and_table(args.device)
    embeds, pooled = encode_captions(pipe, captions)
    log(f"{len(captions)} captions encoded, e.g. '{captions[-1]}'")

    budget = args.minutes * 60
    stats = {"vae_steps": train_vae(pipe.vae, table, args, g, VAE_SHARE * budget, log)}
    ema = copy.deepcopy(pipe.unet).requires_grad_(False)

    def save(progress: dict) -> None:
        save_model(pipe, ema, args.out, args.archive, model_card(args, {**stats, **progress}, params, device_name))
        log(f"saved {args.out / 'model'}" + (f" and {args.archive}" if args.archive else ""))

    remaining = budget - (time.time() - t0)
    stats.update(train_unet(pipe, ema, table, embeds, pooled, args, g, max(remaining, 1.0), save, log))
    save({})
    grid = render_grid(args.out / "model", args.resolution, args.device)
    grid.save(args.out / "grid.png")
    log(f"grid {args.out / 'grid.png'}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
