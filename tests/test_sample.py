"""sample: base vs base + LoRA with the same seeds, the labelled grid, and clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from stages.errors import UserError
from stages.lora import LORA_WEIGHTS_NAME
from stages.config import SampleConfig
from stages.sample import sample
from tests.test_train import QUIET, trained  # noqa: F401  (module fixture: a 3-step LoRA)


def config(lora, model, out, **kw):
    base = dict(lora=str(lora), model=None if model is None else str(model), prompt=("a red circle on a blue background",), steps=2,
                guidance=5.0, resolution=64, compare=True, out=str(out), device="cpu")
    base.update(kw)
    return SampleConfig(**base)


def test_compare_renders_base_and_lora_with_the_same_seed(trained, tiny_model, tmp_path):  # noqa: F811
    from diffusers import StableDiffusionXLPipeline
    out, _ = trained
    paths = sample(config(out, tiny_model, tmp_path / "s"), **QUIET)
    names = sorted(p.name for p in paths)
    assert names == ["00-a-red-circle-on-a-blue-background-base.png", "00-a-red-circle-on-a-blue-background.png",
                     "compare.png"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle on a blue background", num_inference_steps=2, guidance_scale=5.0, height=64,
                    width=64, generator=torch.Generator("cpu").manual_seed(42)).images[0]
    base = np.asarray(Image.open(tmp_path / "s" / names[0]), dtype=np.int16)
    tuned = np.asarray(Image.open(tmp_path / "s" / names[1]), dtype=np.int16)
    assert np.abs(base - np.asarray(expected, dtype=np.int16)).max() <= 2  # base = diffusers, same seed
    assert np.abs(base - tuned).max() > 2  # the LoRA changes the image
    grid = Image.open(tmp_path / "s" / "compare.png")
    assert grid.width > 256 and grid.height > 2 * 256  # two rows of images enlarged to >= 256 px


def test_existing_images_are_not_overwritten(trained, tiny_model, tmp_path):  # noqa: F811
    out, _ = trained
    cfg = config(out, tiny_model, tmp_path / "s", compare=False)
    sample(cfg, **QUIET)
    before = (tmp_path / "s" / "00-a-red-circle-on-a-blue-background.png").read_bytes()
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        sample(cfg, **QUIET)
    assert (tmp_path / "s" / "00-a-red-circle-on-a-blue-background.png").read_bytes() == before
    sample(config(out, tiny_model, tmp_path / "s", compare=False, overwrite=True), **QUIET)


def test_missing_and_mismatched_loras_are_clear_errors(trained, tiny_model, tmp_path):  # noqa: F811
    out, _ = trained
    with pytest.raises(UserError, match="nowhere: LoRA folder or file .* not found"):
        sample(config(tmp_path / "nowhere", tiny_model, tmp_path / "s"), **QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no pytorch_lora_weights.safetensors in .*: not a LoRA folder"):
        sample(config(tmp_path / "empty", tiny_model, tmp_path / "s"), **QUIET)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    tensors = load_file(str(out / LORA_WEIGHTS_NAME))
    save_file({k: torch.zeros(v.shape[0], v.shape[1] + 3) if k.endswith("lora_A.weight") else v
               for k, v in tensors.items()}, str(wrong / LORA_WEIGHTS_NAME))
    with pytest.raises(UserError, match="does not fit"):
        sample(config(wrong, tiny_model, tmp_path / "s2"), **QUIET)


def test_empty_prompts_file_is_a_usage_error(tmp_path, tiny_model):
    from pipeline import cli
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    result = CliRunner().invoke(cli, ["sample", "--model", str(tiny_model), "--prompts-file", str(empty),
                                      "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "holds no prompt" in result.output


def test_a_v_prediction_zero_snr_lora_is_sampled_with_its_scheduler(trained, tiny_model, tmp_path):  # noqa: F811
    import json
    import shutil
    from stages.sample import lora_sampling
    out, _ = trained
    assert lora_sampling(str(out)) == {}  # the reference recipe: the model's own epsilon scheduler
    vpred = tmp_path / "vpred"
    shutil.copytree(out, vpred)
    saved = json.loads((vpred / "train_config.json").read_text())
    saved["resolved"]["prediction_type"], saved["rescale_betas_zero_snr"] = "v_prediction", True
    (vpred / "train_config.json").write_text(json.dumps(saved))
    expected = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    assert lora_sampling(str(vpred)) == expected
    (vpred / "checkpoint-9").mkdir(exist_ok=True)  # a checkpoint folder: its run's train_config.json counts
    assert lora_sampling(str(vpred / "checkpoint-9")) == expected
    logs = []
    a = sample(config(vpred, tiny_model, tmp_path / "v", compare=False), log=logs.append)
    b = sample(config(out, tiny_model, tmp_path / "e", compare=False), log=lambda *x: None)
    assert any("v_prediction" in line and "trailing" in line for line in logs)
    image = lambda p: np.asarray(Image.open(p[0]), dtype=np.int16)
    assert np.abs(image(a) - image(b)).max() > 2  # another scheduler, another image from the same LoRA


def test_the_base_model_comes_from_the_loras_train_config_and_another_one_is_warned_about(trained, tiny_model,  # noqa: F811
                                                                                          tmp_path):
    import shutil
    out, _ = trained
    logs = []
    own = sample(config(out, None, tmp_path / "own", compare=False), log=logs.append)
    assert any(line.startswith(f"base model {tiny_model} (the one {out} was trained on") for line in logs), logs
    same = sample(config(out, tiny_model, tmp_path / "same", compare=False), log=logs.append)
    assert not any(line.startswith("warning") for line in logs)
    image = lambda p: np.asarray(Image.open(p[0]), dtype=np.int16)  # noqa: E731
    assert np.array_equal(image(own), image(same))
    copy = shutil.copytree(tiny_model, tmp_path / "another-model")  # same architecture, another place: warned
    sample(config(out, copy, tmp_path / "other", compare=False), log=logs.append)
    assert any(line.startswith(f"warning: {out} was trained on {tiny_model}, not on {copy}") for line in logs), logs


def test_compare_without_a_lora_is_refused_before_anything_loads(tiny_model, tmp_path, monkeypatch):
    import stages.sample
    monkeypatch.setattr(stages.sample, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match="--compare renders the base model beside a LoRA: pass --lora"):
        sample(SampleConfig(model=str(tiny_model), prompt=("a",), compare=True, out=str(tmp_path / "s")), **QUIET)


def test_a_kohya_file_and_a_renamed_lora_file_sample_like_the_lora_folder(trained, tiny_model, tmp_path):  # noqa: F811
    import shutil

    from stages.config import ExportConfig
    from stages.export import export
    out, _ = trained
    kohya = export(ExportConfig(lora=str(out), out=str(tmp_path / "kohya.safetensors")), **QUIET)
    renamed = shutil.copy(out / LORA_WEIGHTS_NAME, tmp_path / "my-lora.safetensors")
    import tempfile
    leftovers = lambda: set(Path(tempfile.gettempdir()).glob("sdxl-lora-*"))  # noqa: E731
    before = leftovers()
    images, logs = {}, {}
    for name, lora in (("folder", out), ("kohya", kohya), ("renamed", renamed)):
        logs[name] = []
        paths = sample(config(lora, tiny_model, tmp_path / name, compare=False), log=logs[name].append)
        images[name] = np.asarray(Image.open(paths[0]), dtype=np.int16)
    assert any(line.startswith(f"imported the kohya LoRA {kohya}") for line in logs["kohya"]), logs["kohya"]
    assert np.abs(images["kohya"] - images["folder"]).max() <= 2 and np.array_equal(images["renamed"], images["folder"])
    assert leftovers() == before  # the imported kohya file's temporary folder is gone


def test_non_ascii_prompts_keep_their_names_and_are_drawn_in_the_grid():
    from stages.sample import _has_glyph, label_text, labelled_grid, slug
    assert slug("Un café, 猫 / Ж!") == "un-café-猫-ж" and slug("../../etc") == "etc" and slug("???") == "prompt"
    font, (text,) = label_text(["un café 猫"])
    assert all(_has_glyph(font, ch) for ch in text)  # drawn by a font that has them, or transliterated (U+732B)
    assert text.startswith("un caf") and ("猫" in text or "U+732B" in text)
    grid = labelled_grid([("base", [Image.new("RGB", (8, 8))])], ["un café 猫"])
    assert grid.size[0] > 256
