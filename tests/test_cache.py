"""The shard cache: manifest, shard layout, CacheReader random access / pickling / integrity, epoch order."""
from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cache import FORMAT_VERSION, CacheError, CacheReader, Manifest, epoch_order
from cache.format import MANIFEST_NAME, PROGRESS_NAME

from tests.conftest import RESOLUTION

TENSORS = {"latent_mean", "latent_std", "latent_mean_flipped", "latent_std_flipped", "prompt_embeds",
           "pooled_prompt_embeds", "time_ids", "time_ids_flipped"}
LATENTS = {"latent_mean", "latent_std", "latent_mean_flipped", "latent_std_flipped"}


def read_shards(cache: Path, manifest: Manifest) -> list[dict[str, torch.Tensor]]:
    out = []
    for shard in manifest.shards:
        with safe_open(str(cache / shard.file), framework="pt") as f:
            out.append({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture
def cache_copy(fp32_cache, tmp_path) -> Path:
    """A private copy of the session cache, free to damage."""
    return Path(shutil.copytree(fp32_cache, tmp_path / "copy"))


def assert_same_sample(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------------------------------- manifest
def test_manifest_json_round_trip(fp32_cache):
    m = Manifest.load(fp32_cache)
    d = m.to_json()
    assert d["num_samples"] == m.num_samples == 6
    assert Manifest.from_json(d) == m
    assert Manifest.from_json(json.loads(json.dumps(d))) == m  # through real JSON text
    assert json.loads((fp32_cache / MANIFEST_NAME).read_text()) == json.loads(json.dumps(d))
    assert m.format_version == FORMAT_VERSION
    assert m.dtype == "fp32" and m.preprocessing == {"resolution": RESOLUTION, "center_crop": True, "flip": True}
    assert m.scaling_factor == pytest.approx(0.13025) and m.shift_factor is None
    assert len(m.fingerprint) == 64 and m.created.endswith("Z")


def test_shard_layout(fp32_cache):
    m = Manifest.load(fp32_cache)
    assert [s.file for s in m.shards] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert [s.num_samples for s in m.shards] == [4, 2]
    for s in m.shards:
        p = fp32_cache / s.file
        assert s.bytes == p.stat().st_size
        assert s.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert [(s.shard, s.row) for s in m.samples] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert [s.key for s in m.samples] == [f"img_{i:03d}.png" for i in range(6)]
    assert all(len(s.source["sha256"]) == 64 and s.source["path"].endswith(s.key) for s in m.samples)
    # nothing but the shards, the manifest and the empty caption's embedding: no journal, no temporary files
    assert sorted(p.name for p in fp32_cache.iterdir()) == ["empty_prompt.safetensors", MANIFEST_NAME,
                                                            "shard-00000.safetensors", "shard-00001.safetensors"]
    lat = RESOLUTION // 8
    for shard, tensors in zip(m.shards, read_shards(fp32_cache, m)):
        n = shard.num_samples
        assert set(tensors) == TENSORS
        for k in LATENTS:
            assert tensors[k].shape == (n, 4, lat, lat) and tensors[k].dtype == torch.float32, k
        assert tensors["prompt_embeds"].shape == (n, 77, 32 + 64)  # tiny CLIP-L width + tiny bigG width
        assert tensors["pooled_prompt_embeds"].shape == (n, 32)
        assert tensors["time_ids"].shape == (n, 6) and tensors["time_ids"].dtype == torch.float32
        assert tensors["time_ids"].tolist() == [[64, 80, 0, 8, 64, 64]] * n
        assert (tensors["latent_std"] > 0).all()
    with safe_open(str(fp32_cache / m.shards[0].file), framework="pt") as f:
        assert f.metadata() == {"format": "sdxl-lora-cache"}


# ------------------------------------------------------------------------------------------ reader
def test_reader_random_access_matches_shards(fp32_cache):
    reader = CacheReader(fp32_cache)
    m = reader.manifest
    shards = read_shards(fp32_cache, m)
    assert len(reader) == 6 and reader.flipped
    assert set(reader.tensor_names()) == TENSORS
    order = list(range(len(reader)))
    random.Random(0).shuffle(order)
    assert order != sorted(order)
    for i in order:
        sample = reader[i]
        info = m.samples[i]
        assert sample["key"] == info.key and sample["caption"] == info.caption
        assert set(sample) == TENSORS | {"key", "caption"}
        for name in TENSORS:
            raw = shards[info.shard][name][info.row]
            # latents come back scaled as the UNet consumes them (no shift for SDXL)
            want = raw * m.scaling_factor if name in LATENTS else raw
            assert sample[name].dtype == raw.dtype, name
            assert torch.equal(sample[name], want), (i, name)


def test_reader_negative_and_out_of_range_indices(fp32_cache):
    reader = CacheReader(fp32_cache)
    assert_same_sample(reader[-1], reader[5])
    assert_same_sample(reader[-6], reader[0])
    assert reader[-1]["key"] == "img_005.png"
    for bad in (6, 100, -7):
        with pytest.raises(IndexError, match="out of range"):
            reader[bad]
    # indices as training produces them (0-d tensors from epoch_order)
    assert_same_sample(reader[epoch_order(6, 0, 0)[0]], reader[int(epoch_order(6, 0, 0)[0])])


def test_reader_pickles_for_dataloader_workers(fp32_cache):
    from torch.utils.data import DataLoader
    reader = CacheReader(fp32_cache)
    expected = [reader[i] for i in range(len(reader))]  # opens both shard handles
    assert len(reader._handles) == 2
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._handles == {}
    assert len(clone) == 6
    for i in (5, 0, 3):
        assert_same_sample(clone[i], expected[i])
    assert len(reader._handles) == 2  # pickling left the original's handles alone
    # a real worker process: spawn pickles the dataset into it
    loader = DataLoader(reader, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    got = list(loader)
    assert [g["key"] for g in got] == [e["key"] for e in expected]
    for g, e in zip(got, expected):
        assert_same_sample(g, e)


def test_verify_intact(fp32_cache):
    assert CacheReader(fp32_cache).verify() == []


def test_verify_finds_flipped_byte(cache_copy):
    shard = cache_copy / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) - 100] ^= 0x01  # a tensor byte near the end: the size stays the same
    shard.write_bytes(bytes(data))
    reader = CacheReader(cache_copy)  # opening checks sizes only
    problems = reader.verify()
    assert len(problems) == 1
    assert problems[0].startswith("shard-00001.safetensors") and "sha256" in problems[0]


def test_truncated_shard_fails_on_open(cache_copy):
    shard = cache_copy / "shard-00000.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CacheError) as e:
        CacheReader(cache_copy)
    msg = str(e.value)
    assert "shard-00000.safetensors" in msg and "truncated" in msg
    assert f"{len(data) - 10} bytes" in msg and str(len(data)) in msg


def test_missing_shard_fails_on_open(cache_copy):
    (cache_copy / "shard-00001.safetensors").unlink()
    with pytest.raises(CacheError, match="missing shard shard-00001.safetensors"):
        CacheReader(cache_copy)


def test_missing_manifest_is_not_a_complete_cache(cache_copy, tmp_path):
    (cache_copy / MANIFEST_NAME).unlink()
    with pytest.raises(CacheError, match="is not a complete cache: no manifest.json$"):
        CacheReader(cache_copy)
    (cache_copy / PROGRESS_NAME).write_text("{}")
    with pytest.raises(CacheError, match="is not a complete cache.*unfinished"):
        CacheReader(cache_copy)
    with pytest.raises(CacheError, match="cache folder not found"):
        CacheReader(tmp_path / "nowhere")


def test_unknown_format_version(cache_copy):
    path = cache_copy / MANIFEST_NAME
    d = json.loads(path.read_text())
    d["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(d))
    with pytest.raises(CacheError, match=f"format version {FORMAT_VERSION + 1} is not supported"):
        CacheReader(cache_copy)
    del d["format_version"]
    path.write_text(json.dumps(d))
    with pytest.raises(CacheError, match="format version None"):
        CacheReader(cache_copy)


def test_unreadable_manifest(cache_copy):
    path = cache_copy / MANIFEST_NAME
    path.write_text(path.read_text()[:200])  # cut mid-way: invalid JSON
    with pytest.raises(CacheError, match="unreadable or incomplete"):
        CacheReader(cache_copy)


# ------------------------------------------------------------------------------------- epoch order
def test_epoch_order():
    n = 50
    a = epoch_order(n, seed=7, epoch=0)
    assert sorted(a.tolist()) == list(range(n))  # a permutation
    assert a.tolist() != list(range(n))
    assert torch.equal(a, epoch_order(n, seed=7, epoch=0))  # pure function of (seed, epoch)
    orders = {tuple(epoch_order(n, seed=7, epoch=e).tolist()) for e in range(5)}
    assert len(orders) == 5  # every epoch differs
    assert not torch.equal(a, epoch_order(n, seed=8, epoch=0))
    assert epoch_order(0, 1, 1).tolist() == []
