"""`--vram-budget` on CUDA: the process is capped at the budget, the planner's choice trains within it (T4-class
fp16 under 15 GiB with checkpoints; 6 GiB), and a budget nothing fits in ends with the one-line message.
Full-size SDXL UNet architecture with random weights, 512².

bench/RESULTS.md recorded: 15 GiB fp16 `train`, 40 steps, peak 12.72 GiB, checkpoints at 20 and 40 and the LoRA
written; 6 GiB `train`, peak 3.75 GiB; `bench --vram-budget 4GiB` ends with
`Error: does not fit in 4GiB: out of GPU memory (configuration at 512², micro-batch 1)`.
"""
from __future__ import annotations

import json
import math

import pytest

from tests.gpu.conftest import read_metrics, run_pipeline

pytestmark = pytest.mark.gpu


def budget_run(cache, output, budget_gib: int, steps: int, *extra):
    run_pipeline("train", "--cache", cache, "--output", output, "--model", "random:sdxl", "--device", "cuda",
                 "--num-workers", "2", "--warmup-steps", "0", "--max-steps", steps, "--vram-budget", f"{budget_gib}GiB",
                 *extra)
    rows = read_metrics(output)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in rows), rows
    peak = max(r["peak_gib"] for r in rows)
    print(f"--vram-budget {budget_gib}GiB {' '.join(extra)}: peak {peak} GiB")
    assert 0 < peak <= budget_gib, f"peak {peak} GiB under a {budget_gib} GiB budget"
    return json.loads((output / "train_config.json").read_text())


def test_t4_class_fp16_under_15gib_trains_checkpoints_and_writes_the_lora(sdxl_cache_512, tmp_path):
    out = tmp_path / "t4"
    config = budget_run(sdxl_cache_512, out, 15, 12, "--mixed-precision", "fp16", "--checkpoint-every", "6")
    assert config["resolved"]["mixed_precision"] == "float16", config["resolved"]
    assert (out / "checkpoint-6").is_dir() and (out / "checkpoint-12").is_dir()
    assert (out / "pytorch_lora_weights.safetensors").exists()


def test_6gib_budget_fits(sdxl_cache_512, tmp_path):
    budget_run(sdxl_cache_512, tmp_path / "p6", 6, 6, "--checkpoint-every", "0")


def test_bench_under_4gib_cap_refuses_with_one_line():
    proc = run_pipeline("bench", "--vram-budget", "4GiB", "--steps", "2", "--device", "cuda", check=False)
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Error: does not fit in 4GiB: out of GPU memory (configuration at 512" in proc.stderr, proc.stderr[-2000:]
    assert "micro-batch 1)" in proc.stderr
    assert "Traceback" not in proc.stderr
