"""The flat LoRA buffers (stages/optim.py): views that stay views, gradients that accumulate in place, and an
optimizer over one flat tensor that equals the per-tensor one."""
from __future__ import annotations

import copy

import pytest
import torch

from stages.errors import UserError
from stages.optim import BLOCK, FlatParams

SHAPES = [(16, 320), (640, 16), (16, 2048), (1280, 16), (7, 5)]  # LoRA-like, plus one smaller than a block


def params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in SHAPES]


def grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def test_params_become_views_and_gradients_accumulate_into_the_flat_buffer():
    ps = params()
    values = [p.detach().clone() for p in ps]
    flat = FlatParams(ps)
    assert all(torch.equal(p, v) for p, v in zip(ps, values))
    assert all(o % BLOCK == 0 for o in flat.offsets)
    flat.check_views()
    # autograd accumulates into the pre-allocated views, so the flat gradient sees the sum of two backwards
    x = torch.randn(3, 320)
    for _ in range(2):
        (x @ ps[0].t()).sum().backward()
    assert torch.equal(flat.param.grad[:ps[0].numel()].view_as(ps[0]), 2 * x.sum(0).expand(16, 320))
    flat.check_views()
    flat.zero_grad()
    assert not flat.param.grad.any()
    flat.param.data.mul_(2)  # an update of the flat tensor is an update of every parameter
    assert all(torch.equal(p, 2 * v) for p, v in zip(ps, values))


def test_check_views_notices_a_replaced_parameter():
    ps = params()
    flat = FlatParams(ps)
    ps[1].data = ps[1].data.clone()
    with pytest.raises(RuntimeError, match="flat buffer"):
        flat.check_views()


def run(optimizer_cls, flat: bool, steps: int = 5, **kw) -> list[torch.Tensor]:
    ps = params()
    if flat:
        f = FlatParams(ps)
        opt = optimizer_cls([f.param], **kw)
    else:
        opt = optimizer_cls(ps, **kw)
    for step in range(steps):
        for p, g in zip(ps, grads(step)):
            if flat:
                p.grad.copy_(g)
            else:
                p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("impl", [{}, {"foreach": True}, {"fused": True}])
def test_adamw_over_the_flat_buffer_equals_per_tensor_adamw(impl):
    per_tensor = run(torch.optim.AdamW, False, lr=1e-2, weight_decay=1e-2, **impl)
    flat = run(torch.optim.AdamW, True, lr=1e-2, weight_decay=1e-2, **impl)
    assert all(torch.equal(a, b) for a, b in zip(per_tensor, flat))  # elementwise: bit for bit


def test_adamw8bit_over_the_flat_buffer_equals_per_tensor_adamw8bit():
    import bitsandbytes as bnb  # a dependency of the project: runs on the CPU too (its reference implementation)
    # bitsandbytes keeps 32-bit states for tensors under min_8bit_size (4,096) elements; the flat buffer is one
    # large tensor, so per-tensor equality holds with that threshold below the smallest tensor (true for the
    # reference LoRA at rank >= 7 with the default threshold: its smallest tensor has 16 x 640 elements)
    kw = dict(lr=1e-3, weight_decay=1e-2, min_8bit_size=1)
    per_tensor = run(bnb.optim.AdamW8bit, False, **kw)
    flat = run(bnb.optim.AdamW8bit, True, **kw)
    assert max((a - b).abs().max().item() for a, b in zip(per_tensor, flat)) <= 1e-6
    moved = max((a - b).abs().max().item() for a, b in zip(per_tensor, params()))
    assert moved > 1e-3  # the steps did something


def test_clipping_the_flat_gradient_equals_clipping_the_list():
    ps = params()
    reference = copy.deepcopy(ps)
    flat = FlatParams(ps)
    for p, r, g in zip(ps, reference, grads(0)):
        p.grad.copy_(g)
        r.grad = g.clone()
    norm_list = torch.nn.utils.clip_grad_norm_(reference, 0.5)
    norm_flat = torch.nn.utils.clip_grad_norm_([flat.param], 0.5)
    assert abs(norm_list.item() - norm_flat.item()) <= 1e-5 * norm_list.item()
    assert max((p.grad - r.grad).abs().max().item() for p, r in zip(ps, reference)) <= 1e-7


def test_cuda_graphs_are_chosen_only_where_they_can_run():
    from stages.device import use_cuda_graphs
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    notes = []
    assert use_cuda_graphs("auto", "none", cpu, 1, notes.append) is False
    assert use_cuda_graphs("off", "none", cuda, 1, notes.append) is False
    assert use_cuda_graphs("auto", "regional-graphs", cuda, 1, notes.append) is False  # blocks are graphs already
    assert use_cuda_graphs("auto", "regional", cuda, 1, notes.append) is True
    assert use_cuda_graphs("on", "none", cuda, 2, notes.append) is False and "torchrun" in notes[-1]
    with pytest.raises(UserError, match="--cuda-graphs on needs a CUDA GPU"):
        use_cuda_graphs("on", "none", cpu, 1, notes.append)
    # a streamed UNet: auto trains eagerly and says how to capture it; on captures the block copies too
    assert use_cuda_graphs("auto", "none", cuda, 1, notes.append, streamed=True) is False and "--cuda-graphs on" in notes[-1]
    assert use_cuda_graphs("on", "none", cuda, 1, notes.append, streamed=True) is True
