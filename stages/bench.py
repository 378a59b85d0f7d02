"""Benchmark helpers: a synthetic cache shaped like SDXL's, for measuring `train` without a dataset."""
from __future__ import annotations

from pathlib import Path

import torch

from cache.format import Manifest, fingerprint
from cache.writer import CacheWriter
from stages.sdxl import RANDOM_SDXL


def write_synthetic_cache(folder: str | Path, num_samples: int = 64, resolution: int = 512, dtype: str = "fp16",
                          seed: int = 0, text_width: int = 2048, pooled_width: int = 1280,
                          model: str = RANDOM_SDXL, validation_prompts: int = 0) -> Manifest:
    """A cache of random tensors with SDXL's shapes (flips included), recorded as made for `model`;
    optionally with random embeddings for `validation_prompts` prompts."""
    g = torch.Generator().manual_seed(seed)
    latent = (4, resolution // 8, resolution // 8)
    preprocessing = {"resolution": resolution, "center_crop": True, "flip": True, "synthetic": True}
    manifest = Manifest(fingerprint=fingerprint({"synthetic": seed}, preprocessing, dtype),
                        encoder={"model": model, "revision": None, "variant": None, "model_config": None,
                                 "weights": {"synthetic": str(seed)}},
                        preprocessing=preprocessing, dtype=dtype, scaling_factor=0.13025, shift_factor=None,
                        dataset={"name": "synthetic", "split": "train", "num_records": num_samples})
    writer = CacheWriter(Path(folder), manifest, shard_size=256)
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    for i in range(num_samples):
        writer.add({
            "latent_mean": torch.randn(latent, generator=g) * 5, "latent_std": torch.rand(latent, generator=g) * 0.1,
            "latent_mean_flipped": torch.randn(latent, generator=g) * 5,
            "latent_std_flipped": torch.rand(latent, generator=g) * 0.1,
            "prompt_embeds": torch.randn(77, text_width, generator=g),
            "pooled_prompt_embeds": torch.randn(pooled_width, generator=g),
            "time_ids": ids, "time_ids_flipped": ids,
        }, key=f"{i:08d}", caption=f"synthetic sample {i}", source={"synthetic": i})
    manifest = writer.finish()
    if validation_prompts:
        from cache.writer import write_validation
        write_validation(Path(folder), manifest, [f"synthetic prompt {i}" for i in range(validation_prompts)],
                         torch.randn(validation_prompts, 77, text_width, generator=g),
                         torch.randn(validation_prompts, pooled_width, generator=g))
    return manifest


# ------------------------------------------------------------------------------------------ bench
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import dataclasses  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

from stages.errors import UserError  # noqa: E402


@dataclass
class BenchConfig:
    model: str = field(default=RANDOM_SDXL, metadata={"help": "random:sdxl = full-size SDXL UNet with random weights, built on the GPU (no download); or a hub id / folder."})
    resolution: int = field(default=512, metadata={"help": "Image side in pixels (latents are 1/8)."})
    batch_size: int = field(default=1, metadata={"help": "Samples per micro-batch."})
    grad_accum: int = field(default=4, metadata={"help": "Micro-batches per optimizer step."})
    mixed_precision: str = field(default="auto", metadata={"help": "As in train."})
    base_weights: str = field(default="auto", metadata={"help": "As in train."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "As in train."})
    optimizer: str = field(default="adamw8bit", metadata={"help": "As in train."})
    rank: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha."})
    target_modules: str = field(default="to_q,to_k,to_v,to_out.0", metadata={"help": "As in train."})
    compile: str = field(default="none", metadata={"help": "As in train: none, regional, regional-graphs."})
    steps: int = field(default=10, metadata={"help": "Timed optimizer steps."})
    warmup: int = field(default=2, metadata={"help": "Untimed optimizer steps first (compilation, allocator warm-up)."})
    baseline: bool = field(default=False, metadata={"help": "Also run the reference recipe at the same effective batch (all FP32, VAE + text encoders on the GPU encoding every step, checkpointing, micro-batch 1, 8-bit AdamW) for a side-by-side ratio."})
    vram_budget: str | None = field(default=None, metadata={"help": "Cap this process's GPU memory, e.g. 16GiB, to prove a fit on a smaller card."})
    device: str = field(default="auto", metadata={"help": "auto = cuda when available, else cpu."})
    seed: int = field(default=42, metadata={"help": "Seed."})


def parse_size(text: str) -> int:
    units = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}
    t = text.strip().lower()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    raise UserError(f"--vram-budget {text}: give a size such as 16GiB or 12000MB")


def unet_forward_flops(unet, batch: dict) -> int:
    """FLOPs of one UNet forward on `batch`, counted by torch's FLOP counter (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode
    added = {"text_embeds": batch["pooled_prompt_embeds"].to(unet.dtype), "time_ids": batch["time_ids"].to(unet.dtype)}
    latents = batch["latent_mean"].to(unet.dtype)
    t = torch.full((latents.shape[0],), 500, device=latents.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(latents, t, batch["prompt_embeds"].to(unet.dtype), added_cond_kwargs=added)
    return counter.get_total_flops()


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 10) -> float | None:
    """bf16 matrix-multiply rate measured here, the denominator of MFU (None off CUDA)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(cfg: BenchConfig, device: torch.device, baseline: bool, log) -> dict:
    """Time `steps` optimizer steps through train's own setup_model / micro_batches / training_step."""
    from cache import CacheReader
    from stages.encode import encode_latents, encode_token_ids
    from stages.sdxl import ModelSource, load_encoders, random_encoders, unet_config
    from stages.train import TrainConfig, apply_compile, micro_batches, setup_model, training_step

    total = cfg.warmup + cfg.steps
    tcfg = TrainConfig(model=cfg.model, rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules,
                       gradient_checkpointing=cfg.gradient_checkpointing, batch_size=cfg.batch_size,
                       grad_accum=cfg.grad_accum, max_steps=total, warmup_steps=0, optimizer=cfg.optimizer,
                       mixed_precision=cfg.mixed_precision, seed=cfg.seed, base_weights=cfg.base_weights,
                       device=str(device), num_workers=0, checkpoint_every=0)
    if baseline:  # the reference recipe at the same effective batch: FP32, checkpointing, micro-batch 1, 8-bit AdamW
        tcfg = dataclasses.replace(tcfg, mixed_precision="no", base_weights="auto", gradient_checkpointing=True,
                                   batch_size=1, grad_accum=cfg.batch_size * cfg.grad_accum, optimizer="adamw8bit")
    uc = unet_config(ModelSource(cfg.model))
    pooled = uc["projection_class_embeddings_input_dim"] - 6 * uc["addition_time_embed_dim"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_cache(tmp, num_samples=max(8, cfg.batch_size * cfg.grad_accum), resolution=cfg.resolution,
                              text_width=uc["cross_attention_dim"], pooled_width=pooled, model=cfg.model)
        reader = CacheReader(tmp)
        model = setup_model(tcfg, reader, device, lambda *a: None)
        if device.type == "cuda":  # the training steps' peak, as train logs it (not a quantizing load's)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        encoders = None
        if baseline:  # the model's own FP32 VAE and text encoders (random full-size ones for random:sdxl)
            source = ModelSource(cfg.model)
            encoders = random_encoders(device) if source.kind == "random" else {
                k: v.to(device) for k, v in load_encoders(source).items() if not k.startswith("tokenizer")}
        flops = None
        times, first_step = [], None
        for step, micro in micro_batches(reader, tcfg, 0, device):
            if flops is None:  # counted eagerly, before compiling: a counting pass would make compiled blocks recompile
                flops = unet_forward_flops(model.unet, {k: v[:1] for k, v in micro[0].items()})
                apply_compile(model.unet, "none" if baseline else cfg.compile, device)
            _sync(device)
            t0 = time.perf_counter()
            if encoders:  # the reference recipe: every micro-batch through the FP32 VAE and text encoders
                for batch in micro:
                    b = batch["latent_mean"].shape[0]
                    pixels = torch.rand(b, 3, cfg.resolution, cfg.resolution, device=device) * 2 - 1
                    mean, std = encode_latents(encoders["vae"], pixels)
                    sf = encoders["vae"].config.scaling_factor
                    batch["latent_mean"], batch["latent_std"] = mean * sf, std * sf
                    vocab = encoders["text_encoder"].config.vocab_size
                    ids = torch.randint(0, vocab, (b, 77), device=device)
                    batch["prompt_embeds"], batch["pooled_prompt_embeds"] = encode_token_ids(
                        (encoders["text_encoder"], encoders["text_encoder_2"]), [ids, ids])
            result = training_step(model, micro, step, tcfg)
            _sync(device)
            times.append(time.perf_counter() - t0)
            if first_step is None:
                first_step = time.perf_counter() - started
        timed = times[cfg.warmup:]
        images = cfg.batch_size * cfg.grad_accum
        row = {
            "recipe": "baseline: all FP32, encode every step" if baseline else "cached inputs, UNet only",
            "resolution": cfg.resolution, "micro_batch": tcfg.batch_size, "grad_accum": tcfg.grad_accum,
            "precision": model.resolved["mixed_precision"], "base_weights": model.resolved["base_weights"],
            "base_gib": round(model.resolved["base_bytes_after"] / 2**30, 3),
            "checkpointing": tcfg.gradient_checkpointing, "compile": "none" if baseline else cfg.compile,
            "optimizer": model.resolved["optimizer"], "trainable_parameters": model.resolved["trainable_parameters"],
            "images_per_s": round(images * len(timed) / sum(timed), 3),
            "median_step_s": round(statistics.median(timed), 4),
            "time_to_first_step_s": round(first_step, 1),
            "unet_forward_tflop_per_image": round(flops / 1e12, 4),
            "last_loss": round(result["loss"], 5),
        }
        if device.type == "cuda":
            row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
        del model, encoders, reader
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def bench(cfg: BenchConfig, log=print) -> list[dict]:
    """Run the configuration (and the baseline); print a table and one JSON line per run."""
    from stages.encode import resolve_device
    device = resolve_device(cfg.device)
    if cfg.vram_budget:
        from stages.plan import cap_gpu_memory  # (plan imports parse_size from here)
        cap_gpu_memory(device, cfg.vram_budget, log)
    peak = matmul_peak_tflops(device)
    rows = []
    for baseline in ([True, False] if cfg.baseline else [False]):
        try:
            row = run_one(cfg, device, baseline, log)
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"does not fit{' in ' + cfg.vram_budget if cfg.vram_budget else ''}: out of GPU memory "
                            f"({'baseline' if baseline else 'configuration'} at {cfg.resolution}², micro-batch "
                            f"{cfg.batch_size})") from None
        if peak:
            useful = 2 * row["unet_forward_tflop_per_image"] * row["images_per_s"]  # TFLOP/s: forward + backward
            row["matmul_peak_tflops"] = round(peak, 1)
            row["mfu"] = round(useful / peak, 4)
        row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        row["torch"] = torch.__version__
        rows.append(row)
    keys = ["recipe", "resolution", "micro_batch", "grad_accum", "precision", "base_weights", "base_gib",
            "checkpointing", "compile", "optimizer", "peak_allocated_gib", "peak_reserved_gib", "images_per_s",
            "time_to_first_step_s", "mfu"]
    for k in keys:
        log(f"{k:22s}" + "".join(f"{str(r.get(k, '-')):>40s}" for r in rows))
    if len(rows) == 2:
        log(f"{'speed-up vs baseline':22s}{rows[1]['images_per_s'] / rows[0]['images_per_s']:>80.2f}x")
    for r in rows:
        log(json.dumps({**r, "config": asdict(cfg)}))
    return rows
