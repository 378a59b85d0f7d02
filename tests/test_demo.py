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


def test_model_demo_names_the_shipped_model_in_encode_train_sample_and_bench(tmp_path, tiny_model, image_folder,
                                                                          monkeypatch):
    """--model demo resolves, in stages/sdxl.py alone, to stages/demo_model/; a stand-in (the tiny model) takes its
    place here, so the test does not need the real weights."""
    import pytest

    from stages.encode import encode
    from stages.errors import UserError
    from stages.sample import sample
    from stages.sdxl import ModelSource, unet_config
    from stages.train import train
    from tests.conftest import encode_config
    from tests.test_sample import config
    from tests.test_train import QUIET, train_config

    monkeypatch.setattr("stages.sdxl.DEMO_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(UserError, match="--model demo: the demo model is not in .*absent"):
        encode(encode_config("demo", image_folder, tmp_path / "never"), **QUIET)
    assert not (tmp_path / "never").exists()

    monkeypatch.setattr("stages.sdxl.DEMO_MODEL_DIR", tiny_model)
    assert ModelSource("demo").check().describe() == ModelSource(str(tiny_model)).describe()
    assert ModelSource("./demo").model == "./demo"  # a folder named demo is given as a path
    manifest = encode(encode_config("demo", image_folder, tmp_path / "cache"), **QUIET)
    assert manifest.encoder["model"] == str(tiny_model)
    train(train_config(tmp_path / "cache", tmp_path / "lora", model="demo", max_steps=1), **QUIET)
    logs = []
    paths = sample(config(tmp_path / "lora", "demo", tmp_path / "samples", steps=1, compare=False), log=logs.append)
    assert [p.name for p in paths] == ["00-a-red-circle-on-a-blue-background.png"]
    assert not any("warning" in line for line in logs)  # the LoRA's recorded base is the same model
    assert unet_config(ModelSource("demo")) == unet_config(ModelSource(str(tiny_model)))  # what bench reads
