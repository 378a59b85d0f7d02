"""`export`: our LoRA -> the kohya / A1111 / ComfyUI file and back, checked through diffusers' own loader,
the LDM module names those tools look up, per-module alphas, exact round trips, and the CLI's errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stages.errors import UserError
from stages.export import (ExportConfig, export, kohya_module_to_ldm, module_alphas, module_ranks, peft_to_kohya,
                           to_peft)
from stages.lora import LORA_WEIGHTS_NAME, adapter_metadata, lora_state_dict
from stages.config import TrainConfig
from stages.train import train
from tests.conftest import max_abs_diff
from tests.ldm_checkpoint import UNET_PREFIX, convert_unet, read_component, read_config

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fp32_cache):
    """A 3-step rank-4 / alpha-8 run (alpha != rank); returns (output folder, summary with the trained UNet)."""
    out = tmp_path_factory.mktemp("export-train") / "lora"
    cfg = TrainConfig(cache=str(fp32_cache), output=str(out), rank=4, alpha=8.0, max_steps=3, batch_size=2,
                      grad_accum=2, warmup_steps=1, learning_rate=1e-2, checkpoint_every=0, num_workers=0,
                      device="cpu")
    return out, train(cfg, **QUIET)


@pytest.fixture(scope="module")
def kohya(trained, tmp_path_factory) -> Path:
    out, _ = trained
    path = tmp_path_factory.mktemp("export-kohya") / "naruto.safetensors"
    assert export(ExportConfig(lora=str(out), format="kohya", out=str(path)), **QUIET) == path
    return path


def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    enc = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64., 80, 0, 8, 64, 64]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), enc, added_cond_kwargs=added).sample


def ldm_lora_names(unet_state: dict, config: dict) -> set[str]:
    """The kohya names ComfyUI (comfy/lora.py: model_lora_keys_unet) and A1111 (networks.py: load_network,
    "lora_unet" -> "diffusion_model") accept for an SDXL checkpoint: `lora_unet_` + LDM weight key, `.` -> `_`."""
    ldm = convert_unet(unet_state, config)
    return {"lora_unet_" + k[len(UNET_PREFIX):-len(".weight")].replace(".", "_") for k in ldm if k.endswith(".weight")}


def test_kohya_file_loads_in_diffusers_exactly_like_our_folder(trained, kohya, tiny_model):
    from diffusers import StableDiffusionXLPipeline
    out, summary = trained
    ours = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    ours.load_lora_weights(out)
    theirs = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    theirs.load_lora_weights(str(kohya))
    scaling = next(m.scaling for n, m in theirs.unet.named_modules()
                   if n.endswith("attn1.to_q") and hasattr(m, "scaling"))
    assert list(scaling.values()) == [2.0]  # alpha 8 / rank 4 from the .alpha tensors
    a, b = unet_output(ours.unet), unet_output(theirs.unet)
    trained_output = unet_output(summary["unet"].eval())
    theirs.unet.disable_adapters()
    base = unet_output(theirs.unet)
    assert max_abs_diff(a, b) <= 1e-5
    assert max_abs_diff(b, trained_output) <= 1e-5
    assert max_abs_diff(a, base) > 1e-4 and max_abs_diff(b, base) > 1e-4  # the LoRA acts: the comparison has teeth


def test_kohya_file_has_lora_unet_keys_float32_alphas_and_rank(trained, kohya):
    out, _ = trained
    state = load_file(str(kohya))
    ours = load_file(str(out / LORA_WEIGHTS_NAME))
    modules = {k.partition(".")[0] for k in state}
    assert all(k.startswith("lora_unet_") for k in state)
    assert {k.partition(".")[2] for k in state} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert len(modules) == len(ours) // 2 and len(state) == 3 * len(modules)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules  # sd-scripts' SDXL naming
    for m in modules:
        alpha = state[f"{m}.alpha"]
        assert alpha.dtype == torch.float32 and alpha.ndim == 0 and alpha.item() == 8.0
        assert state[f"{m}.lora_down.weight"].shape[0] == 4 and state[f"{m}.lora_up.weight"].shape[1] == 4
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    # A1111 lists the file under SDXL (network.py: detect_version); sd-scripts' dim/alpha fields.
    assert meta["ss_base_model_version"].startswith("sdxl_")
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 8.0


def test_kohya_names_are_the_ldm_names_comfyui_and_a1111_look_up(kohya, tiny_model):
    accepted = ldm_lora_names(read_component(tiny_model, "unet"), read_config(tiny_model, "unet"))
    modules = {k.partition(".")[0] for k in load_file(str(kohya))}
    assert modules and modules <= accepted


def test_full_size_sdxl_default_lora_gets_sd_scripts_names(sdxl_meta_unet):
    """The reference recipe's 560 modules on the real SDXL layout, weights on the meta device."""
    from stages.lora import attach_lora
    base, unet = sdxl_meta_unet(), sdxl_meta_unet()
    accepted = ldm_lora_names(base.state_dict(), dict(base.config))
    cfg = TrainConfig()
    attach_lora(unet, cfg.rank, cfg.alpha, cfg.target_module_list)
    peft = to_peft(lora_state_dict(unet))
    config = adapter_metadata(unet.peft_config["default"])
    state = peft_to_kohya(peft, module_alphas(module_ranks(peft), config))  # also read back by diffusers' loader
    modules = {k.partition(".")[0] for k in state}
    assert len(modules) == 560 and modules <= accepted
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
                 "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k",
                 "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_v"):
        assert name in modules and state[f"{name}.alpha"].item() == 32.0


def test_import_round_trip_reproduces_our_file_exactly(trained, kohya, tmp_path):
    from pipeline import cli
    out, summary = trained
    result = CliRunner().invoke(cli, ["export", "--lora", str(kohya), "--format", "diffusers",
                                      "--out", str(tmp_path / "back")])
    written = tmp_path / "back" / LORA_WEIGHTS_NAME
    assert result.exit_code == 0 and f"to {written}" in result.output, result.output
    assert [p.name for p in written.parent.iterdir()] == [LORA_WEIGHTS_NAME]  # no temporary folder left behind
    a, b = load_file(str(out / LORA_WEIGHTS_NAME)), load_file(str(written))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(written), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8.0
    assert meta["unet.lora_dropout"] == 0.0 and meta["unet.use_dora"] is False
    assert "unet.rank_pattern" not in meta and "unet.alpha_pattern" not in meta
    modules = {n for n, m in summary["unet"].named_modules() if hasattr(m, "lora_A")}
    assert set(meta["unet.target_modules"]) == modules


def test_per_module_rank_and_alpha_survive_both_directions(tmp_path, tiny_model):
    """rank_pattern / alpha_pattern in the metadata -> one alpha per module -> back to equivalent patterns."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn2.to_k": 6.0, "attn1.to_v": 3.0}))
    config = unet.peft_config["default"]
    src = tmp_path / "src"
    StableDiffusionXLPipeline.save_lora_weights(
        src, unet_lora_layers=lora_state_dict(unet), safe_serialization=True,
        unet_lora_adapter_metadata={**adapter_metadata(config), "rank_pattern": config.rank_pattern,
                                    "alpha_pattern": config.alpha_pattern})
    export(ExportConfig(lora=str(src), out=str(tmp_path / "k.safetensors")), **QUIET)
    state = load_file(str(tmp_path / "k.safetensors"))
    expected = {"attn1_to_v": (4, 3.0), "attn2_to_k": (2, 6.0), "attn1_to_q": (4, 8.0), "attn2_to_out_0": (4, 8.0)}
    for key in (k for k in state if k.endswith(".alpha")):
        module = key[: -len(".alpha")]
        for suffix, (rank, alpha) in expected.items():
            if module.endswith(suffix):
                assert state[f"{module}.lora_down.weight"].shape[0] == rank and state[key].item() == alpha, module

    export(ExportConfig(lora=str(tmp_path / "k.safetensors"), format="diffusers", out=str(tmp_path / "back")), **QUIET)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(tmp_path / "back")
    scale = {n: m.scaling["default"] for n, m in unet.named_modules() if hasattr(m, "scaling")}
    loaded = {n: m.scaling["default_0"] for n, m in pipe.unet.named_modules() if hasattr(m, "scaling")}
    assert loaded == scale and {scale[n] for n in scale if n.endswith("attn2.to_k")} == {3.0}
    a, b = load_file(str(src / LORA_WEIGHTS_NAME)), load_file(str(tmp_path / "back" / LORA_WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_alpha_without_metadata_and_with_rslora():
    ranks = {"a.to_q": 4, "b.to_k": 16}
    assert module_alphas(ranks, None) == {"a.to_q": 4.0, "b.to_k": 16.0}  # diffusers' scale 1 without metadata
    rs = module_alphas(ranks, {"r": 4, "lora_alpha": 8.0, "rank_pattern": {"b.to_k": 16}, "use_rslora": True})
    assert rs == {"a.to_q": 16.0, "b.to_k": 32.0}  # alpha/sqrt(r) * rank
    with pytest.raises(UserError, match="rank 4 for b.to_k"):
        module_alphas(ranks, {"r": 4, "lora_alpha": 8.0})
    assert kohya_module_to_ldm("lora_unet_up_blocks_1_resnets_2_conv_shortcut") == \
        "lora_unet_output_blocks_5_0_skip_connection"
    with pytest.raises(UserError, match="no kohya"):
        kohya_module_to_ldm("lora_unet_down_blocks_0_resnets_0_norm1")


def test_cli_export_prints_where_it_wrote_and_refuses_to_overwrite(trained, tmp_path, cli):
    out, _ = trained
    target = tmp_path / "lora.safetensors"
    proc = cli("export", "--lora", out, "--format", "kohya", "--out", target)
    assert f"to {target}" in proc.stdout and target.is_file()
    before = target.read_bytes()
    again = cli("export", "--lora", out, "--out", target, check=False)
    assert again.returncode != 0 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr and target.read_bytes() == before
    cli("export", "--lora", out, "--out", target, "--overwrite")
    missing = cli("export", "--lora", tmp_path / "nope", "--out", tmp_path / "x.safetensors", check=False)
    errors = [line for line in missing.stderr.splitlines() if line.strip()]
    assert missing.returncode != 0 and errors == [f"Error: LoRA folder not found: {tmp_path / 'nope'}"]
    assert not (tmp_path / "x.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temporary file left behind


def test_bad_inputs_are_one_line_errors(trained, kohya, tmp_path):
    from pipeline import cli
    out, _ = trained
    runner = CliRunner()

    def fails(*args) -> str:
        result = runner.invoke(cli, ["export", *map(str, args)])
        assert result.exit_code != 0 and (result.exception is None or isinstance(result.exception, SystemExit))
        return result.output

    assert "Invalid value" in fails("--lora", out, "--format", "onnx", "--out", tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="unknown --format"):
        export(ExportConfig(lora=str(out), format="onnx", out=str(tmp_path / "a")), **QUIET)
    assert "no pytorch_lora_weights.safetensors" in fails("--lora", tmp_path, "--out", tmp_path / "a.safetensors")

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / LORA_WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert "cannot read LoRA file" in fails("--lora", garbage, "--out", tmp_path / "a.safetensors")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / LORA_WEIGHTS_NAME).write_bytes((out / LORA_WEIGHTS_NAME).read_bytes()[:-64])
    assert "cannot read LoRA file" in fails("--lora", truncated, "--out", tmp_path / "a.safetensors")

    other = tmp_path / "other"
    other.mkdir()
    save_file({"conv.weight": torch.zeros(2, 2)}, str(other / LORA_WEIGHTS_NAME))
    assert "not a diffusers UNet LoRA file" in fails("--lora", other, "--out", tmp_path / "a.safetensors")
    assert "not a kohya SDXL UNet LoRA" in fails("--lora", out / LORA_WEIGHTS_NAME, "--format", "diffusers",
                                                 "--out", tmp_path / "d")
    with_te = tmp_path / "te.safetensors"
    save_file({**load_file(str(kohya)), "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)},
              str(with_te))
    assert "text-encoder" in fails("--lora", with_te, "--format", "diffusers", "--out", tmp_path / "d")
    assert "must be a .safetensors file" in fails("--lora", out, "--out", tmp_path / "lora.bin")
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "d").exists()
