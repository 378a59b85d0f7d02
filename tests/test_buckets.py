"""Aspect-ratio buckets and multi-resolution caches: `encode --buckets`, `encode --resolution 64,128`,
the bucket sampler, and `train --resolution-schedule` (tiny model, CPU)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cache import CacheReader, bucket_epoch_batches
from stages.data import bucket_sizes, nearest_bucket, preprocess, resize_to_cover, to_pixels
from stages.encode import encode
from stages.errors import UserError
from stages.config import TrainConfig, resolution_stages
from stages.train import train, train_batches
from tests.conftest import RESOLUTION, encode_config, max_abs_diff

STEP = 32  # bucket sides for the tiny model: latents of multiples of 4, as its UNet needs
# image name -> (width, height), and the bucket (height, width) it must land in at 64px with STEP
SHAPES = {"square.png": ((96, 96), (64, 64)), "square2.png": ((70, 72), (64, 64)),
          "wide.png": ((160, 48), (32, 96)), "wide2.png": ((150, 50), (32, 96)),
          "tall.png": ((48, 170), (128, 32)), "panorama.png": ((260, 40), (32, 128))}


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Six captioned images of several aspect ratios (imagefolder convention)."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    rows = []
    for name, ((w, h), _) in SHAPES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": f"a picture called {name[:-4]}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def bucket_cache(tmp_path_factory, tiny_model, mixed_folder) -> Path:
    cache = tmp_path_factory.mktemp("bucketed") / "cache"
    encode(encode_config(tiny_model, mixed_folder, cache, buckets=True, bucket_step=STEP, shard_size=2), log=lambda *a: None)
    return cache


@pytest.fixture(scope="module")
def multires_cache(tmp_path_factory, tiny_model, image_folder) -> Path:
    cache = tmp_path_factory.mktemp("multires") / "cache"
    encode(encode_config(tiny_model, image_folder, cache, resolution=(64, 128)), log=lambda *a: None)
    return cache


# ------------------------------------------------------------------------------------------ buckets
@pytest.mark.parametrize("resolution,step", [(64, 32), (1024, 64), (768, 64)])
def test_bucket_sizes_are_multiples_of_the_step_with_the_area_of_the_resolution(resolution, step):
    buckets = bucket_sizes(resolution, step, max_aspect=4.0)
    assert (resolution, resolution) in buckets
    for h, w in buckets:
        assert h % step == 0 and w % step == 0
        assert h * w <= resolution ** 2
        assert h * (w + step) > resolution ** 2 or w * (h + step) > resolution ** 2  # no side can grow
        assert max(h, w) / min(h, w) <= 4.0
        assert (w, h) in buckets  # every bucket has its transpose
    if resolution == 1024:  # SDXL's own training buckets include these
        assert {(1344, 768), (768, 1344), (1152, 896), (512, 2048)} <= set(buckets)


def test_nearest_bucket_by_aspect_ratio():
    buckets = bucket_sizes(64, STEP)
    for (w, h), expected in SHAPES.values():
        assert nearest_bucket(h, w, buckets) == expected


def test_bucket_preprocessing_resizes_to_cover_then_crops_and_records_time_ids():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 160, 3), dtype=np.uint8))
    pre = preprocess(image, 64, True, crop_seed="s", size=(32, 96))
    # 160x48 -> covers 96x32 with height binding: 106x32 (int(32 * 160 / 48) = 106), center crop left 5
    assert pre.pixels.shape == (3, 32, 96)
    assert pre.time_ids.tolist() == [48, 160, 0, 5, 32, 96]
    assert pre.time_ids_flipped.tolist() == [48, 160, 0, 106 - 96 - 5, 32, 96]
    expected = to_pixels(image.resize((106, 32), Image.BILINEAR).crop((5, 0, 101, 32)))
    assert torch.equal(pre.pixels, expected)
    assert resize_to_cover(image, 64, 64).size == (213, 64)  # a square target: torchvision's shorter-side resize


def test_encode_buckets_one_bucket_per_shard_with_matching_latents(bucket_cache, tiny_model, mixed_folder):
    from stages.encode import encode_latents
    from stages.sdxl import ModelSource, load_encoders
    reader = CacheReader(bucket_cache)
    m = reader.manifest
    assert m.bucketed and m.preprocessing["buckets"] == {"step": STEP, "max_aspect": 4.0}
    assert len(reader) == len(SHAPES)
    for shard in m.shards:  # one shape per shard, and the shard's tensors have it
        h, w = shard.size
        tensors = load_file(str(bucket_cache / shard.file))
        assert tensors["latent_mean"].shape[1:] == (4, h // 8, w // 8)
        assert (tensors["time_ids"][:, 4:] == torch.tensor([h, w], dtype=torch.float32)).all()
    vae = load_encoders(ModelSource(str(tiny_model)))["vae"]
    for i in range(len(reader)):
        sample = reader[i]
        (w, h), bucket = SHAPES[sample["key"]]
        assert reader.size(i) == bucket
        image = Image.open(mixed_folder / sample["key"]).convert("RGB")
        pre = preprocess(image, RESOLUTION, True, crop_seed="unused", size=bucket)
        assert torch.equal(sample["time_ids"], pre.time_ids) and torch.equal(sample["time_ids_flipped"], pre.time_ids_flipped)
        mean, _ = encode_latents(vae, torch.stack([pre.pixels, pre.pixels.flip(-1)]))
        sf = m.scaling_factor
        assert max_abs_diff(sample["latent_mean"], mean[0] * sf) < 1e-5
        assert max_abs_diff(sample["latent_mean_flipped"], mean[1] * sf) < 1e-5


def test_bucketed_cache_is_resumable_and_rerun_is_up_to_date(bucket_cache, tiny_model, mixed_folder, tmp_path):
    """Killed after its second shard, a bucketed encode resumes to the same shards as an uninterrupted one."""
    import os
    import subprocess
    import sys
    from tests.conftest import REPO
    cache = tmp_path / "cache"
    args = [sys.executable, str(REPO / "pipeline.py"), "encode", "--model", str(tiny_model), "--dataset",
            str(mixed_folder), "--cache", str(cache), "--resolution", "64", "--buckets", "--bucket-step", str(STEP),
            "--cache-dtype", "fp32", "--device", "cpu", "--num-workers", "0", "--batch-size", "4", "--shard-size", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SDXL_LORA_KILL_AT": "shards:2"}
    killed = subprocess.run(args, env=env, capture_output=True, text=True)
    assert killed.returncode != 0 and not (cache / "manifest.json").exists()
    env.pop("SDXL_LORA_KILL_AT")
    subprocess.run(args, env=env, check=True, capture_output=True)
    resumed, reference = CacheReader(cache), CacheReader(bucket_cache)
    assert [s.key for s in resumed.samples] == [s.key for s in reference.samples]
    for i in range(len(reference)):
        for k, v in reference[i].items():
            assert v == resumed[i][k] if isinstance(v, str) else torch.equal(v, resumed[i][k]), k
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    assert "up to date" in rerun.stdout


def test_bucket_epochs_are_shape_homogeneous_and_see_every_sample():
    buckets = [[0, 1, 2], [3], [4, 5, 6, 7, 8]]  # indices grouped by shape
    shape = {i: b for b, members in enumerate(buckets) for i in members}
    for batch in (1, 2, 4):
        epoch = bucket_epoch_batches(buckets, batch, seed=42, epoch=0)
        assert all(len(b) == batch and len({shape[i] for i in b}) == 1 for b in epoch)
        assert len(epoch) == sum(math.ceil(len(m) / batch) for m in buckets)
        seen = [i for b in epoch for i in b]
        assert set(seen) == set(range(9))
        if batch == 1:
            assert sorted(seen) == list(range(9))  # exactly once
        assert epoch == bucket_epoch_batches(buckets, batch, seed=42, epoch=0)  # a pure function
    assert bucket_epoch_batches(buckets, 1, 42, 0) != bucket_epoch_batches(buckets, 1, 42, 1)
    # fair: over many epochs every bucket appears at every place of the order, not one bucket first
    firsts = {shape[bucket_epoch_batches(buckets, 1, 42, e)[0][0]] for e in range(40)}
    assert firsts == {0, 1, 2}


def test_train_batches_come_from_one_bucket(bucket_cache):
    reader = CacheReader(bucket_cache)
    cfg = TrainConfig(cache=str(bucket_cache), batch_size=2, grad_accum=2, max_steps=6, num_workers=0, seed=3)
    sizes = []
    for step, micro in train_batches(reader, cfg, 0, torch.device("cpu")):
        for batch in micro:
            h, w = batch["latent_mean"].shape[-2:]
            assert (batch["time_ids"][:, 4:] == torch.tensor([h * 8, w * 8], dtype=torch.float32)).all()
            sizes.append((h * 8, w * 8))
    assert len(sizes) == 12 and len(set(sizes)) >= 3  # several buckets visited, each batch one shape


def test_bucketed_training_resumes_bit_identically(bucket_cache, tmp_path):
    base = dict(cache=str(bucket_cache), batch_size=2, grad_accum=1, max_steps=4, checkpoint_every=2, num_workers=0,
                device="cpu", optimizer="adamw", learning_rate=1e-3, warmup_steps=0)
    full = train(TrainConfig(output=str(tmp_path / "full"), **base), log=lambda *a: None)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    train(TrainConfig(output=str(tmp_path / "resumed"), resume="latest", **base), log=lambda *a: None)
    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it did train
    assert full["trained_steps"] == 4


# --------------------------------------------------------------------------------- multi-resolution
def test_multiresolution_cache_equals_separate_caches(multires_cache, fp32_cache):
    m = CacheReader(multires_cache).manifest
    assert m.resolutions == [64, 128] and m.preprocessing["resolution"] == [64, 128]
    assert m.num_samples == 6 and len(m.samples) == 12
    at64, single = CacheReader(multires_cache, 64), CacheReader(fp32_cache)
    assert len(at64) == len(single) == 6
    for i in range(6):  # the 64px entries are exactly what a 64px-only encode stores
        a, b = at64[i], single[i]
        assert a["key"] == b["key"] and all(torch.equal(a[k], b[k]) for k in a if k not in ("key", "caption"))
    at128 = CacheReader(multires_cache, 128)
    assert at128[0]["latent_mean"].shape == (4, 16, 16) and at128[0]["time_ids"][4:].tolist() == [128, 128]
    with pytest.raises(Exception, match="not 96"):
        CacheReader(multires_cache, 96)


def test_resolution_schedule_parsing(multires_cache):
    m = CacheReader(multires_cache).manifest
    stages = lambda spec, steps=10: resolution_stages(spec, m.resolutions, steps)
    assert stages("64:4,128") == [(64, 0, 4), (128, 4, 10)]
    assert stages("64:4,128:6") == [(64, 0, 4), (128, 4, 10)]
    assert stages("128") == [(128, 0, 10)]
    for bad, message in [("64:4,128:4", "covers 8 optimizer steps"), ("96", "not 96"), ("64:x,128", "expected"),
                         ("64:10,128", "nothing is left for it"), ("64,128", "expected")]:
        with pytest.raises(UserError, match=message):
            stages(bad)
    with pytest.raises(UserError, match="choose with --resolution-schedule"):
        resolution_stages(None, m.resolutions, 10)


def test_resolution_schedule_switches_at_the_given_step(multires_cache, tmp_path, cli):
    out = tmp_path / "out"
    cli("train", "--cache", multires_cache, "--output", out, "--resolution-schedule", "64:2,128", "--max-steps", "5",
        "--grad-accum", "1", "--checkpoint-every", "0", "--device", "cpu", "--num-workers", "0", "--optimizer", "adamw")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["resolution"] for r in rows] == [64, 64, 128, 128, 128]
    reader = CacheReader(multires_cache)
    cfg = TrainConfig(cache=str(multires_cache), resolution_schedule="64:2,128", max_steps=5, grad_accum=1, num_workers=0)
    shapes = [tuple(micro[0]["latent_mean"].shape[-2:]) for _, micro in train_batches(reader, cfg, 0, torch.device("cpu"))]
    assert shapes == [(8, 8)] * 2 + [(16, 16)] * 3
    resumed = [step for step, _ in train_batches(reader, cfg, 3, torch.device("cpu"))]
    assert resumed == [3, 4]


def test_encode_cli_resolution_lists(tiny_model, image_folder, tmp_path, cli):
    bad = cli("encode", "--model", tiny_model, "--dataset", image_folder, "--cache", tmp_path / "c",
              "--resolution", "64,abc", check=False)
    assert bad.returncode != 0 and "512,768,1024" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("encode", "--model", tiny_model, "--dataset", image_folder, "--cache", tmp_path / "c",
              "--resolution", "64", "--buckets", "--bucket-step", "48", check=False)
    assert bad.returncode != 0 and "--bucket-step 48" in bad.stderr and "Traceback" not in bad.stderr


def test_shards_fill_per_group_and_square_caches_keep_the_old_shard_records(tiny_model, mixed_folder, fp32_cache,
                                                                             tmp_path):
    from cache.writer import CacheWriter
    from cache.format import Manifest
    m = Manifest(fingerprint="x", encoder={}, preprocessing={"resolution": 64, "buckets": {"step": 32}}, dtype="fp32",
                 scaling_factor=1.0, shift_factor=None)
    w = CacheWriter(tmp_path / "w", m, shard_size=3)
    t = {"x": torch.zeros(2)}
    for i in range(7):  # one big group and a small one: shards are cut when the big one holds 3
        w.add_record([((64, 64, 64), t)] if i % 4 else [((64, 32, 96), t)], f"k{i}", "c", {})
    w.finish()
    assert [(s.num_samples, s.size) for s in m.shards] == [(1, [32, 96]), (3, [64, 64]), (1, [32, 96]), (2, [64, 64])]
    assert sorted(s.key for s in m.samples) == [f"k{i}" for i in range(7)] and w.records_done == 7
    plain = json.loads((fp32_cache / "manifest.json").read_text())["shards"]
    assert all(s["resolution"] is None and s["size"] is None for s in plain)  # readable as before


def test_a_stage_continues_the_epoch_order_of_the_previous_one(multires_cache):
    reader = CacheReader(multires_cache)
    cfg = TrainConfig(cache=str(multires_cache), resolution_schedule="64:3,128", max_steps=6, grad_accum=1, num_workers=0)
    keys = [k for _, micro in train_batches(reader, cfg, 0, torch.device("cpu")) for k in micro[0]["position"].tolist()]
    assert keys == list(range(6))  # positions run on across the stage boundary
    from cache.sampler import CacheStream
    a, b = CacheStream(CacheReader(multires_cache, 64), 42), CacheStream(CacheReader(multires_cache, 128), 42)
    visited = [a.index_at(p) for p in range(3)] + [b.index_at(p) for p in range(3, 6)]
    assert sorted(visited) == list(range(6))  # stage 2 takes the rest of the epoch, not the same images again
