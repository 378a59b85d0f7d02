"""Stage 2: golden losses against on-the-fly encoding, the LoRA round trip through diffusers, resume,
the end-to-end CLI, and the clear errors."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from PIL import Image
from safetensors.torch import load_file, save_file

from cache import CacheReader
from stages.data import decode_image, preprocess
from stages.lora import LORA_WEIGHTS_NAME, attach_lora
from cache.sampler import CacheStream, use_flipped
from stages.checkpoint import join_tensors, split_tensors
from stages.config import TrainConfig
from stages.recipes import draw_noise, step_generator
from stages.train import train, training_step
from tests.conftest import RESOLUTION, max_abs_diff

QUIET = dict(log=lambda *a: None)


def train_config(cache, output, **overrides) -> TrainConfig:
    kw = dict(cache=str(cache), output=str(output), max_steps=3, batch_size=2, grad_accum=2, warmup_steps=1,
              learning_rate=1e-2, checkpoint_every=0, num_workers=0, device="cpu")
    kw.update(overrides)
    return TrainConfig(**kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fp32_cache):
    """A 3-step run on the fp32 cache; returns (output folder, summary with the trained UNet)."""
    out = tmp_path_factory.mktemp("train") / "lora"
    summary = train(train_config(fp32_cache, out, alpha=8.0, rank=4), **QUIET)
    return out, summary


def test_default_lora_on_full_sdxl_unet_has_23_224_320_trainable_parameters(sdxl_meta_unet):
    unet = sdxl_meta_unet()
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    cfg = TrainConfig()
    params = attach_lora(unet, cfg.rank, cfg.alpha, cfg.target_module_list)
    assert sum(p.numel() for p in params) == 23_224_320
    assert all(p.dtype == torch.float32 for p in params)


def on_the_fly_batch(position_list, seed, image_folder, tiny_model, parts):
    """The micro-batch the reference recipe computes from images: VAE + text encoders on the fly."""
    vae, pipe = parts
    stream_keys, flips = position_list
    latents_mean, latents_std, embeds, pooled, ids = [], [], [], [], []
    for key, flip in zip(stream_keys, flips):
        captions = {json.loads(line)["file_name"]: json.loads(line)["text"]
                    for line in (image_folder / "metadata.jsonl").read_text().splitlines()}
        pre = preprocess(decode_image((image_folder / key).read_bytes()), RESOLUTION, True, crop_seed="unused")
        pixels = pre.pixels.flip(-1) if flip else pre.pixels
        with torch.no_grad():
            dist = vae.encode(pixels[None]).latent_dist
            pe, _, pp, _ = pipe.encode_prompt(captions[key], device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
        sf = vae.config.scaling_factor
        latents_mean.append(dist.mean[0] * sf)
        latents_std.append(dist.std[0] * sf)
        embeds.append(pe[0])
        pooled.append(pp[0])
        ids.append(pre.time_ids_flipped if flip else pre.time_ids)
    return {"latent_mean": torch.stack(latents_mean), "latent_std": torch.stack(latents_std),
            "prompt_embeds": torch.stack(embeds), "pooled_prompt_embeds": torch.stack(pooled),
            "time_ids": torch.stack(ids)}


def test_golden_losses_from_cache_equal_on_the_fly_encoding(tmp_path, fp32_cache, tiny_model, image_folder):
    """The proof that the cache changes nothing that is learned: same noise, timesteps and latent draws,
    the cache-fed run and a run that encodes every micro-batch on the fly give the same losses."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from stages.train import setup_model
    cfg = train_config(fp32_cache, tmp_path / "cached", max_steps=4)
    summary = train(cfg, **QUIET)
    cached_losses = [json.loads(line)["loss"] for line in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert len(cached_losses) == 4 and summary["final_loss"] > 0

    reader = CacheReader(fp32_cache)
    stream = CacheStream(reader, cfg.seed)
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    torch.manual_seed(cfg.seed)
    model = setup_model(cfg, reader, torch.device("cpu"), lambda *a: None)  # same LoRA init, same optimizer
    reference_losses = []
    per_micro = cfg.batch_size
    for step in range(cfg.max_steps):
        micro = []
        for m in range(cfg.grad_accum):
            positions = range((step * cfg.grad_accum + m) * per_micro, (step * cfg.grad_accum + m + 1) * per_micro)
            keys = [reader.manifest.samples[stream.index_at(p)].key for p in positions]
            flips = [use_flipped(cfg.seed, p) for p in positions]
            micro.append(on_the_fly_batch((keys, flips), cfg.seed, image_folder, tiny_model, (vae, pipe)))
        reference_losses.append(training_step(model, micro, step, cfg)["loss"])
    assert max(abs(a - b) for a, b in zip(cached_losses, reference_losses)) <= 1e-5, (cached_losses, reference_losses)
    assert len(set(round(x, 6) for x in cached_losses)) == 4  # real, varying losses, not a constant


def test_lora_loads_in_diffusers_with_alpha_and_matches_trained_unet(trained, tiny_model):
    from diffusers import StableDiffusionXLPipeline
    out, summary = trained
    unet = summary["unet"].eval()
    with safe_open(str(out / LORA_WEIGHTS_NAME), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(k.startswith("unet.") and (k.endswith("lora_A.weight") or k.endswith("lora_B.weight")) for k in keys)
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8.0

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(out)
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    enc = torch.randn(2, 77, c.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64., 80, 0, 8, 64, 64]] * 2)}
    with torch.no_grad():
        ours = unet(x, t, enc, added_cond_kwargs=added).sample
        theirs = pipe.unet(x, t, enc, added_cond_kwargs=added).sample
        pipe.unet.disable_adapters()
        base = pipe.unet(x, t, enc, added_cond_kwargs=added).sample
    assert max_abs_diff(ours, theirs) <= 1e-5
    assert max_abs_diff(ours, base) > 1e-4  # the LoRA changed the model: the comparison above has teeth


def test_lora_without_alpha_metadata_would_load_at_another_strength(trained, tiny_model, tmp_path):
    """Why the metadata matters: stripped of it, diffusers assumes alpha = rank (here 4 instead of 8)."""
    from diffusers import StableDiffusionXLPipeline
    out, summary = trained
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    save_file(load_file(str(out / LORA_WEIGHTS_NAME)), str(stripped / LORA_WEIGHTS_NAME))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(stripped)
    module = next(m for n, m in pipe.unet.named_modules() if n.endswith("to_q") and hasattr(m, "scaling"))
    assert module.scaling["default_0"] == 1.0
    ours = next(m for n, m in summary["unet"].named_modules() if n.endswith("to_q") and hasattr(m, "scaling"))
    assert ours.scaling["default"] == 2.0


def test_resume_from_checkpoint_is_bit_identical(tmp_path, fp32_cache):
    full = tmp_path / "full"
    train(train_config(fp32_cache, full, max_steps=4, checkpoint_every=2), **QUIET)
    part = tmp_path / "part"
    train(train_config(fp32_cache, part, max_steps=4, checkpoint_every=2), **QUIET)
    # Simulate a crash after checkpoint-2: the final LoRA and the later checkpoint never got written.
    (part / LORA_WEIGHTS_NAME).unlink()
    shutil.rmtree(part / "checkpoint-4")
    rows = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(rows[:3]) + "\n")  # one row past the checkpoint
    train(train_config(fp32_cache, part, max_steps=4, checkpoint_every=2, resume="latest"), **QUIET)

    a, b = load_file(str(full / LORA_WEIGHTS_NAME)), load_file(str(part / LORA_WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, part)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_checkpoint_state_round_trips_without_pickle():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5), "nested": {"q": torch.randn(2)}}},
             "param_groups": [{"lr": 1e-3, "params": [0]}], "scale": 65536.0}
    tensors = {}
    skeleton = json.loads(json.dumps(split_tensors(state, tensors)))
    back = join_tensors(skeleton, tensors)
    assert list(back["state"]) == [0]
    assert torch.equal(back["state"][0]["nested"]["q"], state["state"][0]["nested"]["q"])
    assert back["param_groups"] == state["param_groups"] and back["scale"] == 65536.0


def test_randomness_is_a_pure_function_of_seed_and_position():
    a = draw_noise(torch.Size([2, 4, 8, 8]), 1000, step_generator(42, 7))
    b = draw_noise(torch.Size([2, 4, 8, 8]), 1000, step_generator(42, 7))
    c = draw_noise(torch.Size([2, 4, 8, 8]), 1000, step_generator(42, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])
    flips = [use_flipped(42, p) for p in range(2000)]
    assert flips == [use_flipped(42, p) for p in range(2000)]
    assert 0.45 < sum(flips) / len(flips) < 0.55


def test_stream_visits_every_sample_once_per_epoch(fp32_cache):
    reader = CacheReader(fp32_cache)
    stream = CacheStream(reader, seed=3)
    n = len(reader)
    for epoch in range(2):
        keys = [stream[p]["latent_mean"] for p in range(epoch * n, (epoch + 1) * n)]
        order = [stream.index_at(p) for p in range(epoch * n, (epoch + 1) * n)]
        assert sorted(order) == list(range(n)) and len(keys) == n
    assert [stream.index_at(p) for p in range(n)] != [stream.index_at(p) for p in range(n, 2 * n)]


def test_non_finite_step_is_skipped_and_leaves_weights_unchanged(tmp_path, fp32_cache):
    from stages.train import setup_model
    cfg = train_config(fp32_cache, tmp_path / "nan")
    reader = CacheReader(fp32_cache)
    model = setup_model(cfg, reader, torch.device("cpu"), lambda *a: None)
    batch = {k: v[None] for k, v in CacheStream(reader, 0)[0].items()}
    batch["prompt_embeds"] = torch.full_like(batch["prompt_embeds"], float("nan"))
    before = [p.detach().clone() for p in model.params]
    result = training_step(model, [batch], 0, cfg)
    assert result["skipped"] and result["bad"]
    assert all(torch.equal(p, q) for p, q in zip(before, model.params))


def test_training_runs_without_vae_and_text_encoders(tmp_path, fp32_cache, tiny_model):
    unet_only = tmp_path / "unet-only"
    shutil.copytree(tiny_model, unet_only)
    for part in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.rmtree(unet_only / part)
    from stages.errors import UserError
    with pytest.raises(UserError, match="is not the model the cache was encoded with .* --allow-other-model"):
        train(train_config(fp32_cache, tmp_path / "out", model=str(unet_only), max_steps=2), **QUIET)
    summary = train(train_config(fp32_cache, tmp_path / "out", model=str(unet_only), max_steps=2,
                                 allow_other_model=True), **QUIET)
    assert (tmp_path / "out" / LORA_WEIGHTS_NAME).exists() and summary["final_loss"] > 0


def test_a_short_run_says_what_its_final_loss_averages(tmp_path, fp32_cache):
    logs = []
    train(train_config(fp32_cache, tmp_path / "out", max_steps=1, checkpoint_every=0), log=logs.append)
    line = next(line for line in logs if line.startswith("trained "))
    assert line.startswith("trained 1 step in ") and "(mean of the last 1 step)" in line, line


def test_cache_that_does_not_fit_the_unet_is_refused(tmp_path, tiny_model):
    from stages.bench import write_synthetic_cache
    from stages.errors import UserError
    cache = tmp_path / "sdxl-shaped"
    write_synthetic_cache(cache, num_samples=2, resolution=64, model=str(tiny_model))  # 2048-wide embeddings
    with pytest.raises(UserError, match="does not fit this UNet.*cross_attention_dim"):
        train(train_config(cache, tmp_path / "out"), **QUIET)


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_end_to_end_cli_encode_once_train_twice(tmp_path, tiny_model, image_folder, cli):
    cache = tmp_path / "cache"
    cli("encode", "--model", tiny_model, "--dataset", image_folder, "--cache", cache, "--resolution", RESOLUTION,
        "--num-workers", 0)
    before = tree_digest(cache)
    runs = {}
    for name, lr, rank in (("a", "1e-3", 4), ("b", "5e-3", 8)):
        proc = cli("train", "--cache", cache, "--output", tmp_path / name, "--max-steps", 2, "--grad-accum", 1,
                   "--learning-rate", lr, "--rank", rank, "--checkpoint-every", 1, "--num-workers", 0)
        assert "trained 2 steps" in proc.stdout
        runs[name] = load_file(str(tmp_path / name / LORA_WEIGHTS_NAME))
        config = json.loads((tmp_path / name / "train_config.json").read_text())
        assert config["learning_rate"] == float(lr) and config["rank"] == rank
        assert (tmp_path / name / "checkpoint-1" / LORA_WEIGHTS_NAME).exists()
    assert tree_digest(cache) == before  # training never writes to the cache
    key = next(k for k in runs["a"] if k.endswith("lora_A.weight"))
    assert runs["a"][key].shape[0] == 4 and runs["b"][key].shape[0] == 8


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "must be > 0"),
    (["--learning-rate", "0"], "must be > 0"),
    (["--grad-accum", "0"], "must be > 0"),
    (["--mixed-precision", "fp8"], "Invalid value"),
])
def test_invalid_hyperparameters_are_usage_errors(args, message, fp32_cache, tmp_path):
    from pipeline import cli
    result = CliRunner().invoke(cli, ["train", "--cache", str(fp32_cache), "--output", str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "o").exists()


def test_missing_cache_and_finished_output_are_one_line_errors(tmp_path, trained, fp32_cache):
    from pipeline import cli
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--cache", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and "cache folder not found" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)

    out, _ = trained
    digest = tree_digest(out)
    result = runner.invoke(cli, ["train", "--cache", str(fp32_cache), "--output", str(out)])
    assert result.exit_code == 1 and "already holds a finished LoRA" in result.output
    assert tree_digest(out) == digest

    half = tmp_path / "half"
    shutil.copytree(fp32_cache, half)
    (half / "manifest.json").write_text((half / "manifest.json").read_text()[:100])
    result = runner.invoke(cli, ["train", "--cache", str(half), "--output", str(tmp_path / "o2")])
    assert result.exit_code == 1 and "unreadable or incomplete" in result.output


def test_validation_renders_cached_prompts_like_diffusers_with_the_saved_lora(tmp_path, tiny_model, image_folder):
    """Validation images come from the training UNet and cached embeddings; they equal what diffusers
    renders from the prompt text with the saved LoRA loaded, same seed."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline

    from stages.encode import encode
    from tests.conftest import encode_config
    cache = tmp_path / "cache"
    prompts = ("a red circle on a blue background", "a green square")
    encode(encode_config(tiny_model, image_folder, cache, validation_prompt=prompts), **QUIET)
    assert CacheReader(cache).validation()["prompt_embeds"].shape[0] == 2
    out = tmp_path / "out"
    train(train_config(cache, out, max_steps=4, validate_every=2, validation_steps=3), **QUIET)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("validation_image") for r in rows] == [None, "samples/step-00002.png", None, "samples/step-00004.png"]

    from stages.sample import labelled_grid
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(out)
    pipe.set_progress_bar_config(disable=True)
    images = [pipe(p, num_inference_steps=3, guidance_scale=5.0, height=RESOLUTION, width=RESOLUTION,
                   generator=torch.Generator("cpu").manual_seed(42 + i)).images[0] for i, p in enumerate(prompts)]
    expected = np.asarray(labelled_grid([("step 4", images)], list(prompts)), dtype=np.int16)
    got = np.asarray(Image.open(out / "samples" / "step-00004.png"), dtype=np.int16)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 2
    first = np.asarray(Image.open(out / "samples" / "step-00002.png"), dtype=np.int16)
    assert np.abs(first - got).max() > 2  # training between the two validations changed the images


def test_validate_every_without_prompts_in_the_cache_is_a_clear_error(tmp_path, fp32_cache):
    from stages.errors import UserError
    with pytest.raises(UserError, match="encode .* again with --validation-prompt"):
        train(train_config(fp32_cache, tmp_path / "out", validate_every=1), **QUIET)
