"""streaming: the frozen UNet's blocks streamed from host memory (--stream-blocks) and the memory watch of
--vram-budget. On the CPU the "device" is a second host buffer: every block is resident when it runs, at most N are,
nothing is copied back, and the trained LoRA equals the unstreamed one."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from stages.budget import MemoryWatch
from stages.device import enable_checkpointing
from stages.errors import UserError
from stages.lora import LORA_WEIGHTS_NAME, attach_lora
from stages.plan import Candidate, Choices, estimate_peak_gib, needed_gib, plan
from stages.sdxl import tiny_unet_config
from stages.streaming import Residency, StreamOrder, attach_streaming, check_stream_blocks, stream_units
from stages.train import train
from tests.test_train import QUIET, train_config

GIB = 2**30


def test_order_prefetches_forward_then_backward_and_keeps_at_most_n():
    order, residency = StreamOrder(capacity=2), Residency(capacity=2)
    units = ["a", "b", "c", "d"]
    windows = []
    for _ in range(2):  # the first forward knows no order yet: each unit alone
        order.begin_forward()
        for u in units:
            windows.append(order.entering(u))
            if u != "a":  # a's output needs no gradient: backward never reaches it
                order.output_requires_grad(u)
        order.end_forward()
        for u in ["d", "c", "b"]:
            windows.append(order.backward(u))
            windows.append(order.entering(u))  # checkpointing recomputes it in backward
    assert windows[:4] == [["a"], ["b"], ["c"], ["d"]]
    assert windows[10:14] == [["a", "b"], ["b", "c"], ["c", "d"], ["d"]]
    assert windows[14:] == [["d", "c"], ["d", "c"], ["c", "b"], ["c", "b"], ["b"], ["b"]]
    fetched = []
    for w in windows:
        evict, fetch = residency.want(w)
        fetched += fetch
        assert set(w) <= set(residency.resident) and len(residency.resident) <= 2 and not set(evict) & set(w)
    # forward a-d; backward finds d, c resident and fetches b; the next forward and backward the same, nothing twice
    assert fetched == ["a", "b", "c", "d", "b", "a", "c", "d", "b"]


def _tiny_lora_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    attach_lora(unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"], "lora", {})
    for p in unet.parameters():
        if p.requires_grad:  # B is zero at init: give the LoRA an effect, so that its gradients mean something
            torch.nn.init.normal_(p, std=0.1)
    return unet.train()


def _grads(unet) -> dict[str, torch.Tensor]:
    cfg = unet.config
    g = torch.Generator().manual_seed(1)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    for _ in range(2):  # two forward + backward: the second prefetches in the recorded order
        out = unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
                   torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
                   added_cond_kwargs={"text_embeds": torch.randn(2, pooled, generator=g),
                                      "time_ids": torch.randn(2, 6, generator=g)}).sample
        out.square().mean().backward()
    return {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_streamed_blocks_are_resident_when_used_at_most_n_and_never_copied_back(checkpointing):
    plain = _tiny_lora_unet()
    streamed = copy.deepcopy(plain)
    if checkpointing:
        enable_checkpointing(plain)
        enable_checkpointing(streamed)
    expected = _grads(plain)
    streamer = attach_streaming(streamed, 3, torch.device("cpu"), lambda *a: None)
    hosts = {name: [h.clone() for h in unit.hosts] for name, unit in streamer.units.items()}
    copies, resident = [], set()
    fetch, evict = streamer._fetch, streamer._evict

    def recording_fetch(unit):  # the fake device: which unit came in, from where, and how many are in
        fetch(unit)
        copies.append((unit.name, all(h.device.type == "cpu" for h in unit.hosts)))
        resident.add(unit.name)
        assert len(resident) <= 3

    def recording_evict(unit):
        evict(unit)
        resident.discard(unit.name)
        assert all(s.nbytes() == 0 for s in unit.storages)
    streamer._fetch, streamer._evict = recording_fetch, recording_evict

    def present(name, module, args):  # runs after the streamer's pre-hook: the unit's weights are all there
        assert name in resident and all(s.nbytes() == h.numel() for s, h in zip(streamer.units[name].storages,
                                                                                 streamer.units[name].hosts))
    for name, module in stream_units(streamed):
        module.register_forward_pre_hook(lambda m, a, name=name: present(name, m, a))
    got = _grads(streamed)

    assert len(streamer.units) == 38 and copies and all(from_host for _, from_host in copies)
    assert all(torch.equal(a, b) for name in hosts for a, b in zip(hosts[name], streamer.units[name].hosts))
    assert expected.keys() == got.keys() and max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
    # every block in forward, those that backward reaches again; the second pass prefetches, so no block twice per pass
    assert streamer.bytes_in <= 2 * 2 * sum(u.nbytes for u in streamer.units.values())
    streamer.evict_all()  # around a CUDA graph's capture: nothing resident, and the next pass fetches what it uses
    assert not resident and not streamer.residency.resident
    assert all(s.nbytes() == 0 for u in streamer.units.values() for s in u.storages)
    streamed.zero_grad(set_to_none=True)
    again = _grads(streamed)
    assert max((expected[k] - again[k]).abs().max().item() for k in expected) <= 1e-6
    for u in streamer.units.values():
        u.ready = object()  # as a CUDA copy's event would be
    streamer.forget()  # after a failed capture: nothing resident, no copy waited for
    assert not streamer.residency.resident and all(u.ready is None for u in streamer.units.values())
    assert all(s.nbytes() == 0 for u in streamer.units.values() for s in u.storages)


def test_a_streamed_run_trains_the_same_lora(tmp_path, fp32_cache):
    runs = {}
    for blocks in ("off", "2"):
        out = tmp_path / blocks
        train(train_config(fp32_cache, out, max_steps=2, rank=4, alpha=8.0, stream_blocks=blocks), **QUIET)
        runs[blocks] = load_file(str(out / LORA_WEIGHTS_NAME))
    a, b = runs["off"], runs["2"]
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_streaming_is_refused_under_torchrun():
    with pytest.raises(UserError, match="--stream-blocks 4: not under torchrun"):
        check_stream_blocks("4", world=2)
    assert check_stream_blocks("auto", world=2) == 0 and check_stream_blocks("off", world=1) == 0


def test_planner_streams_where_nothing_else_fits_and_counts_validation():
    allowed = Choices(stream_blocks=(0, 2, 8), cuda_graphs=True, validation=True)
    at_4 = plan(4 * GIB, 1024, 4, allowed=allowed)  # the target: 1024², validation, a 4 GiB card
    assert needed_gib(at_4.estimate.peak_gib) <= 4
    small = plan(int(2.5 * GIB), 1024, 4, allowed=allowed)
    assert small.choice.stream_blocks and needed_gib(small.estimate.peak_gib) <= 2.5
    nf4 = Candidate(True, "nf4", "adamw8bit", "none", 1, 4)
    assert estimate_peak_gib(Candidate(True, "nf4", "adamw8bit", "none", 1, 4, 2), 512) < estimate_peak_gib(nf4, 512) - 1
    assert estimate_peak_gib(nf4, 1024, validation=True) > estimate_peak_gib(nf4, 1024)


def test_memory_watch_stops_an_overrun_with_a_configuration_that_fits():
    peaks = [(3.0 * GIB, 3.4 * GIB)]
    scales = []
    watch = MemoryWatch(torch.device("cuda"), budget=4 * GIB, outside=int(0.5 * GIB), planned=int(3.5 * GIB),
                        refit=lambda scale: scales.append(scale) or "--base-weights nf4 --stream-blocks 2",
                        read=lambda: peaks[0])
    row = watch.peaks()
    assert row == {"peak_gib": 3.0, "peak_reserved_gib": 3.4} and watch.peak_gib == 3.0
    watch.check(row, step=1)  # 3.4 + 0.5 <= 4: runs on
    peaks[0] = (3.2 * GIB, 3.7 * GIB)
    with pytest.raises(UserError) as e:
        watch.check(watch.peaks(), step=2)
    message = str(e.value)
    assert message.startswith("stopped at step 2: measured 4.20 GiB (3.70 GiB reserved by PyTorch + 0.50 GiB outside it)")
    assert message.endswith("--base-weights nf4 --stream-blocks 2") and "\n" not in message
    assert scales == [pytest.approx(4.2 / 3.5, rel=1e-3)]
    watch.check({"peak_reserved_gib": 9.0}, step=4)  # past the watched steps, no validation: not checked again
    with pytest.raises(UserError, match="validation|stopped at step 5"):
        watch.check({"peak_reserved_gib": 1.0, "validation_reserved_gib": 3.9}, step=5)
    with pytest.raises(UserError, match="stopped at step 1: out of memory within the cap"):
        with watch.guard(1):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.cuda.OutOfMemoryError):  # unwatched: the usual out-of-memory message
        with MemoryWatch(torch.device("cpu")).guard(1):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")


def test_bench_row_reports_the_bytes_streamed_per_step(tiny_model):
    from stages.bench import bench
    from stages.config import BenchConfig
    row, = bench(BenchConfig(model=str(tiny_model), resolution=64, steps=1, warmup=1, device="cpu", stream_blocks="2"),
                 **QUIET)
    from stages.sdxl import ModelSource, load_unet
    unet = load_unet(ModelSource(str(tiny_model)))
    frozen = sum(p.nbytes for _, m in stream_units(unet) for p in m.parameters())  # no LoRA yet: all frozen
    # grad-accum 4 micro-batches, each every block in forward and (at most) again in backward
    assert row["stream_blocks"] == 2 and 4 * frozen / GIB <= row["h2d_gib_per_step"] + 1e-3 <= 8 * frozen / GIB + 2e-3
    assert row["cuda_graphs"] is False
