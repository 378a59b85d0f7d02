"""bench: the same training step as train, on a tiny config on CPU; FLOP counting; budgets."""
from __future__ import annotations

import pytest
import torch

from stages.bench import bench, unet_forward_flops
from stages.config import BenchConfig, parse_size
from stages.errors import UserError
from tests.test_train import QUIET


def test_bench_runs_the_training_step_with_and_without_baseline_and_as_a_sweep(tiny_model):
    logs = []
    rows = bench(BenchConfig(model=str(tiny_model), resolution=64, steps=1, warmup=1, baseline=True, device="cpu",
                             sweep=2), log=logs.append)
    assert [r["recipe"] for r in rows] == ["baseline: all FP32, encode every step", "cached inputs, UNet only",
                                           "sweep of 2 LoRAs, one pass"]
    for r in rows:
        assert r["images_per_s"] > 0 and r["unet_forward_tflop_per_image"] > 0
        assert r["trainable_parameters"] == 295_936  # what train prints for the same LoRA on this model
        assert r["last_loss"] > 0
        assert r["adapter_images_per_s"] == pytest.approx(r["adapters"] * r["images_per_s"], rel=1e-3)
    assert [r["adapters"] for r in rows] == [1, 1, 2]
    assert any(line.startswith("speed-up vs baseline") for line in logs)
    assert any(line.startswith("sweep of 2: ") and "adapter-images/s" in line for line in logs)
    assert sum(line.startswith("{") for line in logs) == 3  # one JSON line per run


def test_bench_renders_validation_as_train_does_after_the_timed_steps(tiny_model, monkeypatch):
    import stages.sample
    rendered = []
    real = stages.sample.render_embeddings
    monkeypatch.setattr(stages.sample, "render_embeddings", lambda *a: rendered.append(a[5:7]) or real(*a))
    logs = []
    row = bench(BenchConfig(model=str(tiny_model), resolution=64, steps=1, warmup=0, device="cpu", validate_steps=2),
                log=logs.append)[0]
    assert rendered == [(64, 2)] and row["validation_s"] > 0  # the cache's prompts at the bench resolution, 2 steps
    assert "validation_peak_gib" not in row and any(line.startswith("validation_s") for line in logs)  # CUDA only


def test_flop_count_is_linear_in_batch_and_grows_with_resolution(tiny_model):
    from stages.sdxl import ModelSource, load_unet
    unet = load_unet(ModelSource(str(tiny_model))).eval()

    def batch(b, side):
        return {"latent_mean": torch.randn(b, 4, side, side), "prompt_embeds": torch.randn(b, 77, 96),
                "pooled_prompt_embeds": torch.randn(b, 32), "time_ids": torch.zeros(b, 6)}
    one, two, big = (unet_forward_flops(unet, batch(b, s)) for b, s in ((1, 8), (2, 8), (1, 16)))
    assert two == 2 * one and one > 0
    # 4x the pixels: the spatial part grows >= 4x, the text/time embedding part not at all
    assert 2 * one < big < 16 * one


def test_parse_size_and_budget_errors(tiny_model):
    assert parse_size("16GiB") == 16 * 2**30 and parse_size("12000MB") == 12 * 10**9
    with pytest.raises(UserError, match="give a size"):
        parse_size("lots")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        bench(BenchConfig(model=str(tiny_model), vram_budget="8GiB", device="cpu"), **QUIET)


def test_bench_of_the_full_size_model_on_a_cpu_is_refused_at_once(monkeypatch):
    import stages.bench
    monkeypatch.setattr(stages.bench, "run_one", lambda *a, **k: pytest.fail("bench built a model"))
    with pytest.raises(UserError, match="random:sdxl builds the full-size SDXL UNet .* --model w/tiny-sdxl"):
        bench(BenchConfig(device="cpu"), **QUIET)


def test_bench_reports_the_base_weights_mode(tiny_model):
    rows = {mode: bench(BenchConfig(model=str(tiny_model), resolution=64, steps=1, warmup=0, base_weights=mode,
                                    device="cpu"), **QUIET)[0] for mode in ("auto", "fp8")}
    assert rows["auto"]["base_weights"] == "fp32" and rows["fp8"]["base_weights"] == "fp8"
    # Linear weights are most of the UNet: 4 bytes -> 1 byte each leaves well under 70% of the base
    assert 0 < rows["fp8"]["base_gib"] < 0.7 * rows["auto"]["base_gib"]
    assert rows["fp8"]["trainable_parameters"] == rows["auto"]["trainable_parameters"]
    assert rows["fp8"]["last_loss"] > 0
