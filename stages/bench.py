"""`bench`: measure a training configuration through train's own setup and step (peak memory, images/s,
time to the first step, MFU), optionally beside the all-FP32 encode-every-step baseline; and a synthetic
cache shaped like SDXL's, for measuring `train` without a dataset."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cache import CacheReader
from cache.format import Manifest, fingerprint
from cache.writer import CacheWriter, write_validation
from stages.config import (DEFAULT_LEARNING_RATES, RANDOM_SDXL, BenchConfig, TrainConfig, parse_resolutions,
                           parse_stream_blocks, resolve_target_modules, sweep_members, sweep_values)
from stages.device import (apply_compile, cap_gpu_memory, check_device_options, resolve_device, resolve_precision,
                           synchronize, use_cuda_graphs)
from stages.errors import UserError
from stages.quantize import check_base_weights
from stages.sdxl import ModelSource, check_target_modules, load_encoders, random_encoders, unet_config
from stages.streaming import streamed_bytes


def write_synthetic_cache(folder: str | Path, num_samples: int = 64, resolution: int = 512, dtype: str = "fp16",
                          seed: int = 0, text_width: int = 2048, pooled_width: int = 1280,
                          model: str = RANDOM_SDXL, validation_prompts: int = 0,
                          sizes: list[tuple[int, int]] | None = None) -> Manifest:
    """A cache of random tensors with SDXL's shapes (flips included), recorded as made for `model`;
    optionally with random embeddings for `validation_prompts` prompts. `sizes`: (height, width) buckets in
    pixels, sample i in sizes[i % len(sizes)] (a bucketed cache); default one square `resolution`."""
    g = torch.Generator().manual_seed(seed)
    preprocessing = {"resolution": resolution, "center_crop": True, "flip": True, "synthetic": True}
    if sizes:
        preprocessing["buckets"] = {"step": 8, "max_aspect": 4.0}
    manifest = Manifest(fingerprint=fingerprint({"synthetic": seed}, preprocessing, dtype),
                        encoder={"model": model, "revision": None, "variant": None, "model_config": None,
                                 "weights": {"synthetic": str(seed)}},
                        preprocessing=preprocessing, dtype=dtype, scaling_factor=0.13025, shift_factor=None,
                        dataset={"name": "synthetic", "split": "train", "num_records": num_samples})
    writer = CacheWriter(Path(folder), manifest, shard_size=256)
    for i in range(num_samples):
        h, w = sizes[i % len(sizes)] if sizes else (resolution, resolution)
        latent = (4, h // 8, w // 8)
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)
        writer.add({
            "latent_mean": torch.randn(latent, generator=g) * 5, "latent_std": torch.rand(latent, generator=g) * 0.1,
            "latent_mean_flipped": torch.randn(latent, generator=g) * 5,
            "latent_std_flipped": torch.rand(latent, generator=g) * 0.1,
            "prompt_embeds": torch.randn(77, text_width, generator=g),
            "pooled_prompt_embeds": torch.randn(pooled_width, generator=g),
            "time_ids": ids, "time_ids_flipped": ids,
        }, key=f"{i:08d}", caption=f"synthetic sample {i}", source={"synthetic": i},
            group=(resolution, h, w) if sizes else None)
    manifest = writer.finish()
    if validation_prompts:
        write_validation(Path(folder), manifest, [f"synthetic prompt {i}" for i in range(validation_prompts)],
                         torch.randn(validation_prompts, 77, text_width, generator=g),
                         torch.randn(validation_prompts, pooled_width, generator=g))
    return manifest


# ------------------------------------------------------------------------------------------ bench
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


def bench_sweep(cfg: BenchConfig) -> tuple[str, ...]:
    """`train --sweep` of bench --sweep K: K learning rates from the optimizer's default down by factors of 2
    (× --sweep-ranks' ranks)."""
    lrs = ",".join(f"{DEFAULT_LEARNING_RATES[cfg.optimizer] * 0.5 ** k:g}" for k in range(cfg.sweep))
    return (f"learning_rate={lrs}",) + ((f"rank={cfg.sweep_ranks}",) if cfg.sweep_ranks else ())


def run_one(cfg: BenchConfig, device: torch.device, baseline: bool, log, sweep: bool = False) -> dict:
    """Time `steps` optimizer steps through train's own setup_models / micro_batches / training_step (with `sweep`,
    bench_sweep's members trained together, as `train --sweep` does)."""
    from stages.encode import encode_latents, encode_token_ids
    from stages.train import setup_models, train_batches, training_step

    total = cfg.warmup + cfg.steps
    profiled = cfg.profile_steps if device.type == "cuda" else 0  # after the timed steps: where the time goes
    tcfg = TrainConfig(model=cfg.model, rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules,
                       gradient_checkpointing=cfg.gradient_checkpointing, batch_size=cfg.batch_size,
                       grad_accum=cfg.grad_accum, max_steps=total + profiled, warmup_steps=0, optimizer=cfg.optimizer,
                       mixed_precision=cfg.mixed_precision, seed=cfg.seed, base_weights=cfg.base_weights,
                       device=device.type, num_workers=0, checkpoint_every=0, stream_blocks=cfg.stream_blocks,
                       cuda_graphs="off" if cfg.compile == "regional-graphs" else cfg.cuda_graphs,
                       sweep=bench_sweep(cfg) if sweep else ())
    if baseline:  # the reference recipe at the same effective batch: FP32, checkpointing, micro-batch 1, 8-bit AdamW
        tcfg = dataclasses.replace(tcfg, mixed_precision="no", base_weights="auto", gradient_checkpointing=True,
                                   batch_size=1, grad_accum=cfg.batch_size * cfg.grad_accum, optimizer="adamw8bit",
                                   cuda_graphs="off", stream_blocks="off")
    uc = unet_config(ModelSource(cfg.model))
    pooled = uc["projection_class_embeddings_input_dim"] - 6 * uc["addition_time_embed_dim"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_cache(tmp, num_samples=max(8, cfg.batch_size * cfg.grad_accum), resolution=cfg.resolution,
                              text_width=uc["cross_attention_dim"], pooled_width=pooled, model=cfg.model,
                              validation_prompts=2 if cfg.validate_steps else 0)
        reader = CacheReader(tmp)
        models = setup_models([c for _, c in sweep_members(tcfg)] if sweep else [tcfg], reader, device, lambda *a: None)
        model = models[0]
        if device.type == "cuda":  # the training steps' peak, as train logs it (not a quantizing load's)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        encoders = None
        if baseline:  # the model's own FP32 VAE and text encoders (random full-size ones for random:sdxl)
            source = ModelSource(cfg.model)
            encoders = random_encoders(device) if source.kind == "random" else {
                k: v.to(device) for k, v in load_encoders(source).items() if not k.startswith("tokenizer")}
        flops = None
        times, first_step, copied = [], None, {}
        for step, micro in train_batches(reader, tcfg, 0, device):
            if step in (cfg.warmup, total):  # host -> device bytes of a streamed UNet over the timed steps
                copied[step] = streamed_bytes(model.unet)
            if step == total:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                              torch.profiler.ProfilerActivity.CUDA])
                profiler.__enter__()
                profile_started = time.perf_counter()
            if flops is None:  # counted eagerly, before compiling: a counting pass would make compiled blocks recompile
                with model.mixed.only(model.adapter) if model.mixed else contextlib.nullcontext():  # one adapter's
                    flops = unet_forward_flops(model.unet, {k: v[:1] for k, v in micro[0].items()})
                apply_compile(model.unet, "none" if baseline else cfg.compile, device)
            synchronize(device)
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
            result = training_step(models, micro, step, tcfg)[0]
            synchronize(device)
            times.append(time.perf_counter() - t0)
            if first_step is None:
                first_step = time.perf_counter() - started
        if profiled:
            synchronize(device)
            wall = time.perf_counter() - profile_started
            profiler.__exit__(None, None, None)
            profile = time_split(profiler.events(), wall, profiled)
        timed = times[cfg.warmup:total]
        images = cfg.batch_size * cfg.grad_accum
        row = {
            "recipe": "baseline: all FP32, encode every step" if baseline else
                      f"sweep of {len(models)} LoRAs, one pass" if sweep else "cached inputs, UNet only",
            "adapters": len(models),
            "resolution": cfg.resolution, "micro_batch": tcfg.batch_size, "grad_accum": tcfg.grad_accum,
            "precision": model.resolved["mixed_precision"], "base_weights": model.resolved["base_weights"],
            "base_gib": round(model.resolved["base_bytes_after"] / 2**30, 3),
            "checkpointing": tcfg.gradient_checkpointing, "compile": "none" if baseline else cfg.compile,
            "optimizer": model.resolved["optimizer"], "trainable_parameters": model.resolved["trainable_parameters"],
            "images_per_s": round(images * len(timed) / sum(timed), 3),  # of the stream; each adapter trains on them
            "adapter_images_per_s": round(len(models) * images * len(timed) / sum(timed), 3),
            "median_step_s": round(statistics.median(timed), 4),
            "time_to_first_step_s": round(first_step, 1),
            "unet_forward_tflop_per_image": round(flops / 1e12, 4),
            "last_loss": round(result["loss"], 5),
            "cuda_graphs": model.resolved["cuda_graphs"] and not (model.graphs and model.graphs.failed),
            "stream_blocks": model.resolved["stream_blocks"],
            "h2d_gib_per_step": round((copied.get(total, streamed_bytes(model.unet)) - copied[cfg.warmup])
                                      / len(timed) / 2**30, 3),
        }
        if device.type == "cuda":
            row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
        if profiled:
            row.update(profile)
        if cfg.validate_steps and not baseline:
            row.update(bench_validation(model, reader, cfg.validate_steps, cfg.resolution, cfg.seed, Path(tmp), log))
        del model, models, encoders, reader
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_validation(model, reader: CacheReader, steps: int, resolution: int, seed: int, folder: Path, log) -> dict:
    """One validation pass as train renders it (Validator.from_cache: the cache's 2 prompts, the FP32 VAE decoding; out
    of memory beside the CUDA graphs' pool: they are released, as in train): its seconds and, on CUDA, peak
    allocated / reserved."""
    from stages.config import TrainConfig
    from stages.sample import Validator
    from stages.sweep import validate
    guidance = TrainConfig.__dataclass_fields__["validation_guidance"].default
    validator = Validator.from_cache(reader, model.source, steps, guidance, seed)
    started = time.perf_counter()
    try:
        with model.mixed.only(model.adapter) if model.mixed else contextlib.nullcontext():
            row = validate(model, validator, 0, folder, resolution, log)
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"the validation pass does not fit beside this configuration at {resolution}² (the training "
                        "steps did)") from None
    return {"validation_s": round(time.perf_counter() - started, 2),
            **{k: row[k] for k in ("validation_peak_gib", "validation_reserved_gib") if k in row}}


HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy")


def time_split(events, wall_s: float, steps: int) -> dict:
    """Per optimizer step, from a torch.profiler trace: wall time, the host's own time (wall less its waits for
    the GPU in synchronizations and copies back), and GPU busy time (the sum of kernel durations). Host time near
    the wall time with GPU busy far below it: launch-bound; GPU busy near the wall time: GPU-bound."""
    kernels = sum(e.time_range.elapsed_us() for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    waits = sum(e.time_range.elapsed_us() for e in events
                if e.device_type == torch.autograd.DeviceType.CPU and e.name in HOST_WAITS)
    return {"profile_step_ms": round(wall_s * 1e3 / steps, 1), "host_ms_per_step": round((wall_s * 1e6 - waits) / 1e3 / steps, 1),
            "gpu_busy_ms_per_step": round(kernels / 1e3 / steps, 1)}


def check_bench(cfg: BenchConfig, device: torch.device) -> None:
    """Refuse, before anything is built, what cannot run here: random:sdxl off a GPU (the full-size UNet: ~10 GB of
    memory and minutes per step on a CPU), a model path that is not there, precision / base weights / CUDA graphs
    / --compile this device lacks, --target-modules the UNet does not have, a --resolution no multiple of 8."""
    parse_resolutions(cfg.resolution)
    sweep_values(bench_sweep(cfg))  # --sweep-ranks: whole numbers, distinct
    check_device_options("auto", cfg.compile, device)
    resolve_precision(cfg.mixed_precision, device)
    check_base_weights(cfg.base_weights, device, "lora")
    use_cuda_graphs(cfg.cuda_graphs, cfg.compile, device, 1, lambda *a: None, streamed=bool(parse_stream_blocks(cfg.stream_blocks)))
    source = ModelSource(cfg.model).check()
    check_target_modules(source, resolve_target_modules(cfg.target_modules), {})
    if source.kind == "random" and device.type != "cuda":
        raise UserError("bench --model random:sdxl builds the full-size SDXL UNet (~10 GB of memory, minutes per step "
                        "on a CPU) to measure GPU training: run it on a CUDA GPU, or on a CPU pass --model with a small "
                        "diffusers folder (the demo's: python pipeline.py demo --workdir w, then --model w/tiny-sdxl)")


def bench(cfg: BenchConfig, log=print) -> list[dict]:
    """Run the configuration (and the baseline, and the --sweep); print a table and one JSON line per run."""
    device = resolve_device(cfg.device)
    check_bench(cfg, device)
    if cfg.vram_budget:
        cap_gpu_memory(device, cfg.vram_budget, log)
    peak = matmul_peak_tflops(device)
    rows = []
    runs = [(True, False)] * cfg.baseline + [(False, False)] + [(False, True)] * (cfg.sweep > 1 or bool(cfg.sweep_ranks))
    for baseline, sweep in runs:
        try:
            row = run_one(cfg, device, baseline, log, sweep)
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"does not fit{' in ' + cfg.vram_budget if cfg.vram_budget else ''}: out of GPU memory "
                            f"({'baseline' if baseline else 'sweep' if sweep else 'configuration'} at "
                            f"{cfg.resolution}², micro-batch {cfg.batch_size})") from None
        if peak:
            useful = 2 * row["unet_forward_tflop_per_image"] * row["images_per_s"]  # TFLOP/s: forward + backward
            row["matmul_peak_tflops"] = round(peak, 1)
            row["mfu"] = round(useful / peak, 4)
        row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        row["torch"] = torch.__version__
        rows.append(row)
    keys = ["recipe", "resolution", "micro_batch", "grad_accum", "precision", "base_weights", "base_gib",
            "checkpointing", "cuda_graphs", "compile", "stream_blocks", "h2d_gib_per_step", "optimizer", "adapters",
            "peak_allocated_gib", "peak_reserved_gib", "images_per_s", "adapter_images_per_s", "time_to_first_step_s", "mfu",
            "profile_step_ms", "host_ms_per_step", "gpu_busy_ms_per_step", "validation_s", "validation_peak_gib",
            "validation_reserved_gib"]
    for k in keys:
        log(f"{k:22s}" + "".join(f"{str(r.get(k, '-')):>40s}" for r in rows))
    if cfg.baseline:
        log(f"{'speed-up vs baseline':22s}{rows[1]['images_per_s'] / rows[0]['images_per_s']:>80.2f}x")
    if rows[-1]["adapters"] > 1:  # the sweep beside the single run of this invocation
        single, swept = rows[-2], rows[-1]
        log(f"sweep of {swept['adapters']}: {swept['adapter_images_per_s'] / single['images_per_s']:.2f}x the single run's "
            "images/s in adapter-images/s" + (f"; peak {swept['peak_allocated_gib'] - single['peak_allocated_gib']:+.2f} "
                                              "GiB" if "peak_allocated_gib" in swept else ""))
    for r in rows:
        log(json.dumps({**r, "config": asdict(cfg)}))
    return rows
