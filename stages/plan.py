"""`train --vram-budget 12GiB`: pick the fastest training configuration whose peak GPU memory fits.

    candidates (checkpointing × base weights × optimizer × compile × micro-batch | effective batch fixed)
      -> peak GiB and img/s of each: a measured bench row where one matches, else the estimate below
      -> drop those whose peak + safety margin exceeds the budget -> the fastest (near-ties: less memory)

The estimate is a small model of the full-size SDXL UNet with the reference LoRA (r16 on attention,
23,224,320 trainable parameters), calibrated on the H200 measurements in bench/RESULTS.md:
    peak = base weights (bytes per parameter by format) + LoRA params, grads, optimizer states
           + fixed workspaces + micro-batch × activations per sample (by resolution, checkpointing)
    time per optimizer step = grad_accum × time per micro-batch + optimizer step
Other architectures, ranks or GPUs: pass measured rows (`load_table` on `bench`'s output).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from stages.errors import UserError

GIB = 2**30

# ---- memory (GiB) ----
# Parameters of the SDXL UNet by kind, counted on the meta device from stages/sdxl.py SDXL_UNET_CONFIG
# (tests/test_plan.py recounts them): Linear weight matrices are what fp8/int8/nf4 shrink; convolutions,
# biases and norms stay in the compute dtype.
LINEAR_WEIGHT_PARAMS = 2_232_647_680
OTHER_PARAMS = 334_816_004
BYTES_PER_LINEAR_WEIGHT = {
    "bf16": 2.0, "fp16": 2.0,
    "fp8": 1.0,    # float8 storage, upcast layer by layer (and again in backward, not saved for it)
    "int8": 1.0,   # bitsandbytes Linear8bitLt; its per-row fp32 scales are < 0.1 MB
    "nf4": 0.5 + 1 / 64 + 4 / (64 * 256),  # Linear4bit: 4 bits + double-quantized absmax per 64 weights
}
LORA_PARAMS = 23_224_320
LORA_BYTES_PER_PARAM = {  # fp32 param + fp32 grad + optimizer states
    "adamw": 4 + 4 + 8,                   # two fp32 moments: 186 MB
    "adamw8bit": 4 + 4 + 2 + 2 * 4 / 256,  # two 8-bit moments + a fp32 absmax per 256: 46 MB
}
WORKSPACE_GIB = 0.20  # cuBLAS/cuDNN workspaces, inputs: the intercept of peak vs micro-batch (b4 12.72, b16 34.9 GiB)
# Activations per sample at (512², 1024²), linear in pixel count between and beyond. No checkpointing:
# slope of peak vs micro-batch at 512² (b4 → b16) and b8 at 1024² (48.9 GiB); checkpointing: b1 peaks
# at 512² / 1024² (5.36 / 5.84 GiB) less weights, LoRA state and workspaces.
ACTIVATIONS_GIB = {False: (1.85, 5.45), True: (0.17, 0.64)}
COMPILE_GIB = 0.01  # regional compile, measured at b4 512² (12.73 vs 12.72 GiB)

# Safety margin between the planned peak (allocated) and the budget. Allocator fragmentation: reserved
# exceeded allocated by up to 7.3% in bench/RESULTS.md (6.26 vs 5.84 GiB at 1024²). CUDA context and
# library handles live outside the allocator: typically 0.3-0.5 GiB of the card.
RESERVED_PER_ALLOCATED = 1.08
CONTEXT_GIB = 0.5

# --stream-blocks N: what stays on the device (stages/streaming.py; counted on the meta device like the above):
# Linear weights outside the 91 streamed blocks (embeddings, proj_in/out), everything else outside them is < 0.1 M;
# the largest block, up_blocks.0.resnets.0 (1.64 M Linear weights + 47.5 M conv / norm), bounds each resident one;
# bitsandbytes' quantization statistics (nf4 absmax) stay on the device too
STREAM_REST_LINEAR_PARAMS = 31_047_680
STREAM_BLOCK_MAX_PARAMS = (1_638_400, 47_526_400)  # (Linear weights, others) of the largest block
STREAM_STATS_PER_LINEAR = {"nf4": 1 / 64 + 4 / (64 * 256)}
STREAM_CHOICES = (2, 8)  # N that --vram-budget tries with --stream-blocks auto
# effective host -> device rate of a streamed step (2026-12-02, H200): bf16 at 1024² moved 9.4 GiB per micro-batch
# in 1.0 s, at 512² in 1.16 s (its eager twin: 0.94 s): a lower bound on the link, host time mixed in; with it,
# streamed fp8 ranks above bf16 (by ~5%), as measured at 512²
H2D_GBPS = 10.0
# --validate-every: the validation pass holds the weights and the LoRA's state, the FP32 VAE (83.7 M parameters,
# moved in to decode) and the larger of CFG inference and a tiled decode (256 px tiles), at (512², 1024²); the
# training activations are gone by then. At 1024², 2026-12-02: nf4 2.76 GiB measured vs 2.81 estimated; bf16 with
# 2 blocks streamed 1.00 vs 1.34 (streaming's resident blocks are counted at the largest's size: conservative).
VALIDATION_GIB = (0.65, 0.9)

# ---- speed (s) ----
# The eager step is host-bound (kernel launches): ≈ constant time per micro-batch whatever its size,
# until the GPU's work takes longer. Checkpointing re-runs the forward: ≈ 2× the host time.
HOST_S_PER_MICRO_BATCH = {False: 0.40, True: 0.85}  # no-ckpt b4 9.78 img/s; ckpt b1×4 ≈ 1.1-1.3 img/s
GPU_TFLOPS = 300.0  # assumed achievable bf16 rate on an H200 (~40% of the 790 measured); not yet calibrated
FORWARD_TFLOP_PER_IMAGE = (1.6, 6.8)  # at 512², 1024² (torch's FLOP counter); backward ≈ 1×, recompute 1×
# Per-layer dequantization / upcast: nf4 from its ckpt runs (0.63-0.75 img/s); eager at 512² b1 × ga2 (bench/RESULTS.md)
# bf16 0.986, fp8 0.817 (1.21×: kept at 1.15, also the CUDA-graph figure, not measured there), int8 0.582 img/s
WEIGHTS_SLOWDOWN = {"bf16": 1.0, "fp16": 1.0, "fp8": 1.15, "int8": 1.7, "nf4": 1.7}
# int8 is not among --vram-budget's choices (Choices, choices_for): nf4 is smaller at the same speed, fp8 faster at the
# same size, and bitsandbytes' int8 matmul keeps its inputs as autograd-context attributes, out of gradient
# checkpointing's reach: +2.1 GiB at 512² b1 and +4.0 GiB at b4 over these estimates (streamed: 3.69 measured, 0.80
# estimated)
COMPILE_SPEEDUP = 0.86  # regional compile: 11.34 vs 9.78 img/s (no ckpt), 1.34 vs ≈ 1.15 (ckpt)
COMPILE_START_S = 30.0  # its extra time before the first step (20-40 s measured)
OPTIMIZER_STEP_S = {"adamw": 0.007, "adamw8bit": 0.09}  # fused AdamW vs bitsandbytes 8-bit
# With CUDA graphs (--cuda-graphs, the default on CUDA: one graph per micro-batch; bench/RESULTS.md 2026-12-01) the
# launch time is gone: a micro-batch costs a fixed replay overhead plus its arithmetic at an achieved rate (fitted
# to 512² b1/b4 and 1024² b1 with checkpointing, 80 / 140 / 150 ms per micro-batch with the step's share included)
GRAPH_OVERHEAD_S = 0.062
GRAPH_TFLOPS = 300.0
GRAPH_WEIGHTS_SLOWDOWN = {**WEIGHTS_SLOWDOWN, "nf4": 1.38}  # nf4 b1 / b4: 110 / 175 ms vs 80 / 126 ms for bf16
GRAPH_GIB = 0.05  # static inputs, the graph pool's slack: 5.386 vs 5.36 GiB eager at 512², b1, checkpointing
# an nf4 base's activations in a graph's pool: 1.38x bf16's (peaks 2.395 / 3.103 / 3.013 GiB at 512² b1, 512² b4,
# 1024² b1, 2026-12-01/02, were 0.06 / 0.26 / 0.21 GiB over the plain estimate)
GRAPH_ACTIVATIONS = {"nf4": 1.38}
GRAPH_OPTIMIZER_STEP_S = 0.01  # flat LoRA buffers: 8-bit AdamW is one launch, as fast as fused AdamW (12.12 vs 12.21 img/s)
NEAR_TIE = 0.02  # speeds within 2% count as equal (the estimates are good to ~10%): take less memory


@dataclass(frozen=True)
class Candidate:
    """One training configuration; field names are TrainConfig's."""
    gradient_checkpointing: bool
    base_weights: str  # bf16/fp16 (the compute dtype), fp8, int8, nf4
    optimizer: str     # adamw (fused) or adamw8bit
    compile: str       # none or regional
    batch_size: int    # micro-batch
    grad_accum: int
    stream_blocks: int = 0  # resident blocks of the streamed frozen UNet; 0: not streamed
    members: int = 1   # a sweep's adapters: each adds its LoRA state, and its replica of every micro-batch

    def describe(self, graphs: bool = False) -> str:  # graphs: unstreamed candidates replay CUDA graphs
        ckpt = "checkpointing" if self.gradient_checkpointing else "no checkpointing"
        mode = ("regional compile" if self.compile == "regional" else "CUDA graphs" if graphs and not self.stream_blocks
                else "eager")
        stream = f", {self.stream_blocks} blocks streamed" if self.stream_blocks else ""
        return (f"{self.base_weights} weights{stream}, {ckpt}, {self.optimizer}, {mode}, "
                f"micro-batch {self.batch_size} × grad-accum {self.grad_accum}"
                + (f", {self.members} sweep members" if self.members > 1 else ""))

    def flags(self) -> str:
        """The train flags that select this configuration."""
        return (f"--base-weights {self.base_weights} --stream-blocks {self.stream_blocks or 'off'} "
                f"--{'' if self.gradient_checkpointing else 'no-'}gradient-checkpointing --optimizer {self.optimizer} "
                f"--compile {self.compile} --batch-size {self.batch_size} --grad-accum {self.grad_accum}")


@dataclass(frozen=True)
class Choices:
    """What can run here; the planner searches their product (`choices_for` builds it for a config)."""
    gradient_checkpointing: tuple[bool, ...] = (False, True)
    base_weights: tuple[str, ...] = ("bf16", "fp8", "nf4")  # not int8: see WEIGHTS_SLOWDOWN
    optimizer: tuple[str, ...] = ("adamw", "adamw8bit")
    compile: tuple[str, ...] = ("none", "regional")
    cuda_graphs: bool = False  # every unstreamed candidate runs as CUDA graphs (train's default on CUDA)
    stream_blocks: tuple[int, ...] = (0,)
    validation: bool = False  # --validate-every: the validation pass must fit too


def choices_for(cfg, compute_dtype: str, bitsandbytes: bool, world: int = 1) -> Choices:
    """What the dataclass config `cfg` can express here (no base_weights field: the compute dtype only; no compile
    field: eager only). compute_dtype: bf16 or fp16; bitsandbytes: it works on this GPU (nf4, adamw8bit);
    world: torchrun's processes (several: eager, no CUDA graphs)."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    weights = ("fp8",) + (("nf4",) if bitsandbytes else ()) if "base_weights" in fields else ()
    stream = (0,)
    if "stream_blocks" in fields:
        from stages.config import parse_stream_blocks
        blocks = parse_stream_blocks(cfg.stream_blocks)
        stream = ((0,) if cfg.cuda_graphs == "on" else (0, *STREAM_CHOICES)) if blocks is None else (blocks,)
    return Choices(base_weights=(compute_dtype,) + weights,
                   optimizer=("adamw", "adamw8bit") if bitsandbytes else ("adamw",),
                   compile=("none", "regional") if "compile" in fields else ("none",),
                   cuda_graphs="cuda_graphs" in fields and cfg.cuda_graphs != "off" and world == 1, stream_blocks=stream,
                   validation=bool(getattr(cfg, "validate_every", 0)))


@dataclass(frozen=True)
class Estimate:
    peak_gib: float       # peak allocated GPU memory
    images_per_s: float
    peak_measured: bool   # from a bench row rather than the model above
    speed_measured: bool

    @property
    def source(self) -> str:
        kinds = {(True, True): "measured", (False, False): "estimated"}
        return kinds.get((self.peak_measured, self.speed_measured),
                         "peak measured, speed estimated" if self.peak_measured else "peak estimated, speed measured")


@dataclass(frozen=True)
class Plan:
    choice: Candidate
    estimate: Estimate
    needed_gib: float  # peak with the safety margin: what was compared with the budget
    reason: str        # what was chosen and why, and what was rejected


# --------------------------------------------------------------------------------------- estimates
def _at_resolution(at_512_and_1024: tuple[float, float], resolution: int) -> float:
    """Linear in pixel count through the values at 512² and 1024²."""
    low, high = at_512_and_1024
    return low + (high - low) * ((resolution / 512) ** 2 - 1) / 3


def needed_gib(peak_gib: float) -> float:
    return peak_gib * RESERVED_PER_ALLOCATED + CONTEXT_GIB


def weights_gib(c: Candidate) -> float:
    """The frozen base's bytes on the device: all of it, or (streamed) the rest and N of the largest block."""
    per_linear = BYTES_PER_LINEAR_WEIGHT[c.base_weights]
    if not c.stream_blocks:
        return (LINEAR_WEIGHT_PARAMS * per_linear + OTHER_PARAMS * 2) / GIB
    linear, other = STREAM_BLOCK_MAX_PARAMS
    return (STREAM_REST_LINEAR_PARAMS * per_linear + c.stream_blocks * (linear * per_linear + other * 2)
            + LINEAR_WEIGHT_PARAMS * STREAM_STATS_PER_LINEAR.get(c.base_weights, 0)) / GIB


def streamed_gib(c: Candidate) -> float:
    """Bytes copied host -> device per pass (forward, and again backward): about all the frozen weights."""
    return weights_gib(dataclasses.replace(c, stream_blocks=0)) if c.stream_blocks else 0.0


def estimate_peak_gib(c: Candidate, resolution: int, graphs: bool = False, validation: bool = False) -> float:
    graphs = graphs and not c.stream_blocks  # a streamed UNet runs eagerly
    lora = c.members * LORA_PARAMS * LORA_BYTES_PER_PARAM[c.optimizer] / GIB
    activations = c.members * c.batch_size * _at_resolution(ACTIVATIONS_GIB[c.gradient_checkpointing], resolution)
    activations *= GRAPH_ACTIVATIONS.get(c.base_weights, 1.0) if graphs else 1.0
    train = (weights_gib(c) + lora + WORKSPACE_GIB + activations + (COMPILE_GIB if c.compile == "regional" else 0)
             + (GRAPH_GIB if graphs else 0))
    # with CUDA graphs, validation that does not fit beside their pool releases it (stages/sweep.py: validate)
    return max(train, weights_gib(c) + lora + _at_resolution(VALIDATION_GIB, resolution)) if validation else train


def micro_batch_s(c: Candidate, resolution: int, graphs: bool = False) -> float:
    """Seconds per micro-batch (forward + backward): eager, the host's launch time or the GPU's work, whichever is
    longer; as a CUDA graph, a replay overhead plus the GPU's work."""
    passes = 3 if c.gradient_checkpointing else 2
    if c.stream_blocks:  # eager; the copies overlap the compute: the slower of the two
        eager = micro_batch_s(dataclasses.replace(c, stream_blocks=0), resolution)
        return max(eager, 2 * streamed_gib(c) * GIB / 1e9 / H2D_GBPS)
    if graphs:
        work = c.members * c.batch_size * passes * _at_resolution(FORWARD_TFLOP_PER_IMAGE, resolution) / GRAPH_TFLOPS
        seconds = (GRAPH_OVERHEAD_S + work) * GRAPH_WEIGHTS_SLOWDOWN[c.base_weights]
        return seconds * (COMPILE_SPEEDUP if c.compile == "regional" else 1)
    gpu = c.members * c.batch_size * passes * _at_resolution(FORWARD_TFLOP_PER_IMAGE, resolution) / GPU_TFLOPS
    seconds = max(HOST_S_PER_MICRO_BATCH[c.gradient_checkpointing], gpu) * WEIGHTS_SLOWDOWN[c.base_weights]
    return seconds * (COMPILE_SPEEDUP if c.compile == "regional" else 1)


def optimizer_step_s(c: Candidate, graphs: bool = False) -> float:
    return GRAPH_OPTIMIZER_STEP_S if graphs and not c.stream_blocks else OPTIMIZER_STEP_S[c.optimizer]


def images_per_s(c: Candidate, micro_s: float, graphs: bool = False) -> float:
    return c.batch_size * c.grad_accum / (c.grad_accum * micro_s + optimizer_step_s(c, graphs))


def load_table(path: str | Path) -> list[dict]:
    """Bench rows from a file of `bench` output: its JSON lines (other lines are skipped)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")]
    return [r for r in rows if "resolution" in r]


def _matches(row: dict, c: Candidate, resolution: int, graphs: bool) -> bool:
    return (row.get("resolution"), row.get("micro_batch"), row.get("checkpointing"), row.get("base_weights"),
            row.get("optimizer"), row.get("compile", "none"), bool(row.get("cuda_graphs")), row.get("stream_blocks", 0),
            row.get("members", 1)) == (
        resolution, c.batch_size, c.gradient_checkpointing, c.base_weights, c.optimizer, c.compile,
        graphs and not c.stream_blocks, c.stream_blocks, c.members)


def estimate(c: Candidate, resolution: int, table: list[dict] | None = None, graphs: bool = False,
             validation: bool = False) -> Estimate:
    """Peak GiB and img/s of `c`; matching measured rows win over the model (the largest peak of repeats)."""
    rows = [r for r in table or [] if _matches(r, c, resolution, graphs) and not validation]
    peaks = [r["peak_allocated_gib"] for r in rows if r.get("peak_allocated_gib") is not None]
    # a row's img/s is for its own grad_accum: recover its time per micro-batch, then re-time for ours
    micro = [(r["micro_batch"] * r.get("grad_accum", c.grad_accum) / r["images_per_s"]
              - optimizer_step_s(c, graphs)) / r.get("grad_accum", c.grad_accum)
             for r in rows if r.get("images_per_s")]
    return Estimate(peak_gib=max(peaks) if peaks else estimate_peak_gib(c, resolution, graphs, validation),
                    images_per_s=images_per_s(c, sum(micro) / len(micro) if micro else micro_batch_s(c, resolution, graphs),
                                              graphs),
                    peak_measured=bool(peaks), speed_measured=bool(micro))


# -------------------------------------------------------------------------------------------- plan
def candidates(effective_batch: int, allowed: Choices, members: int = 1) -> list[Candidate]:
    sizes = [b for b in range(1, effective_batch + 1) if effective_batch % b == 0]
    return [Candidate(ckpt, weights, opt, comp, b, effective_batch // b, n, members) for ckpt, weights, opt, comp, b, n in
            itertools.product(allowed.gradient_checkpointing, allowed.base_weights, allowed.optimizer,
                              allowed.compile, sizes, allowed.stream_blocks) if not (n and comp != "none")]


def plan(budget_bytes: int, resolution: int, effective_batch: int, table: list[dict] | None = None,
         allowed: Choices = Choices(), max_steps: int | None = None, members: int = 1) -> Plan:
    """The fastest candidate whose peak + margin fits `budget_bytes`. With max_steps, compile's start-up
    time counts against its speed (a short run may not earn it back). `members`: a sweep's, trained together."""
    if effective_batch < 1:
        raise UserError(f"effective batch {effective_batch}: must be >= 1")
    budget = budget_bytes / GIB
    scored = []
    for c in candidates(effective_batch, allowed, members):
        e = estimate(c, resolution, table, allowed.cuda_graphs, allowed.validation)
        run_s = (max_steps or 1) * effective_batch / e.images_per_s
        if max_steps and c.compile == "regional":
            run_s += COMPILE_START_S
        scored.append((run_s, e.peak_gib, c, e))
    scored.sort(key=lambda s: (s[0], s[1]))
    fits = [s for s in scored if needed_gib(s[1]) <= budget]
    where = f"{resolution}², effective batch {effective_batch}" + (f", {members} sweep members" if members > 1 else "")
    if not fits:
        _, peak, c, _ = min(scored, key=lambda s: s[1])
        raise UserError(f"--vram-budget {budget:.2f} GiB: no configuration fits at {where}; the smallest, "
                        f"{c.describe(allowed.cuda_graphs)}, peaks at ~{peak:.2f} GiB ({needed_gib(peak):.2f} GiB with the safety margin)")
    near = [s for s in fits if s[0] <= fits[0][0] * (1 + NEAR_TIE)]
    run_s, peak, choice, est = min(near, key=lambda s: s[1])
    over = [s for s in scored if s[0] < run_s and needed_gib(s[1]) > budget]  # faster, but too big
    shown = over[:1] + [s for s in sorted(over, key=lambda s: s[1])[:2] if s is not over[0]]  # fastest, nearest misses
    lines = [f"--vram-budget {budget:.2f} GiB at {where}: chose {choice.describe(allowed.cuda_graphs)}: ~{est.images_per_s:.2f} img/s, "
             f"peak ~{peak:.2f} GiB ({needed_gib(peak):.2f} GiB with the safety margin; {est.source})"]
    lines += [f"  rejected {c.describe(allowed.cuda_graphs)}: ~{e.images_per_s:.2f} img/s but needs ~{needed_gib(p):.1f} GiB"
              for _, p, c, e in shown]
    if len(over) > len(shown):
        lines.append(f"  ... and {len(over) - len(shown)} more faster configurations over the budget")
    reason = "\n".join(lines)
    return Plan(choice, est, needed_gib(peak), reason)


_PLAIN = {"base_weights": ("bf16", "fp16"), "compile": ("none",), "stream_blocks": (0,)}  # what a config without such a field runs


def apply_plan(cfg, plan: Plan):
    """A copy of the dataclass config `cfg` with the plan's choice in the fields it has."""
    names = {f.name for f in dataclasses.fields(cfg)}
    choice = dataclasses.asdict(plan.choice)
    for name, plain in _PLAIN.items():
        if name not in names and choice[name] not in plain:
            raise ValueError(f"the plan chose {name}={choice[name]} but {type(cfg).__name__} has no {name} field")
    choice["stream_blocks"] = str(choice["stream_blocks"] or "off")  # the flag's text
    return dataclasses.replace(cfg, **{k: v for k, v in choice.items() if k in names})


def _allowed_here(cfg, device) -> Choices:
    """What `cfg` can run on this CUDA device: its compute dtype, and bitsandbytes if it imports."""
    import torch

    from stages.device import resolve_precision
    dtype = resolve_precision(cfg.mixed_precision, device)
    if dtype is None:
        raise UserError("--vram-budget plans bf16/fp16 training: use --mixed-precision auto, bf16 or fp16")
    try:
        import bitsandbytes  # noqa: F401
        bnb = True
    except Exception:
        bnb = False
    from stages.distributed import world_size
    return choices_for(cfg, "bf16" if dtype == torch.bfloat16 else "fp16", bitsandbytes=bnb, world=world_size())


def fit_vram_budget(cfg, device, resolution: int, log, members: int = 1):
    """--vram-budget: cap this process's GPU memory at cfg.vram_budget; returns (a copy of the TrainConfig `cfg` with
    the fastest configuration that fits (the reason printed), the budget and the bytes outside the allocator counted
    against it, the plan's need in bytes (its peak with the margin), `refit(scale)`: the flags of the fastest
    configuration that fits if every estimate were `scale` times larger, for the stop after a measured overrun, and
    how many of a sweep's `members` train together: all, or (one line says so) as many as fit, in rounds)."""
    from stages.device import cap_gpu_memory
    if cfg.optimizer not in Choices.optimizer:
        raise UserError(f"--vram-budget plans with adamw or adamw8bit, not --optimizer {cfg.optimizer}: drop one of the two")
    budget, outside = cap_gpu_memory(device, cfg.vram_budget, log)  # UserError off CUDA
    allowed = _allowed_here(cfg, device)
    effective = cfg.batch_size * cfg.grad_accum

    def fitted(together: int, budget: int = budget) -> Plan:
        return plan(budget, resolution, effective, allowed=allowed, max_steps=cfg.max_steps, members=together)
    try:
        chosen = fitted(members)
    except UserError:
        together = next((k for k in range(members - 1, 0, -1) if _fits(budget, resolution, effective, allowed, k)), 0)
        if not together:
            fitted(1)  # raises the plan's error for one member: not even one fits
        chosen = fitted(together)
        log(f"the {members} sweep members do not fit in {budget / GIB:.2f} GiB together: "
            f"{-(-members // together)} rounds of ≤ {together} members")
    log(chosen.reason)

    def refit(scale: float) -> str:
        try:
            return fitted(chosen.choice.members, int(budget / scale)).choice.flags()
        except UserError:
            return "none is estimated to fit; the smallest is " + min(
                candidates(effective, allowed, chosen.choice.members),
                key=lambda c: estimate_peak_gib(c, resolution, False, allowed.validation)).flags()
    return apply_plan(cfg, chosen), budget, outside, int(chosen.needed_gib * GIB), refit, chosen.choice.members


def _fits(budget: int, resolution: int, effective_batch: int, allowed: Choices, members: int) -> bool:
    try:
        plan(budget, resolution, effective_batch, allowed=allowed, members=members)
        return True
    except UserError:
        return False


SUGGEST_SPEEDUP = 1.25  # say so when the card could train this much faster


def suggest_budget(cfg, device, resolution: int) -> str | None:
    """One line when this card could train cfg's effective batch markedly faster: what `--vram-budget` (the whole
    card) would pick and the estimated speed-up; None otherwise, or where the planner cannot express cfg."""
    import torch
    try:
        allowed = _allowed_here(cfg, device)
    except UserError:
        return None
    weights = allowed.base_weights[0] if cfg.base_weights == "auto" else cfg.base_weights
    known = allowed.base_weights + (("int8",) if "nf4" in allowed.base_weights else ())  # int8: never planned, but run
    if cfg.compile not in allowed.compile or weights not in known or cfg.optimizer not in allowed.optimizer:
        return None
    current = Candidate(cfg.gradient_checkpointing, weights, cfg.optimizer, cfg.compile, cfg.batch_size, cfg.grad_accum)
    now = estimate(current, resolution, graphs=allowed.cuda_graphs).images_per_s
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        best = plan(total, resolution, cfg.batch_size * cfg.grad_accum, allowed=allowed, max_steps=cfg.max_steps)
    except UserError:
        return None
    speedup = best.estimate.images_per_s / now
    if speedup < SUGGEST_SPEEDUP:
        return None
    return (f"note: this GPU could train faster: --vram-budget {total / GIB:.0f}GiB would pick {best.choice.describe(allowed.cuda_graphs)}, "
            f"~{best.estimate.images_per_s:.1f} img/s, an estimated {speedup:.1f}x this configuration's "
            f"~{now:.1f} img/s (same effective batch; peak ~{best.estimate.peak_gib:.1f} GiB)")
