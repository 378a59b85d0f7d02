"""Stage 2: train a UNet LoRA from the cache. Loads the UNet only; never the VAE or text encoders.

    CacheReader -> deterministic order (seed, epoch) -> pinned prefetch -> training_step
    (the whole recipe, one function) -> checkpoint-N/ -> pytorch_lora_weights.safetensors

Every random draw is a pure function of (seed, position): the epoch order, the per-sample flip,
the latent sample, the noise and the timesteps, and the recipe's caption dropout, offset noise and
timestep strata. Resume regenerates them instead of storing RNG state.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cache import CacheReader, bucket_epoch_batches, epoch_order
from cache.format import write_json_atomic
from stages import distributed
from stages.encode import resolve_device
from stages.errors import UserError, kill_point
from stages.recipes import Recipe, configure_noise_scheduler, make_recipe
from stages.lora import (LORA_TYPES, LORA_WEIGHTS_NAME, attach_lora, load_lora_weights_into, parse_rank_pattern,
                         resolve_target_modules, save_lora)
from stages.quantize import QUANTIZED, check_base_weights, quantize_base
from stages.report import MetricsLogger, check_report_to, plot_losses, write_model_card
from stages.sdxl import ModelSource, load_noise_scheduler, load_unet


@dataclass
class TrainConfig:
    cache: str = field(default="./cache", metadata={"help": "Cache folder written by `encode`."})
    output: str = field(default="./sdxl-naruto-lora", metadata={"help": "Output folder for the LoRA, checkpoints and logs."})
    model: str | None = field(default=None, metadata={"help": "UNet source: hub id, diffusers folder or single file (default: the model recorded in the cache)."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --model (default: the cache's)."})
    variant: str | None = field(default=None, metadata={"help": "Weight variant of --model, e.g. fp16 (default: the cache's)."})
    model_config: str | None = field(default=None, metadata={"help": "Single-file --model only: folder or hub id with its configs."})
    resolution_schedule: str | None = field(default=None, metadata={"help": "Train progressively through the resolutions of a multi-resolution cache: res:steps,... in optimizer steps, the last stage may omit its steps (it runs to --max-steps), e.g. 512:500,768:500,1024 (default: the cache's only resolution)."})
    rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the update is scaled by alpha/rank."})
    target_modules: str = field(default="to_q,to_k,to_v,to_out.0", metadata={"help": "Comma-separated UNet module names that get the adapter, or a preset: attn (these four), attn-ff, all-linear, all (see README)."})
    lora_type: str = field(default="lora", metadata={"help": "Adapter, through peft: lora, dora (weight-decomposed), loha (Hadamard product), lokr (Kronecker product); loha/lokr load through peft, not load_lora_weights (see README)."})
    rank_pattern: str | None = field(default=None, metadata={"help": "Other ranks for some modules: name=rank,... where a name (a regex) matches the end of a module path, e.g. to_k=8,mid_block.*=32 (peft rank_pattern; alpha stays --alpha)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in backward: far less memory, ~30% slower."})
    compile: str = field(default="none", metadata={"help": "none; regional: torch.compile of the UNet's repeated transformer blocks (diffusers compile_repeated_blocks; CUDA; ~20-40 s before the first step, then ~15% faster); regional-graphs: the same in mode reduce-overhead, which replays each block as a CUDA graph (less host time per step, more memory)."})
    vram_budget: str | None = field(default=None, metadata={"help": "GPU memory to fit, e.g. 12GiB: picks the fastest checkpointing / base weights / optimizer / compile / batch-size × grad-accum (same effective batch) that fits, prints why, and caps this process at it (CUDA; overrides those flags)."})
    batch_size: int = field(default=1, metadata={"help": "Samples per micro-batch."})
    grad_accum: int = field(default=4, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    scale_lr: bool = field(default=False, metadata={"help": "Under torchrun, multiply --learning-rate by the number of processes (default: use it as given)."})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": "diffusers scheduler name: constant, constant_with_warmup, linear, cosine, ..."})
    warmup_steps: int = field(default=100, metadata={"help": "Warmup, in optimizer steps."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps to train."})
    max_grad_norm: float = field(default=0.5, metadata={"help": "Clip the gradient norm to this."})
    noise_offset: float = field(default=0.0, metadata={"help": "Offset noise: add this × N(0,1), one value per sample and channel, to the noise (0: off; 0.05-0.1 helps very dark or bright images)."})
    min_snr_gamma: float | None = field(default=None, metadata={"help": "Min-SNR-γ loss weights min(SNR, γ)/SNR per sample (v-prediction: /(SNR+1)); 5 is the paper's choice (default: off, plain MSE)."})
    timestep_sampling: str = field(default="uniform", metadata={"help": "Timesteps: uniform; stratified = one per equal stratum of [0, T) among each optimizer step's samples; logit-normal = sigmoid(N(0,1)) × T (favours middle timesteps)."})
    prediction_type: str | None = field(default=None, metadata={"help": "Train the UNet to predict epsilon (the noise) or v_prediction (the velocity) (default: the model's scheduler's, epsilon for SDXL base)."})
    rescale_betas_zero_snr: bool = field(default=False, metadata={"help": "Rescale the noise schedule to zero terminal SNR (diffusers' rescale_betas_zero_snr; pair with --prediction-type v_prediction)."})
    caption_dropout: float = field(default=0.0, metadata={"help": "Probability of training a sample with the empty caption's embedding instead of its own (0: off)."})
    optimizer: str = field(default="adamw8bit", metadata={"help": "adamw8bit (bitsandbytes, CUDA; else falls back to adamw) or adamw."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    mixed_precision: str = field(default="auto", metadata={"help": "auto = bf16 where the GPU supports it, else fp16 + GradScaler; fp32 on CPU."})
    base_weights: str = field(default="auto", metadata={"help": "How the frozen UNet is stored: auto = the compute dtype; bf16, fp16; fp8 (scaled per channel, upcast per layer); int8, nf4 (bitsandbytes, CUDA only). The LoRA trains in fp32 and loads into an ordinary pipeline either way."})
    attention: str = field(default="auto", metadata={"help": "auto = xformers when installed and working on the GPU, else PyTorch SDPA."})
    seed: int = field(default=42, metadata={"help": "Seed of the data order, flips, latent draws, noise and timesteps."})
    checkpoint_every: int = field(default=200, metadata={"help": "Save checkpoint-N/ every this many optimizer steps (0: never)."})
    max_bad_steps: int = field(default=10, metadata={"help": "Stop after this many non-finite steps in a row."})
    validate_every: int = field(default=0, metadata={"help": "Render the cache's validation prompts every N optimizer steps into OUTPUT/samples/ (0: never)."})
    validation_steps: int = field(default=25, metadata={"help": "Denoising steps of validation images."})
    validation_guidance: float = field(default=5.0, metadata={"help": "Guidance scale of validation images."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep only this many newest checkpoints (default: keep all)."})
    report_to: str = field(default="none", metadata={"help": "Also log loss, lr and grad_norm per step to a tracker: tensorboard writes OUTPUT/logs (pip install tensorboard)."})
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder to continue from."})
    verify_cache: bool = field(default=True, metadata={"help": "Check every shard's sha256 before training (seconds per GB)."})
    device: str = field(default="auto", metadata={"help": "auto = cuda when available, else cpu."})
    num_workers: int = field(default=2, metadata={"help": "Data-loading processes (0: in the main process)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished LoRA or an earlier run in --output."})

    @property
    def target_module_list(self) -> list[str]:
        return resolve_target_modules(self.target_modules)


# ---------------------------------------------------------------------------------------- randomness
def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """The CPU generator of one micro-batch: a pure function of (seed, micro-batch index)."""
    return torch.Generator().manual_seed((seed << 32) + micro_step)


def draw_noise(shape: torch.Size, num_timesteps: int, generator: torch.Generator,
               rank_slice: tuple[int, int] | None = None):
    """(latent_eps, noise, timesteps) for a micro-batch of latents of `shape`, drawn in this order.

    rank_slice=(rank, world_size) under torchrun: `shape` is this rank's part of a global micro-batch of
    world_size × shape[0] samples; the draws are made for the global micro-batch and this rank's rows are
    returned, so every sample gets exactly the draws of one process training with the global batch."""
    if rank_slice is not None:
        rank, world = rank_slice
        rows = slice(rank * shape[0], (rank + 1) * shape[0])
        return tuple(x[rows] for x in draw_noise(torch.Size([shape[0] * world, *shape[1:]]), num_timesteps, generator))
    latent_eps = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, num_timesteps, (shape[0],), generator=generator)
    return latent_eps, noise, timesteps


def use_flipped(seed: int, position: int) -> bool:
    """The per-sample, per-visit orientation choice (p = 0.5)."""
    g = torch.Generator().manual_seed((seed << 32) + (1 << 31) + position)
    return bool(torch.rand((), generator=g) < 0.5)


# ------------------------------------------------------------------------------------------- data
class CacheStream(Dataset):
    """Item p = the p-th sample the run visits.

    Square caches: epoch p // N in that epoch's order. Bucketed caches: global micro-batches of `batch`
    positions, each filled from one bucket (cache.bucket_epoch_batches). The orientation is drawn per position."""

    KEYS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "time_ids")

    def __init__(self, reader: CacheReader, seed: int, batch: int = 1):
        self.reader, self.seed, self.batch = reader, seed, batch
        self._orders: dict[int, object] = {}
        self._buckets = list(reader.buckets().values()) if reader.manifest.bucketed else None
        if self._buckets:
            self._batches_per_epoch = sum(-(-len(members) // batch) for members in self._buckets)

    def __len__(self):  # positions are unbounded; the sampler decides which are visited
        return 1 << 62

    def index_at(self, position: int) -> int:
        """The cache index visited at `position`."""
        p = position
        if self._buckets:
            micro, slot = divmod(p, self.batch)
            epoch, k = divmod(micro, self._batches_per_epoch)
            if epoch not in self._orders:
                self._orders = {epoch: bucket_epoch_batches(self._buckets, self.batch, self.seed, epoch)}
            return self._orders[epoch][k][slot]
        n = len(self.reader)
        epoch = p // n
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(n, self.seed, epoch)}
        return int(self._orders[epoch][p % n])

    def __getitem__(self, position: int) -> dict:
        sample = self.reader[self.index_at(position)]
        suffix = "_flipped" if self.reader.flipped and use_flipped(self.seed, position) else ""
        return {**{k: sample[k + suffix if k in ("latent_mean", "latent_std", "time_ids") else k] for k in self.KEYS},
                "position": torch.tensor(position)}  # per-sample draws of the recipe (caption dropout, strata)


def note_small_buckets(reader: CacheReader, global_batch: int, log) -> None:
    """Say which buckets are smaller than a global micro-batch: their batches repeat samples every epoch."""
    small = sorted((n, r, hw) for (r, hw), n in reader.manifest.bucket_counts().items()
                   if n % global_batch and n < global_batch)
    if small:
        log(f"note: {len(small)} bucket(s) hold fewer samples than a global micro-batch of {global_batch} "
            f"(e.g. {small[0][2][1]}x{small[0][2][0]} at {small[0][1]}: {small[0][0]}); their batches repeat samples "
            "every epoch, so they weigh more: a smaller --batch-size or a larger --bucket-step avoids it")


def resolution_stages(cfg: TrainConfig, manifest) -> list[tuple[int, int, int]]:
    """(resolution, first step, end step) per stage of --resolution-schedule, in optimizer steps."""
    available = manifest.resolutions
    if not cfg.resolution_schedule:
        if len(available) > 1:
            raise UserError(f"cache {cfg.cache} holds resolutions {', '.join(map(str, available))}: choose with "
                            f"--resolution-schedule, e.g. {available[-1]} or {available[0]}:500,{available[-1]}")
        return [(available[0], 0, cfg.max_steps)]
    entries = [e.strip() for e in cfg.resolution_schedule.split(",") if e.strip()]
    stages, start = [], 0
    for i, entry in enumerate(entries):
        res, _, steps = entry.partition(":")
        last = i == len(entries) - 1
        if not res.isdigit() or not (steps.isdigit() or (last and not steps)) or (steps and int(steps) < 1):
            raise UserError(f"--resolution-schedule {cfg.resolution_schedule}: expected res:steps,..., the last "
                            f"steps optional, e.g. 512:500,1024 ({entry!r})")
        if int(res) not in available:
            raise UserError(f"--resolution-schedule: the cache holds resolution(s) {', '.join(map(str, available))}, "
                            f"not {res}; encode with --resolution {','.join(map(str, sorted({*available, int(res)})))}")
        end = start + int(steps) if steps else cfg.max_steps
        if end <= start:
            raise UserError(f"--resolution-schedule {cfg.resolution_schedule}: the stages before {entry} already "
                            f"take {start} of --max-steps {cfg.max_steps}, nothing is left for it")
        stages.append((int(res), start, end))
        start = end
    if start != cfg.max_steps or any(a >= b for _, a, b in stages):
        raise UserError(f"--resolution-schedule {cfg.resolution_schedule} covers {start} optimizer steps, "
                        f"--max-steps is {cfg.max_steps}: make them agree, or leave the last stage's steps out")
    return stages


def stage_resolution(stages: list[tuple[int, int, int]], step: int) -> int:
    """The resolution trained at optimizer step `step` (0-based)."""
    return next(r for r, a, b in stages if a <= step < b)


class RankPositions:
    """The stream positions one rank visits: its `batch` rows of every global micro-batch of batch × world
    positions, micro-batches [first, last). With world 1: range(first * batch, last * batch)."""

    def __init__(self, first: int, last: int, batch: int, rank: int = 0, world: int = 1):
        self.first, self.last, self.batch, self.rank, self.world = first, last, batch, rank, world

    def __len__(self):
        return max(self.last - self.first, 0) * self.batch

    def __iter__(self):
        for m in range(self.first, self.last):
            start = (m * self.world + self.rank) * self.batch
            yield from range(start, start + self.batch)


def micro_batches(reader: CacheReader, cfg: TrainConfig, first_step: int, device: torch.device,
                  rank: int = 0, world_size: int = 1):
    """Yield (optimizer_step, [micro-batch dicts on device]) from `first_step` to cfg.max_steps, stage by stage
    of --resolution-schedule.

    Under torchrun, rank r gets its slice of every global micro-batch of batch_size × world_size: the
    positions, in the order, of one process training with that batch."""
    one = len(reader.manifest.resolutions) == 1
    for resolution, start, end in resolution_stages(cfg, reader.manifest):
        if end <= first_step:
            continue
        # positions count on from the previous stage: its epoch order continues instead of starting over
        stream = CacheStream(reader if one else CacheReader(reader.path, resolution), cfg.seed,
                             batch=cfg.batch_size * world_size)
        begin = max(start, first_step)
        positions = RankPositions(begin * cfg.grad_accum, end * cfg.grad_accum, cfg.batch_size, rank, world_size)
        loader = DataLoader(stream, batch_size=cfg.batch_size, sampler=positions,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                            persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
        step, group = begin, []
        for batch in loader:
            group.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            if len(group) == cfg.grad_accum:
                yield step, group
                step, group = step + 1, []


# ------------------------------------------------------------------------------- the training step
def compute_loss(unet, noise_scheduler, batch: dict, generator: torch.Generator,
                 rank_slice: tuple[int, int] | None = None, recipe: Recipe | None = None) -> torch.Tensor:
    """Diffusion loss of one micro-batch from cached inputs (the reference recipe, plus `recipe`'s options).
    Under torchrun, rank_slice=(rank, world_size): random draws are made for the global micro-batch, then sliced."""
    recipe = recipe or Recipe()
    mean, std = batch["latent_mean"].float(), batch["latent_std"].float()  # (B, 4, H/8, W/8), scaled
    num_timesteps = noise_scheduler.config.num_train_timesteps
    latent_eps, noise, timesteps = (x.to(mean.device)
                                    for x in draw_noise(mean.shape, num_timesteps, generator, rank_slice))
    timesteps = recipe.timesteps(timesteps, batch, num_timesteps, generator, rank_slice)  # uniform: as drawn
    noise = recipe.noise(noise, generator, rank_slice)  # + offset noise
    latents = mean + std * latent_eps  # a fresh sample of the VAE posterior, as on-the-fly training draws
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    dtype = unet.dtype  # the frozen base's: cached fp16/bf16 conditioning is cast to it
    prompt_embeds, pooled = recipe.conditioning(batch)  # caption dropout: some rows -> the empty caption's
    added = {"text_embeds": pooled.to(dtype), "time_ids": batch["time_ids"].to(dtype)}
    model_pred = unet(noisy_latents, timesteps, prompt_embeds.to(dtype), added_cond_kwargs=added).sample
    return recipe.loss(model_pred, target, noise_scheduler, timesteps)  # MSE, or min-SNR weighted


def training_step(model: "Model", micro: list[dict], step: int, cfg: TrainConfig) -> dict:
    """One optimizer step: accumulate over micro-batches, clip, step (or skip if non-finite)."""
    total = 0.0
    net, rank_slice = model.unet, None
    if model.ddp is not None:  # torchrun: this rank's slice of each global micro-batch
        net, rank_slice = model.ddp, (distributed.rank(), distributed.world_size())
    for i, batch in enumerate(micro):
        generator = step_generator(cfg.seed, step * cfg.grad_accum + i)
        # DDP all-reduces the accumulated gradients once, in the last micro-batch's backward
        with net.no_sync() if model.ddp is not None and i < len(micro) - 1 else contextlib.nullcontext():
            with torch.autocast(model.device.type, dtype=model.autocast_dtype, enabled=model.autocast_dtype is not None):
                loss = compute_loss(net, model.noise_scheduler, batch, generator, rank_slice, model.recipe)
            model.scaler.scale(loss / len(micro)).backward()
        total += loss.detach().float()
    loss = total / len(micro)
    if model.ddp is not None:
        loss = distributed.mean_across_ranks(loss)  # the global mean: every rank logs and skips alike
    model.scaler.unscale_(model.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.params, cfg.max_grad_norm)
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
    if finite:
        model.scaler.step(model.optimizer)
    model.scaler.update()  # with fp16, an overflow lowers the scale; otherwise a no-op
    model.optimizer.zero_grad(set_to_none=True)
    lr = model.lr_scheduler.get_last_lr()[0]
    model.lr_scheduler.step()
    # With a GradScaler, inf gradients while the scale calibrates are expected, not a failure.
    bad = not bool(torch.isfinite(loss)) or (not finite and not model.scaler.is_enabled())
    return {"loss": float(loss), "grad_norm": float(grad_norm), "lr": lr, "skipped": not finite, "bad": bad}


# ------------------------------------------------------------------------------------------ setup
@dataclass
class Model:
    unet: torch.nn.Module
    noise_scheduler: object
    params: list
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scaler: torch.amp.GradScaler
    device: torch.device
    autocast_dtype: torch.dtype | None
    resolved: dict  # what "auto" settings became, for train_config.json
    source: ModelSource
    ddp: torch.nn.Module | None = None  # under torchrun: DistributedDataParallel around unet
    recipe: Recipe = field(default_factory=Recipe)  # noise and loss options (noise offset, min-SNR, ...)


def resolve_precision(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast / frozen-base dtype: None means plain fp32."""
    if device.type != "cuda":
        if mixed_precision in ("fp16", "bf16"):
            raise UserError(f"--mixed-precision {mixed_precision} needs a CUDA GPU; use auto or no on CPU")
        return None
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("--mixed-precision bf16: this GPU has no bf16 support; use fp16 or auto")
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def check_cache_fits(unet, reader: CacheReader) -> None:
    """Stop early, with the mismatch named, when the cache was encoded for another architecture."""
    sample = reader[0]
    c = unet.config
    problems = []
    if sample["latent_mean"].shape[0] != c.in_channels:
        problems.append(f"latent channels {sample['latent_mean'].shape[0]} vs UNet in_channels {c.in_channels}")
    if sample["prompt_embeds"].shape[-1] != c.cross_attention_dim:
        problems.append(f"prompt_embeds width {sample['prompt_embeds'].shape[-1]} vs cross_attention_dim {c.cross_attention_dim}")
    if c.addition_embed_type != "text_time":
        problems.append("the UNet has no SDXL text_time conditioning")
    else:
        expected = sample["pooled_prompt_embeds"].shape[-1] + 6 * c.addition_time_embed_dim
        if expected != c.projection_class_embeddings_input_dim:
            problems.append(f"pooled + time_ids width {expected} vs UNet's {c.projection_class_embeddings_input_dim}")
    if problems:
        raise UserError(f"cache {reader.path} does not fit this UNet: " + "; ".join(problems))


def enable_attention(unet, attention: str, device: torch.device, log) -> str:
    """SDPA (diffusers' default) or xformers when it really works here (checked with a real call)."""
    if attention == "sdpa" or device.type != "cuda":
        if attention == "xformers":
            raise UserError("--attention xformers needs a CUDA GPU")
        return "sdpa"
    try:
        import xformers.ops
        q = torch.randn(1, 8, 2, 40, device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    except Exception as e:  # missing, or built for another torch/CUDA: fall back, say so once
        if attention == "xformers":
            raise UserError(f"--attention xformers does not work here: {type(e).__name__}: {e}") from e
        if not isinstance(e, ImportError):
            log(f"note: xformers is installed but does not work here ({type(e).__name__}); using PyTorch SDPA")
        return "sdpa"


def apply_compile(unet, mode: str, device: torch.device) -> None:
    """--compile: regional compilation of the repeated transformer blocks (lazy: it happens in the first step);
    regional-graphs adds mode reduce-overhead, which replays each compiled block as a CUDA graph."""
    if mode == "none":
        return
    if device.type != "cuda":
        raise UserError(f"--compile {mode} needs a CUDA GPU")
    # fullgraph=True hit the recompile limit with checkpointing
    unet.compile_repeated_blocks(**({"mode": "reduce-overhead"} if mode == "regional-graphs" else {}))


def fit_vram_budget(cfg: TrainConfig, device: torch.device, resolution: int, log) -> TrainConfig:
    """--vram-budget: cap this process's GPU memory and switch to the fastest configuration that fits (stages/plan.py)."""
    from stages import plan
    budget = plan.cap_gpu_memory(device, cfg.vram_budget, log)  # UserError off CUDA
    dtype = resolve_precision(cfg.mixed_precision, device)
    if dtype is None:
        raise UserError("--vram-budget plans bf16/fp16 training: use --mixed-precision auto, bf16 or fp16")
    try:
        import bitsandbytes  # noqa: F401
        bnb = True
    except Exception:
        bnb = False
    allowed = plan.choices_for(cfg, "bf16" if dtype == torch.bfloat16 else "fp16", bitsandbytes=bnb)
    chosen = plan.plan(budget, resolution, cfg.batch_size * cfg.grad_accum, allowed=allowed, max_steps=cfg.max_steps)
    log(chosen.reason)
    return plan.apply_plan(cfg, chosen)


def make_optimizer(name: str, params, cfg: TrainConfig, device: torch.device, log):
    lr = cfg.learning_rate * (distributed.world_size() if cfg.scale_lr else 1)
    if name == "adamw8bit":
        if device.type == "cuda":
            try:
                import bitsandbytes as bnb
                return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=cfg.weight_decay), "adamw8bit"
            except Exception as e:
                log(f"note: bitsandbytes 8-bit AdamW is unavailable ({type(e).__name__}: {e}); using AdamW")
        else:
            log("note: 8-bit AdamW needs a CUDA GPU; using AdamW")
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, **fused), "adamw"


def setup_model(cfg: TrainConfig, reader: CacheReader, device: torch.device, log) -> Model:
    enc = reader.manifest.encoder
    source = ModelSource(cfg.model or enc["model"],
                         cfg.revision if cfg.model else (cfg.revision or enc.get("revision")),
                         cfg.variant if cfg.model else (cfg.variant or enc.get("variant")),
                         cfg.model_config if cfg.model else (cfg.model_config or enc.get("model_config")))
    autocast_dtype = resolve_precision(cfg.mixed_precision, device)
    recipe = make_recipe(cfg, reader, device, distributed.world_size())
    try:
        rank_pattern = parse_rank_pattern(cfg.rank_pattern)
    except ValueError as e:
        raise UserError(str(e)) from e
    check_base_weights(cfg.base_weights, device, cfg.lora_type)  # before the slow load
    log(f"loading the UNet from {source.model}")
    # a quantized base is loaded on the CPU and reaches the GPU one quantized layer at a time
    on_cpu = cfg.base_weights in QUANTIZED
    unet = load_unet(source, dtype=autocast_dtype or torch.float32, device=torch.device("cpu") if on_cpu else device)
    base = quantize_base(unet, cfg.base_weights, autocast_dtype, device, cfg.lora_type)
    noise_scheduler = configure_noise_scheduler(load_noise_scheduler(source), cfg.prediction_type,
                                                cfg.rescale_betas_zero_snr)
    if cfg.rescale_betas_zero_snr and noise_scheduler.config.prediction_type == "epsilon":
        log("note: with zero terminal SNR the last timestep's input is pure noise, so an epsilon target teaches "
            "nothing there; Lin et al. pair --rescale-betas-zero-snr with --prediction-type v_prediction")
    check_cache_fits(unet, reader)
    try:
        params = attach_lora(unet, cfg.rank, cfg.alpha, cfg.target_module_list, cfg.lora_type, rank_pattern)
    except ValueError as e:
        raise UserError(str(e)) from e
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(device).train()
    attention = enable_attention(unet, cfg.attention, device, log)
    apply_compile(unet, cfg.compile, device)
    optimizer, optimizer_name = make_optimizer(cfg.optimizer, params, cfg, device, log)
    from diffusers.optimization import get_scheduler
    try:
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                     num_training_steps=cfg.max_steps)
    except (ValueError, KeyError) as e:
        raise UserError(f"--lr-scheduler {cfg.lr_scheduler}: {e}") from e
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    trainable = sum(p.numel() for p in params)
    resolved = {"model": source.describe(), "mixed_precision": str(autocast_dtype or "fp32").removeprefix("torch."), **base,
                "optimizer": optimizer_name, "attention": attention, "trainable_parameters": trainable,
                "effective_batch": cfg.batch_size * cfg.grad_accum * distributed.world_size(), "device": str(device),
                "world_size": distributed.world_size(), "global_batch_size": cfg.batch_size * distributed.world_size(),
                "learning_rate": optimizer.defaults["lr"]}
    resolved["prediction_type"] = noise_scheduler.config.prediction_type
    log(f"{LORA_TYPES[cfg.lora_type]} r{cfg.rank}/alpha{cfg.alpha:g} on {cfg.target_modules}: "
        f"{trainable:,} trainable parameters; {resolved['mixed_precision']}, base {base['base_weights']} "
        f"({base['base_bytes_after'] / 2**30:.2f} GiB), {optimizer_name}, {attention}, effective batch {resolved['effective_batch']}"
        + (f" (batch {cfg.batch_size} × grad-accum {cfg.grad_accum} × {resolved['world_size']} processes), "
           f"learning rate {resolved['learning_rate']:g}" + (" (--scale-lr)" if cfg.scale_lr else "")
           if resolved["world_size"] > 1 else ""))
    return Model(unet, noise_scheduler, params, optimizer, lr_scheduler, scaler, device, autocast_dtype, resolved, source,
                 recipe=recipe)


# ------------------------------------------------------------------------------- checkpoints
def split_tensors(obj, tensors: dict, path: str = "s"):
    """A JSON-able copy of a state dict with every tensor moved into `tensors` (no pickle anywhere).

    Dicts become {"__dict__": [[key, value], ...]} so that integer keys (optimizer state) survive.
    """
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, split_tensors(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def join_tensors(obj, tensors: dict):
    """Inverse of split_tensors."""
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def save_checkpoint(model: Model, out: Path, step: int, counters: dict) -> Path:
    """checkpoint-<step>/: the LoRA (loadable like the final one) + optimizer, scheduler, scaler, step."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_lora(model.unet, tmp)
    tensors: dict = {}
    state = split_tensors({"optimizer": model.optimizer.state_dict(), "lr_scheduler": model.lr_scheduler.state_dict(),
                           "scaler": model.scaler.state_dict()}, tensors)
    save_file(tensors, str(tmp / "training_state.safetensors"))
    layout = {"world_size": model.resolved.get("world_size", 1), "global_batch_size": model.resolved.get("global_batch_size")}
    write_json_atomic(tmp / "training_state.json", {"step": step, "counters": counters, "state": state, **layout})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def check_resume_layout(folder: Path, cfg: TrainConfig, world: int, log) -> None:
    """Resume needs the checkpoint's global micro-batch (batch_size × processes): then the positions and
    random draws continue exactly. The same number of processes and --batch-size always qualifies."""
    saved = json.loads((folder / "training_state.json").read_text())
    saved_world, saved_global = saved.get("world_size", 1), saved.get("global_batch_size")
    if saved_world == world:
        return
    if saved_global == cfg.batch_size * world:
        log(f"note: {folder} was trained by {saved_world} process(es) and resumes with {world}: the same global "
            f"micro-batch of {saved_global}, so the same samples and random draws (equal up to float rounding)")
        return
    raise UserError(f"--resume {folder}: it was trained by {saved_world} process(es)"
                    + (f" with a global micro-batch of {saved_global} (--batch-size × processes)" if saved_global else "")
                    + f", this run has {world} × --batch-size {cfg.batch_size}; resume with torchrun --nproc-per-node "
                    f"{saved_world} and the same --batch-size"
                    + (f", or any N with --batch-size {saved_global} / N" if saved_global else ""))


def load_checkpoint(model: Model, folder: Path) -> tuple[int, dict]:
    saved = json.loads((folder / "training_state.json").read_text())
    load_lora_weights_into(model.unet, folder)
    state = join_tensors(saved["state"], load_file(str(folder / "training_state.safetensors")))
    model.optimizer.load_state_dict(state["optimizer"])
    model.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state["scaler"]:
        model.scaler.load_state_dict(state["scaler"])
    return saved["step"], saved["counters"]


def checkpoint_problem(folder: Path) -> str | None:
    """None if `folder` is a complete, readable checkpoint; else what is wrong with it."""
    from safetensors import safe_open
    try:
        saved = json.loads((folder / "training_state.json").read_text())
        if not isinstance(saved.get("step"), int):
            return "training_state.json has no step"
        for name in ("training_state.safetensors", LORA_WEIGHTS_NAME):
            with safe_open(str(folder / name), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)  # header and offsets must be consistent
    except Exception as e:  # unreadable JSON, a truncated or corrupt safetensors file (SafetensorError), ...
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def list_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders in `out`, oldest first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def find_checkpoint(out: Path, resume: str, log) -> Path:
    """The checkpoint to resume: a given folder, or the newest intact one (falling back past corrupt ones)."""
    if resume != "latest":
        path = Path(resume)
        problem = checkpoint_problem(path)
        if problem:
            raise UserError(f"--resume {resume}: not a usable checkpoint ({problem})")
        return path
    for path in reversed(list_checkpoints(out)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log(f"warning: {path} is unusable ({problem}); trying the previous checkpoint")
    raise UserError(f"--resume latest: no usable checkpoint in {out}")


def prune_checkpoints(out: Path, keep: int | None) -> None:
    if keep:
        for path in list_checkpoints(out)[:-keep]:
            shutil.rmtree(path)


def prepare_output(out: Path, cfg: TrainConfig) -> None:
    """Refuse to clobber a finished LoRA or another run's checkpoints without --overwrite."""
    if not out.exists():
        return
    finished = (out / LORA_WEIGHTS_NAME).exists()
    checkpoints = list(out.glob("checkpoint-*"))
    if cfg.overwrite:
        for p in checkpoints:
            shutil.rmtree(p)
        for name in (LORA_WEIGHTS_NAME, "metrics.jsonl", "train_config.json"):
            (out / name).unlink(missing_ok=True)
    elif finished and not cfg.resume:
        raise UserError(f"{out} already holds a finished LoRA; pass --overwrite to replace it, or choose another --output")
    elif checkpoints and not cfg.resume:
        raise UserError(f"{out} holds checkpoints of an earlier run; pass --resume latest to continue it, "
                        "or --overwrite to start over")


# ------------------------------------------------------------------------------------- validation
class Validator:
    """Renders the cache's validation prompts with the training UNet; the FP32 VAE waits on the CPU
    and visits the GPU only to decode (tiled)."""

    def __init__(self, reader: CacheReader, source: ModelSource, cfg: TrainConfig):
        from stages.sdxl import load_decoder_vae
        self.embeddings = reader.validation()
        if self.embeddings is None:
            raise UserError(f"--validate-every needs validation prompts in the cache: encode {reader.path} "
                            "again with --validation-prompt \"...\" (the samples stay as they are)")
        self.vae = load_decoder_vae(source, reader.manifest.encoder.get("vae")).to(torch.float32).eval()
        self.vae.requires_grad_(False)
        self.vae.enable_tiling()
        self.cfg = cfg

    def __call__(self, model: "Model", step: int, out: Path, resolution: int) -> dict:
        from stages.sample import labelled_grid, render_embeddings
        device = model.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model.unet.eval()
        self.vae.to(device)
        try:
            images = render_embeddings(model.unet, self.vae, model.noise_scheduler, self.embeddings["prompt_embeds"],
                                       self.embeddings["pooled_prompt_embeds"], resolution,
                                       self.cfg.validation_steps, self.cfg.validation_guidance, self.cfg.seed)
        finally:
            self.vae.to("cpu")
            model.unet.train()
        (out / "samples").mkdir(parents=True, exist_ok=True)
        path = out / "samples" / f"step-{step:05d}.png"
        labelled_grid([(f"step {step}", images)], self.embeddings["prompts"]).save(path)
        row = {"validation_image": str(path.relative_to(out))}
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            row["validation_peak_gib"] = round(peak / 2**30, 3)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)  # later rows' peak_gib: training steps only
        return row


# ------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, log=print) -> dict:
    """Run stage 2; returns a summary dict (final loss, steps, seconds, peak memory, output)."""
    out = Path(cfg.output)
    check_report_to(cfg.report_to)  # a missing tracker fails now, not after the UNet is loaded
    reader = CacheReader(cfg.cache)
    if len(reader) == 0:
        raise UserError(f"cache {cfg.cache} holds no samples")
    if cfg.verify_cache:
        problems = reader.verify()
        if problems:
            raise UserError(f"cache {cfg.cache} is corrupt: {'; '.join(problems)}; re-encode it with --overwrite")
    schedule = resolution_stages(cfg, reader.manifest)  # a bad --resolution-schedule fails before the UNet loads
    device = distributed.setup(resolve_device(cfg.device))  # torchrun: join the process group, cuda:LOCAL_RANK
    main = distributed.is_main()  # only rank 0 writes outputs and logs
    log = log if main else (lambda *a, **k: None)
    if cfg.vram_budget:
        cfg = fit_vram_budget(cfg, device, max(res for res, _, _ in schedule), log)
    if reader.manifest.bucketed:
        note_small_buckets(reader, cfg.batch_size * distributed.world_size(), log)
    if cfg.compile != "none" and (reader.manifest.bucketed or len(schedule) > 1):
        log(f"note: with --compile {cfg.compile}, every bucket / resolution shape compiles (and records CUDA graphs) "
            "the first time it is seen: expect pauses, and more memory with regional-graphs")
    distributed.on_main(prepare_output, out, cfg)
    torch.manual_seed(cfg.seed)  # LoRA initialization
    model = setup_model(cfg, reader, device, log)

    start_step, counters = 0, {"skipped_steps": 0, "bad_in_a_row": 0}
    if cfg.resume:
        checkpoint = find_checkpoint(out, cfg.resume, log)
        check_resume_layout(checkpoint, cfg, distributed.world_size(), log)
        start_step, counters = load_checkpoint(model, checkpoint)
        log(f"resumed from {checkpoint} at step {start_step}")
    model.ddp = distributed.wrap(model.unet, device)  # None in a single process
    metrics_path = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "train_config.json", {**asdict(cfg), "resolved": model.resolved,
                                                      "cache_fingerprint": reader.manifest.fingerprint})
        _truncate_metrics(metrics_path, start_step)
    validator = distributed.on_main(Validator, reader, model.source, cfg) if cfg.validate_every else None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.time()
    last = time.time()
    per_step = cfg.batch_size * cfg.grad_accum * distributed.world_size()
    losses, peak_gib = [], None
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", disable=not main)
    with open(metrics_path if main else os.devnull, "a") as metrics, \
            MetricsLogger(cfg.report_to if main else "none", out, start_step) as tracker:
        for step, micro in micro_batches(reader, cfg, start_step, device, distributed.rank(), distributed.world_size()):
            result = training_step(model, micro, step, cfg)
            now = time.time()
            counters["skipped_steps"] += result["skipped"]
            counters["bad_in_a_row"] = counters["bad_in_a_row"] + 1 if result["bad"] else 0
            row = {"step": step + 1, "loss": result["loss"], "lr": result["lr"], "grad_norm": result["grad_norm"],
                   "skipped": result["skipped"], "seconds": round(now - last, 4),
                   "images_per_s": round(per_step / max(now - last, 1e-9), 3)}
            if len(schedule) > 1:
                row["resolution"] = stage_resolution(schedule, step)
            if device.type == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                peak_gib = max(peak_gib or 0.0, row["peak_gib"])
            if validator and (step + 1) % cfg.validate_every == 0:
                row.update(validator(model, step + 1, out, stage_resolution(schedule, step)))
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
                save_checkpoint(model, out, step + 1, counters)
                prune_checkpoints(out, cfg.checkpoints_total_limit)
            kill_point("step", step + 1)
    bar.close()
    if main:
        save_lora(model.unet, out)
    if main and cfg.checkpoint_every:
        save_checkpoint(model, out, cfg.max_steps, counters)
        prune_checkpoints(out, cfg.checkpoints_total_limit)
    summary = {
        "output": str(out), "steps": cfg.max_steps, "trained_steps": cfg.max_steps - start_step,
        "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else float("nan"),
        "seconds": round(time.time() - started, 2), "skipped_steps": counters["skipped_steps"],
        "peak_gib": peak_gib,  # of the training steps (validation is logged separately)
        "unet": model.unet,  # the trained peft UNet, for callers that use it in-process (tests, demo)
    }
    log(f"trained {summary['trained_steps']} steps in {summary['seconds']:.1f} s; final loss "
        f"{summary['final_loss']:.4f} (mean of last 10)"
        + (f"; peak GPU memory {summary['peak_gib']:.2f} GiB" if summary["peak_gib"] is not None else "")
        + (f"; {summary['skipped_steps']} non-finite step(s) skipped" if summary["skipped_steps"] else "")
        + f" -> {out / LORA_WEIGHTS_NAME}")
    if main:
        card = write_model_card(out, json.loads((out / "train_config.json").read_text()), reader.manifest, summary)
        plotted = plot_losses(metrics_path, out / "loss.png", log)
        log(f"model card -> {card}" + (f"; loss curve -> {out / 'loss.png'}" if plotted else ""))
    distributed.barrier()  # every process returns once rank 0 has written the outputs
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows after the checkpoint so the log matches an uninterrupted run."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))
