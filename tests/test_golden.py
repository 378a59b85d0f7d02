"""Pinned golden numbers of a short tiny-model `train` run through the CLI: any change to the numerics (noise,
timesteps, loss, accumulation, clipping, optimizer, schedule, data order, seeding) shows here. They were recorded
once on the CPU (torch 2.13.0, one thread, as CI runs); a deliberate change of numerics re-records them, and the
commit that does says why."""
from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from stages.lora import LORA_WEIGHTS_NAME

GOLDEN_LOSSES = [0.7494246959686279, 1.031675100326538, 1.0277493000030518, 1.1219987869262695]  # steps 1-4
GOLDEN_LORA_NORM = 49.742715743889605  # the L2 norm of every tensor of the final LoRA file, together


def test_golden_losses_and_lora_norm_of_a_short_cli_run(fp32_cache, tmp_path):
    from pipeline import cli
    out = tmp_path / "golden"
    result = CliRunner().invoke(cli, [
        "train", "--cache", str(fp32_cache), "--output", str(out), "--max-steps", "4", "--batch-size", "2",
        "--grad-accum", "2", "--learning-rate", "1e-3", "--warmup-steps", "1", "--checkpoint-every", "0",
        "--num-workers", "0", "--device", "cpu", "--rank", "4", "--alpha", "8", "--noise-offset", "0.05",
        "--min-snr-gamma", "5"])
    assert result.exit_code == 0, result.output
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in load_file(str(out / LORA_WEIGHTS_NAME)).values())).item()
    assert len(losses) == 4
    assert max(abs(a - b) for a, b in zip(losses, GOLDEN_LOSSES)) <= 1e-5, losses
    assert abs(norm - GOLDEN_LORA_NORM) <= 1e-5, norm
