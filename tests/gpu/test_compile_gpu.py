"""`train --compile regional | regional-graphs` on CUDA computes what eager computes, and a compiled run checkpoints
and resumes. Full-size SDXL UNet architecture with random weights (random:sdxl), 12 steps at micro-batch 4,
no checkpointing, fused AdamW, the same seed: the runs of bench/gpu_session_2026-11-23c.sh (compile part).

bench/RESULTS.md ("Fast path = eager, and it checkpoints and resumes") recorded: max |loss - eager loss| over
the 12 steps 1.3e-4 (regional) and 1.1e-4 (regional-graphs); the compiled run resumed from its checkpoint-6 vs
uninterrupted, max |dLoRA| 9.8e-5, with LoRA B entries up to 6.1e-4; eager resume on the GPU gave the same losses
to 5e-5. GPU kernels are not deterministic, so these are tolerances, not equalities (on CPU resume is
bit-identical: tests/test_train.py). Each bound below is a small multiple of the recorded figure.
"""
from __future__ import annotations

import math
import shutil

import pytest

from tests.gpu.conftest import load_lora, max_abs_lora_diff, read_metrics, run_pipeline

pytestmark = pytest.mark.gpu

STEPS = 12
LOSS_TOLERANCE = 5e-4          # recorded: 1.3e-4 (regional), 1.1e-4 (regional-graphs)
RESUME_LORA_TOLERANCE = 2e-4   # recorded: 9.8e-5
RESUME_LOSS_TOLERANCE = 5e-4   # recorded for eager resume: 5e-5
# Not in RESULTS.md: the gradient norm per step, which the loss alone does not check (a compiled backward that
# missed the LoRA would still match eager's losses over 12 steps at this learning rate); a loose bf16-level bound.
GRAD_NORM_RELATIVE_TOLERANCE = 0.05


def train_args(cache, output, *extra):
    return ["train", "--cache", cache, "--output", output, "--model", "random:sdxl", "--device", "cuda",
            "--num-workers", "2", "--warmup-steps", "0", "--max-steps", STEPS, "--optimizer", "adamw",
            "--no-gradient-checkpointing", "--batch-size", "4", "--grad-accum", "1", *extra]


@pytest.fixture(scope="module")
def runs(sdxl_cache_512, tmp_path_factory):
    """Output folders, made on first use: eager, regional (checkpoint every 6), regional-graphs."""
    root = tmp_path_factory.mktemp("compile-gpu")
    made = {}

    def get(name):
        if name not in made:
            extra = {"eager": ["--checkpoint-every", "0"],
                     "regional": ["--checkpoint-every", "6", "--compile", "regional"],
                     "regional-graphs": ["--checkpoint-every", "0", "--compile", "regional-graphs"]}[name]
            run_pipeline(*train_args(sdxl_cache_512, root / name, *extra))
            made[name] = root / name
        return made[name]
    return get


def finite_rows(output):
    rows = read_metrics(output)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "one metrics row per step"
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows), rows
    return rows


@pytest.mark.parametrize("mode", ["regional", "regional-graphs"])
def test_compiled_train_matches_eager(runs, mode):
    eager, compiled = finite_rows(runs("eager")), finite_rows(runs(mode))
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(eager, compiled))
    print(f"{mode}: max |loss - eager loss| over {STEPS} steps: {loss_diff:.2e}")
    assert loss_diff <= LOSS_TOLERANCE, f"{mode} losses differ from eager's by {loss_diff:.2e}"
    grad_diff = max(abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] for a, b in zip(eager, compiled))
    assert grad_diff <= GRAD_NORM_RELATIVE_TOLERANCE, f"{mode} gradient norms differ from eager's by {grad_diff:.1%}"
    assert set(load_lora(runs(mode))) == set(load_lora(runs("eager")))


def test_compiled_run_resumes_from_its_checkpoint(runs, sdxl_cache_512, tmp_path):
    uninterrupted = runs("regional")
    checkpoint = uninterrupted / "checkpoint-6"
    assert (checkpoint / "pytorch_lora_weights.safetensors").exists(), "the compiled run wrote no checkpoint-6"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-6")
    proc = run_pipeline(*train_args(sdxl_cache_512, resumed, "--checkpoint-every", "6", "--compile", "regional",
                                    "--resume", "latest"))
    assert "at step 6" in proc.stdout, proc.stdout[-2000:]

    rows = {r["step"]: r for r in read_metrics(resumed)}
    assert sorted(rows) == list(range(7, STEPS + 1)), "the resumed run trains steps 7-12 only"
    reference = {r["step"]: r for r in finite_rows(uninterrupted)}
    loss_diff = max(abs(rows[s]["loss"] - reference[s]["loss"]) for s in rows)
    final, expected, at_6 = load_lora(resumed), load_lora(uninterrupted), load_lora(checkpoint)
    lora_diff = max_abs_lora_diff(final, expected)
    moved = max_abs_lora_diff(final, at_6)
    print(f"compiled resume: max |loss diff| steps 7-12 {loss_diff:.2e}, max |dLoRA| vs uninterrupted {lora_diff:.2e}, "
          f"max change over the 6 resumed steps {moved:.2e}")
    assert loss_diff <= RESUME_LOSS_TOLERANCE, f"resumed losses differ by {loss_diff:.2e}"
    assert lora_diff <= RESUME_LORA_TOLERANCE, f"resumed LoRA differs from the uninterrupted run's by {lora_diff:.2e}"
    assert moved > lora_diff, "the resumed steps changed the LoRA less than resume's own discrepancy"
