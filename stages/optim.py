"""The optimizer over the LoRA: every adapter tensor a view into one flat fp32 buffer, every gradient a view
into another, so clipping and the optimizer step touch one tensor (a handful of kernel launches) instead of
one per adapter tensor (1,120 for the reference LoRA: ~90 ms of launches per 8-bit AdamW step).

Each tensor starts at a multiple of BLOCK elements (zero padding between): bitsandbytes' 8-bit optimizers
quantize their states in blocks of 256 within a tensor, so over the flat buffer every block still holds one
tensor's elements, and the update equals the per-tensor one element for element (tests/test_optim.py).
"""
from __future__ import annotations

import torch

BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state: one absmax per 256 elements


class FlatParams:
    """`params` (fp32, one device) re-homed as views into `self.param` (one nn.Parameter) and their gradients
    as views into `self.param.grad`. Autograd then accumulates straight into the flat gradient (in place), so
    zero it with `zero_grad()`, never by setting `.grad` to None."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = list(params)
        device = self.params[0].device
        sizes = [-(-p.numel() // BLOCK) * BLOCK for p in self.params]
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        grad = torch.zeros_like(flat)
        self.offsets, offset = [], 0
        for p, size in zip(self.params, sizes):
            if p.dtype != torch.float32 or p.device != device:
                raise ValueError(f"FlatParams needs fp32 parameters on one device, got {p.dtype} on {p.device}")
            n = p.numel()
            flat[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = flat[offset:offset + n].view_as(p)
            p.grad = grad[offset:offset + n].view_as(p)
            self.offsets.append(offset)
            offset += size
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


def make_optimizer(name: str, param: torch.nn.Parameter, lr: float, weight_decay: float, device: torch.device, log):
    """(optimizer, resolved name): bitsandbytes 8-bit AdamW on CUDA, else torch's AdamW (fused on CUDA)."""
    if name == "adamw8bit":
        if device.type == "cuda":
            try:
                import bitsandbytes as bnb
                return bnb.optim.AdamW8bit([param], lr=lr, weight_decay=weight_decay), "adamw8bit"
            except Exception as e:
                log(f"note: bitsandbytes 8-bit AdamW is unavailable ({type(e).__name__}: {e}); using AdamW")
        else:
            log("note: 8-bit AdamW needs a CUDA GPU; using AdamW")
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay, **fused), "adamw"
