"""Several caches in one run, kohya dataset folders and masked loss (issue 18, items 3, 4 and 5): the mixture's
proportions, per-cache loss weights and metrics, bit-identical resume, refusal of a cache from another model;
repeats of `N_name/` folders; masks stored like their images, the masked loss against a hand computation."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cache import CacheReader, open_caches
from cache.sampler import CacheStream, MixtureSchedule, MixtureStream, mixture_counts
from stages.config import TrainConfig, parse_cache_specs
from stages.data import decode_image, preprocess
from stages.encode import describe, encode
from stages.errors import UserError
from stages.lora import LORA_WEIGHTS_NAME
from stages.recipes import Recipe
from stages.train import train
from tests.conftest import encode_config

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def kohya_cache(tmp_path_factory, tiny_model):
    """A kohya dataset: 10_a/ and 2_b/ with one image each, a mask for a's image (its red channel), a random crop,
    tag captions with two shuffled copies each."""
    from stages.demo import make_images
    root = tmp_path_factory.mktemp("kohya")
    dataset, masks = root / "dataset", root / "masks"
    for folder in ("10_a", "2_b"):
        make_images(dataset / folder, count=1, captions="txt", seed=len(folder))
        (dataset / folder / "img_000.txt").write_text(f"{folder}, shape, flat colors, simple")
    (masks / "10_a").mkdir(parents=True)
    Image.open(dataset / "10_a" / "img_000.png").getchannel("R").save(masks / "10_a" / "img_000.png")
    cache = root / "cache"
    encode(kohya_config(tiny_model, dataset, cache), **QUIET)
    return dataset, cache


def kohya_config(model, dataset, cache):
    return encode_config(model, dataset, cache, masks=str(dataset.parent / "masks"), center_crop=False,
                         caption_variants=2, shuffle_tags=True)


def test_cache_specs_take_only_trailing_numbers_as_weights():
    assert parse_cache_specs("a:0.5") == [("a:0.5", 1.0, 1.0)]  # one --cache is always just a path
    assert parse_cache_specs(["style", "reg:0.25", "c:d:3:0.5", "run:2:1:1", "x:y"]) == [
        ("style", 1.0, 1.0), ("reg", 0.25, 1.0), ("c:d", 3.0, 0.5), ("run:2", 1.0, 1.0), ("x:y", 1.0, 1.0)]
    for bad in ("reg:0", "reg:1:0", ":2", "reg:"):
        with pytest.raises(UserError, match="--cache"):
            parse_cache_specs(["style", bad])
    assert TrainConfig(cache=("only",)).cache == "only"


def test_weights_3_to_1_give_300_and_100_of_400_micro_batches():
    schedule = MixtureSchedule([3, 1], block=8, seed=0)
    drawn = [schedule.at(m) for m in range(400)]
    labels = [c for c, _ in drawn]
    assert (labels.count(0), labels.count(1)) == (300, 100)
    assert [k for c, k in drawn if c == 1] == list(range(100))  # each cache's micro-batches in its own order
    assert labels != [c for c, _ in (MixtureSchedule([3, 1], 8, seed=1).at(m) for m in range(400))]  # seeded
    for n in range(0, 400, 8):  # at every block's end: within 1 of the exact share (largest remainders)
        counts = mixture_counts([3, 1.5, 0.5], n)
        assert sum(counts) == n and all(abs(c - n * w / 5) < 1 for c, w in zip(counts, [3, 1.5, 0.5]))


def test_a_kohya_folder_with_10_a_and_2_b_is_sampled_5_to_1(kohya_cache):
    _, cache = kohya_cache
    reader = CacheReader(cache)
    assert reader.manifest.dataset["repeats"] == {"10_a": 10, "2_b": 2}
    stream = CacheStream(reader, seed=0)
    keys = [reader.samples[stream.index_at(p)].key.split("/")[0] for p in range(120)]
    assert (keys.count("10_a"), keys.count("2_b")) == (100, 20)
    assert "kohya repeats    10_a: 10, 2_b: 2" in describe(reader.manifest)
    assert "masks            1 mask file(s)" in describe(reader.manifest)


def test_a_rerun_records_the_repeats_of_a_kohya_cache_made_before_them(kohya_cache, tiny_model, tmp_path):
    dataset, cache = kohya_cache
    old = tmp_path / "old"
    shutil.copytree(cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["dataset"]["repeats"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert CacheReader(old).manifest.repeats("10_a/img_000.png") == 1
    logs = []
    encode(kohya_config(tiny_model, dataset, old), log=logs.append)
    assert CacheReader(old).manifest.repeats("10_a/img_000.png") == 10 and any("up to date" in line for line in logs)


def test_masks_are_stored_cropped_and_resized_exactly_like_their_images(kohya_cache):
    dataset, cache = kohya_cache
    reader = CacheReader(cache)
    i = next(i for i, s in enumerate(reader.samples) if s.key.startswith("10_a"))
    sample, key = reader[i], reader.samples[i].key
    # the mask is the image's red channel: it must equal the preprocessed image's red channel, averaged per latent pixel
    pre = preprocess(decode_image((dataset / key).read_bytes()), 64, False, crop_seed=f"42:{key}")
    red = torch.nn.functional.avg_pool2d(((pre.pixels[:1] + 1) / 2), 8)
    assert sample["mask"].shape == (1, 8, 8) and (sample["mask"] - red).abs().max() <= 1e-6
    assert torch.equal(sample["mask_flipped"], sample["mask"].flip(-1))
    other = reader[1 - i]
    assert torch.equal(other["mask"], torch.ones(1, 8, 8))  # no mask file: counts fully


def test_masked_loss_equals_a_hand_computed_weighted_mse_and_ones_equal_the_plain_loss():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    mask = torch.rand(3, 1, 8, 8, generator=g)
    mask[2] = 0.0  # nothing to learn in this sample: it adds 0
    hand = sum(((pred[b] - target[b]) ** 2 * mask[b]).sum() / (4 * mask[b].sum()) if mask[b].sum() else 0
               for b in range(3)) / 3
    recipe = Recipe(masked_loss=True)
    assert abs(recipe.loss(pred, target, mask=mask).item() - hand.item()) <= 1e-6
    ones = torch.ones(3, 1, 8, 8)
    assert torch.equal(recipe.loss(pred, target, mask=ones), Recipe().loss(pred, target))
    w = torch.tensor([0.5, 1.0, 2.0])
    assert torch.equal(recipe.loss(pred, target, w, mask=ones), Recipe().loss(pred, target, w))


def test_loss_weights_scale_each_cache_and_its_loss_is_recorded():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    recipe = Recipe(cache_loss_weights=torch.tensor([1.0, 0.25]), cache_names=("style", "reg"),
                    cache_losses=torch.zeros(2, 2))
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    cache = torch.tensor([0, 0, 1, 1])
    loss = recipe.loss(pred, target, cache=cache)
    assert torch.allclose(loss, (per_sample * torch.tensor([1, 1, 0.25, 0.25])).mean())
    row = recipe.cache_loss_row()
    assert row == pytest.approx({"loss/style": per_sample[:2].mean().item(), "loss/reg": per_sample[2:].mean().item()})
    assert recipe.cache_loss_row() == {}  # read once: the sums start over


def test_mixture_stream_draws_each_cache_as_weighted(fp32_cache, kohya_cache):
    mixture = open_caches(parse_cache_specs([str(fp32_cache), f"{kohya_cache[1]}:0.25"]))
    stream = MixtureStream(mixture, seed=0, batch=2)
    caches = [int(stream[p]["cache"]) for p in range(0, 800, 2)]  # one per micro-batch of 2
    block = stream.schedule.block
    whole = 400 // block * block
    assert abs(caches[:whole].count(1) - whole / 5) < 1 and abs(caches.count(1) - 80) <= block
    first = stream[0]
    assert int(first["position"]) == 0 and first["latent_mean"].shape == (4, 8, 8)


def _train_mixture(caches, out, **kw):
    kw = {**dict(max_steps=4, batch_size=2, grad_accum=2, warmup_steps=1, learning_rate=1e-2, checkpoint_every=2,
                 num_workers=0, device="cpu", rank=4), **kw}
    return train(TrainConfig(cache=tuple(caches), output=str(out), **kw), **QUIET)


def test_a_mixture_run_logs_per_cache_losses_and_resumes_bit_identically(fp32_cache, kohya_cache, tmp_path):
    caches = [str(fp32_cache), f"{kohya_cache[1]}:0.5:2"]
    full = tmp_path / "full"
    _train_mixture(caches, full, masked_loss=True)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r) & {"loss/fp32", "loss/cache"} for r in rows)
    assert any("loss/cache" in r for r in rows) and any("loss/fp32" in r for r in rows)
    part = tmp_path / "part"
    shutil.copytree(full, part)  # as if killed after checkpoint-2
    (part / LORA_WEIGHTS_NAME).unlink()
    shutil.rmtree(part / "checkpoint-4")
    _train_mixture(caches, part, masked_loss=True, resume="latest")
    a, b = load_file(str(full / LORA_WEIGHTS_NAME)), load_file(str(part / LORA_WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]
    assert [r.get("loss/cache") for r in resumed] == [r.get("loss/cache") for r in rows]
    with pytest.raises(UserError, match="holds other samples"):  # other weights: another data order
        _train_mixture([str(fp32_cache), f"{kohya_cache[1]}:0.7:2"], part, max_steps=6, resume="latest")


def test_a_cache_from_another_model_is_refused_in_a_mixture(fp32_cache, tmp_path, cli, image_folder):
    from stages.sdxl import build_tiny_sdxl
    other_model = build_tiny_sdxl(tmp_path / "other-model", seed=1)
    other = tmp_path / "other-cache"
    encode(encode_config(other_model, image_folder, other), **QUIET)
    result = cli("train", "--cache", fp32_cache, "--cache", f"{other}:0.5", "--output", tmp_path / "out",
                 "--device", "cpu", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "was encoded with other vae, text_encoder, text_encoder_2 weights" in message, message
    assert not (tmp_path / "out").exists()  # refused before the output or any model


def test_masked_loss_without_masks_is_refused_before_anything_loads(fp32_cache, tmp_path, cli):
    result = cli("train", "--cache", fp32_cache, "--output", tmp_path / "out", "--masked-loss", check=False)
    assert result.returncode != 0 and "--masked-loss needs masks in the cache" in result.stderr


def test_alpha_masks_come_from_the_images_own_alpha_channel():
    import io
    from stages.data import decode_mask
    rgba = Image.new("RGBA", (16, 8), (10, 20, 30, 255))
    rgba.putpixel((3, 2), (10, 20, 30, 0))
    data = io.BytesIO()
    rgba.save(data, format="PNG")
    alpha = np.asarray(decode_mask(data.getvalue(), alpha=True))
    assert alpha.shape == (8, 16) and alpha[2, 3] == 0 and alpha.sum() == 255 * (16 * 8 - 1)
    data = io.BytesIO()
    rgba.convert("RGB").save(data, format="PNG")
    assert decode_mask(data.getvalue(), alpha=True) is None  # no alpha: the sample counts fully
