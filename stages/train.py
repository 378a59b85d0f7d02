"""Stage 2: train a UNet LoRA, or a --sweep of them (stages/sweep.py), from the cache. Loads the UNet only.

    CacheReader -> cache/sampler.py's order (seed, position) -> micro-batches on the device
      -> training_step: per micro-batch the random draws (draw_inputs) and forward + backward
         (diffusion_losses; one CUDA graph replay on a GPU), then clip and step the optimizer over the flat LoRA
      -> checkpoint-N/ (stages/checkpoint.py) -> pytorch_lora_weights.safetensors + OUTPUT/<name>.safetensors (kohya)

Every random draw is a pure function of (seed, position): the epoch order, the per-sample flip, the latent
sample, the noise and the timesteps, and the recipe's caption dropout, offset noise and timestep strata.
Resume regenerates them instead of storing RNG state.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from cache import CacheReader, open_caches
from cache.sampler import micro_batches, note_small_buckets
from stages import checkpoint, distributed
from stages.budget import watch_memory
from stages.config import (LORA_TYPES, QUANTIZED, TrainConfig, parse_cache_specs, resolution_stages, stage_resolution,
                           sweep_members)
from stages.device import (CudaGraphs, apply_compile, check_device_options, enable_attention, enable_checkpointing,
                           resolve_device, resolve_precision, use_cuda_graphs)
from stages.errors import UserError, kill_point
from stages.lora import MixedBatch, adapter_parameters, attach_lora
from stages.optim import EMA, FlatGroups, load_training_states, setup_optimizer, training_states, weights_in_use
from stages.quantize import check_base_weights, quantize_base
from stages.recipes import Recipe, configure_noise_scheduler, draw_noise, make_recipe, step_generator
from stages.report import check_report_to
from stages.sample import Validator
from stages.sweep import claim_outputs, train_members
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


def batched(tensors: list[torch.Tensor]) -> torch.Tensor:  # a sweep's replicas along the batch; one run's: no copy
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def diffusion_losses(unet, noise_schedulers: list, xs: list[dict[str, torch.Tensor]], recipes: list[Recipe]) -> list:
    """The diffusion loss of one micro-batch per adapter from each one's draw_inputs tensors, in one forward: a
    sweep's replicas are concatenated along the batch (stages/lora.py MixedBatch routes each to its adapter).
    Device work only (CUDA-graph safe)."""
    latents = [x["latent_mean"] + x["latent_std"] * x["latent_eps"] for x in xs]  # a fresh sample of the VAE posterior
    noisy_latents = [s.add_noise(z, x["noise"], x["timesteps"]) for s, z, x in zip(noise_schedulers, latents, xs)]
    targets = [s.get_velocity(z, x["noise"], x["timesteps"]) if s.config.prediction_type == "v_prediction"
               else x["noise"] for s, z, x in zip(noise_schedulers, latents, xs)]
    dtype = unet.dtype  # the frozen base's: cached fp16/bf16 conditioning is cast to it
    added = {k: batched([x[key] for x in xs]).to(dtype) for k, key in (("text_embeds", "pooled_prompt_embeds"),
                                                                     ("time_ids", "time_ids"))}
    model_pred = unet(batched(noisy_latents), batched([x["timesteps"] for x in xs]),
                      batched([x["prompt_embeds"] for x in xs]).to(dtype), added_cond_kwargs=added).sample
    return [recipe.loss(pred, target, x.get("loss_weights"), x.get("huber_c"), x.get("mask"), x.get("cache"))
            for pred, target, x, recipe in zip(model_pred.chunk(len(xs)), targets, xs, recipes)]


def forward_backward(models: dict[str, "Model"], net, xs: dict[str, dict], accum: int) -> None:
    """One micro-batch of each adapter in `xs` (its name -> its draw_inputs): losses, the backward of each loss / accum
    into its adapter's gradients (the adapters are disjoint), each loss added to its model.loss_sum."""
    members = [models[name] for name in xs]
    first = members[0]
    if first.mixed is not None:  # a sweep: replica k of the micro-batch through adapter k
        first.mixed.route(list(xs))
    with torch.autocast(first.device.type, dtype=first.autocast_dtype, enabled=first.autocast_dtype is not None,
                        cache_enabled=False):  # no cast cache: it would not survive a CUDA-graph replay
        losses = diffusion_losses(net, [m.noise_scheduler for m in members], list(xs.values()), [m.recipe for m in members])
    sum(m.scaler.scale(loss / accum) for m, loss in zip(members, losses)).backward()
    for m, loss in zip(members, losses):
        m.loss_sum.add_(loss.detach().float())


def training_step(model: "Model | list[Model]", micro: list[dict], step: int, cfg: TrainConfig) -> dict | list[dict]:
    """One optimizer step: accumulate over micro-batches, clip, step (or skip if non-finite). A sweep's list of
    models shares each micro-batch's forward and steps each alone (a list of results)."""
    models = model if isinstance(model, list) else [model]
    first = models[0]
    net, rank_slice = first.unet, None
    if first.ddp is not None:  # torchrun: this rank's slice of each global micro-batch
        net, rank_slice = first.ddp, (distributed.rank(), distributed.world_size())
    num_timesteps = first.noise_scheduler.config.num_train_timesteps
    for i, batch in enumerate(micro):  # every adapter sees a single run's draws: a generator of its own, same seed
        xs = {m.adapter: draw_inputs(batch, num_timesteps, step_generator(cfg.seed, step * cfg.grad_accum + i),
                                     m.recipe, m.noise_scheduler, rank_slice) for m in models}
        # DDP all-reduces the accumulated gradients once, in the last micro-batch's backward
        with net.no_sync() if first.ddp is not None and i < len(micro) - 1 else contextlib.nullcontext():
            forward_backward({m.adapter: m for m in models}, net, xs, len(micro)) if first.graphs is None else first.graphs(xs)
    values = torch.stack([v.float() for m in models for v in clip_gradients(m, len(micro))]).tolist()  # one host sync
    results = [optimizer_step(m, *values[2 * k:2 * k + 2]) for k, m in enumerate(models)]
    return results if isinstance(model, list) else results[0]


def clip_gradients(model: "Model", accum: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's mean loss and the accumulated gradients' norm (device tensors), the gradients clipped."""
    loss = model.loss_sum / accum
    if model.ddp is not None:
        loss = distributed.mean_across_ranks(loss)  # the global mean: every rank logs and skips alike
    model.scaler.unscale_(model.optimizer)
    # flat tensors on a GPU (a few launches); per tensor on the CPU, whose fp32 norm of one long vector is less exact
    clipped = model.flat.flat_params if model.device.type == "cuda" else model.flat.params
    return loss, torch.nn.utils.clip_grad_norm_(clipped, model.max_grad_norm)


def optimizer_step(model: "Model", loss_value: float, norm_value: float) -> dict:
    """Step the optimizer over the clipped gradients (or skip the step if non-finite), zero the gradients."""
    if finite := math.isfinite(loss_value) and math.isfinite(norm_value):
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

    adapter: str = "default"  # its name in the UNet (a sweep's members: member0, member1, ...)
    max_grad_norm: float = 0.5  # --max-grad-norm
    mixed: MixedBatch | None = None  # a sweep's: routes each replica of a micro-batch through its member's adapter

    @property
    def params(self) -> list:  # the LoRA's tensors (views into the flat buffers)
        return self.flat.params

    def final_weights(self, ema: bool = True):  # in its block: schedule-free's average x, and the EMA if kept
        return weights_in_use(self.optimizer, self.ema if ema else None)

    def states(self) -> dict:  # optimizer, lr scheduler, grad scaler, EMA: what a checkpoint stores
        return training_states(self.optimizer, self.lr_scheduler, self.scaler, self.ema)

    def load_states(self, states: dict, weight_decay: float) -> None:
        """A checkpoint's states, then this run's learning rates (per group) and weight decay, applied."""
        this_run = [group["initial_lr"] for group in self.optimizer.param_groups]
        load_training_states(states, self.optimizer, self.lr_scheduler, self.scaler, self.ema)
        checkpoint.set_hyperparameters(self.optimizer, self.lr_scheduler, this_run, weight_decay)


def _setup_unet(cfgs: list[TrainConfig], adapters: list[str], source: ModelSource, reader: CacheReader, device, autocast_dtype, log,
                blocks: int):
    """The frozen UNet (as --base-weights) with each config's adapter attached; returns (unet, [[(name, param)]], base)."""
    cfg = cfgs[0]
    log(f"loading the UNet from {source.model}")
    on_cpu = cfg.base_weights in QUANTIZED or blocks  # a quantized / streamed base reaches the GPU a layer / block at a time
    unet = load_unet(source, dtype=autocast_dtype or torch.float32, device=torch.device("cpu") if on_cpu else device)
    base = quantize_base(unet, cfg.base_weights, autocast_dtype, device, cfg.lora_type, torch.device("cpu") if blocks else None)
    check_cache_fits(unet.config, reader[0], reader.path)
    rng, named = torch.get_rng_state(), []  # every adapter's initialization draws from the same random state
    for adapter, c in zip(adapters, cfgs):
        torch.set_rng_state(rng)
        try:
            attach_lora(unet, c.rank, c.alpha, c.target_module_list, c.lora_type, c.rank_pattern_dict, adapter)
        except ValueError as e:
            raise UserError(str(e)) from e
        named.append(adapter_parameters(unet, adapter))
    if cfg.gradient_checkpointing:
        enable_checkpointing(unet)
    attach_streaming(unet, blocks, device, log)  # --stream-blocks: before .to(device), the blocks stay in host memory
    unet.to(device).train()
    return unet, named, base


def setup_model(cfg: TrainConfig, reader: CacheReader, device: torch.device, log, source: ModelSource | None = None) -> Model:
    return setup_models([cfg], reader, device, log, source)[0]


def setup_models(cfgs: list[TrainConfig], reader: CacheReader, device: torch.device, log, source: ModelSource | None = None) -> list[Model]:
    """One Model per config around one frozen UNet: a single run's, or a sweep's members (configs that differ only in
    stages/config.py's SWEEPABLE settings), each with its own adapter, recipe, optimizer and schedule."""
    cfg, world = cfgs[0], distributed.world_size()
    source = source or cache_model_source(reader.manifest.encoder, cfg.model, cfg.revision, cfg.variant, cfg.model_config)
    autocast_dtype = resolve_precision(cfg.mixed_precision, device)
    recipes = [make_recipe(c.seed, c.batch_size * c.grad_accum * world, c.noise_offset, c.min_snr_gamma, c.timestep_sampling,
                           c.caption_dropout, reader.empty_prompt() if c.caption_dropout else None, c.cache, device,
                           c.loss, c.huber_c, c.huber_schedule, c.debiased_estimation, c.masked_loss) for c in cfgs]
    for c in cfgs:
        check_base_weights(c.base_weights, device, c.lora_type)  # before the slow load
        check_target_modules(source, c.target_module_list, c.rank_pattern_dict)
    check_device_options(cfg.attention, cfg.compile, device)
    blocks = check_stream_blocks(cfg.stream_blocks, world)
    graphs = use_cuda_graphs(cfg.cuda_graphs, cfg.compile, device, world, log, streamed=bool(blocks))
    adapters = ["default"] if len(cfgs) == 1 else [f"member{k}" for k in range(len(cfgs))]
    unet, named_params, base = _setup_unet(cfgs, adapters, source, reader, device, autocast_dtype, log, blocks)
    shared = world == 1 and not any(c.block_lr_dict or c.loraplus_lr_ratio for c in cfgs)  # one lr group each: one buffer
    mixed = MixedBatch(unet, adapters, named_params, shared) if len(cfgs) > 1 else None
    attention = enable_attention(unet, cfg.attention, device, log)
    apply_compile(unet, cfg.compile, device)
    models = []
    for c, adapter, named, recipe in zip(cfgs, adapters, named_params, recipes):
        noise_scheduler = configure_noise_scheduler(load_noise_scheduler(source), c.prediction_type, c.rescale_betas_zero_snr, log)
        lr = c.lr * (world if c.scale_lr else 1)
        flat, optimizer, optimizer_name, lr_scheduler, ema = setup_optimizer(
            named, c.optimizer, lr, c.weight_decay, c.lr_scheduler, c.warmup_steps, c.max_steps, c.block_lr_dict,
            c.loraplus_lr_ratio, c.ema_decay, torch.device("cpu" if c.ema_device == "cpu" else device), device, log,
            mixed.member_buffers(adapters.index(adapter)) if mixed else None)
        resolved = {"model": source.resolved().describe(), "mixed_precision": str(autocast_dtype or "fp32").removeprefix("torch."),
                    **base, "optimizer": optimizer_name, "attention": attention, "cuda_graphs": graphs, "stream_blocks": blocks,
                    "trainable_parameters": sum(p.numel() for _, p in named), "effective_batch": c.batch_size * c.grad_accum * world,
                    "device": str(device), "world_size": world, "global_batch_size": c.batch_size * world,
                    "learning_rate": lr, "prediction_type": noise_scheduler.config.prediction_type,
                    "lr_multipliers": flat.scales}
        log(f"{LORA_TYPES[c.lora_type]} r{c.rank}/alpha{c.alpha:g} on {c.target_modules}: {resolved['trainable_parameters']:,} trainable parameters; "
            f"{resolved['mixed_precision']}, base {base['base_weights']} ({base['base_bytes_after'] / 2**30:.2f} GiB), "
            f"{optimizer_name}, {attention}{', CUDA graphs' if graphs else ''}, effective batch {resolved['effective_batch']}"
            + (f" (batch {c.batch_size} × grad-accum {c.grad_accum} × {world} processes), learning rate {lr:g}"
               + (" (--scale-lr)" if c.scale_lr else "") if world > 1 else ""))
        scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
        models.append(Model(unet, noise_scheduler, flat, optimizer, lr_scheduler, scaler, device, autocast_dtype, resolved,
                            source, recipe, loss_sum=torch.zeros((), device=device), ema=ema, adapter=adapter,
                            max_grad_norm=c.max_grad_norm, mixed=mixed))
    if graphs:  # one graph per input shape runs every adapter's forward + backward
        shared = CudaGraphs(lambda xs: forward_backward({m.adapter: m for m in models}, unet, xs, cfg.grad_accum),
                            [t for m in models for t in (*(p.grad for p in m.flat.flat_params), m.loss_sum, *m.recipe.state)], log,
                            getattr(unet, "block_streamer", None))
        for m in models:
            m.graphs = shared
    return models


# ------------------------------------------------------------------------------------------ train
def train_batches(reader: CacheReader, cfg: TrainConfig, first_step: int, device: torch.device, rank: int = 0, world: int = 1):
    """(optimizer step, [micro-batches on device]) from `first_step` to --max-steps, through the resolution schedule."""
    schedule = resolution_stages(cfg.resolution_schedule, reader.manifest.resolutions, cfg.max_steps, cfg.cache)
    return micro_batches(reader, schedule, cfg.seed, cfg.batch_size, cfg.grad_accum, first_step, device, rank, world,
                         cfg.num_workers, cfg.masked_loss)


def train(cfg: TrainConfig, log=print) -> dict:
    """Run stage 2; returns a summary dict (final loss, steps, seconds, peak memory, output)."""
    with contextlib.ExitStack() as held:  # --output's lock (rank 0), from before the UNet loads to the end
        return _train(cfg, log, held)


def _train(cfg: TrainConfig, log, held: contextlib.ExitStack) -> dict:
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
    resolution = max(res for res, _, _ in schedule)
    # --vram-budget: a copy with the plan's choice and how many of a sweep's members fit together (else: rounds)
    cfg, watch, together = watch_memory(cfg, device, resolution, log, len(sweep_members(cfg)) if cfg.sweep else 1)
    members = claim_outputs(cfg, sweep_members(cfg) if cfg.sweep else [(None, cfg)], reader.manifest, world, held, log)
    if reader.manifest.bucketed:
        note_small_buckets(reader.manifest, cfg.batch_size * world, log)
    if (cfg.compile != "none" or cfg.cuda_graphs != "off") and device.type == "cuda" and (reader.manifest.bucketed or len(schedule) > 1):
        log("note: every bucket / resolution shape is compiled or captured as a CUDA graph the first time it is "
            "seen: expect short pauses, and more memory")
    validator = distributed.on_main(Validator.from_cache, reader, source, cfg.validation_steps, cfg.validation_guidance,
                                    cfg.seed) if cfg.validate_every else None
    return train_members(cfg, members, together, lambda group: _train_pass(cfg, group, reader, source, device, watch,
                                                                            validator, schedule, log), main, log)


def _train_pass(cfg: TrainConfig, members: list, reader, source, device, watch, validator, schedule, log) -> list:
    """One pass over the cache training `members` (a single run, or a round of a sweep) on one UNet; their summaries."""
    main, world = distributed.is_main(), distributed.world_size()
    torch.manual_seed(cfg.seed)  # LoRA initialization (every member of a sweep: as a single run)
    models = setup_models([m.cfg for m in members], reader, device, log, source)
    layout = {"world_size": world, "global_batch_size": cfg.batch_size * world}  # every member starts at one step:
    start_step = min(m.start(model, reader.manifest, layout, main) for m, model in zip(members, models))
    ddp = distributed.wrap(models[0].unet, device)  # None in a single process
    for model in models:
        model.ddp = ddp
    watch.start()  # peaks from the first step
    started = last = time.time()
    per_step = cfg.batch_size * cfg.grad_accum * world
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", disable=not main)
    batches = train_batches(reader, cfg, start_step, device, distributed.rank(), world)
    with contextlib.ExitStack() as files:
        for m in members:
            m.open_logs(files, main)
        for step, micro in batches:
            if not (active := [i for i, m in enumerate(members) if m.stopped_at is None]):
                break  # every member of a sweep's round stopped: the next round goes on
            with watch.guard(step + 1 - start_step):  # --vram-budget: out of memory in the first steps -> what fits
                results = training_step([members[i].model for i in active], micro, step, cfg)
            now = time.time()
            row = {"seconds": round(now - last, 4), "images_per_s": round(per_step / max(now - last, 1e-9), 3)}
            if len(schedule) > 1:
                row["resolution"] = stage_resolution(schedule, step)
            row.update(watch.peaks())  # on CUDA: peak_gib (allocated), peak_reserved_gib
            for i, result in zip(active, results):
                members[i].record(step, result, row, validator, stage_resolution(schedule, step), main, watch)
            last = now
            bar.set_postfix(loss=f"{results[0]['loss']:.4f}", img_s=f"{row['images_per_s']:.2f}")
            bar.update(1)
            kill_point("step", step + 1)
    bar.close()
    return [m.finish(reader.manifest, round(time.time() - started, 2), watch.peak_gib, main) if m.stopped_at is None
            else None for m in members]
