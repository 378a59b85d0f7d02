"""The optimizer over the LoRA: every adapter tensor a view into one flat fp32 buffer, every gradient a view
into another, so clipping and the optimizer step touch one tensor (a handful of kernel launches) instead of
one per adapter tensor (1,120 for the reference LoRA: ~90 ms of launches per 8-bit AdamW step).

With learning-rate multipliers (LoRA+, --block-lr) the tensors are split into one such buffer per multiplier
(`FlatGroups`), each its own optimizer param group. The EMA of the weights (`EMA`) is one tensor per buffer.

Each tensor starts at a multiple of BLOCK elements (zero padding between): bitsandbytes' 8-bit optimizers
quantize their states in blocks of 256 within a tensor, so over the flat buffer every block still holds one
tensor's elements, and the update equals the per-tensor one element for element (tests/test_optim.py).
"""
from __future__ import annotations

import contextlib
import re

import torch

from stages.errors import UserError

BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state: one absmax per 256 elements


def flat_layout(params: list[torch.Tensor]) -> tuple[list[int], int]:
    """Each tensor's offset in a flat buffer (starting at multiples of BLOCK), and the buffer's size."""
    offsets, size = [], 0
    for p in params:
        offsets.append(size)
        size += -(-p.numel() // BLOCK) * BLOCK
    return offsets, size


class FlatParams:
    """`params` (fp32, one device) re-homed as views into `self.param` (one nn.Parameter) and their gradients
    as views into `self.param.grad`. Autograd then accumulates straight into the flat gradient (in place), so
    zero it with `zero_grad()`, never by setting `.grad` to None."""

    def __init__(self, params: list[torch.nn.Parameter], buffers: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`buffers`: (values, gradients) of flat_layout(params)'s size to live in (a sweep's rows of one buffer)."""
        self.params = list(params)
        device = self.params[0].device
        self.offsets, size = flat_layout(self.params)
        if buffers is None:
            flat = torch.zeros(size, dtype=torch.float32, device=device)
            buffers = flat, torch.zeros_like(flat)
        flat, grad = buffers
        if flat.numel() != size:
            raise ValueError(f"FlatParams: buffers of {flat.numel()} elements for a layout of {size}")
        for p, offset in zip(self.params, self.offsets):
            if p.dtype != torch.float32 or p.device != device:
                raise ValueError(f"FlatParams needs fp32 parameters on one device, got {p.dtype} on {p.device}")
            n = p.numel()
            flat[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = flat[offset:offset + n].view_as(p)
            p.grad = grad[offset:offset + n].view_as(p)
        self.param = torch.nn.Parameter(flat)
        self.param.grad = grad

    def zero_grad(self) -> None:
        self.param.grad.zero_()

    def check_views(self) -> None:
        """Raise if something replaced a parameter's or gradient's storage (e.g. a load that assigned)."""
        base, grad = self.param.data_ptr(), self.param.grad.data_ptr()
        for p, offset in zip(self.params, self.offsets):
            if p.data_ptr() != base + 4 * offset or p.grad is None or p.grad.data_ptr() != grad + 4 * offset:
                raise RuntimeError("a LoRA parameter no longer lives in the flat buffer")


class FlatGroups:
    """The LoRA's tensors in learning-rate groups: group i is one FlatParams, trained at lr × scales[i]."""

    def __init__(self, groups: list[list[torch.nn.Parameter]], scales: list[float],
                 buffers: tuple[torch.Tensor, torch.Tensor] | None = None):  # buffers: one group's (FlatParams)
        if buffers is not None and len(groups) != 1:
            raise ValueError("FlatGroups: buffers are for one learning-rate group")
        self.flats, self.scales = [FlatParams(g, buffers) for g in groups], list(scales)

    @property
    def params(self) -> list[torch.nn.Parameter]:  # every LoRA tensor (views), group by group
        return [p for f in self.flats for p in f.params]

    @property
    def flat_params(self) -> list[torch.nn.Parameter]:  # one flat tensor per group
        return [f.param for f in self.flats]

    def zero_grad(self) -> None:
        for f in self.flats:
            f.zero_grad()

    def check_views(self) -> None:
        for f in self.flats:
            f.check_views()


def lr_groups(named: list[tuple[str, torch.nn.Parameter]], block_lr: dict[str, float],
              loraplus_ratio: float | None) -> tuple[list[list[torch.nn.Parameter]], list[float]]:
    """Split the LoRA's (name, parameter) pairs by learning-rate multiplier: the first --block-lr pattern that
    matches whole dot-separated parts of the name, times --loraplus-lr-ratio for a LoRA B (up) matrix (LoRA+:
    Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024; kohya's and LyCORIS's
    `loraplus_lr_ratio` on lora_up). Groups in order of first appearance; without either option one group."""
    matchers = {key: re.compile(rf"(^|\.)({key})(\.|$)") for key in block_lr}
    used, groups = set(), {}
    for name, param in named:
        key = next((k for k, m in matchers.items() if m.search(name)), None)
        used.add(key)
        scale = (block_lr[key] if key is not None else 1.0) * (loraplus_ratio if loraplus_ratio and ".lora_B." in name else 1.0)
        groups.setdefault(scale, []).append(param)
    unused = [k for k in block_lr if k not in used]
    if unused:
        raise UserError(f"--block-lr {unused[0]}: matches no adapted module (patterns match whole parts of a module "
                        "path, e.g. down_blocks.1, mid_block, up_blocks.0.attentions.1, attn2)")
    return list(groups.values()), list(groups.keys())


def make_optimizer(name: str, flat: FlatGroups, lr: float, weight_decay: float, device: torch.device, log,
                   warmup_steps: int = 0):
    """(optimizer, resolved name) over the flat groups, group i at lr × flat.scales[i]: bitsandbytes 8-bit AdamW
    on CUDA, else torch's AdamW (fused on CUDA); Prodigy (prodigyopt); transformers' Adafactor with relative
    step, parameter scaling and warmup init off, over the per-tensor views (it factors each 2-D tensor's second
    moment and clips each tensor's update RMS, which a flat buffer would merge); schedulefree's
    AdamWScheduleFree, which warms up itself and is left in train mode (see `optimizer_mode`)."""
    groups = [{"params": [p], "lr": lr * s} for p, s in zip(flat.flat_params, flat.scales)]
    if name == "prodigy":
        from prodigyopt import Prodigy
        return Prodigy(groups, lr=lr, weight_decay=weight_decay), name
    if name == "adafactor":
        from transformers.optimization import Adafactor
        per_tensor = [{"params": f.params, "lr": lr * s} for f, s in zip(flat.flats, flat.scales)]
        return Adafactor(per_tensor, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False), name
    if name == "adamw-schedulefree":
        from schedulefree import AdamWScheduleFree
        optimizer = AdamWScheduleFree(groups, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)
        optimizer.train()
        return optimizer, name
    if name == "adamw8bit":
        if device.type == "cuda":
            try:
                import bitsandbytes as bnb
                return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay), "adamw8bit"
            except Exception as e:
                log(f"note: bitsandbytes 8-bit AdamW is unavailable ({type(e).__name__}: {e}); using AdamW")
        else:
            log("note: 8-bit AdamW needs a CUDA GPU; using AdamW")
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **fused), "adamw"


def setup_optimizer(named: list[tuple[str, torch.nn.Parameter]], name: str, lr: float, weight_decay: float,
                    lr_scheduler: str, warmup_steps: int, max_steps: int, block_lr: dict[str, float],
                    loraplus_ratio: float | None, ema_decay: float | None, ema_device: torch.device,
                    device: torch.device, log, buffers: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(FlatGroups, optimizer, resolved optimizer name, lr scheduler, EMA or None) for the LoRA's named
    parameters: one flat buffer per learning-rate multiplier (`lr_groups`), diffusers' scheduler (constant for
    schedule-free, which warms up itself), the EMA of the flat buffers on `ema_device` with --ema-decay.
    `buffers`: where the one flat buffer lives (a sweep member's row of MixedBatch.buffers)."""
    from diffusers.optimization import get_scheduler
    flat = FlatGroups(*lr_groups(named, block_lr, loraplus_ratio), buffers)
    optimizer, resolved = make_optimizer(name, flat, lr, weight_decay, device, log, warmup_steps)
    free = resolved == "adamw-schedulefree"
    try:
        scheduler = get_scheduler("constant" if free else lr_scheduler, optimizer, num_training_steps=max_steps,
                                  num_warmup_steps=0 if free else warmup_steps)
    except (ValueError, KeyError) as e:
        raise UserError(f"--lr-scheduler {lr_scheduler}: {e}") from e
    ema = EMA(flat.flat_params, ema_decay, ema_device) if ema_decay else None
    return flat, optimizer, resolved, scheduler, ema


def optimizer_mode(optimizer, mode: str) -> None:
    """Schedule-free optimizers train on an interpolation y of their iterates and must be switched to their
    average x ("eval") before the weights are used or saved, and back ("train") before the next step
    (schedulefree's README); a no-op for every other optimizer."""
    if hasattr(optimizer, "train") and hasattr(optimizer, "eval"):
        getattr(optimizer, mode)()


def training_states(optimizer, lr_scheduler, scaler, ema: "EMA | None") -> dict:
    """What a checkpoint stores to resume exactly (schedule-free: save in eval mode, inside `weights_in_use`)."""
    return {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict(), **({"ema": ema.state_dict()} if ema is not None else {})}


def load_training_states(states: dict, optimizer, lr_scheduler, scaler, ema: "EMA | None") -> None:
    """Restore `training_states`; schedule-free is switched back to train mode, as the uninterrupted run does
    right after it saved."""
    optimizer.load_state_dict(states["optimizer"])
    optimizer_mode(optimizer, "train")
    lr_scheduler.load_state_dict(states["lr_scheduler"])
    if states["scaler"] and scaler.is_enabled():  # a bf16/fp32 resume of an fp16 run: no scaler to restore
        scaler.load_state_dict(states["scaler"])
    if (ema is None) != ("ema" not in states):
        raise UserError(f"--ema-decay: resume with the checkpoint's setting (it was trained with{'out' * (ema is not None)} "
                        "an EMA)")
    if ema is not None:
        ema.load_state_dict(states["ema"])


@contextlib.contextmanager
def weights_in_use(optimizer, ema: "EMA | None"):
    """Inside the block the weights to use and save: schedule-free's average x (eval mode) and the EMA if given;
    after it, training resumes (train mode, the raw weights)."""
    optimizer_mode(optimizer, "eval")
    try:
        with ema.applied() if ema is not None else contextlib.nullcontext():
            yield
    finally:
        optimizer_mode(optimizer, "train")


class EMA:
    """An exponential moving average of the flat LoRA buffers `tensors` (one per learning-rate group), kept on
    `device`. Decay at the n-th update: diffusers' EMAModel without its power warm-up (training_utils.py:
    `get_decay`, update_after_step 0): 0 at the first update (a copy), then min(decay, (1 + s)/(10 + s)) with
    s = n - 1, so an early EMA is not dominated by the initial weights."""

    def __init__(self, tensors: list[torch.Tensor], decay: float, device: torch.device):
        self.tensors, self.decay, self.updates = tensors, decay, 0
        self.shadow = [t.detach().to(device, copy=True) for t in tensors]

    def decay_at(self, n: int) -> float:
        s = n - 1
        return 0.0 if s <= 0 else min(self.decay, (1 + s) / (10 + s))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        weight = 1 - self.decay_at(self.updates)
        for e, t in zip(self.shadow, self.tensors):
            e.lerp_(t.to(e.device), weight)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self):
        """The EMA in place of the weights inside the block; the weights bit for bit after it."""
        saved = [t.detach().clone() for t in self.tensors]
        for t, e in zip(self.tensors, self.shadow):
            t.copy_(e)
        try:
            yield
        finally:
            for t, v in zip(self.tensors, saved):
                t.copy_(v)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        for e, v in zip(self.shadow, state["shadow"]):
            e.copy_(v)
