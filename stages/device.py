"""One process's device: which device, which precision, which attention kernel, compilation, the
memory cap. (Several processes under torchrun: stages/distributed.py.)"""
from __future__ import annotations

import gc

import torch

from stages.config import parse_size
from stages.errors import UserError

GIB = 2**30


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(device)


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


def check_device_options(attention: str, compile: str, device: torch.device) -> None:
    """Refuse, before anything loads, --attention xformers and --compile off CUDA."""
    check_attention(attention, device)
    check_compile(compile, device)


def check_attention(attention: str, device: torch.device) -> None:
    """Refuse --attention xformers off CUDA before anything loads."""
    if attention == "xformers" and device.type != "cuda":
        raise UserError("--attention xformers needs a CUDA GPU")


def enable_attention(unet, attention: str, device: torch.device, log) -> str:
    """SDPA (diffusers' default) or xformers when it really works here (checked with a real call)."""
    check_attention(attention, device)
    if attention == "sdpa" or device.type != "cuda":
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


def enable_checkpointing(unet) -> None:
    """Gradient checkpointing that a CUDA graph can capture: non-reentrant, and without saving RNG state (the
    UNet draws no random numbers)."""
    import functools
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=functools.partial(
        torch.utils.checkpoint.checkpoint, use_reentrant=False, preserve_rng_state=False))


def check_compile(mode: str, device: torch.device) -> None:
    if mode != "none" and device.type != "cuda":
        raise UserError(f"--compile {mode} needs a CUDA GPU")


def apply_compile(unet, mode: str, device: torch.device) -> None:
    """--compile: regional compilation of the repeated transformer blocks (lazy: it happens in the first step);
    regional-graphs adds mode reduce-overhead, which replays each compiled block as a CUDA graph."""
    check_compile(mode, device)
    if mode == "none":
        return
    # fullgraph=True hit the recompile limit with checkpointing
    unet.compile_repeated_blocks(**({"mode": "reduce-overhead"} if mode == "regional-graphs" else {}))


def cap_gpu_memory(device: torch.device, budget: str, log) -> tuple[int, int]:
    """Cap this process's CUDA allocator so that it and the memory outside it fit `budget` (e.g. "12GiB", or auto:
    the card's free memory now plus what this process's allocator holds). Returns (budget, outside) in bytes:
    outside = the card's memory in use that the allocator does not hold (this process's CUDA context, other
    processes), counted against a size; 0 for auto (free memory excludes it already)."""
    if device.type != "cuda":
        raise UserError("--vram-budget needs a CUDA GPU")
    free, total = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_reserved(device)
    budget_bytes, outside = (free + held, 0) if budget == "auto" else (parse_size(budget), total - free - held)
    if budget_bytes <= outside:
        raise UserError(f"--vram-budget {budget}: {outside / GIB:.2f} GiB of this GPU is in use outside PyTorch's "
                        "allocator (CUDA context, other processes): nothing is left")
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (budget_bytes - outside) / total), index)
    log(f"GPU memory capped at {budget_bytes / GIB:.2f} GiB of {total / GIB:.1f} GiB"
        + (" (auto: free memory)" if budget == "auto" else f", {outside / GIB:.2f} GiB of it outside PyTorch's allocator"))
    return budget_bytes, outside


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def use_cuda_graphs(mode: str, compile: str, device: torch.device, world: int, log, streamed: bool = False) -> bool:
    """--cuda-graphs auto: on for a single CUDA process unless the blocks are graphs already (regional-graphs) or
    the frozen UNet is streamed (eager, with a note: `on` captures a streamed step, not yet planned by --vram-budget)."""
    if mode == "off" or (mode == "auto" and (device.type != "cuda" or compile == "regional-graphs")):
        return False
    if streamed and mode == "auto":
        log("note: --stream-blocks trains eagerly; --cuda-graphs on captures the block copies in the step's CUDA graph "
            "(5-13x faster on an H200 at +0.3-0.5 GiB reserved; not planned by --vram-budget yet)")
        return False
    if device.type != "cuda":
        raise UserError("--cuda-graphs on needs a CUDA GPU")
    if world > 1:
        log("note: CUDA graphs are not used under torchrun yet (DDP's all-reduce runs outside a graph); training eagerly")
        return False
    return True


class CudaGraphs:
    """Run `fn(inputs)` (one micro-batch's forward + backward, accumulating into pre-allocated gradients and
    loss buffers) as a CUDA graph: captured the first time each input shape is seen, replayed after that
    with the inputs copied into the graph's static buffers. All graphs share one memory pool. `inputs` maps
    each adapter's name to its tensors by name (a sweep's members: one graph runs them all).

    With a `streamer` (--stream-blocks), the graph holds the block copies too: every unit is evicted before the
    capture and at its end, so the graph copies in each unit it uses, from the same pinned host memory, into
    memory of its pool; each replay adds the captured bytes to the streamer's count.

    `state` lists the tensors `fn` accumulates into (gradients, loss sum): capture warms up by running `fn`
    for real, so their values are saved first (to host memory) and restored after. Where capture fails (an operation that
    syncs with the host or allocates outside the pool), every later call runs `fn` eagerly, and `log` says
    why once."""

    WARMUP = 3  # eager runs on a side stream before capture (cuBLAS / autotuning / lazy init settle)

    def __init__(self, fn, state: list[torch.Tensor], log, streamer=None):
        self.fn, self.state, self.log, self.streamer = fn, state, log, streamer
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, dict]]] = {}
        self.h2d: dict[tuple, int] = {}  # bytes a replay copies in (a streamed UNet)
        self.pool, self.side = None, None
        self.failed: str | None = None

    def __call__(self, inputs: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.failed:
            return self.fn(inputs)
        key = tuple((k, tuple(v.shape), v.dtype, adapter) for adapter, x in inputs.items() for k, v in x.items())
        if key not in self.graphs and not self._capture(key, inputs):
            return self.fn(inputs)
        graph, static = self.graphs[key]
        for adapter, x in inputs.items():
            for name, value in x.items():
                static[adapter][name].copy_(value, non_blocking=True)
        if self.streamer:
            if self.streamer.evict_all():  # units an eager pass (validation) left resident: the graph has its own
                torch.cuda.empty_cache()
            self.streamer.bytes_in += self.h2d[key]
        graph.replay()

    def release(self) -> bool:
        """Drop every captured graph and give their memory pool back to the device (validation that does not fit
        beside it); each shape is captured again when next seen. False if there was nothing to release."""
        if not self.graphs:
            return False
        self.graphs, self.pool = {}, None
        gc.collect()  # a failed attempt's tensors that a reference cycle (its traceback's frames) still holds
        torch.cuda.empty_cache()
        return True

    def _evict_blocks(self) -> int:
        """Evict every streamed block (a streamed UNet); returns the bytes copied in so far."""
        if self.streamer:
            self.streamer.evict_all()
        return self.streamer.bytes_in if self.streamer else 0

    def _capture(self, key: tuple, inputs: dict[str, dict[str, torch.Tensor]]) -> bool:
        static = {adapter: {k: v.clone() for k, v in x.items()} for adapter, x in inputs.items()}
        saved = [t.to("cpu", copy=True) for t in self.state]  # on the host: a GPU copy would add to the peak
        before = None  # bytes copied in before the capture (a streamed UNet)
        try:
            side = self.side = self.side or torch.cuda.Stream()  # one: each stream keeps its own cuBLAS workspace
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    self.fn(static)
            torch.cuda.current_stream().wait_stream(side)
            graph, before = torch.cuda.CUDAGraph(), self._evict_blocks()
            with torch.cuda.graph(graph, pool=self.pool):
                self.fn(static)
                self._evict_blocks()  # inside: the copies' stream joins the capture again
            if self.streamer:  # the capture copied nothing (its fetches are the graph's): each replay counts them
                self.h2d[key], self.streamer.bytes_in = self.streamer.bytes_in - before, before
        except Exception as e:  # noqa: BLE001 (any failure to capture means: run eagerly)
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            self.log(f"note: CUDA graph capture failed ({self.failed}); training continues eagerly "
                     "(--cuda-graphs off skips the attempt)")
            torch.cuda.synchronize()
            if self.streamer:
                self.streamer.forget()  # the blocks the capture "fetched" never received their copies
                if before is not None:  # nor were they copied: not counted
                    self.streamer.bytes_in = before
            self.release()  # graphs captured before are never replayed now: their pool back for the eager steps
            return False
        finally:
            for t, value in zip(self.state, saved):
                t.copy_(value)
        self.pool = self.pool or graph.pool()
        self.graphs[key] = (graph, static)
        return True
