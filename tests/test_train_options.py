"""Training options and the files they write: the kohya / LyCORIS file beside every LoRA (its keys checked against
the LDM names ComfyUI and A1111 look up, its values against ComfyUI's patch math), --save-dtype and file modes, the
EMA, Huber / debiased losses, LoRA+ and --block-lr, the extra optimizers' exact resume, and --config files."""
from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file

from stages.config import TrainConfig, resolve_target_modules
from stages.errors import UserError
from stages.export import ExportConfig, export, kohya_state, ldm_name
from stages.lora import LORA_WEIGHTS_NAME, adapter_metadata, attach_lora, lora_state_dict
from stages.train import train
from tests.ldm_checkpoint import read_component, read_config
from tests.test_export import ldm_lora_names

QUIET = dict(log=lambda *a: None)


def train_config(cache, output, **overrides) -> TrainConfig:
    kw = dict(cache=str(cache), output=str(output), max_steps=4, batch_size=2, grad_accum=1, warmup_steps=1,
              learning_rate=1e-2, checkpoint_every=2, num_workers=0, device="cpu", rank=4, alpha=8.0)
    kw.update(overrides)
    return TrainConfig(**kw)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, fp32_cache):
    out = tmp_path_factory.mktemp("options") / "my-lora"
    old = os.umask(0o022)
    try:
        train(train_config(fp32_cache, out), **QUIET)
    finally:
        os.umask(old)
    return out


@pytest.fixture(scope="module")
def accepted_names(tiny_model) -> set[str]:
    return ldm_lora_names(read_component(tiny_model, "unet"), read_config(tiny_model, "unet"))


# ------------------------------------------------------------------------------------ the kohya file of train
def test_train_writes_the_kohya_file_export_writes_with_comfyui_names(default_run, accepted_names, tmp_path):
    kohya = default_run / "my-lora.safetensors"
    exported = tmp_path / "my-lora.safetensors"
    export(ExportConfig(lora=str(default_run), out=str(exported)), **QUIET)
    assert kohya.read_bytes() == exported.read_bytes()
    state = load_file(str(kohya))
    modules = {k.partition(".")[0] for k in state}
    # every key is a ComfyUI/A1111 LDM name (comfy/lora.py: model_lora_keys_unet) + .lora_down/.lora_up/.alpha
    assert modules <= accepted_names and len(state) == 3 * len(modules)
    assert len(modules) == len(load_file(str(default_run / LORA_WEIGHTS_NAME))) // 2
    for step in (2, 4):  # and one per checkpoint, of that checkpoint's LoRA
        folder = default_run / f"checkpoint-{step}"
        assert {k.partition(".")[0] for k in load_file(str(folder / "my-lora.safetensors"))} == modules


def test_output_name_and_no_kohya_file(tmp_path, fp32_cache):
    train(train_config(fp32_cache, tmp_path / "a", max_steps=1, output_name="naruto_v1", checkpoint_every=0), **QUIET)
    assert (tmp_path / "a" / "naruto_v1.safetensors").is_file()
    train(train_config(fp32_cache, tmp_path / "b", max_steps=1, kohya_file=False), **QUIET)
    assert sorted(p.name for p in (tmp_path / "b").glob("**/*.safetensors")) == [
        LORA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, "training_state.safetensors"]
    with pytest.raises(UserError, match="--output-name"):
        train_config(fp32_cache, tmp_path / "c", output_name="pytorch_lora_weights")


def test_every_output_file_has_the_default_mode_under_umask_022(default_run):
    modes = {p.relative_to(default_run): stat.S_IMODE(p.stat().st_mode) for p in default_run.rglob("*")}
    files = {p: m for p, m in modes.items() if (default_run / p).is_file()}
    assert files and set(files.values()) == {0o644}, {p: oct(m) for p, m in files.items() if m != 0o644}
    assert {m for p, m in modes.items() if (default_run / p).is_dir()} == {0o755}


def test_save_dtype_applies_to_the_final_files_and_not_to_checkpoints(tmp_path, fp32_cache):
    out = tmp_path / "half"
    train(train_config(fp32_cache, out, max_steps=2, save_dtype="bf16"), **QUIET)
    final = load_file(str(out / LORA_WEIGHTS_NAME))
    kohya = load_file(str(out / "half.safetensors"))
    assert {v.dtype for v in final.values()} == {torch.bfloat16}
    assert {v.dtype for k, v in kohya.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert {v.dtype for k, v in kohya.items() if k.endswith(".alpha")} == {torch.float32}
    checkpointed = load_file(str(out / "checkpoint-2" / LORA_WEIGHTS_NAME))
    assert {v.dtype for v in checkpointed.values()} == {torch.float32}
    assert all(torch.equal(final[k], checkpointed[k].bfloat16()) for k in final)


# ---------------------------------------------------------------------------------------- LyCORIS exports
def comfyui_weight(kind: str, w: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The patched weight, transcribed from ComfyUI comfy/lora.py `calculate_weight` (strength 1): lora/locon,
    loha, lokr; with a dora_scale, the decomposition in LyCORIS's output-channel form (modules/locon.py
    `apply_weight_decompose`, wd_on_out=True), the form peft's DoRA and our export use."""
    alpha = w["alpha"].item()
    if kind == "lora":
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        scale, diff = alpha / down.shape[0], (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    elif kind == "loha":
        scale = alpha / w["hada_w1_b"].shape[0]
        diff = ((w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])).reshape(weight.shape)
    else:
        dim = None
        w1 = w.get("lokr_w1")
        if w1 is None:
            dim, w1 = w["lokr_w1_b"].shape[0], w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w.get("lokr_w2")
        if w2 is None:
            dim, w2 = w["lokr_w2_b"].shape[0], w["lokr_w2_a"] @ w["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        scale = alpha / dim if dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(weight.shape)
    merged = weight + scale * diff
    if "dora_scale" in w:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.ndim - 1))
        merged = merged * (w["dora_scale"] / norm)
    return merged


@pytest.mark.parametrize("lora_type", ["dora", "loha", "lokr"])
def test_lycoris_export_keys_shapes_and_weights_as_comfyui_applies_them(lora_type, tiny_model, accepted_names):
    from diffusers import UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    params = attach_lora(unet, 4, 8.0, resolve_target_modules("all"), lora_type, {"to_k": 2})
    g = torch.Generator().manual_seed(0)
    for p in params:  # no zero-initialised factor: every term of the formulas counts
        p.data = torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim <= 1 or p.shape[0] == 1 else 0.0)
    kohya, metadata, _ = kohya_state(lora_state_dict(unet), adapter_metadata(unet.peft_config["default"]), lambda *a: None)
    parts = {"dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
             "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
             "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}}[lora_type]
    assert {k.partition(".")[2] for k in kohya} <= parts
    assert {k.partition(".")[0] for k in kohya} <= accepted_names
    assert json.loads(metadata["ss_network_args"])["algo"] == ("lora" if lora_type == "dora" else lora_type)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
    for module, layer in layers.items():
        name = ldm_name(module)
        w = {k.partition(".")[2]: v for k, v in kohya.items() if k.partition(".")[0] == name}
        base = layer.get_base_layer().weight.detach().clone()
        rank = 2 if module.endswith("to_k") else 4
        out, fan_in = base.shape[0], base[0].numel()
        if lora_type == "loha":
            assert w["hada_w1_a"].shape == (out, rank) and w["hada_w1_b"].shape == (rank, fan_in)
        elif lora_type == "dora":
            assert w["dora_scale"].shape == (out,) + (1,) * (base.ndim - 1)
            assert w["lora_down.weight"].shape[0] == rank and w["lora_up.weight"].shape[:2] == (out, rank)
        assert w["alpha"].dtype == torch.float32 and w["alpha"].ndim == 0
        with torch.no_grad():
            if lora_type == "dora":  # peft's own merge: W' = m / ||W + s·BA||_row · (W + s·BA)
                layer.merge(adapter_names=["default"])
                expected = layer.get_base_layer().weight.clone()
                layer.unmerge()
            else:
                expected = base + layer.get_delta_weight("default")
        got = comfyui_weight("lora" if lora_type == "dora" else lora_type, w, base)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), module
    lokr_full = [k for k in kohya if k.endswith(".lokr_w2")]
    assert lora_type != "lokr" or lokr_full  # the full/full case, whose scale is folded into lokr_w1, is covered


def test_cli_export_of_a_loha_run(tmp_path, fp32_cache, cli):
    out = tmp_path / "loha"
    train(train_config(fp32_cache, out, max_steps=1, checkpoint_every=0, lora_type="loha", kohya_file=False), **QUIET)
    proc = cli("export", "--lora", out, "--out", tmp_path / "loha.safetensors")
    assert "wrote kohya LoRA" in proc.stdout
    assert {k.partition(".")[2] for k in load_file(str(tmp_path / "loha.safetensors"))} == {
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}


# ------------------------------------------------------------------------------------------------- EMA
def test_ema_equals_a_hand_rolled_ema_over_five_steps():
    from stages.optim import EMA, FlatGroups
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((4, 8), (300,), (2, 3))]
    flat = FlatGroups([params[:2], params[2:]], [1.0, 2.0])
    ema = EMA(flat.flat_params, 0.9, torch.device("cpu"))
    hand = [p.detach().clone() for p in params]
    for n in range(1, 6):
        for p in params:
            p.data.add_(torch.randn(p.shape, generator=g))
        ema.update()
        decay = 0.0 if n == 1 else min(0.9, n / (9 + n))  # diffusers EMAModel.get_decay: (1 + s)/(10 + s), s = n - 1
        hand = [decay * h + (1 - decay) * p.detach() for h, p in zip(hand, params)]
    raw = [p.detach().clone() for p in params]
    with ema.applied():
        assert all(torch.allclose(p, h, atol=1e-6) for p, h in zip(params, hand))
    assert all(torch.equal(p, r) for p, r in zip(params, raw))  # restored bit for bit


def test_ema_run_saves_the_ema_and_the_raw_weights_and_resumes_bit_identically(tmp_path, fp32_cache):
    kw = dict(ema_decay=0.8, validate_every=0)
    full, part = tmp_path / "full", tmp_path / "part"
    summary = train(train_config(fp32_cache, full, **kw), **QUIET)
    raw, ema = load_file(str(full / "pytorch_lora_weights_raw.safetensors")), load_file(str(full / LORA_WEIGHTS_NAME))
    trained = lora_state_dict(summary["unet"])
    assert all(torch.equal(raw[f"unet.{k}"], v) for k, v in trained.items())  # _raw: the weights themselves
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert (full / "full_raw.safetensors").is_file() and (full / "full.safetensors").is_file()
    assert_resume_is_bit_identical(fp32_cache, full, part, **kw)


def assert_resume_is_bit_identical(cache, full, part, **kw):
    """`part` trained like `full` but crashed after checkpoint-2, then resumed: the same files and losses."""
    if not full.exists():
        train(train_config(cache, full, **kw), **QUIET)
    train(train_config(cache, part, **kw), **QUIET)
    for name in os.listdir(part):
        if name.endswith(".safetensors"):
            (part / name).unlink()
    shutil.rmtree(part / "checkpoint-4")
    rows = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(rows[:3]) + "\n")
    train(train_config(cache, part, resume="latest", **kw), **QUIET)
    for name in sorted(n for n in os.listdir(full) if n.startswith("pytorch_lora_weights")):
        a, b = load_file(str(full / name)), load_file(str(part / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = [[json.loads(r)["loss"] for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, part)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


@pytest.mark.parametrize("optimizer", ["prodigy", "adafactor", "adamw-schedulefree"])
def test_each_optimizer_resumes_bit_identically(optimizer, tmp_path, fp32_cache):
    from stages.config import DEFAULT_LEARNING_RATES
    kw = dict(optimizer=optimizer, learning_rate=None)
    assert_resume_is_bit_identical(fp32_cache, tmp_path / "full", tmp_path / "part", **kw)
    config = json.loads((tmp_path / "full" / "train_config.json").read_text())
    assert config["resolved"]["optimizer"] == optimizer
    assert config["resolved"]["learning_rate"] == DEFAULT_LEARNING_RATES[optimizer]
    moved = load_file(str(tmp_path / "full" / LORA_WEIGHTS_NAME))
    assert any(v.abs().max() > 0 for k, v in moved.items() if "lora_B" in k)  # it trained


def test_loraplus_and_block_lr_runs_resume_bit_identically_with_their_group_rates(tmp_path, fp32_cache):
    # a resume re-applies this run's learning rate per parameter group: each group keeps its multiplier
    assert_resume_is_bit_identical(fp32_cache, tmp_path / "full", tmp_path / "part", optimizer="adamw",
                                   loraplus_lr_ratio=4.0, block_lr="down_blocks=0.5")


# ---------------------------------------------------------------------------------------------- losses
def test_huber_tends_to_mse_and_smooth_l1_to_mse_over_c():
    from stages.recipes import Recipe, conditional_loss
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    mse = (pred - target) ** 2
    c = torch.full((3,), 1e4, dtype=torch.float64)  # 2c(sqrt(d² + c²) - c) = d² - d⁴/(4c²) + ...
    assert torch.allclose(conditional_loss(pred, target, "huber", c), mse, rtol=1e-5, atol=1e-6)
    assert torch.allclose(conditional_loss(pred, target, "smooth_l1", c) * 1e4, mse, rtol=1e-5, atol=1e-6)
    small = torch.full((3,), 1e-6, dtype=torch.float64)  # and to 2c|d| (scaled L1) as c -> 0
    assert torch.allclose(conditional_loss(pred, target, "smooth_l1", small), 2 * (pred - target).abs(), atol=1e-5)
    # Recipe.loss: the per-sample means of the elementwise loss, weighted (min-SNR / debiased), then their mean
    c, w = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([1.0, 0.5, 2.0])
    huber = Recipe(loss_type="huber").loss(pred.float(), target.float(), w, c)
    expected = (conditional_loss(pred, target, "huber", c.double()).mean(dim=(1, 2, 3)) * w.double()).mean()
    assert abs(huber.item() - expected.item()) <= 1e-6


def test_huber_schedules_and_debiased_weights_are_kohyas():
    from diffusers import DDPMScheduler

    from stages.recipes import Recipe, huber_thresholds
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 250, 999])
    ac = sched.alphas_cumprod
    assert torch.allclose(huber_thresholds(t, 0.1, "exponential", ac), 0.1 ** (t / 1000), rtol=1e-5)
    sigma = ((1 - ac[t]) / ac[t]) ** 0.5
    assert torch.allclose(huber_thresholds(t, 0.1, "snr", ac), 0.9 / (1 + sigma) ** 2 + 0.1)
    assert torch.equal(huber_thresholds(t, 0.1, "constant", ac), torch.full((3,), 0.1))
    snr = ac[t] / (1 - ac[t])
    both = Recipe(min_snr_gamma=5.0, debiased_estimation=True).loss_weights(sched, t)
    assert torch.allclose(both, torch.clamp(snr, max=5) / snr / torch.sqrt(torch.clamp(snr, max=1000)), rtol=1e-5)
    assert Recipe().loss_weights(sched, t) is None and Recipe().huber_thresholds(sched, t) is None


def test_huber_run_feeds_per_sample_thresholds_drawn_on_the_cpu(tmp_path, fp32_cache):
    from cache import CacheReader
    from cache.sampler import CacheStream
    from stages.train import draw_inputs, setup_model
    cfg = train_config(fp32_cache, tmp_path / "h", loss="huber", huber_schedule="snr", debiased_estimation=True)
    reader = CacheReader(fp32_cache)
    model = setup_model(cfg, reader, torch.device("cpu"), lambda *a: None)
    batch = {k: v[None] for k, v in CacheStream(reader, 0)[0].items()}
    x = draw_inputs(batch, 1000, torch.Generator().manual_seed(0), model.recipe, model.noise_scheduler)
    assert x["huber_c"].shape == (1,) and x["loss_weights"].shape == (1,)
    summary = train(cfg, **QUIET)
    assert 0 < summary["final_loss"] < float("inf")


# -------------------------------------------------------------------------------- LoRA+ and --block-lr
def test_loraplus_gives_b_ratio_times_the_update_and_block_lr_groups(tmp_path, fp32_cache):
    from cache import CacheReader
    from cache.sampler import CacheStream
    from stages.train import setup_model, training_step
    reader = CacheReader(fp32_cache)
    batch = {k: torch.stack([CacheStream(reader, 0)[i][k] for i in range(2)]) for k in CacheStream(reader, 0)[0]}
    updates = {}
    for name, ratio in (("plain", None), ("plus", 4.0)):
        cfg = train_config(fp32_cache, tmp_path / name, optimizer="adamw", warmup_steps=0, weight_decay=0.0,
                           loraplus_lr_ratio=ratio)
        torch.manual_seed(cfg.seed)
        model = setup_model(cfg, reader, torch.device("cpu"), lambda *a: None)
        named = {n: p for n, p in model.unet.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in named.items()}
        training_step(model, [batch], 0, cfg)
        updates[name] = {n: p.detach() - before[n] for n, p in named.items()}
    b_keys = [n for n in updates["plain"] if ".lora_B." in n]
    assert b_keys and len(b_keys) * 2 == len(updates["plain"])
    for n, plain in updates["plain"].items():
        if ".lora_B." in n:
            assert plain.abs().max() > 0 and torch.allclose(updates["plus"][n], 4 * plain, rtol=1e-5, atol=1e-9), n
        else:
            assert torch.equal(updates["plus"][n], plain), n

    cfg = train_config(fp32_cache, tmp_path / "blocks", block_lr="down_blocks.1=0.5,mid_block=2", loraplus_lr_ratio=3.0)
    model = setup_model(cfg, reader, torch.device("cpu"), lambda *a: None)
    lrs = sorted(round(g["initial_lr"] / 1e-2, 6) for g in model.optimizer.param_groups)
    assert lrs == [0.5, 1.0, 1.5, 2.0, 3.0, 6.0]
    with pytest.raises(UserError, match="--block-lr up_blocks.9"):
        setup_model(train_config(fp32_cache, tmp_path / "x", block_lr="up_blocks.9=2"), reader, torch.device("cpu"),
                    lambda *a: None)
    with pytest.raises(UserError, match="LoRA\\+"):
        train_config(fp32_cache, tmp_path / "y", lora_type="loha", loraplus_lr_ratio=2.0)


# -------------------------------------------------------------------------------------------- --config
@pytest.mark.parametrize("suffix, text", [
    (".toml", 'learning-rate = 3e-4\nrank = 8\nno-kohya-file = true\ntarget_modules = "to_q,to_k"\nbatch-size = 2\n'),
    (".yaml", "learning_rate: 3.0e-4\nrank: 8\nkohya-file: false\ntarget-modules: to_q,to_k\nbatch_size: 2\n"),
    (".json", '{"learning_rate": 3e-4, "rank": 8, "kohya_file": false, "target_modules": "to_q,to_k", "batch_size": 2}'),
])
def test_config_file_plus_override_equals_the_same_flags(suffix, text, tmp_path):
    from pipeline import cli
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    command = cli.commands["train"]
    from_file = command.make_context("train", ["--config", str(path), "--rank", "4"]).params
    flags = command.make_context("train", ["--learning-rate", "3e-4", "--rank", "4", "--no-kohya-file",
                                           "--target-modules", "to_q,to_k", "--batch-size", "2"]).params
    assert from_file == flags and from_file["rank"] == 4


def test_train_config_json_reruns_with_one_change(tmp_path, default_run, cli):
    from pipeline import cli as group
    from stages.config import RUN_RECORD_EXTRAS
    saved = json.loads((default_run / "train_config.json").read_text())
    params = group.commands["train"].make_context(
        "train", ["--config", str(default_run / "train_config.json"), "--learning-rate", "1e-4"]).params
    assert params["learning_rate"] == 1e-4
    repeatable = {p.name for p in group.commands["train"].params if getattr(p, "multiple", False)}  # --cache
    assert all(params[k] == (tuple(v) if isinstance(v, list) else (v,) if k in repeatable else v)
               for k, v in saved.items() if k not in (*RUN_RECORD_EXTRAS, "learning_rate") and v is not None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: 4\nlearning_rat: 1e-4\nbogus: 1\n")
    proc = cli("train", "--config", bad, check=False)
    assert proc.returncode == 2 and "unknown key(s) learning_rat, bogus" in proc.stdout + proc.stderr
    proc = cli("info", "--config", bad, check=False)
    assert proc.returncode == 2 and "unknown key(s) rank, learning_rat, bogus for `info`" in proc.stdout + proc.stderr
