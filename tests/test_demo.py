"""The Quickstart's demo: the shipped demo model learns the style through encode -> cache -> train, and shows it on
held-out prompts; `sample --model demo --lora` renders with its LoRA."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stages.config import SampleConfig
from stages.demo import SAMPLE_GUIDANCE, SAMPLE_STEPS, run_demo, style_scores
from stages.lora import LORA_WEIGHTS_NAME
from stages.sample import slug
from stages.scenes import HELD_OUT_PROMPTS
from tests.conftest import invoke_cli

# A shorter run than the demo's own (DEMO_STEPS on STYLE_IMAGES), the same settings otherwise: cheap enough for CI.
STEPS, IMAGES = 300, 48
# Measured (CPU, torch 2.13) with these settings, held-out style scores per prompt: base [0, 0, 0, 0], base + LoRA
# [0, 0.0120, 0.0081, 0.0059], mean 0.0065 (the demo's 600 steps on 96 images: [0, 0.0132, 0.0068, 0.0103]). The
# margin is about half the measured rise of the mean.
MARGIN = 0.003


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    logs = []
    root = tmp_path_factory.mktemp("demo") / "work"
    return root, run_demo(root, steps=STEPS, images=IMAGES, log=logs.append), logs


def test_demo_runs_every_stage_and_says_where_things_went(demo):
    root, result, logs = demo
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    assert manifest["num_samples"] == IMAGES and not manifest["skipped"]
    assert manifest["encoder"]["model"].endswith("stages/demo_model")
    rows = [json.loads(line) for line in (root / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (root / "samples" / "compare.png").exists()
    assert any(str(root / "samples" / "compare.png") in line for line in logs)
    for prompt, base, tuned in zip(HELD_OUT_PROMPTS, *result["scores"].values()):  # the printed table
        assert f"  {base:6.3f} {tuned:6.3f}  {prompt}" in logs


def test_the_lora_draws_the_style_on_held_out_prompts(demo):
    _, result, _ = demo
    base, tuned = (torch.tensor(result["scores"][k]) for k in ("base", "lora"))
    assert base.max() == 0  # the demo model draws these scenes without ink, even with the trigger phrase
    assert tuned.mean() - base.mean() > MARGIN, result["scores"]
    assert (tuned > base).sum() >= 3, result["scores"]


def test_sample_renders_the_demo_lora_and_a_lora_at_its_initialisation_changes_nothing(demo, tmp_path):
    """`sample --model demo --lora` renders the demo's LoRA images again; the same LoRA with lora_B at zero (where
    peft initialises it: the adapter before any step) renders the base model's images (to a rounding of the last bit
    of a pixel) and scores as they do."""
    root, result, _ = demo
    i = 1  # a prompt whose LoRA image has ink; image i has seed + i: alone, it needs --seed seed + i
    name, demo_name = (f"{k:02d}-{slug(HELD_OUT_PROMPTS[i])}" for k in (0, i))
    args = ["sample", "--model", "demo", "--prompt", HELD_OUT_PROMPTS[i], "--seed", SampleConfig().seed + i, "--steps",
            SAMPLE_STEPS, "--guidance", SAMPLE_GUIDANCE, "--resolution", 64, "--device", "cpu"]
    invoke_cli(*args, "--lora", root / "lora", "--out", tmp_path / "trained")
    assert torch.equal(pixels(tmp_path / "trained" / f"{name}.png"), pixels(root / "samples" / f"{demo_name}.png"))

    untrained = tmp_path / "untrained"
    untrained.mkdir()
    weights = load_file(root / "lora" / LORA_WEIGHTS_NAME)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())
    save_file({k: torch.zeros_like(v) if k.endswith("lora_B.weight") else v for k, v in weights.items()},
              untrained / LORA_WEIGHTS_NAME)
    shutil.copy(root / "lora" / "train_config.json", untrained)
    invoke_cli(*args, "--lora", untrained, "--compare", "--out", tmp_path / "init")
    image, base = (tmp_path / "init" / f"{name}{end}.png" for end in ("", "-base"))
    assert torch.equal(pixels(base), pixels(root / "samples" / f"{demo_name}-base.png"))
    assert (pixels(image) - pixels(base)).abs().max() <= 1
    assert style_scores([image]) == style_scores([base]) == [result["scores"]["base"][i]] == [0]
    assert style_scores([tmp_path / "trained" / f"{name}.png"]) == [result["scores"]["lora"][i]] != [0]


def pixels(path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.int16))


def test_model_demo_names_the_shipped_model_in_encode_train_sample_and_bench(tmp_path, tiny_model, image_folder,
                                                                          monkeypatch):
    """--model demo resolves, in stages/sdxl.py alone, to stages/demo_model/; a stand-in (the tiny model) takes its
    place here, so the test does not need the real weights."""
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
