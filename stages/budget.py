"""The memory promise of a run: `--vram-budget` planned (stages/plan.py), then measured. MemoryWatch resets and reads
the device's peaks for the metrics rows and, under a budget, checks the first steps and every validation: an out of
memory error there, or a peak reserved by PyTorch plus the memory outside its allocator over the budget, stops the
run with one line naming a configuration that fits, instead of running on (where a driver would spill into shared
host memory, 50-100x slower, without an error)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from stages.errors import UserError
from stages.plan import fit_vram_budget, suggest_budget

GIB = 2**30
WATCHED_STEPS = 3  # the first optimizer steps measured against the budget (later ones repeat their shapes)


class MemoryWatch:
    """read(): (peak allocated, peak reserved) bytes since the last reset; `refit(scale)` names a configuration that
    fits if every estimate were `scale` times larger; `planned` is the plan's need (peak with its margin), bytes."""

    def __init__(self, device: torch.device, budget: int | None = None, outside: int = 0, planned: int = 0,
                 refit: Callable[[float], str] | None = None, read: Callable[[], tuple[int, int]] | None = None):
        self.device, self.budget, self.outside, self.planned, self.refit = device, budget, outside, planned, refit
        cuda = device.type == "cuda"
        self.read = read or ((lambda: (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)))
                             if cuda else None)
        self.peak_gib: float | None = None

    def start(self) -> None:
        self.peak_gib = None  # each pass (a sweep's round) reports its own peak
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> dict:
        """The metrics row's peak_gib (allocated) and peak_reserved_gib; {} off CUDA."""
        if self.read is None:
            return {}
        allocated, reserved = self.read()
        self.peak_gib = max(self.peak_gib or 0.0, round(allocated / GIB, 3))
        return {"peak_gib": round(allocated / GIB, 3), "peak_reserved_gib": round(reserved / GIB, 3)}

    def check(self, row: dict, step: int) -> None:
        """Stop when a watched step's (or a validation's) reserved peak + outside memory is over the budget."""
        if self.budget is None or not (step <= WATCHED_STEPS or "validation_reserved_gib" in row):
            return
        reserved = max(row.get("peak_reserved_gib", 0), row.get("validation_reserved_gib", 0)) * GIB
        if reserved + self.outside > self.budget:
            self._stop(step, f"measured {(reserved + self.outside) / GIB:.2f} GiB ({reserved / GIB:.2f} GiB reserved "
                             f"by PyTorch + {self.outside / GIB:.2f} GiB outside it)", reserved + self.outside)

    @contextlib.contextmanager
    def guard(self, step: int):
        """Around a watched step: out of GPU memory under the budget becomes the stop with a configuration that fits."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            if self.budget is None or step > WATCHED_STEPS:
                raise
            self._stop(step, "out of memory within the cap", 1.25 * self.budget)

    def _stop(self, step: int, what: str, measured: float) -> None:
        scale = max(1.1, measured / max(self.planned, 1))
        raise UserError(f"stopped at step {step}: {what} is over --vram-budget {self.budget / GIB:.2f} GiB (planned "
                        f"{self.planned / GIB:.2f} GiB); a configuration that fits, with the estimates scaled by the "
                        f"overrun ({scale:.2f}x): {self.refit(scale) if self.refit else 'a smaller --batch-size'}")


def watch_memory(cfg, device: torch.device, resolution: int, log, members: int = 1):
    """--vram-budget: the planned copy of the TrainConfig `cfg`, a watch that keeps it to the budget, and how many of
    a sweep's `members` train together (as many as fit: the sweep runs in rounds); otherwise `cfg`, a watch that only
    reads peaks (with one line when this card could train markedly faster) and all the members."""
    if cfg.vram_budget:
        cfg, budget, outside, planned, refit, together = fit_vram_budget(cfg, device, resolution, log, members)
        return cfg, MemoryWatch(device, budget, outside, planned, refit), together
    if device.type == "cuda" and (note := suggest_budget(cfg, device, resolution)):
        log(note)
    return cfg, MemoryWatch(device), members
