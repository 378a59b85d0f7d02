"""The Quickstart's demo: every stage on the embedded tiny model, end to end."""
from __future__ import annotations

import json

from stages.demo import run_demo


def test_demo_runs_every_stage_and_says_where_things_went(tmp_path):
    logs = []
    result = run_demo(tmp_path / "demo", steps=2, log=logs.append)
    root = tmp_path / "demo"
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    assert manifest["num_samples"] == 12 and not manifest["skipped"]
    assert (root / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert [json.loads(line)["step"] for line in (root / "lora" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (root / "samples" / "compare.png").exists()
    assert result["final_loss"] > 0
    assert any(str(root / "samples" / "compare.png") in line for line in logs)
