"""Several processes under torchrun: PyTorch's own engine (torch.distributed, DistributedDataParallel).

    torchrun --nproc-per-node N pipeline.py train|encode ...

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); `setup` joins the
process group: NCCL with one GPU per process (cuda:LOCAL_RANK), gloo on CPU. Without torchrun, or with
a world of one, nothing is initialized and every helper here is a no-op, so single-process runs are
unchanged.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group if there is one; returns this process's device (cuda:LOCAL_RANK)."""
    if env_world_size() <= 1 or not dist.is_available():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            from stages.errors import UserError
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA GPU(s) are visible: "
                            "use --nproc-per-node no larger than the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast (NVLS) off, as the GPU hosts require
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        atexit.register(_teardown)
    return device


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks (the value itself in a single process)."""
    if not active():
        return value
    value = value.detach().float().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def on_main(fn, *args, **kwargs):
    """Run fn on rank 0 only and return its result there (None elsewhere); an exception on rank 0 is raised
    on every rank, so that no rank waits forever at a later collective for one that has stopped."""
    if not active():
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            error = e
    box = [None if error is None else (type(error).__name__, str(error), _is_user_error(error))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        name, message, user = box[0]
        from stages.errors import UserError
        raise UserError(message) if user else RuntimeError(f"rank 0 failed: {name}: {message}")
    return result


def _is_user_error(e: Exception) -> bool:
    from cache.format import CacheError
    from stages.errors import UserError
    return isinstance(e, (UserError, CacheError))


class _DDP(DistributedDataParallel):
    """DistributedDataParallel that also answers the wrapped model's attributes (`unet.dtype`, `.config`)."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def wrap(unet: torch.nn.Module, device: torch.device) -> DistributedDataParallel | None:
    """DDP over the trainable (LoRA) parameters only; None in a single process.

    The frozen base is left out of DDP entirely (no broadcast, no buckets); every rank loads the same
    weights and initializes the LoRA from the same seed, and DDP broadcasts rank 0's LoRA once anyway.
    Every LoRA parameter is used in every forward, so find_unused_parameters stays off; gradient
    checkpointing (diffusers: non-reentrant torch.utils.checkpoint) needs no static_graph.
    """
    if not active():
        return None
    frozen = [name for name, p in unet.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in unet.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(unet, frozen)
    ids = [device.index] if device.type == "cuda" else None
    return _DDP(unet, device_ids=ids, output_device=ids[0] if ids else None, broadcast_buffers=False,
                find_unused_parameters=False)


def sum_across_ranks(value: int) -> int:
    """The sum of an integer over all ranks (the value itself in a single process)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())
