"""`--stream-blocks N`: the frozen UNet's blocks live in (pinned) host memory and visit the device in turn.

    units      every ResnetBlock2D, BasicTransformerBlock, Downsample2D and Upsample2D (SDXL: 91 units, the largest
               ~95 M parameters); the rest (conv_in/out, embeddings, proj_in/out, norms) and every trainable tensor
               (the LoRA) stay on the device
    forward    unit i's forward pre-hook makes it resident (waits for its copy) and starts copying the N-1 units
               after it in the last forward's order
    backward   a hook on unit i's output fires just before its backward (and before gradient checkpointing
               recomputes it): it makes unit i resident and prefetches the N-1 units before it, among those that
               backward reaches (the units whose output required a gradient)
    eviction   at most N units are resident; fetching one more first gives back the least recently wanted one's
               device memory. Nothing is ever copied back: the host copy is the truth (the weights are frozen)

A unit's device tensors keep their storage objects while their memory comes and goes (`untyped_storage().resize_`,
as FSDP2 frees and refills a parameter), so tensors that autograd saved in forward see the weights again once the
unit is resident for its backward, and bitsandbytes' int8 CB (the weight's storage) follows. Quantization
statistics that are not parameters or buffers (bitsandbytes' absmax, SCB: ~1% of the weights) stay on the device.

On CUDA the copies run on a side stream from pinned memory: memory is allocated on the compute stream (so freeing
it there is ordered after every kernel that read it), the side stream waits for that point, copies, and records an
event that the compute stream waits on before the unit runs. On a CPU "device" the same logic streams between two
host buffers (the tests). The order logic (StreamOrder, Residency) is pure Python.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from stages.config import parse_stream_blocks
from stages.errors import UserError

UNIT_TYPES = ("ResnetBlock2D", "BasicTransformerBlock", "Downsample2D", "Upsample2D")  # diffusers class names


def check_stream_blocks(value: str, world: int) -> int:
    """The number of resident units for `value` (auto: off; the planner resolves auto before this), refusing what
    cannot stream, before anything loads."""
    blocks = parse_stream_blocks(value) or 0
    if blocks and world > 1:
        raise UserError(f"--stream-blocks {value}: not under torchrun yet (DDP syncs the frozen weights at start); "
                        "use one process or --stream-blocks off")
    return blocks


def stream_units(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's streamed units in registration order: (module path, module)."""
    return [(name, m) for name, m in unet.named_modules() if type(m).__name__ in UNIT_TYPES]


# ------------------------------------------------------------------------------------------ the order (pure)
class StreamOrder:
    """Which units should be resident when unit `u` is about to run: `u` and the next `capacity - 1` in the order of
    the current phase. Forward: the order of the last forward (none in the first: each unit is fetched as it starts);
    backward: the reverse of the units whose output required a gradient in the last forward."""

    def __init__(self, capacity: int):
        self.capacity, self.forward_order, self.backward_order = capacity, [], []
        self.phase, self._seen, self._grad = "backward", [], []

    def begin_forward(self) -> None:
        self.phase, self._seen, self._grad = "forward", [], []

    def end_forward(self) -> None:
        self.phase = "backward"
        if self._seen:
            self.forward_order = self._seen
        self.backward_order = self._grad[::-1]

    def entering(self, unit: str) -> list[str]:
        """A unit's forward (or, in backward, its recomputation) starts: the window to make resident."""
        if self.phase == "forward":
            self._seen.append(unit)
            return self._window(self.forward_order, unit)
        return self._window(self.backward_order, unit)

    def output_requires_grad(self, unit: str) -> None:
        if self.phase == "forward":
            self._grad.append(unit)

    def backward(self, unit: str) -> list[str]:
        """A unit's backward starts."""
        return self._window(self.backward_order, unit)

    def _window(self, order: list[str], unit: str) -> list[str]:
        if unit not in order:
            return [unit]
        i = order.index(unit)
        return order[i:i + self.capacity]


class Residency:
    """At most `capacity` resident units; `want(window)` says what to evict (least recently wanted first, never one
    in the window) and what to fetch (window order: the unit about to run first)."""

    def __init__(self, capacity: int):
        self.capacity, self.resident = capacity, []  # least recently wanted first

    def clear(self) -> list[str]:
        """Forget every resident unit; returns them (to evict)."""
        resident, self.resident = self.resident, []
        return resident

    def want(self, window: list[str]) -> tuple[list[str], list[str]]:
        fetch = [u for u in window if u not in self.resident]
        others = [u for u in self.resident if u not in window]
        evict = others[:max(0, len(others) + len(window) - self.capacity)]
        self.resident = others[len(evict):] + window
        return evict, fetch


# ------------------------------------------------------------------------------------------ the copies
@dataclass
class Unit:
    name: str
    storages: list[torch.UntypedStorage]  # on the device; 0 bytes while not resident
    hosts: list[torch.Tensor]  # uint8 copies of the storages' bytes in (pinned) host memory
    ready: torch.cuda.Event | None = None  # recorded on the side stream after the copy in
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = sum(h.numel() for h in self.hosts)


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class BlockStreamer:
    """Streams the frozen tensors of `stream_units(unet)` onto `device`, `capacity` units resident at most. Call before
    `unet.to(device)`: it moves each unit's frozen tensors to host memory (a unit still on the CPU reaches the
    device one tensor's memory at a time, freed at once); `unet.to(device)` then moves the rest. `bytes_in` counts host -> device bytes."""

    def __init__(self, unet: nn.Module, capacity: int, device: torch.device):
        self.device, self.bytes_in = device, 0
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.units = {name: self._offload(name, module) for name, module in stream_units(unet)}
        self.order, self.residency = StreamOrder(capacity), Residency(capacity)
        unet.register_forward_pre_hook(lambda *_: self.order.begin_forward())
        unet.register_forward_hook(lambda *_: self.order.end_forward())
        for name, module in stream_units(unet):
            module.register_forward_pre_hook(functools.partial(self._before_forward, name))
            module.register_forward_hook(functools.partial(self._after_forward, name))

    def _offload(self, name: str, module: nn.Module) -> Unit:
        storages, hosts, seen = [], [], set()
        for t in itertools.chain(module.parameters(), module.buffers()):
            storage = t.untyped_storage()
            if t.requires_grad or storage._cdata in seen:
                continue
            seen.add(storage._cdata)
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=self.cuda)
            host.copy_(_bytes(storage))
            if t.device != self.device or not storage.resizable():  # on the host, or memory-mapped from a file:
                # a device twin of its own (one tensor's memory, for a moment)
                twin = torch.UntypedStorage(storage.nbytes(), device=self.device)
                t.data = torch.empty(0, dtype=t.dtype, device=self.device).set_(twin, t.storage_offset(), t.shape,
                                                                                 t.stride())
                storage = t.untyped_storage()
            storage.resize_(0)
            storages.append(storage)
            hosts.append(host)
        return Unit(name, storages, hosts)

    # ---- hooks
    def _before_forward(self, name: str, module, args) -> None:
        self._make_resident(self.order.entering(name))

    def _after_forward(self, name: str, module, args, output) -> None:
        if self.order.phase != "forward" or not torch.is_grad_enabled():
            return
        tensors = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        if tensors:
            self.order.output_requires_grad(name)
        for t in tensors:
            t.register_hook(functools.partial(self._before_backward, name))

    def _before_backward(self, name: str, grad) -> None:
        self._make_resident(self.order.backward(name))

    # ---- copies
    def _make_resident(self, window: list[str]) -> None:
        """Evict, then start the copies of the window's missing units; wait for the first (about to run)."""
        evict, fetch = self.residency.want(window)
        for name in evict:
            self._evict(self.units[name])
        for name in fetch:
            self._fetch(self.units[name])
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.units[window[0]].ready)

    def _fetch(self, unit: Unit) -> None:
        for storage, host in zip(unit.storages, unit.hosts):
            storage.resize_(host.numel())  # allocated on the compute stream
        self.bytes_in += unit.nbytes
        if not self.cuda:
            for storage, host in zip(unit.storages, unit.hosts):
                _bytes(storage).copy_(host)
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            for storage, host in zip(unit.storages, unit.hosts):
                _bytes(storage).copy_(host, non_blocking=True)
            unit.ready = torch.cuda.Event()
            unit.ready.record(self.side)

    def evict_all(self) -> int:
        """Give every resident unit's device memory back (the next forward fetches from scratch): around a CUDA
        graph's capture, so that the graph copies in every unit it uses and leaves none behind. Returns how many."""
        resident = self.residency.clear()
        for name in resident:
            self._evict(self.units[name])
        return len(resident)

    def forget(self) -> None:
        """After a failed CUDA graph capture: units "fetched" there hold memory no copy ever reached and events of the
        aborted capture; drop them all without waiting (the caller synchronized), every unit, whatever the residency
        list says (an eviction the capture broke off may have emptied it first)."""
        self.residency.clear()
        for unit in self.units.values():
            unit.ready = None
            for storage in unit.storages:
                if storage.nbytes():
                    storage.resize_(0)

    def _evict(self, unit: Unit) -> None:
        if self.cuda:  # a prefetched unit that never ran: its copy must be done before the memory is reused
            torch.cuda.current_stream(self.device).wait_event(unit.ready)
        for storage in unit.storages:
            storage.resize_(0)


def attach_streaming(unet: nn.Module, blocks: int, device: torch.device, log) -> BlockStreamer | None:
    """--stream-blocks N (N >= 1): stream the frozen UNet's units, N resident; call before unet.to(device)."""
    if not blocks:
        return None
    streamer = BlockStreamer(unet, blocks, device)
    streamed = sum(u.nbytes for u in streamer.units.values())
    largest = sorted((u.nbytes for u in streamer.units.values()), reverse=True)[:blocks]
    log(f"streaming {len(streamer.units)} UNet blocks ({streamed / 2**30:.2f} GiB) from host memory, {blocks} resident "
        f"(at most {sum(largest) / 2**30:.2f} GiB)")
    unet.block_streamer = streamer
    return streamer


def streamed_bytes(unet: nn.Module) -> int:
    """Host -> device bytes copied so far by the UNet's BlockStreamer (0 if not streamed)."""
    streamer = getattr(unet, "block_streamer", None)
    return streamer.bytes_in if streamer else 0
