"""Stage 2: train a UNet LoRA from the cache. Loads the UNet only; never the VAE or text encoders.

    CacheReader -> cache/sampler.py's order (seed, position) -> micro-batches on the device
      -> training_step: per micro-batch the random draws (draw_inputs) and forward + backward
         (diffusion_loss; one CUDA graph replay on a GPU), then clip and step the optimizer over the flat LoRA
      -> checkpoint-N/ (stages/checkpoint.py) -> pytorch_lora_weights.safetensors + OUTPUT/<name>.safetensors (kohya)

Every random draw is a pure function of (seed, position): the epoch order, the per-sample flip, the latent
sample, the noise and the timesteps, and the recipe's caption dropout, offset noise and timestep strata.
Resume regenerates them instead of storing RNG state.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cache import CacheReader, open_caches
from cache.files import write_json_atomic
from cache.sampler import micro_batches, note_small_buckets
from stages import checkpoint, distributed
from stages.budget import watch_memory
from stages.config import LORA_TYPES, QUANTIZED, TrainConfig, parse_cache_specs, resolution_stages, stage_resolution
from stages.device import (CudaGraphs, apply_compile, check_device_options, enable_attention, enable_checkpointing,
                           resolve_device, resolve_precision, use_cuda_graphs)
from stages.errors import UserError, kill_point
from stages.lora import LORA_WEIGHTS_NAME, attach_lora
from stages.optim import EMA, FlatGroups, load_training_states, setup_optimizer, training_states, weights_in_use
from stages.outputs import save_final_lora, save_training_checkpoint
from stages.quantize import check_base_weights, quantize_base
from stages.recipes import Recipe, configure_noise_scheduler, draw_noise, make_recipe, step_generator
from stages.report import MetricsLogger, check_report_to, plot_losses, plural, write_model_card
from stages.sample import Validator
from stages.sdxl import ModelSource, cache_model_source, check_cache_fits, check_target_modules, load_noise_scheduler, load_unet
from stages.streaming import attach_streaming, check_stream_blocks


# ------------------------------------------------------------------------------- the training step
def draw_inputs(batch: dict, num_timesteps: int, generator: torch.Generator, recipe: Recipe, noise_scheduler,
                rank_slice: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Everything one micro-batch's forward + backward reads, on the batch's device: the cached tensors and
    this micro-batch's random draws (made on the CPU from `generator`, then copied over)."""
    mean = batch["latent_mean"].float()  # (B, 4, H/8, W/8), scaled
    latent_eps, noise, timesteps = draw_noise(mean.shape, num_timesteps, generator, rank_slice)
    timesteps = recipe.timesteps(timesteps, batch, num_timesteps, generator, rank_slice)  # uniform: as drawn
    noise = recipe.noise(noise, generator, rank_slice)  # + offset noise
    weights = recipe.loss_weights(noise_scheduler, timesteps)  # min-SNR, debiased: per sample; else None
    huber_c = recipe.huber_thresholds(noise_scheduler, timesteps)  # --loss huber / smooth_l1: per sample; else None
    prompt_embeds, pooled = recipe.conditioning(batch)  # caption dropout: some rows -> the empty caption's
    draws = {"latent_eps": latent_eps, "noise": noise, "timesteps": timesteps,
             **{k: v for k, v in (("loss_weights", weights), ("huber_c", huber_c)) if v is not None}}
    pin = mean.device.type == "cuda"  # pinned: the copies do not wait for the GPU's queue
    return {"latent_mean": mean, "latent_std": batch["latent_std"].float(), "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled, "time_ids": batch["time_ids"], **recipe.cached_inputs(batch),
            **{k: (v.pin_memory() if pin else v).to(mean.device, non_blocking=True) for k, v in draws.items()}}


def diffusion_loss(unet, noise_scheduler, x: dict[str, torch.Tensor], recipe: Recipe) -> torch.Tensor:
    """The diffusion loss of one micro-batch from draw_inputs' tensors: device work only (CUDA-graph safe)."""
    latents = x["latent_mean"] + x["latent_std"] * x["latent_eps"]  # a fresh sample of the VAE posterior
    noisy_latents = noise_scheduler.add_noise(latents, x["noise"], x["timesteps"])
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, x["noise"], x["timesteps"])
    else:
        target = x["noise"]
    dtype = unet.dtype  # the frozen base's: cached fp16/bf16 conditioning is cast to it
    added = {"text_embeds": x["pooled_prompt_embeds"].to(dtype), "time_ids": x["time_ids"].to(dtype)}
    model_pred = unet(noisy_latents, x["timesteps"], x["prompt_embeds"].to(dtype), added_cond_kwargs=added).sample
    return recipe.loss(model_pred, target, x.get("loss_weights"), x.get("huber_c"), x.get("mask"), x.get("cache"))


def compute_loss(unet, noise_scheduler, batch: dict, generator: torch.Generator,
                 rank_slice: tuple[int, int] | None = None, recipe: Recipe | None = None) -> torch.Tensor:
    """The diffusion loss of one micro-batch of cached inputs, draws included (the eager path, in one call)."""
    recipe = recipe or Recipe()
    x = draw_inputs(batch, noise_scheduler.config.num_train_timesteps, generator, recipe, noise_scheduler, rank_slice)
    return diffusion_loss(unet, noise_scheduler, x, recipe)


def forward_backward(model: "Model", net, x: dict[str, torch.Tensor], accum: int) -> None:
    """One micro-batch: loss, backward of loss / accum into the LoRA gradients, loss added to model.loss_sum."""
    with torch.autocast(model.device.type, dtype=model.autocast_dtype, enabled=model.autocast_dtype is not None,
                        cache_enabled=False):  # no cast cache: it would not survive a CUDA-graph replay
        loss = diffusion_loss(net, model.noise_scheduler, x, model.recipe)
    model.scaler.scale(loss / accum).backward()
    model.loss_sum.add_(loss.detach().float())


def training_step(model: "Model", micro: list[dict], step: int, cfg: TrainConfig) -> dict:
    """One optimizer step: accumulate over micro-batches, clip, step (or skip if non-finite)."""
    net, rank_slice = model.unet, None
    if model.ddp is not None:  # torchrun: this rank's slice of each global micro-batch
        net, rank_slice = model.ddp, (distributed.rank(), distributed.world_size())
    num_timesteps = model.noise_scheduler.config.num_train_timesteps
    for i, batch in enumerate(micro):
        x = draw_inputs(batch, num_timesteps, step_generator(cfg.seed, step * cfg.grad_accum + i), model.recipe,
                        model.noise_scheduler, rank_slice)
        # DDP all-reduces the accumulated gradients once, in the last micro-batch's backward
        with net.no_sync() if model.ddp is not None and i < len(micro) - 1 else contextlib.nullcontext():
            model.run_micro_batch(x, len(micro)) if model.graphs is None else model.graphs(x)
    loss = model.loss_sum / len(micro)
    if model.ddp is not None:
        loss = distributed.mean_across_ranks(loss)  # the global mean: every rank logs and skips alike
    model.scaler.unscale_(model.optimizer)
    # flat tensors on a GPU (a few launches); per tensor on the CPU, whose fp32 norm of one long vector is less exact
    clipped = model.flat.flat_params if model.device.type == "cuda" else model.flat.params
    grad_norm = torch.nn.utils.clip_grad_norm_(clipped, cfg.max_grad_norm)
    loss_value, norm_value = torch.stack([loss.float(), grad_norm.float()]).tolist()  # the step's one host sync
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if finite:
        model.scaler.step(model.optimizer)
    model.scaler.update()  # with fp16, an overflow lowers the scale; otherwise a no-op
    if model.ema is not None:
        model.ema.update()
    model.flat.zero_grad()
    model.loss_sum.zero_()
    lr = model.lr_scheduler.get_last_lr()[0] / model.flat.scales[0]  # --learning-rate's, without a group's multiplier
    model.lr_scheduler.step()
    # With a GradScaler, inf gradients while the scale calibrates are expected, not a failure.
    bad = not math.isfinite(loss_value) or (not finite and not model.scaler.is_enabled())
    return {"loss": loss_value, "grad_norm": norm_value, "lr": lr, "skipped": not finite, "bad": bad}


# ------------------------------------------------------------------------------------------ setup
@dataclass
class Model:
    unet: torch.nn.Module
    noise_scheduler: object
    flat: FlatGroups  # the LoRA parameters and gradients as views into flat buffers, one pair per lr group
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scaler: torch.amp.GradScaler
    device: torch.device
    autocast_dtype: torch.dtype | None
    resolved: dict  # what "auto" settings became, for train_config.json
    source: ModelSource
    recipe: Recipe = field(default_factory=Recipe)  # noise and loss options (noise offset, min-SNR, ...)
    ddp: torch.nn.Module | None = None  # under torchrun: DistributedDataParallel around unet
    graphs: CudaGraphs | None = None  # --cuda-graphs: forward + backward replayed as CUDA graphs
    loss_sum: torch.Tensor | None = None  # the step's micro-batch losses, summed on the device
    ema: EMA | None = None  # --ema-decay: the moving average of flat.flat_params

    @property
    def params(self) -> list:  # the LoRA's tensors (views into the flat buffers)
        return self.flat.params

    def final_weights(self, ema: bool = True):  # in its block: schedule-free's average x, and the EMA if kept
        return weights_in_use(self.optimizer, self.ema if ema else None)

    def run_micro_batch(self, x: dict, accum: int) -> None:
        forward_backward(self, self.ddp if self.ddp is not None else self.unet, x, accum)

    def states(self) -> dict:  # optimizer, lr scheduler, grad scaler, EMA: what a checkpoint stores
        return training_states(self.optimizer, self.lr_scheduler, self.scaler, self.ema)

    def load_states(self, states: dict, weight_decay: float) -> None:
        """A checkpoint's states, then this run's learning rates (per group) and weight decay, applied."""
        this_run = [group["initial_lr"] for group in self.optimizer.param_groups]
        load_training_states(states, self.optimizer, self.lr_scheduler, self.scaler, self.ema)
        checkpoint.set_hyperparameters(self.optimizer, self.lr_scheduler, this_run, weight_decay)


def _setup_unet(cfg: TrainConfig, source: ModelSource, reader: CacheReader, device, autocast_dtype, log, blocks: int):
    """The frozen UNet (as --base-weights, streamed if blocks) with the adapter; returns (unet, [(name, LoRA param)], base info)."""
    log(f"loading the UNet from {source.model}")
    on_cpu = cfg.base_weights in QUANTIZED or blocks  # a quantized / streamed base reaches the GPU a layer / block at a time
    unet = load_unet(source, dtype=autocast_dtype or torch.float32, device=torch.device("cpu") if on_cpu else device)
    base = quantize_base(unet, cfg.base_weights, autocast_dtype, device, cfg.lora_type)
    check_cache_fits(unet.config, reader[0], reader.path)
    try:
        attach_lora(unet, cfg.rank, cfg.alpha, cfg.target_module_list, cfg.lora_type, cfg.rank_pattern_dict)
    except ValueError as e:
        raise UserError(str(e)) from e
    if cfg.gradient_checkpointing:
        enable_checkpointing(unet)
    attach_streaming(unet, blocks, device, log)  # --stream-blocks: before .to(device), the blocks stay in host memory
    unet.to(device).train()
    return unet, [(n, p) for n, p in unet.named_parameters() if p.requires_grad], base


def setup_model(cfg: TrainConfig, reader: CacheReader, device: torch.device, log,
                source: ModelSource | None = None) -> Model:
    world = distributed.world_size()
    source = source or cache_model_source(reader.manifest.encoder, cfg.model, cfg.revision, cfg.variant, cfg.model_config)
    autocast_dtype = resolve_precision(cfg.mixed_precision, device)
    recipe = make_recipe(cfg.seed, cfg.batch_size * cfg.grad_accum * world, cfg.noise_offset, cfg.min_snr_gamma,
                         cfg.timestep_sampling, cfg.caption_dropout, reader.empty_prompt() if cfg.caption_dropout else None,
                         cfg.cache, device, cfg.loss, cfg.huber_c, cfg.huber_schedule, cfg.debiased_estimation, cfg.masked_loss)
    check_base_weights(cfg.base_weights, device, cfg.lora_type)  # before the slow load
    check_device_options(cfg.attention, cfg.compile, device)
    check_target_modules(source, cfg.target_module_list, cfg.rank_pattern_dict)
    blocks = check_stream_blocks(cfg.stream_blocks, world)
    graphs = use_cuda_graphs(cfg.cuda_graphs, cfg.compile, device, world, log, streamed=bool(blocks))
    unet, named, base = _setup_unet(cfg, source, reader, device, autocast_dtype, log, blocks)
    noise_scheduler = configure_noise_scheduler(load_noise_scheduler(source), cfg.prediction_type,
                                                cfg.rescale_betas_zero_snr)
    if cfg.rescale_betas_zero_snr and noise_scheduler.config.prediction_type == "epsilon":
        log("note: with zero terminal SNR the last timestep's input is pure noise, so an epsilon target teaches "
            "nothing there; Lin et al. pair --rescale-betas-zero-snr with --prediction-type v_prediction")
    attention = enable_attention(unet, cfg.attention, device, log)
    apply_compile(unet, cfg.compile, device)
    lr = cfg.lr * (world if cfg.scale_lr else 1)
    flat, optimizer, optimizer_name, lr_scheduler, ema = setup_optimizer(
        named, cfg.optimizer, lr, cfg.weight_decay, cfg.lr_scheduler, cfg.warmup_steps, cfg.max_steps, cfg.block_lr_dict,
        cfg.loraplus_lr_ratio, cfg.ema_decay, torch.device("cpu" if cfg.ema_device == "cpu" else device), device, log)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    trainable = sum(p.numel() for _, p in named)
    resolved = {"model": source.resolved().describe(), "mixed_precision": str(autocast_dtype or "fp32").removeprefix("torch."), **base,
                "optimizer": optimizer_name, "attention": attention, "cuda_graphs": graphs, "stream_blocks": blocks,
                "trainable_parameters": trainable, "effective_batch": cfg.batch_size * cfg.grad_accum * world,
                "device": str(device), "world_size": world, "global_batch_size": cfg.batch_size * world,
                "learning_rate": lr, "prediction_type": noise_scheduler.config.prediction_type,
                "lr_multipliers": flat.scales}
    log(f"{LORA_TYPES[cfg.lora_type]} r{cfg.rank}/alpha{cfg.alpha:g} on {cfg.target_modules}: {trainable:,} trainable parameters; "
        f"{resolved['mixed_precision']}, base {base['base_weights']} ({base['base_bytes_after'] / 2**30:.2f} GiB), "
        f"{optimizer_name}, {attention}{', CUDA graphs' if graphs else ''}, effective batch {resolved['effective_batch']}"
        + (f" (batch {cfg.batch_size} × grad-accum {cfg.grad_accum} × {world} processes), learning rate {lr:g}"
           + (" (--scale-lr)" if cfg.scale_lr else "") if world > 1 else ""))
    model = Model(unet, noise_scheduler, flat, optimizer, lr_scheduler, scaler, device, autocast_dtype, resolved,
                  source, recipe, loss_sum=torch.zeros((), device=device), ema=ema)
    if graphs:
        model.graphs = CudaGraphs(lambda x: model.run_micro_batch(x, cfg.grad_accum),
                                  [*(p.grad for p in flat.flat_params), model.loss_sum, *recipe.state], log)
    return model


# ------------------------------------------------------------------------------------------ train
def train_batches(reader: CacheReader, cfg: TrainConfig, first_step: int, device: torch.device, rank: int = 0,
                  world: int = 1):
    """(optimizer step, [micro-batches on device]) from `first_step` to --max-steps, through the resolution schedule."""
    schedule = resolution_stages(cfg.resolution_schedule, reader.manifest.resolutions, cfg.max_steps, cfg.cache)
    return micro_batches(reader, schedule, cfg.seed, cfg.batch_size, cfg.grad_accum, first_step, device, rank, world,
                         cfg.num_workers, cfg.masked_loss)


def train(cfg: TrainConfig, log=print) -> dict:
    """Run stage 2; returns a summary dict (final loss, steps, seconds, peak memory, output)."""
    with contextlib.ExitStack() as held:  # --output's lock (rank 0), from before the UNet loads to the end
        return _train(cfg, log, held)


def _train(cfg: TrainConfig, log, held: contextlib.ExitStack) -> dict:
    out = Path(cfg.output)
    check_report_to(cfg.report_to)  # a missing tracker fails now, not after the UNet is loaded
    reader = open_caches(parse_cache_specs(cfg.cache), cfg.masked_loss)  # one cache's reader, or several's mixture
    if cfg.verify_cache and (problems := reader.verify()):
        raise UserError(f"cache {cfg.cache} is corrupt: {'; '.join(problems)}; rerun the encode command that made it: "
                        "it encodes again only the samples of the corrupt shard(s)")
    schedule = resolution_stages(cfg.resolution_schedule, reader.manifest.resolutions, cfg.max_steps, cfg.cache)
    if cfg.validate_every and not reader.manifest.validation_prompts:
        raise UserError(f"--validate-every needs validation prompts in the cache: encode {reader.path} again with "
                        "--validation-prompt \"...\" (the samples stay as they are)")
    source = cache_model_source(reader.manifest.encoder, cfg.model, cfg.revision, cfg.variant, cfg.model_config, cfg.allow_other_model)
    device = distributed.setup(resolve_device(cfg.device))  # torchrun: join the process group, cuda:LOCAL_RANK
    main, world = distributed.is_main(), distributed.world_size()  # only rank 0 writes outputs and logs
    log = log if main else (lambda *a, **k: None)
    cfg, watch = watch_memory(cfg, device, max(res for res, _, _ in schedule), log)  # --vram-budget: the plan's copy
    resume = checkpoint.claim_output(out, cfg, reader.manifest, world, held, log)  # lock, resume plan, old outputs
    if reader.manifest.bucketed:
        note_small_buckets(reader.manifest, cfg.batch_size * world, log)
    if (cfg.compile != "none" or cfg.cuda_graphs != "off") and device.type == "cuda" and (reader.manifest.bucketed or len(schedule) > 1):
        log("note: every bucket / resolution shape is compiled or captured as a CUDA graph the first time it is "
            "seen: expect short pauses, and more memory")
    torch.manual_seed(cfg.seed)  # LoRA initialization
    model = setup_model(cfg, reader, device, log, source)

    start_step, counters = checkpoint.restore(resume, model, cfg.weight_decay, log)
    model.ddp = distributed.wrap(model.unet, device)  # None in a single process
    metrics_path = out / "metrics.jsonl"
    run = checkpoint.run_record(cfg, model.resolved, reader.manifest, resume)
    if main:  # --output exists: its lock is in it
        write_json_atomic(out / "train_config.json", run)
        checkpoint.truncate_metrics(metrics_path, start_step)
    validator = distributed.on_main(Validator.from_cache, reader, model.source, cfg.validation_steps,
                                    cfg.validation_guidance, cfg.seed) if cfg.validate_every else None
    layout = {"world_size": world, "global_batch_size": cfg.batch_size * world, "run": run}
    kohya_name = cfg.kohya_name if cfg.kohya_file else None

    watch.start()  # peaks from the first step
    started = last = time.time()
    per_step, losses = cfg.batch_size * cfg.grad_accum * world, []
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", disable=not main)
    batches = train_batches(reader, cfg, start_step, device, distributed.rank(), world)
    with open(metrics_path if main else os.devnull, "a") as metrics, \
            MetricsLogger(cfg.report_to if main else "none", out, start_step) as tracker:
        for step, micro in batches:
            with watch.guard(step + 1 - start_step):  # --vram-budget: out of memory in the first steps -> what fits
                result = training_step(model, micro, step, cfg)
            now = time.time()
            counters["skipped_steps"] += result["skipped"]
            counters["bad_in_a_row"] = counters["bad_in_a_row"] + 1 if result["bad"] else 0
            row = {"step": step + 1, **{k: result[k] for k in ("loss", "lr", "grad_norm", "skipped")},
                   "seconds": round(now - last, 4), "images_per_s": round(per_step / max(now - last, 1e-9), 3)}
            if len(schedule) > 1:
                row["resolution"] = stage_resolution(schedule, step)
            if resume and resume.changes and step == start_step:  # the first step with the changed settings
                row["resume_changes"] = resume.changes
            row.update(watch.peaks())  # on CUDA: peak_gib (allocated), peak_reserved_gib
            if validator and (step + 1) % cfg.validate_every == 0:
                with model.final_weights():
                    row.update(validator(model.unet, model.noise_scheduler, step + 1, out, stage_resolution(schedule, step)))
            row.update(model.recipe.cache_loss_row())  # several caches: each one's loss
            watch.check(row, step + 1 - start_step)  # --vram-budget: the first steps' and validations' measured peaks
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            tracker.log(step + 1, row)
            last = now
            if math.isfinite(result["loss"]):
                losses.append(result["loss"])
            bar.set_postfix(loss=f"{result['loss']:.4f}", img_s=f"{row['images_per_s']:.2f}")
            bar.update(1)
            if counters["bad_in_a_row"] >= cfg.max_bad_steps:
                raise UserError(f"stopped: {counters['bad_in_a_row']} non-finite steps in a row at step {step + 1} "
                                "(lower --learning-rate, or use --mixed-precision bf16/no); checkpoints are intact")
            if main and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
                save_training_checkpoint(model, out, step + 1, counters, layout, kohya_name, cfg.checkpoints_total_limit)
            kill_point("step", step + 1)
    bar.close()
    if main:
        save_final_lora(model, out, cfg.kohya_name, cfg.save_dtype, cfg.kohya_file, log)  # the EMA if kept, …_raw beside
        if cfg.checkpoint_every:
            save_training_checkpoint(model, out, cfg.max_steps, counters, layout, kohya_name, cfg.checkpoints_total_limit)
    summary = {
        "output": str(out), "steps": cfg.max_steps, "trained_steps": cfg.max_steps - start_step,
        "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else float("nan"),
        "seconds": round(time.time() - started, 2), "skipped_steps": counters["skipped_steps"],
        "peak_gib": watch.peak_gib,  # of the training steps (validation is logged separately)
        "unet": model.unet,  # the trained peft UNet, for callers that use it in-process (tests, demo)
    }
    log(f"trained {plural(summary['trained_steps'], 'step')} in {summary['seconds']:.1f} s; final loss "
        f"{summary['final_loss']:.4f} (mean of the last {plural(len(losses[-10:]), 'step')})"
        + (f"; peak GPU memory {summary['peak_gib']:.2f} GiB" if summary["peak_gib"] is not None else "")
        + (f"; {summary['skipped_steps']} non-finite step(s) skipped" if summary["skipped_steps"] else "")
        + f" -> {out / LORA_WEIGHTS_NAME}")
    if main:
        card = write_model_card(out, run, reader.manifest, summary)
        plotted = plot_losses(metrics_path, out / "loss.png", log)
        log(f"model card -> {card}" + (f"; loss curve -> {out / 'loss.png'}" if plotted else ""))
    distributed.barrier()  # every process returns once rank 0 has written the outputs
    return summary

