"""Every stage's options: one dataclass per stage, a help text on every field, each option checked once.

Torch-free on purpose: `pipeline.py` imports only this module until a command runs, so `--help` is instant.
A field's metadata holds its help text and, where it has them, its `choices` and its `check` (positive,
non_negative, probability); `__post_init__` applies them, and `pipeline.py` turns the same metadata into click
choices and range checks, so an option is validated in this one place. Parsing of sizes and schedules lives
here too.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
from dataclasses import dataclass, field

from stages.errors import UserError

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
RANDOM_SDXL = "random:sdxl"  # the full-size SDXL UNet architecture with random weights (benchmarks)
DEMO_MODEL = "demo"  # the small pretrained SDXL-architecture model shipped in stages/demo_model/ (./demo: a folder)
DEMO_STEPS = 600  # `demo --steps`: the demo LoRA's training steps (stages/demo.py says how they were chosen)
DEFAULT_DATASET = "lambdalabs/naruto-blip-captions"
DEFAULT_CACHE = "./sdxl-cache"  # not ./cache: run from the repository root, that is the cache/ source package

# what train_config.json records beside the flags (checkpoint.run_record); `--config` of train ignores them
RUN_RECORD_EXTRAS = ("resolved", "cache_fingerprint", "cache_samples", "resumes")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "no", "fp16", "bf16")
BASE_WEIGHTS = ("auto", "bf16", "fp16", "fp8", "int8", "nf4")
QUANTIZED = ("fp8", "int8", "nf4")  # modes that replace the UNet's Linear layers
LORA_TYPES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}  # --lora-type: display name
COMPILE_MODES = ("none", "regional", "regional-graphs")
CUDA_GRAPHS = ("auto", "on", "off")
# --optimizer -> its default --learning-rate (adamw: the reference recipe's; prodigy: its authors' lr=1.0, the
# step size it estimates itself; adafactor without relative step: Adam-like steps; schedule-free: its authors'
# advice of a larger rate than with a schedule)
DEFAULT_LEARNING_RATES = {"adamw8bit": 5e-5, "adamw": 5e-5, "prodigy": 1.0, "adafactor": 1e-4, "adamw-schedulefree": 2e-4}
OPTIMIZERS = tuple(DEFAULT_LEARNING_RATES)
LOSSES = ("mse", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
EMA_DEVICES = ("same", "cpu")
TIMESTEP_SAMPLINGS = ("uniform", "stratified", "logit-normal")
PREDICTION_TYPES = ("epsilon", "v_prediction")
ATTENTIONS = ("auto", "sdpa", "xformers")
REPORT_TO = ("none", "tensorboard")
CACHE_DTYPES = ("fp16", "bf16", "fp32")
EXPORT_FORMATS = ("kohya", "diffusers")
SAVE_DTYPES = ("fp32", "fp16", "bf16")
# diffusers.optimization.SchedulerType (tests/test_config.py checks that the two agree)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")

_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
_FF = ["ff.net.0.proj", "ff.net.2"]
# `--target-modules` presets: module names that peft matches at the end of a module path. In SDXL's UNet
# (use_linear_projection) transformer blocks hold to_q/k/v/out.0 (attn1, attn2), ff.net.0.proj / ff.net.2 and
# proj_in / proj_out; resnet blocks hold time_emb_proj (Linear) and conv1 / conv2 / conv_shortcut (Conv2d).
TARGET_PRESETS = {
    "attn": _ATTN,  # the reference: attention projections
    "attn-ff": _ATTN + _FF,
    "all-linear": _ATTN + _FF + ["proj_in", "proj_out", "time_emb_proj"],  # every Linear of those blocks
    "all": _ATTN + _FF + ["proj_in", "proj_out", "time_emb_proj", "conv1", "conv2", "conv_shortcut"],  # + Conv2d
}


def opt(default, help: str, choices=None, check: str | None = None, **kw):
    """A config field: its default, help text, allowed values and range check (read by pipeline.py too)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if check is not None:
        meta["check"] = check
    return field(default=default, metadata=meta, **kw)


CHECKS = {  # name -> (passes, message): shared by __post_init__ and the CLI's range checks
    "positive": (lambda v: v > 0, "must be > 0"),
    "non_negative": (lambda v: v >= 0, "must be >= 0"),
    "probability": (lambda v: 0 <= v <= 1, "must be in the range 0<=x<=1"),
}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_fields(cfg) -> None:
    """Apply every field's `choices` and `check` metadata; None passes (an unset optional option)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, tuple) else (value,))):
            raise UserError(f"{flag_name(f.name)} is empty: give a value, or leave the option out")
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices is not None and value not in choices:
            raise UserError(f"unknown {flag_name(f.name)} {value}: choose one of {', '.join(map(str, choices))}")
        if check is not None and not CHECKS[check][0](value):
            raise UserError(f"{flag_name(f.name)} {value}: {CHECKS[check][1]}")


# ------------------------------------------------------------------------------------------ parsing
def parse_stream_blocks(value: str) -> int | None:
    """--stream-blocks: None for auto, 0 for off, else the number of resident blocks (>= 1)."""
    if value == "auto":
        return None
    if value == "off":
        return 0
    if not str(value).isdigit() or int(value) < 1:
        raise UserError(f"--stream-blocks {value}: expected auto, off or a number of blocks >= 1, e.g. 4")
    return int(value)


def check_budget(text: str) -> None:
    """--vram-budget: auto (the card's free memory) or a size."""
    if text != "auto":
        parse_size(text)


def parse_size(text: str) -> int:
    """'16GiB' / '12000MB' / '512MiB' -> bytes."""
    units = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}
    t = text.strip().lower()
    for unit, factor in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * factor)
            except ValueError:
                break
    raise UserError(f"--vram-budget {text}: give a size such as 16GiB or 12000MB")


def parse_resolutions(value) -> list[int]:
    """--resolution as a sorted list: 512 -> [512]; "512,768,1024" or (512, 768, 1024) -> [512, 768, 1024]."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--resolution {value}: expected a number or a list such as 512,768,1024") from None
    values = sorted(set([value] if isinstance(value, int) else value))
    if not values or min(values) < 8 or any(v % 8 for v in values):
        raise UserError(f"--resolution {value}: every resolution must be a positive multiple of 8")
    return values


def resolve_target_modules(spec: str) -> list[str]:
    """`--target-modules`: a preset name (TARGET_PRESETS) or a comma-separated list of module names."""
    if spec.strip() in TARGET_PRESETS:
        return list(TARGET_PRESETS[spec.strip()])
    return [m.strip() for m in spec.split(",") if m.strip()]


def _name_values(spec: str | None, convert, error: Exception) -> dict:
    """'name=value,...' -> {name: convert(value)}; `convert` returns None for a bad value, which raises `error`."""
    pattern = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        converted = convert(value.strip())
        if not name.strip() or converted is None:
            raise type(error)(str(error).format(item=item.strip()))
        pattern[name.strip()] = converted
    return pattern


def parse_rank_pattern(spec: str | None) -> dict[str, int]:
    """`--rank-pattern "to_k=8,mid_block.*=32"` -> peft's rank_pattern {"to_k": 8, "mid_block.*": 32}."""
    return _name_values(spec, lambda v: int(v) if v.isdigit() and int(v) >= 1 else None,
                        ValueError("--rank-pattern {item!r}: expected name=rank with a rank >= 1, e.g. to_k=8"))


def parse_block_lr(spec: str | None) -> dict[str, float]:
    """`--block-lr "down_blocks.0=0.5,mid_block=1.5"` -> {"down_blocks.0": 0.5, "mid_block": 1.5}."""
    def multiplier(value: str) -> float | None:
        try:
            return float(value) if float(value) > 0 else None
        except ValueError:
            return None
    return _name_values(spec, multiplier, UserError("--block-lr {item!r}: expected pattern=multiplier with a "
                                                     "multiplier > 0, e.g. down_blocks.0=0.5"))


def _number(text: str) -> float | None:
    """A plain decimal number ("3", "0.25", "1e-2"), else None (inf, nan and words are names, not weights)."""
    import re
    return float(text) if re.fullmatch(r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text) else None


def parse_cache_specs(specs) -> list[tuple[str, float, float]]:
    """`train --cache` given several times -> (path, weight, loss weight) per cache.

    A spec is PATH[:WEIGHT[:LOSS_WEIGHT]]: at most two trailing `:number` fields are weights (default 1 and 1); the
    rest, colons included, is the path. A folder whose own name ends in :number is given with both weights, e.g.
    `run:2:1:1`. One --cache is always just a path."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if len(specs) == 1:
        return [(specs[0], 1.0, 1.0)]
    parsed = []
    for spec in specs:
        fields, numbers = spec.split(":"), []
        while len(fields) > 1 and len(numbers) < 2 and _number(fields[-1]) is not None:
            numbers.insert(0, _number(fields.pop()))
        weight, loss_weight = (numbers + [1.0, 1.0])[:2]
        if weight <= 0 or loss_weight <= 0:
            raise UserError(f"--cache {spec}: WEIGHT and LOSS_WEIGHT must be > 0 (PATH[:WEIGHT[:LOSS_WEIGHT]], "
                            "e.g. reg_cache:0.25:1)")
        if not ":".join(fields) or spec.endswith(":"):
            raise UserError(f"--cache {spec}: expected PATH[:WEIGHT[:LOSS_WEIGHT]] with numbers, e.g. reg_cache:0.25:1")
        parsed.append((":".join(fields), weight, loss_weight))
    return parsed


def resolution_stages(schedule: str | None, available: list[int], max_steps: int,
                      cache: str = "the cache") -> list[tuple[int, int, int]]:
    """(resolution, first step, end step) per stage of --resolution-schedule, in optimizer steps; `available`
    are the cache's resolutions."""
    if not schedule:
        if len(available) > 1:
            raise UserError(f"cache {cache} holds resolutions {', '.join(map(str, available))}: choose with "
                            f"--resolution-schedule, e.g. {available[-1]} or {available[0]}:500,{available[-1]}")
        return [(available[0], 0, max_steps)]
    entries = [e.strip() for e in schedule.split(",") if e.strip()]
    stages, start = [], 0
    for i, entry in enumerate(entries):
        res, _, steps = entry.partition(":")
        last = i == len(entries) - 1
        if not res.isdigit() or not (steps.isdigit() or (last and not steps)) or (steps and int(steps) < 1):
            raise UserError(f"--resolution-schedule {schedule}: expected res:steps,..., the last "
                            f"steps optional, e.g. 512:500,1024 ({entry!r})")
        if int(res) not in available:
            raise UserError(f"--resolution-schedule: the cache holds resolution(s) {', '.join(map(str, available))}, "
                            f"not {res}; encode with --resolution {','.join(map(str, sorted({*available, int(res)})))}")
        end = start + int(steps) if steps else max_steps
        if end <= start:
            raise UserError(f"--resolution-schedule {schedule}: the stages before {entry} already "
                            f"take {start} of --max-steps {max_steps}, nothing is left for it")
        stages.append((int(res), start, end))
        start = end
    if start != max_steps or any(a >= b for _, a, b in stages):
        raise UserError(f"--resolution-schedule {schedule} covers {start} optimizer steps, "
                        f"--max-steps is {max_steps}: make them agree, or leave the last stage's steps out")
    return stages


def stage_resolution(stages: list[tuple[int, int, int]], step: int) -> int:
    """The resolution trained at optimizer step `step` (0-based)."""
    return next(r for r, a, b in stages if a <= step < b)


# ------------------------------------------------------------------------------------------ encode
@dataclass
class EncodeConfig:
    model: str = opt(DEFAULT_MODEL, "Hub id, local diffusers folder, or single-file .safetensors checkpoint; demo = the small model shipped with the project.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of --model.")
    variant: str | None = opt(None, "Weight variant of --model, e.g. fp16.")
    model_config: str | None = opt(None, "Single-file checkpoints only: diffusers folder or hub id with the matching configs (default: inferred by diffusers).")
    vae: str | None = opt(None, "Override the VAE: hub id, folder or single file (e.g. an fp16-fix VAE).")
    dataset: str = opt(DEFAULT_DATASET, "Hub dataset id, imagefolder (metadata.jsonl/csv), save_to_disk folder, or folder of images with .txt captions.")
    split: str = opt("train", "Dataset split.")
    image_column: str = opt("image", "Image column of a hub or save_to_disk dataset.")
    caption_column: str = opt("text", "Caption column of a hub, imagefolder (metadata.jsonl/csv) or save_to_disk dataset.")
    cache: str = opt(DEFAULT_CACHE, "Cache folder to write: a new or empty folder, or an existing cache (locked while encode writes it).")
    resolution: int | tuple[int, ...] = opt(512, "Shorter side is resized to this, then a square crop of this size; several (512,768,1024) store each image once per resolution for `train --resolution-schedule`.")
    buckets: bool = opt(False, "Aspect-ratio buckets: each image is resized and cropped to the bucket (area <= resolution², sides multiples of --bucket-step) nearest its aspect ratio, instead of a square.")
    bucket_step: int = opt(64, "With --buckets: bucket sides are multiples of this many pixels.", check="positive")
    bucket_max_aspect: float = opt(4.0, "With --buckets: the most elongated bucket's long/short side ratio.", check="positive")
    center_crop: bool = opt(True, "Center crop (default) or one random crop per image, recorded in time_ids.")
    flip: bool = opt(True, "Also encode the mirrored image so training can flip per step (p=0.5).")
    cache_dtype: str = opt("fp16", "Storage dtype of latents and embeddings.", choices=CACHE_DTYPES)
    batch_size: int = opt(8, "Images per VAE / text-encoder batch.", check="positive")
    shard_size: int = opt(256, "Samples per shard file (at most; with --buckets or several resolutions, shards of small buckets hold fewer).", check="positive")
    device: str = opt("auto", "auto = cuda when available, else cpu.", choices=DEVICES)
    num_workers: int = opt(2, "Processes decoding and preprocessing images.", check="non_negative")
    seed: int = opt(42, "Seed of --random-crop (crops are a function of seed and key).")
    overwrite: bool = opt(False, "Replace an existing cache made with other settings (never a folder that is not a cache).")
    caption_variants: int = opt(0, "Also encode N augmented copies of every caption (with --shuffle-tags and/or --tag-dropout); `train` picks one of a sample's captions per visit. A rerun with another N adds or removes variants without encoding the images again.", check="non_negative")
    shuffle_tags: bool = opt(False, "With --caption-variants: each copy shuffles the caption's tags (split at --tag-separator), the first --keep-tokens staying in place.")
    keep_tokens: int = opt(0, "With --caption-variants: the first K tags stay in place and are never dropped (kohya's keep_tokens).", check="non_negative")
    tag_separator: str = opt(",", "With --caption-variants: what separates the tags of a caption.")
    tag_dropout: float = opt(0.0, "With --caption-variants: each copy drops every tag after --keep-tokens with this probability (kohya's caption_tag_dropout_rate).", check="probability")
    masks: str | None = opt(None, "Folder of grayscale masks named like the images (same relative folder and stem, any image extension; white = learn, black = ignore), stored at latent resolution for `train --masked-loss`; images without one count fully.")
    alpha_mask: bool = opt(False, "Use each image's own alpha channel as its mask (opaque = learn), for `train --masked-loss`.")
    validation_prompt: tuple[str, ...] = opt((), "A prompt (repeatable) whose embeddings are stored so that `train --validate-every` can render it without text encoders.")
    dry_run: bool = opt(False, "Only report what is stale in an existing cache and why; write nothing.")

    def __post_init__(self):
        check_fields(self)
        values = self.resolutions
        if self.buckets and (self.bucket_step < 8 or self.bucket_step % 8 or any(v % self.bucket_step for v in values)):
            raise UserError(f"--bucket-step {self.bucket_step}: must be a multiple of 8 that divides every --resolution")
        if self.buckets and self.bucket_max_aspect < 1:
            raise UserError(f"--bucket-max-aspect {self.bucket_max_aspect}: must be at least 1")
        if self.caption_variants and not (self.shuffle_tags or self.tag_dropout):
            raise UserError(f"--caption-variants {self.caption_variants}: say how the copies differ: --shuffle-tags "
                            "and/or --tag-dropout P")
        if (self.shuffle_tags or self.tag_dropout) and not self.caption_variants:
            raise UserError("--shuffle-tags / --tag-dropout make caption variants: give their number with "
                            "--caption-variants N")
        if self.masks and self.alpha_mask:
            raise UserError("--masks and --alpha-mask: choose one source of masks")

    @property
    def resolutions(self) -> list[int]:
        return parse_resolutions(self.resolution)


# ------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    cache: str | tuple[str, ...] = opt(DEFAULT_CACHE, "Cache folder written by `encode`. Repeat it to mix several caches: PATH[:WEIGHT[:LOSS_WEIGHT]], e.g. --cache style --cache reg:0.25 (global micro-batches drawn per cache in proportion to WEIGHT, loss scaled by LOSS_WEIGHT; only trailing :numbers are weights).")
    output: str = opt("./sdxl-naruto-lora", "Output folder for the LoRA, checkpoints and logs (locked while train writes it).")
    output_name: str | None = opt(None, "Name of the kohya / A1111 / ComfyUI file OUTPUT/<name>.safetensors (default: the output folder's name).")
    kohya_file: bool = opt(True, "Also write OUTPUT/<name>.safetensors (and one per checkpoint) in the kohya / LyCORIS format that ComfyUI, A1111 and Forge load, the bytes `export --format kohya` writes.")
    save_dtype: str = opt("fp32", "Tensor dtype of the final LoRA files (checkpoints stay fp32, so resume stays exact).", choices=SAVE_DTYPES)
    model: str | None = opt(None, "UNet source: hub id, diffusers folder, single file or demo (default: the model recorded in the cache).")
    revision: str | None = opt(None, "Hub revision of --model (default: the cache's).")
    variant: str | None = opt(None, "Weight variant of --model, e.g. fp16 (default: the cache's).")
    model_config: str | None = opt(None, "Single-file --model only: folder or hub id with its configs.")
    allow_other_model: bool = opt(False, "Train with a --model other than the one the cache was encoded with (e.g. a fine-tune with the same VAE and text encoders); refused without it.")
    resolution_schedule: str | None = opt(None, "Train progressively through the resolutions of a multi-resolution cache: res:steps,... in optimizer steps, the last stage may omit its steps (it runs to --max-steps), e.g. 512:500,768:500,1024 (default: the cache's only resolution).")
    rank: int = opt(16, "LoRA rank r.", check="positive")
    alpha: float = opt(32.0, "LoRA alpha; the update is scaled by alpha/rank.", check="positive")
    target_modules: str = opt("to_q,to_k,to_v,to_out.0", "Comma-separated UNet module names that get the adapter, or a preset: attn (these four), attn-ff, all-linear, all (see README).")
    lora_type: str = opt("lora", "Adapter, through peft: lora, dora (weight-decomposed), loha (Hadamard product), lokr (Kronecker product); loha/lokr load through peft, not load_lora_weights (see README).", choices=LORA_TYPES)
    rank_pattern: str | None = opt(None, "Other ranks for some modules: name=rank,... where a name (a regex) matches the end of a module path, e.g. to_k=8,mid_block.*=32 (peft rank_pattern; alpha stays --alpha).")
    gradient_checkpointing: bool = opt(True, "Recompute activations in backward: far less memory; with CUDA graphs it costs ~30% of the step.")
    cuda_graphs: str = opt("auto", "Capture each micro-batch's forward + backward as one CUDA graph per input shape and replay it (removes the host's kernel-launch time, the bottleneck at small batches): auto = on for CUDA unless --compile regional-graphs; falls back to eager with a note where capture fails.", choices=CUDA_GRAPHS)
    compile: str = opt("none", "none; regional: torch.compile of the UNet's repeated transformer blocks (diffusers compile_repeated_blocks; CUDA; ~20-40 s before the first step; inside the CUDA graph too); regional-graphs: the same in mode reduce-overhead, each block its own CUDA graph (instead of --cuda-graphs).", choices=COMPILE_MODES)
    vram_budget: str | None = opt(None, "GPU memory to fit, e.g. 12GiB, or auto (this card's free memory): picks the fastest checkpointing / base weights / block streaming / optimizer / compile / batch-size × grad-accum (same effective batch) that fits, prints why, caps this process at it, measures the first steps and stops with a configuration that fits if the real peak is over (CUDA; overrides those flags). A --sweep whose members do not fit together trains in rounds of as many as fit.")
    stream_blocks: str = opt("auto", "Keep the frozen UNet's blocks (91 in SDXL: ResNet, transformer, up/down-sampling blocks) in pinned host memory and copy them in on a side CUDA stream, N resident at a time, prefetched in forward and backward order: a number N, off, or auto (what --vram-budget chooses; otherwise off). Eager unless --cuda-graphs on, which captures the copies in the step's CUDA graph; the LoRA is unchanged.")
    batch_size: int = opt(1, "Samples per micro-batch.", check="positive")
    grad_accum: int = opt(4, "Micro-batches per optimizer step.", check="positive")
    learning_rate: float | None = opt(None, "Peak learning rate (default per --optimizer: adamw, adamw8bit 5e-5; prodigy 1.0; adafactor 1e-4; adamw-schedulefree 2e-4).", check="positive")
    loraplus_lr_ratio: float | None = opt(None, "LoRA+: the B (up) matrices learn at --learning-rate × this, e.g. 16 (Hayou et al. 2024; lora and dora only; default: off).", check="positive")
    block_lr: str | None = opt(None, "Learning-rate multipliers per part of the UNet: pattern=multiplier,... where a pattern (a regex) matches whole dot-separated parts of a module path, e.g. down_blocks.0=0.5,mid_block=1.5,up_blocks.2=2; the first matching pattern wins; one matching nothing is an error.")
    scale_lr: bool = opt(False, "Under torchrun, multiply --learning-rate by the number of processes (default: use it as given).")
    lr_scheduler: str = opt("constant_with_warmup", "diffusers scheduler name.", choices=LR_SCHEDULERS)
    warmup_steps: int = opt(100, "Warmup, in optimizer steps.", check="non_negative")
    max_steps: int = opt(1000, "Optimizer steps to train.", check="positive")
    max_grad_norm: float = opt(0.5, "Clip the gradient norm to this.", check="positive")
    noise_offset: float = opt(0.0, "Offset noise: add this × N(0,1), one value per sample and channel, to the noise (0: off; 0.05-0.1 helps very dark or bright images).", check="non_negative")
    min_snr_gamma: float | None = opt(None, "Min-SNR-γ loss weights min(SNR, γ)/SNR per sample (v-prediction: /(SNR+1)); 5 is the paper's choice (default: off, plain MSE).", check="positive")
    timestep_sampling: str = opt("uniform", "Timesteps: uniform; stratified = one per equal stratum of [0, T) among each optimizer step's samples; logit-normal = sigmoid(N(0,1)) × T (favours middle timesteps).", choices=TIMESTEP_SAMPLINGS)
    prediction_type: str | None = opt(None, "Train the UNet to predict epsilon (the noise) or v_prediction (the velocity) (default: the model's scheduler's, epsilon for SDXL base).", choices=PREDICTION_TYPES)
    rescale_betas_zero_snr: bool = opt(False, "Rescale the noise schedule to zero terminal SNR (diffusers' rescale_betas_zero_snr; pair with --prediction-type v_prediction).")
    masked_loss: bool = opt(False, "Weight each sample's per-pixel loss by its cached mask (encode --masks / --alpha-mask), normalised per sample; samples without a mask count fully.")
    caption_dropout: float = opt(0.0, "Probability of training a sample with the empty caption's embedding instead of its own (0: off).", check="probability")
    loss: str = opt("mse", "Loss between prediction and target: mse; huber = 2c(sqrt(d²+c²)-c); smooth_l1 = 2(sqrt(d²+c²)-c) (kohya sd-scripts' pseudo-Huber, with c per sample from --huber-schedule).", choices=LOSSES)
    huber_c: float = opt(0.1, "The Huber / smooth-L1 threshold c (its value at t = 0 for --huber-schedule exponential, at high SNR for snr).", check="positive")
    huber_schedule: str = opt("snr", "c per sample from its timestep: snr = (1-c)/(1+σ_t)²+c; exponential = c^(t/T); constant = c (kohya sd-scripts' schedules).", choices=HUBER_SCHEDULES)
    debiased_estimation: bool = opt(False, "Weight each sample's loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), SNR capped at 1000 (kohya sd-scripts' --debiased_estimation_loss); multiplies with --min-snr-gamma.")
    optimizer: str = opt("adamw8bit", "adamw8bit (bitsandbytes, CUDA; else falls back to adamw), adamw, prodigy (prodigyopt: estimates its step size; --learning-rate is a multiplier, 1.0), adafactor (transformers' Adafactor, relative step off, per tensor), adamw-schedulefree (schedulefree: no lr schedule; --warmup-steps is its own warmup).", choices=OPTIMIZERS)
    weight_decay: float = opt(1e-2, "Decoupled weight decay of the optimizer.", check="non_negative")
    ema_decay: float | None = opt(None, "Keep an exponential moving average of the LoRA weights with this decay, e.g. 0.999 (diffusers' EMAModel warm-up: min(decay, (1+s)/(10+s))); it becomes the saved LoRA and the validation images, the raw weights are saved beside as …_raw (default: off).")
    ema_device: str = opt("same", "Where the EMA lives: same = the training device; cpu = host memory (less GPU memory, a copy per step).", choices=EMA_DEVICES)
    mixed_precision: str = opt("auto", "auto = bf16 where the GPU supports it, else fp16 + GradScaler; fp32 on CPU.", choices=PRECISIONS)
    base_weights: str = opt("auto", "How the frozen UNet is stored: auto = the compute dtype; bf16, fp16; fp8 (scaled per channel, upcast per layer); int8, nf4 (bitsandbytes, CUDA only). The LoRA trains in fp32 and loads into an ordinary pipeline either way.", choices=BASE_WEIGHTS)
    attention: str = opt("auto", "auto = xformers when installed and working on the GPU, else PyTorch SDPA.", choices=ATTENTIONS)
    seed: int = opt(42, "Seed of the data order, flips, latent draws, noise and timesteps.")
    checkpoint_every: int = opt(200, "Save checkpoint-N/ every this many optimizer steps (0: never).", check="non_negative")
    max_bad_steps: int = opt(10, "Stop after this many non-finite steps in a row.", check="positive")
    validate_every: int = opt(0, "Render the cache's validation prompts every N optimizer steps into OUTPUT/samples/ (0: never).", check="non_negative")
    validation_steps: int = opt(25, "Denoising steps of validation images.", check="positive")
    validation_guidance: float = opt(5.0, "Guidance scale of validation images.", check="non_negative")
    checkpoints_total_limit: int | None = opt(None, "Keep only this many newest checkpoints (default: keep all).", check="positive")
    report_to: str = opt("none", "Also log loss, lr and grad_norm per step to a tracker: tensorboard writes OUTPUT/logs (pip install tensorboard).", choices=REPORT_TO)
    resume: str | None = opt(None, "'latest' or a checkpoint folder to continue from, with its adapter shape, batch, grad-accum, seed and cache; --max-steps beyond its step; changed settings such as --learning-rate are applied and recorded.")
    verify_cache: bool = opt(True, "Check every shard's sha256 before training (seconds per GB).")
    device: str = opt("auto", "auto = cuda when available, else cpu.", choices=DEVICES)
    num_workers: int = opt(2, "Data-loading processes (0: in the main process).", check="non_negative")
    overwrite: bool = opt(False, "Replace a finished LoRA or an earlier run in --output: its outputs are removed first.")
    sweep: tuple[str, ...] = opt((), "Train several LoRAs in one pass over the cache, sharing the frozen UNet: setting=value,value,..., e.g. learning_rate=1e-4,5e-5 (repeatable: each --sweep multiplies the members; space-separated settings in one --sweep vary together); values of target_modules, rank_pattern and block_lr are separated by ';'. Each member writes OUTPUT/<setting=value,...>/ as a single run would (see README: Sweeps); where --vram-budget fits fewer together, in rounds of as many as fit.")

    def __post_init__(self):
        if not isinstance(self.cache, str):  # repeated --cache: one stays a plain path, as before
            self.cache = tuple(self.cache) if len(self.cache) != 1 else self.cache[0]
        check_fields(self)
        parse_cache_specs(self.cache)
        sweep_values(self.sweep)
        try:
            parse_rank_pattern(self.rank_pattern)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not self.target_module_list:
            raise UserError("--target-modules: name at least one module, or a preset (attn, attn-ff, all-linear, all)")
        if self.vram_budget:
            check_budget(self.vram_budget)
        blocks = parse_stream_blocks(self.stream_blocks)
        if blocks and self.cuda_graphs == "on" and self.vram_budget:
            raise UserError(f"--vram-budget does not plan --stream-blocks {self.stream_blocks} with --cuda-graphs on yet "
                            "(not measured): drop one of them")
        if blocks and self.compile != "none":
            raise UserError(f"--stream-blocks {self.stream_blocks} with --compile {self.compile}: compiled blocks "
                            "cannot run the streaming hooks; use --compile none")
        parse_block_lr(self.block_lr)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UserError(f"--ema-decay {self.ema_decay}: must be between 0 and 1, e.g. 0.999")
        if self.loraplus_lr_ratio is not None and self.lora_type not in ("lora", "dora"):
            raise UserError(f"--loraplus-lr-ratio: LoRA+ scales the B (up) matrix of lora and dora, not of --lora-type "
                            f"{self.lora_type}")
        if self.optimizer == "prodigy" and (self.loraplus_lr_ratio or self.block_lr):
            raise UserError("--optimizer prodigy estimates one step size for all parameters (prodigyopt refuses "
                            "different learning rates per group): drop --loraplus-lr-ratio / --block-lr, or choose another")
        if self.optimizer == "adamw-schedulefree" and self.lr_scheduler not in ("constant", "constant_with_warmup"):
            raise UserError(f"--optimizer adamw-schedulefree needs no learning-rate schedule: use --lr-scheduler "
                            f"constant (--warmup-steps is its own warmup), not {self.lr_scheduler}")
        if self.output_name is not None and (not self.output_name.strip() or any(c in self.output_name for c in "/\\")
                                             or self.output_name in ("pytorch_lora_weights", ".", "..")):
            raise UserError(f"--output-name {self.output_name!r}: give a plain file name without a folder or "
                            "extension, other than pytorch_lora_weights")
        if self.compile == "regional-graphs" and self.cuda_graphs == "on":
            raise UserError("--compile regional-graphs makes each block its own CUDA graph: use --compile regional "
                            "with --cuda-graphs on (one graph per micro-batch), or --cuda-graphs off")

    @property
    def target_module_list(self) -> list[str]:
        return resolve_target_modules(self.target_modules)

    @property
    def lr(self) -> float:
        """--learning-rate, or the default of --optimizer."""
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.optimizer]

    @property
    def block_lr_dict(self) -> dict[str, float]:
        return parse_block_lr(self.block_lr)

    @property
    def kohya_name(self) -> str:
        """The kohya file's name without .safetensors: --output-name, else the output folder's name."""
        import os
        return self.output_name or os.path.basename(os.path.abspath(self.output))

    @property
    def rank_pattern_dict(self) -> dict[str, int]:
        return parse_rank_pattern(self.rank_pattern)


# ------------------------------------------------------------------------------------------- sweeps
# What a sweep may vary: the adapter, its optimizer and its loss. The sample stream, the step count and the frozen
# base are shared by every member (batch, grad-accum, steps, resolution schedule, seed, cache, precision, ...).
SWEEPABLE = ("learning_rate", "rank", "alpha", "rank_pattern", "target_modules", "weight_decay",
             "max_grad_norm", "lr_scheduler", "warmup_steps", "noise_offset", "min_snr_gamma", "caption_dropout",
             "prediction_type", "timestep_sampling", "loss", "huber_c", "huber_schedule", "debiased_estimation",
             "optimizer", "loraplus_lr_ratio", "block_lr", "ema_decay")
LIST_VALUED = ("target_modules", "rank_pattern", "block_lr")  # their values hold commas: separated by ';'


def _sweep_value(name: str, text: str):
    """One --sweep value as TrainConfig's field `name` holds it ('none' unsets an optional one)."""
    kind = str({f.name: f for f in dataclasses.fields(TrainConfig)}[name].type)
    if text.lower() == "none" and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            return {"true": True, "false": False}[text.lower()]
        return int(text) if kind.startswith("int") else float(text) if kind.startswith("float") else text
    except (KeyError, ValueError):
        raise UserError(f"--sweep {name}={text}: not a value of {flag_name(name)} ({kind})") from None


def sweep_values(specs: tuple[str, ...]) -> list[list[tuple[str, list[tuple[str, object]]]]]:
    """--sweep's settings, each checked: one group per --sweep, [(name, [(value as given, value), ...]), ...] for its
    space-separated settings, which vary together (zipped: the same number of values each)."""
    groups, seen = [], set()
    for spec in specs:
        group = []
        for setting in spec.split():
            key, _, values = setting.partition("=")
            name = key.strip().lstrip("-").replace("-", "_")
            if name not in SWEEPABLE:
                raise UserError(f"--sweep {key.strip()}: not sweepable (members share the sample stream, the step count "
                                f"and the frozen UNet); sweepable: {', '.join(SWEEPABLE)}")
            texts = [v.strip() for v in values.split(";" if name in LIST_VALUED else ",") if v.strip()]
            if not texts or name in seen:
                raise UserError(f"--sweep {setting!r}: expected {name}=value,value,..., each setting once"
                                + (" (values separated by ';')" if name in LIST_VALUED else ""))
            seen.add(name)
            group.append((name, [(text, _sweep_value(name, text)) for text in texts]))
        if not group or len({len(values) for _, values in group}) > 1:
            raise UserError(f"--sweep {spec!r}: settings in one --sweep vary together and need as many values each "
                            "(e.g. \"learning_rate=1e-4,5e-5 rank=8,16\"); separate --sweep options multiply")
        groups.append(group)
    return groups


def member_name(values: list[tuple[str, str]]) -> str:
    """A member's folder name from its swept values, file-system safe: learning_rate=1e-4,rank=8."""
    name = ",".join(f"{k}={v}" for k, v in values)
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name).lstrip(".")[:200]


def sweep_members(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(folder name, config) of every member of --sweep's cross product, in order; each config is the one a single
    `train --output OUTPUT/<name>` with those values would run (checked as such). The members share one batched
    forward whose rows stages/lora.py MixedBatch routes through plain LoRA layers (not dora, loha, lokr)."""
    groups = [[[(name, *values[i]) for name, values in group] for i in range(len(group[0][1]))]
              for group in sweep_values(cfg.sweep)]  # per --sweep: its members' [(name, text, value), ...]
    members, names = [], set()
    for combo in itertools.product(*groups):
        combo = [setting for part in combo for setting in part]
        name = member_name([(n, text) for n, text, _ in combo])
        if name in names:
            raise UserError(f"--sweep: two members would share the folder {name}; give values that differ in their "
                            "letters and digits")
        names.add(name)
        members.append((name, dataclasses.replace(cfg, sweep=(), output=os.path.join(cfg.output, name),
                                                  **{n: value for n, _, value in combo})))
    other = sorted({c.lora_type for _, c in members} - {"lora"})
    if len(members) > 1 and other:
        raise UserError(f"--sweep: --lora-type {other[0]} cannot share a batched forward with other adapters (a sweep "
                        "routes each replica through plain LoRA layers): sweep --lora-type lora, or train it alone")
    return members


# ------------------------------------------------------------------------------------------- bench
def same_as_train(name: str, default=dataclasses.MISSING, help: str | None = None):
    """A BenchConfig field that is TrainConfig's `name` (its help, choices and check), with another default."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    meta = dict(f.metadata)
    if help:
        meta["help"] = help
    return field(default=f.default if default is dataclasses.MISSING else default, metadata=meta)


@dataclass
class BenchConfig:
    model: str = opt(RANDOM_SDXL, "random:sdxl = full-size SDXL UNet with random weights, built on the GPU (no download); or a hub id / folder, or demo.")
    resolution: int = opt(512, "Image side in pixels (latents are 1/8).", check="positive")
    batch_size: int = same_as_train("batch_size")
    grad_accum: int = same_as_train("grad_accum")
    mixed_precision: str = same_as_train("mixed_precision")
    base_weights: str = same_as_train("base_weights")
    gradient_checkpointing: bool = same_as_train("gradient_checkpointing")
    cuda_graphs: str = same_as_train("cuda_graphs")
    optimizer: str = same_as_train("optimizer")
    rank: int = same_as_train("rank")
    alpha: float = same_as_train("alpha")
    target_modules: str = same_as_train("target_modules")
    compile: str = same_as_train("compile")
    stream_blocks: str = same_as_train("stream_blocks")
    steps: int = opt(10, "Timed optimizer steps.", check="positive")
    warmup: int = opt(2, "Untimed optimizer steps first (compilation, graph capture, allocator warm-up).", check="non_negative")
    validate_steps: int = opt(0, "After the timed steps, render the validation images of train --validate-every (2 prompts, this many denoising steps, the FP32 VAE decoding) with the trained UNet and report their peak memory and seconds (not for the --baseline row); 0: none.", check="non_negative")
    profile_steps: int = opt(2, "Optimizer steps traced by torch.profiler after the timed ones, on CUDA (host vs GPU time per step); 0 skips the trace (eager and streamed steps trace slowly).", check="non_negative")
    sweep: int = opt(1, "Also run a `train --sweep` of this many learning rates (the optimizer's default, halved member by member) beside the single run: total adapter-images/s and peak memory of both.", check="positive")
    sweep_ranks: str | None = opt(None, "With --sweep: also sweep these ranks, e.g. 4,8,16,32 (the cross product with the learning rates).")
    baseline: bool = opt(False, "Also run the reference recipe at the same effective batch (all FP32, VAE + text encoders on the GPU encoding every step, checkpointing, micro-batch 1, 8-bit AdamW) for a side-by-side ratio.")
    vram_budget: str | None = opt(None, "Cap this process's GPU memory, e.g. 16GiB, to prove a fit on a smaller card.")
    device: str = same_as_train("device")
    seed: int = same_as_train("seed")

    def __post_init__(self):
        check_fields(self)
        if self.vram_budget:
            parse_size(self.vram_budget)


# ------------------------------------------------------------------------------------------ sample
@dataclass
class SampleConfig:
    lora: str | None = opt(None, "Folder holding pytorch_lora_weights.safetensors (an output or a checkpoint-N folder), or a LoRA .safetensors file (also kohya format, imported on the fly).")
    model: str | None = opt(None, "Base model: hub id, local diffusers folder, single-file checkpoint or demo (default: the one the LoRA was trained on, from its train_config.json; else SDXL base 1.0).")
    prompt: tuple[str, ...] = opt((), "A prompt (repeatable).")
    negative_prompt: str | None = opt(None, "Negative prompt for every image.")
    steps: int = opt(30, "Denoising steps.", check="positive")
    guidance: float = opt(7.5, "Classifier-free guidance scale.", check="non_negative")
    seed: int = opt(42, "Seed; image i uses seed + i, the same for base and LoRA.")
    resolution: int = opt(1024, "Image height and width.", check="positive")
    lora_scale: float = opt(1.0, "Strength of the LoRA.")
    compare: bool = opt(False, "Also render the base model and write a labelled base-vs-LoRA grid.")
    out: str = opt("./samples", "Folder for the PNGs.")
    device: str = opt("auto", "auto = cuda when available, else cpu.", choices=DEVICES)
    overwrite: bool = opt(False, "Replace existing images in --out.")

    def __post_init__(self):
        check_fields(self)


# ------------------------------------------------------------------------------------------ export
@dataclass
class ExportConfig:
    lora: str | None = opt(None, "kohya: folder holding pytorch_lora_weights.safetensors (or that file); diffusers: the kohya .safetensors file.")
    format: str = opt("kohya", "kohya = one file for A1111 / ComfyUI / Forge / kohya; diffusers = import a kohya file into a LoRA folder.", choices=EXPORT_FORMATS)
    out: str | None = opt(None, "kohya: the .safetensors file to write; diffusers: the folder to write pytorch_lora_weights.safetensors into.")
    overwrite: bool = opt(False, "Replace an existing output file.")

    def __post_init__(self):
        check_fields(self)
