"""Training recipes beyond the reference: offset noise, min-SNR weights, timestep samplers, v-prediction
and zero terminal SNR, caption dropout with the cached empty caption, LoRA variants (DoRA, LoHa, LoKr),
target-module presets and rank patterns. Mostly compute_loss and pure functions on the tiny model."""
from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cache import CacheReader
from stages.errors import UserError
from stages.config import TARGET_PRESETS, parse_rank_pattern, resolve_target_modules
from stages.lora import LORA_WEIGHTS_NAME, attach_lora, load_into_pipeline, load_lora_weights_into, save_lora
from stages.sdxl import SDXL_SCHEDULER_CONFIG
from stages.recipes import (Recipe, caption_dropout_mask, configure_noise_scheduler, logit_normal_timesteps,
                            make_recipe, min_snr_weights, offset_noise, stratified_timesteps)
from cache.sampler import CacheStream, use_flipped
from stages.config import TrainConfig
from stages.recipes import draw_noise, step_generator
from stages.train import diffusion_losses, draw_inputs
from tests.conftest import REPO, max_abs_diff

T = 1000  # SDXL's num_train_timesteps


def compute_loss(unet, noise_scheduler, batch: dict, generator: torch.Generator, recipe: Recipe | None = None):
    """One micro-batch's diffusion loss with its draws, as training_step computes it (eager, one adapter)."""
    recipe = recipe or Recipe()
    x = draw_inputs(batch, noise_scheduler.config.num_train_timesteps, generator, recipe, noise_scheduler)
    return diffusion_losses(unet, [noise_scheduler], [x], [recipe])[0]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from intra-op threads, and on a shared CPU their spin-waits make
    its small matmuls up to 100x slower: run this module on one thread, then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ddpm(**overrides):
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG, **overrides)


def synthetic_batch(b: int, seed: int = 0, positions=None) -> dict:
    """A micro-batch shaped like the tiny model's cache (latents 4x8x8, embeddings 77x96, pooled 32)."""
    g = torch.Generator().manual_seed(seed)
    return {"latent_mean": torch.randn(b, 4, 8, 8, generator=g), "latent_std": 0.1 * torch.rand(b, 4, 8, 8, generator=g),
            "prompt_embeds": torch.randn(b, 77, 96, generator=g), "pooled_prompt_embeds": torch.randn(b, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * b),
            "position": torch.arange(b) if positions is None else torch.tensor(positions)}


class RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: records what compute_loss feeds it and predicts 0.5 * its input."""
    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
        self.calls.append(SimpleNamespace(sample=sample, timesteps=timestep, prompt_embeds=encoder_hidden_states,
                                          pooled=added_cond_kwargs["text_embeds"]))
        return SimpleNamespace(sample=0.5 * sample)


def reference_draws(batch: dict, generator: torch.Generator):
    """(latents, noise, timesteps) exactly as the reference recipe draws them, and the generator after."""
    latent_eps, noise, t = draw_noise(batch["latent_mean"].shape, T, generator)
    return batch["latent_mean"] + batch["latent_std"] * latent_eps, noise, t


# ----------------------------------------------------------------------------------- defaults and noise
def test_default_recipe_is_exactly_the_reference_loss():
    sched, batch = ddpm(), synthetic_batch(4)
    latents, noise, t = reference_draws(batch, step_generator(42, 3))
    expected = F.mse_loss(0.5 * sched.add_noise(latents, noise, t), noise)
    for recipe in (None, Recipe(seed=42, window=8)):
        unet = RecordingUNet()
        assert torch.equal(compute_loss(unet, sched, batch, step_generator(42, 3), recipe=recipe), expected)
        assert torch.equal(unet.calls[0].timesteps, t) and unet.calls[0].prompt_embeds is batch["prompt_embeds"]


def test_offset_noise_shifts_each_sample_and_channel_mean():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(256, 4, 8, 8, generator=g)
    delta = torch.randn(256, 4, 1, 1, generator=g)
    assert torch.allclose(offset_noise(noise, 0.1, delta) - noise, (0.1 * delta).expand_as(noise), atol=1e-6)

    recipe = Recipe(noise_offset=0.1)
    shift = recipe.noise(noise, step_generator(42, 0)) - noise
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # one value per sample and channel
    per_channel = shift[:, :, 0, 0]  # 1024 draws of offset * N(0, 1)
    assert 0.085 < per_channel.std().item() < 0.115 and abs(per_channel.mean().item()) < 0.02
    assert torch.equal(recipe.noise(noise, step_generator(42, 0)) - noise, shift)  # a pure function of the generator
    assert Recipe().noise(noise, step_generator(42, 0)) is noise

    # In compute_loss, delta is drawn after the reference draws and the shifted noise is both input and target.
    batch, sched = synthetic_batch(4), ddpm()
    g = step_generator(42, 5)
    latents, noise, t = reference_draws(batch, g)
    noise = noise + 0.1 * torch.randn((4, 4, 1, 1), generator=g)
    loss = compute_loss(RecordingUNet(), sched, batch, step_generator(42, 5), recipe=recipe)
    assert torch.allclose(loss, F.mse_loss(0.5 * sched.add_noise(latents, noise, t), noise), rtol=1e-6)


# -------------------------------------------------------------------------------------------- min-SNR
def test_min_snr_weights_equal_the_formula_and_diffusers_compute_snr():
    from diffusers.training_utils import compute_snr
    sched, t, gamma = ddpm(), torch.tensor([0, 10, 250, 500, 999]), 5.0
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2  # SDXL's scaled_linear
    alpha_bar = torch.cumprod(1 - betas, 0)[t]
    snr_by_hand = alpha_bar / (1 - alpha_bar)  # ~1176, 119, 2.04, 0.277, 0.0047
    snr = compute_snr(sched, t)
    assert torch.allclose(snr.double(), snr_by_hand, rtol=1e-4)
    assert 1170 < snr[0] < 1180 and 0.0046 < snr[4] < 0.0048
    eps, v = min_snr_weights(snr, gamma, "epsilon"), min_snr_weights(snr, gamma, "v_prediction")
    assert torch.allclose(eps.double(), torch.clamp(snr_by_hand, max=gamma) / snr_by_hand, rtol=1e-4)
    assert torch.allclose(v.double(), torch.clamp(snr_by_hand, max=gamma) / (snr_by_hand + 1), rtol=1e-4)
    assert eps[2:].tolist() == [1.0, 1.0, 1.0] and abs(eps[0].item() - gamma / snr[0].item()) < 1e-6
    zero = torch.tensor([0.0])  # the terminal timestep of a zero-terminal-SNR schedule
    assert min_snr_weights(zero, gamma, "epsilon").item() == 1.0 and min_snr_weights(zero, gamma, "v_prediction").item() == 0.0

    batch = synthetic_batch(4)
    latents, noise, t = reference_draws(batch, step_generator(1, 0))
    per_sample = ((0.5 * sched.add_noise(latents, noise, t) - noise) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * min_snr_weights(compute_snr(sched, t), gamma, "epsilon")).mean()
    loss = compute_loss(RecordingUNet(), sched, batch, step_generator(1, 0), recipe=Recipe(min_snr_gamma=gamma))
    assert torch.allclose(loss, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------ timestep samplers
def test_stratified_timesteps_cover_every_stratum_once_per_window():
    for window in (1, 3, 8, 7, 1000):
        t = stratified_timesteps(T, window, torch.Generator().manual_seed(window))
        starts = torch.arange(window + 1) * T // window
        strata = torch.bucketize(t, starts[1:], right=True)  # j with starts[j] <= t < starts[j + 1]
        assert sorted(strata.tolist()) == list(range(window)) and t.dtype == torch.long
    assert torch.bincount(stratified_timesteps(T, 2 * T, torch.Generator().manual_seed(0)), minlength=T).eq(2).all()

    # Through the recipe: an optimizer step of grad_accum 4 x batch 2 draws one timestep per stratum of 8.
    def step_timesteps(recipe, step, batch_size):
        out = []
        for first in range(step * 8, (step + 1) * 8, batch_size):
            batch = {"position": torch.arange(first, first + batch_size)}
            out.append(recipe.timesteps(torch.zeros(batch_size, dtype=torch.long), batch, T, None))
        return torch.cat(out)
    recipe = Recipe(seed=42, window=8, timestep_sampling="stratified")
    step3 = step_timesteps(recipe, 3, 2)
    assert sorted((step3 * 8 // T).tolist()) == list(range(8))
    assert torch.equal(step3, step_timesteps(recipe, 3, 2))  # a pure function of (seed, step, position)
    assert torch.equal(step3, step_timesteps(recipe, 3, 4))  # whatever the micro-batch split of the window
    assert not torch.equal(step3, step_timesteps(recipe, 4, 2))
    unet = RecordingUNet()
    batch = synthetic_batch(2, positions=[26, 27])  # step 3, micro-batch 1
    compute_loss(unet, ddpm(), batch, step_generator(42, 13), recipe=recipe)
    assert torch.equal(unet.calls[0].timesteps, step3[2:4])


def test_logit_normal_timesteps_are_in_range_and_deterministic():
    t = logit_normal_timesteps(20000, T, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and 0 <= t.min() and t.max() <= T - 1
    assert torch.equal(t, logit_normal_timesteps(20000, T, torch.Generator().manual_seed(0)))
    middle = ((t >= 250) & (t < 750)).float().mean().item()  # P(|z| < logit(0.75)) = 0.728; uniform: 0.5
    assert 0.70 < middle < 0.76
    assert logit_normal_timesteps(5, T, torch.Generator().manual_seed(1)).tolist() != \
        logit_normal_timesteps(5, T, torch.Generator().manual_seed(2)).tolist()

    # In compute_loss they come from the micro-batch generator, after the reference draws.
    g = step_generator(7, 2)
    reference_draws(synthetic_batch(4), g)
    expected = logit_normal_timesteps(4, T, g)
    unet = RecordingUNet()
    compute_loss(unet, ddpm(), synthetic_batch(4), step_generator(7, 2), recipe=Recipe(timestep_sampling="logit-normal"))
    assert torch.equal(unet.calls[0].timesteps, expected)
    # Under torchrun each rank gets its rows of the draws for the global micro-batch (here 2 ranks x 2).
    for rank in range(2):
        g = step_generator(7, 2)
        drawn = draw_noise(torch.Size([2, 4, 8, 8]), T, g, rank_slice=(rank, 2))[2]
        got = Recipe(timestep_sampling="logit-normal").timesteps(drawn, {}, T, g, rank_slice=(rank, 2))
        assert torch.equal(got, expected[2 * rank:2 * rank + 2])


# ---------------------------------------------------------------------- v-prediction, zero terminal SNR
def test_v_prediction_target_and_zero_terminal_snr_scheduler():
    from diffusers.training_utils import compute_snr
    base = ddpm()
    assert configure_noise_scheduler(base, None, False) is base
    sched = configure_noise_scheduler(base, "v_prediction", True)
    c = sched.config
    assert c.prediction_type == "v_prediction" and c.rescale_betas_zero_snr and c.timestep_spacing == "trailing"
    assert sched.alphas_cumprod[-1] == 0 and compute_snr(sched, torch.tensor([T - 1])).item() == 0
    assert torch.equal(sched.alphas_cumprod, ddpm(rescale_betas_zero_snr=True).alphas_cumprod)
    assert not torch.equal(sched.alphas_cumprod, base.alphas_cumprod)
    assert configure_noise_scheduler(base, "epsilon", False).config.prediction_type == "epsilon"

    batch = synthetic_batch(4)
    latents, noise, t = reference_draws(batch, step_generator(3, 0))
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    velocity = a.sqrt() * noise - (1 - a).sqrt() * latents  # v = sqrt(a) eps - sqrt(1 - a) x0
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    loss = compute_loss(RecordingUNet(), sched, batch, step_generator(3, 0))
    assert torch.allclose(loss, F.mse_loss(0.5 * noisy, velocity), rtol=1e-5)
    last = torch.full((4,), T - 1)  # zero terminal SNR: pure noise in, -x0 to predict
    assert torch.allclose(sched.add_noise(latents, noise, last), noise)
    assert torch.allclose(sched.get_velocity(latents, noise, last), -latents)
    weighted = compute_loss(RecordingUNet(), sched, batch, step_generator(3, 0), recipe=Recipe(min_snr_gamma=5.0))
    assert torch.isfinite(weighted)


# ------------------------------------------------------------------------------------- caption dropout
def collate(items: list[dict]) -> dict:
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def test_caption_dropout_replaces_exactly_the_chosen_samples(fp32_cache):
    reader = CacheReader(fp32_cache)
    empty = reader.empty_prompt()
    assert empty["prompt_embeds"].shape == (77, 96) and empty["pooled_prompt_embeds"].shape == (32,)
    stream = CacheStream(reader, seed=42)
    positions = list(range(16, 28))  # two epochs' worth of the 6 samples
    batch = collate([stream[p] for p in positions])
    assert batch["position"].tolist() == positions
    drop = caption_dropout_mask(42, positions, 0.5)
    assert 0 < int(drop.sum()) < len(positions)

    unet = RecordingUNet()
    recipe = Recipe(seed=42, caption_dropout=0.5, empty_prompt=empty)
    compute_loss(unet, ddpm(), batch, step_generator(42, 0), recipe=recipe)
    seen = unet.calls[0]
    for i, dropped in enumerate(drop.tolist()):
        pe, pooled = (empty["prompt_embeds"], empty["pooled_prompt_embeds"]) if dropped else \
            (batch["prompt_embeds"][i], batch["pooled_prompt_embeds"][i])
        assert torch.equal(seen.prompt_embeds[i], pe) and torch.equal(seen.pooled[i], pooled)
    assert not torch.equal(batch["prompt_embeds"][0], empty["prompt_embeds"])  # the check above has teeth

    # A pure function of (seed, position): whatever the batch it is in; another seed, other samples.
    assert torch.equal(caption_dropout_mask(42, positions, 0.5), drop)
    assert torch.equal(caption_dropout_mask(42, positions[5:], 0.5), drop[5:])
    many = range(4000)
    assert caption_dropout_mask(42, many, 0.5).tolist() != caption_dropout_mask(43, many, 0.5).tolist()
    assert 0.18 < caption_dropout_mask(42, many, 0.2).float().mean().item() < 0.22
    assert not caption_dropout_mask(42, many, 0.0).any() and caption_dropout_mask(42, many, 1.0).all()
    agree = sum(a == use_flipped(42, p) for p, a in zip(many, caption_dropout_mask(42, many, 0.5).tolist()))
    assert 0.45 < agree / 4000 < 0.55  # independent of the flips, which draw from another stream


def test_encode_rerun_adds_the_empty_caption_without_reencoding_samples(tmp_path, fp32_cache, tiny_model, image_folder):
    from diffusers import StableDiffusionXLPipeline

    from stages.encode import encode
    from tests.conftest import encode_config
    cache = shutil.copytree(fp32_cache, tmp_path / "cache")
    original = (cache / "empty_prompt.safetensors").read_bytes()
    (cache / "empty_prompt.safetensors").unlink()  # a cache encoded before the embedding was stored
    reader = CacheReader(cache)
    assert reader.empty_prompt() is None
    with pytest.raises(UserError, match="run the same `encode` command again"):
        make_recipe(42, 4, 0.0, None, "uniform", 0.1, reader.empty_prompt(), str(cache), torch.device("cpu"))
    make_recipe(42, 4, 0.0, None, "uniform", 0.0, None, str(cache), torch.device("cpu"))  # fine without caption dropout

    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    logs = []
    encode(encode_config(tiny_model, image_folder, cache), log=logs.append)
    assert any("up to date" in line for line in logs) and any("empty caption" in line for line in logs), logs
    after = {p.name: p.read_bytes() for p in cache.iterdir()}
    assert after.pop("empty_prompt.safetensors") == original and after == before  # shards and manifest untouched

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    pe, _, pooled, _ = pipe.encode_prompt("", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    empty = CacheReader(cache).empty_prompt()
    assert max_abs_diff(empty["prompt_embeds"], pe[0]) <= 1e-6
    assert max_abs_diff(empty["pooled_prompt_embeds"], pooled[0]) <= 1e-6


# ------------------------------------------------------------------------------ LoRA variants and presets
@pytest.fixture(scope="module")
def base_unet(tiny_model):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval()


def probe(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    enc = torch.randn(2, 77, 96, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64.0, 80, 0, 8, 64, 64]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), enc, added_cond_kwargs=added).sample


def readme_peft_snippet() -> str:
    readme = (REPO / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python")[1:]]
    return next(b for b in blocks if "LoKrConfig" in b)


@pytest.mark.parametrize("lora_type", ["lora", "dora", "loha", "lokr"])
def test_each_variant_trains_saves_and_reloads_to_the_same_outputs(lora_type, base_unet, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    targets, pattern = resolve_target_modules("all"), {"to_k": 2}  # attention, ff, resnet Linear and Conv2d
    unet = copy.deepcopy(base_unet)
    params = attach_lora(unet, 4, 8.0, targets, lora_type, pattern)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for step in range(2):
        loss = compute_loss(unet, ddpm(), synthetic_batch(2, seed=step), step_generator(0, step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_lora(unet, tmp_path)
    ours = probe(unet)
    unet.disable_adapters()
    assert max_abs_diff(ours, probe(unet)) > 1e-4  # trained: the comparisons below have teeth

    resumed = copy.deepcopy(base_unet)  # resume: into a freshly attached adapter
    attach_lora(resumed, 4, 8.0, targets, lora_type, pattern)
    load_lora_weights_into(resumed, tmp_path)
    assert max_abs_diff(probe(resumed), ours) <= 1e-6

    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=copy.deepcopy(base_unet), scheduler=ddpm())
    if lora_type in ("lora", "dora"):
        pipe.load_lora_weights(tmp_path)  # diffusers' own loader, metadata and all
    else:
        with pytest.raises(ValueError, match="lora"):
            pipe.load_lora_weights(tmp_path)  # diffusers' SDXL loader refuses LoHa / LoKr keys
        snippet = readme_peft_snippet().replace("sdxl-naruto-lora/pytorch_lora_weights.safetensors",
                                                str(tmp_path / LORA_WEIGHTS_NAME))
        exec(snippet, {"pipe": pipe})  # the README's peft snippet, as written
    assert max_abs_diff(probe(pipe.unet), ours) <= 1e-5
    other = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                      tokenizer_2=None, unet=copy.deepcopy(base_unet), scheduler=ddpm())
    load_into_pipeline(other, tmp_path)  # what `sample` uses, for every variant
    assert max_abs_diff(probe(other.unet), ours) <= 1e-5


def test_target_presets_resolve_to_the_documented_module_sets(base_unet, sdxl_meta_unet):
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

    def in_blocks(unet, kinds) -> set[str]:
        """Modules of `kinds` inside a transformer block (Transformer2DModel) or a resnet block."""
        blocks = [n for n, m in unet.named_modules() if isinstance(m, (Transformer2DModel, ResnetBlock2D))]
        return {n for n, m in unet.named_modules() if isinstance(m, kinds) and any(n.startswith(b + ".") for b in blocks)}

    sdxl = sdxl_meta_unet()
    for unet in (sdxl, base_unet):
        linear, conv = in_blocks(unet, torch.nn.Linear), in_blocks(unet, torch.nn.Conv2d)
        attn = {n for n in linear if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))}
        expected = {"attn": attn, "attn-ff": attn | {n for n in linear if n.endswith((".ff.net.0.proj", ".ff.net.2"))},
                    "all-linear": linear, "all": linear | conv}
        assert len(attn) > 0 and expected["attn-ff"] != attn and expected["all-linear"] != expected["attn-ff"]
        for preset, modules in expected.items():
            config = LoraConfig(target_modules=resolve_target_modules(preset))
            assert {n for n, _ in unet.named_modules() if check_target_module_exists(config, n)} == modules, preset
    assert resolve_target_modules("attn") == TrainConfig().target_module_list == ["to_q", "to_k", "to_v", "to_out.0"]
    assert resolve_target_modules(" to_q , ff.net.2 ") == ["to_q", "ff.net.2"]
    assert TrainConfig(target_modules="all").target_module_list == TARGET_PRESETS["all"]

    unet = copy.deepcopy(base_unet)  # the same sets once peft has injected the adapter
    attach_lora(unet, 2, 2.0, resolve_target_modules("all"), "lokr")
    linear, conv = in_blocks(base_unet, torch.nn.Linear), in_blocks(base_unet, torch.nn.Conv2d)
    assert {n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)} == linear | conv


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")  # peft's; we raise
def test_rank_pattern_is_applied_saved_and_checked(base_unet, tmp_path):
    from safetensors import safe_open
    assert parse_rank_pattern("to_k=8, mid_block.*to_q=2") == {"to_k": 8, "mid_block.*to_q": 2}
    assert parse_rank_pattern(None) == {} == parse_rank_pattern("")
    for bad in ("to_k", "to_k=0", "=4", "to_k=x"):
        with pytest.raises(ValueError, match="name=rank"):
            parse_rank_pattern(bad)
    unet = copy.deepcopy(base_unet)
    attach_lora(unet, 4, 8.0, resolve_target_modules("attn"), "lora", {"to_k": 8, "mid_block.*to_q": 2})
    ranks = {n: m.r["default"] for n, m in unet.named_modules() if hasattr(m, "r") and isinstance(m.r, dict)}
    assert ranks and all(r == (8 if n.endswith("to_k") else 2 if n.startswith("mid_block") and n.endswith("to_q") else 4)
                         for n, r in ranks.items())
    assert {2, 4, 8} == set(ranks.values())
    save_lora(unet, tmp_path)
    with safe_open(str(tmp_path / LORA_WEIGHTS_NAME), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        a = f.get_tensor(next(k for k in f.keys() if k.endswith("attn1.to_k.lora_A.weight")))
    assert meta["unet.rank_pattern"] == {"to_k": 8, "mid_block.*to_q": 2} and a.shape[0] == 8
    with pytest.raises(ValueError, match="--rank-pattern to_kk: matches no module"):
        attach_lora(copy.deepcopy(base_unet), 4, 8.0, resolve_target_modules("attn"), "lora", {"to_kk": 8})


# ------------------------------------------------------------------------------------- wiring and CLI
def test_setup_model_wires_every_option(tmp_path, fp32_cache):
    from stages.train import setup_model, training_step
    cfg = TrainConfig(cache=str(fp32_cache), output=str(tmp_path / "o"), batch_size=2, grad_accum=2, num_workers=0,
                      device="cpu", learning_rate=1e-3, warmup_steps=0, noise_offset=0.05, min_snr_gamma=5.0,
                      timestep_sampling="stratified", prediction_type="v_prediction", rescale_betas_zero_snr=True,
                      caption_dropout=0.5, lora_type="loha", target_modules="attn-ff", rank_pattern="ff.net.2=2")
    logs = []
    model = setup_model(cfg, CacheReader(fp32_cache), torch.device("cpu"), logs.append)
    c = model.noise_scheduler.config
    assert c.prediction_type == "v_prediction" and c.rescale_betas_zero_snr and model.resolved["prediction_type"] == "v_prediction"
    r = model.recipe
    assert (r.window, r.noise_offset, r.min_snr_gamma, r.timestep_sampling, r.caption_dropout) == (4, 0.05, 5.0, "stratified", 0.5)
    assert r.empty_prompt is not None and model.unet.peft_config["default"].peft_type == "LOHA"
    assert any(line.startswith("LoHa r16/alpha32 on attn-ff") for line in logs), logs
    stream = CacheStream(CacheReader(fp32_cache), cfg.seed)
    micro = [collate([stream[p] for p in range(i * 2, i * 2 + 2)]) for i in range(2)]
    losses = [compute_loss(model.unet, model.noise_scheduler, micro[0], step_generator(cfg.seed, 0), recipe=r)
              for _ in range(2)]
    assert torch.equal(losses[0], losses[1])  # no hidden state: resume regenerates the same draws
    result = training_step(model, micro, 0, cfg)
    assert not result["skipped"] and result["loss"] > 0


@pytest.mark.parametrize("args, message, code", [
    (["--caption-dropout", "1.5"], "0<=x<=1", 2),
    (["--noise-offset", "-0.1"], "must be >= 0", 2),
    (["--min-snr-gamma", "0"], "must be > 0", 2),
    (["--timestep-sampling", "cosine"], "Invalid value", 2),
    (["--lora-type", "lycoris"], "Invalid value", 2),
    (["--prediction-type", "sample"], "Invalid value", 2),
    (["--rank-pattern", "to_k=eight"], "expected name=rank", 1),
])
def test_invalid_recipe_options_are_clear_errors(args, message, code, fp32_cache, tmp_path):
    from pipeline import cli
    result = CliRunner().invoke(cli, ["train", "--cache", str(fp32_cache), "--output", str(tmp_path / "o"),
                                      "--device", "cpu", *args])
    assert result.exit_code == code and message in result.output, result.output
