"""Reliability: kill -9 at exact points then rerun == uninterrupted; quarantine of hostile inputs;
corrupt checkpoints and caches are named, never trusted."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cache import CacheReader
from stages.encode import encode
from stages.errors import UserError
from stages.lora import LORA_WEIGHTS_NAME
from stages.train import train
from tests.conftest import REPO, RESOLUTION, encode_config
from tests.test_train import QUIET, train_config


def run_killed(args, kill_at: str) -> subprocess.CompletedProcess:
    """Run the CLI with the fault-injection hook: the process SIGKILLs itself at `kill_at`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "SDXL_LORA_KILL_AT": kill_at}
    return subprocess.run([sys.executable, str(REPO / "pipeline.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


def cache_contents(path) -> dict:
    reader = CacheReader(path)
    return {reader[i]["key"]: {k: v for k, v in reader[i].items() if torch.is_tensor(v)} for i in range(len(reader))}


def test_encode_killed_twice_then_rerun_equals_uninterrupted(tmp_path, tiny_model, image_folder):
    reference = tmp_path / "reference"
    encode(encode_config(tiny_model, image_folder, reference, shard_size=1, batch_size=1), **QUIET)
    cache = tmp_path / "killed"
    args = ["encode", "--model", tiny_model, "--dataset", image_folder, "--cache", cache, "--resolution", RESOLUTION,
            "--cache-dtype", "fp32", "--shard-size", 1, "--batch-size", 1, "--num-workers", 0, "--device", "cpu"]
    first = run_killed(args, "shards:2")
    assert first.returncode == -9 and not (cache / "manifest.json").exists()
    assert json.loads((cache / "encode-progress.json").read_text())["records_done"] == 2
    second = run_killed(args, "shards:4")  # a resumed run, killed again
    assert second.returncode == -9 and "resuming an unfinished encode: 2/6" in second.stdout
    third = run_killed(args, "never")
    assert third.returncode == 0 and "resuming an unfinished encode: 4/6" in third.stdout
    assert not (cache / "encode-progress.json").exists()

    got, want = cache_contents(cache), cache_contents(reference)
    assert list(got) == list(want)  # same samples, same order: no duplicates, no gaps
    for key in want:
        assert all(torch.equal(got[key][name], want[key][name]) for name in want[key])
    assert not list(cache.glob(".*.tmp"))


def test_train_killed_twice_then_resumed_equals_uninterrupted(tmp_path, fp32_cache):
    reference = tmp_path / "reference"
    train(train_config(fp32_cache, reference, max_steps=8, checkpoint_every=2, batch_size=1, grad_accum=2), **QUIET)
    out = tmp_path / "killed"
    args = ["train", "--cache", fp32_cache, "--output", out, "--max-steps", 8, "--checkpoint-every", 2,
            "--batch-size", 1, "--grad-accum", 2, "--warmup-steps", 1, "--learning-rate", "1e-2",
            "--num-workers", 0, "--device", "cpu"]
    first = run_killed(args, "step:3")  # dies one step after checkpoint-2
    assert first.returncode == -9 and not (out / LORA_WEIGHTS_NAME).exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    second = run_killed(args + ["--resume", "latest"], "step:7")
    assert second.returncode == -9 and "resumed from" in second.stdout and "at step 2" in second.stdout
    third = run_killed(args + ["--resume", "latest"], "never")
    assert third.returncode == 0 and "at step 6" in third.stdout

    a, b = load_file(str(reference / LORA_WEIGHTS_NAME)), load_file(str(out / LORA_WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (reference, out)]
    assert [r["step"] for r in rows[1]] == list(range(1, 9))  # no duplicated or missing log rows
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_hostile_folder_is_quarantined_and_odd_images_are_encoded(tmp_path, tiny_model):
    folder = tmp_path / "hostile"
    folder.mkdir()
    good = Image.new("RGB", (80, 64), (200, 30, 30))
    valid = {
        "cmyk.jpg": lambda p: good.convert("CMYK").save(p, "JPEG"),
        "sixteen_bit.png": lambda p: Image.fromarray((np.arange(80 * 64).reshape(64, 80) * 10).astype(np.uint16)).save(p),
        "palette.png": lambda p: good.convert("P").save(p),
        "gray.png": lambda p: good.convert("L").save(p),
        "rgba.png": lambda p: Image.new("RGBA", (80, 64), (0, 0, 0, 0)).save(p),
        "rotated.jpg": lambda p: _save_rotated(good, p),
    }
    for name, make in valid.items():
        make(folder / name)
    broken = {
        "empty.png": b"",
        "truncated.png": _png(good)[:60],
        "text.jpg": b"this is not an image",
    }
    for name, data in broken.items():
        (folder / name).write_bytes(data)
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")  # too small for 64 px (shorter side < 64/4)
    good.save(folder / "no_caption.png")
    good.save(folder / "empty_caption.png")
    good.save(folder / "latin1_caption.png")
    for name in [*valid, *broken, "tiny.png"]:
        (folder / name).with_suffix(".txt").write_text(f"a picture called {name}")
    (folder / "empty_caption.txt").write_text("   ")
    (folder / "latin1_caption.txt").write_bytes("caf\xe9".encode("latin-1"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    manifest = encode(encode_config(tiny_model, folder, tmp_path / "cache"), **QUIET)
    skipped = {s["key"]: s["reason"] for s in manifest.skipped}
    assert set(skipped) == {"empty.png", "truncated.png", "text.jpg", "tiny.png", "no_caption.png",
                            "empty_caption.png", "latin1_caption.png"}
    assert "empty file" in skipped["empty.png"] and "too small" in skipped["tiny.png"]
    assert skipped["no_caption.png"] == "missing caption" and skipped["latin1_caption.png"] == "caption is not UTF-8"
    assert sorted(s.key for s in manifest.samples) == sorted(valid)
    reader = CacheReader(tmp_path / "cache")
    rotated = next(reader[i] for i in range(len(reader)) if reader[i]["key"] == "rotated.jpg")
    assert rotated["time_ids"].tolist()[:2] == [80.0, 64.0]  # EXIF orientation 6 applied: 64x80 -> 80 high
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # sources never modified


def _save_rotated(im: Image.Image, path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise on display
    im.save(path, "JPEG", exif=exif.tobytes())


def test_decompression_bomb_is_rejected_before_decoding(monkeypatch):
    from stages import data
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="decompression bomb"):
        data.decode_image(_png(Image.new("RGB", (20, 20))))


def test_corrupt_newest_checkpoint_falls_back_and_limit_keeps_newest(tmp_path, fp32_cache):
    out = tmp_path / "run"
    train(train_config(fp32_cache, out, max_steps=6, checkpoint_every=2, checkpoints_total_limit=2), **QUIET)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    (out / LORA_WEIGHTS_NAME).unlink()
    state = out / "checkpoint-6" / "training_state.safetensors"
    state.write_bytes(state.read_bytes()[:50])  # truncated by a crash or a bad disk
    logs = []
    summary = train(train_config(fp32_cache, out, max_steps=6, checkpoint_every=2, resume="latest"), log=logs.append)
    assert any("checkpoint-6 is unusable" in line for line in logs)
    assert any("resumed from" in line and "at step 4" in line for line in logs)
    assert summary["trained_steps"] == 2


def test_train_refuses_a_cache_with_a_corrupted_byte_naming_the_shard(tmp_path, fp32_cache):
    cache = tmp_path / "cache"
    shutil.copytree(fp32_cache, cache)
    shard = sorted(cache.glob("shard-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"corrupt: {shard.name}: sha256 mismatch"):
        train(train_config(cache, tmp_path / "out"), **QUIET)


def test_rerun_updates_only_what_is_stale(tmp_path, tiny_model):
    from stages.demo import make_images
    folder = make_images(tmp_path / "images", count=5, size=(80, 64), captions="txt")
    cache = tmp_path / "cache"
    encode(encode_config(tiny_model, folder, cache, shard_size=2), **QUIET)
    first = cache_contents(cache)
    Image.new("RGB", (80, 64), (0, 0, 0)).save(folder / "img_001.png")             # changed bytes
    (folder / "img_002.txt").write_text("a new caption")                            # changed caption
    (folder / "img_004.png").unlink()                                               # removed
    (folder / "img_004.txt").unlink()
    Image.new("RGB", (80, 64), (9, 9, 9)).save(folder / "img_009.png")               # added
    (folder / "img_009.txt").write_text("a dark picture")
    logs = []
    encode(encode_config(tiny_model, folder, cache, shard_size=2, dry_run=True), log=logs.append)
    assert any("3 samples unchanged" not in l and "2 samples unchanged; stale: 1 added (img_009.png), "
               "2 changed (img_001.png, img_002.png), 1 removed (img_004.png)" in l for l in logs), logs
    assert cache_contents(cache).keys() == first.keys()  # --dry-run wrote nothing

    manifest = encode(encode_config(tiny_model, folder, cache, shard_size=2), **QUIET)
    assert len(manifest.shards) == 3 + 2  # old shards kept as they are, the 3 stale samples in 2 new ones
    got = cache_contents(cache)
    assert sorted(got) == ["img_000.png", "img_001.png", "img_002.png", "img_003.png", "img_009.png"]
    for key in ("img_000.png", "img_003.png"):  # untouched: the very same tensors
        assert all(torch.equal(got[key][n], first[key][n]) for n in first[key])
    assert not torch.equal(got["img_001.png"]["latent_mean"], first["img_001.png"]["latent_mean"])
    assert not torch.equal(got["img_002.png"]["prompt_embeds"], first["img_002.png"]["prompt_embeds"])
    fresh = tmp_path / "fresh"
    encode(encode_config(tiny_model, folder, fresh, shard_size=2), **QUIET)
    want = cache_contents(fresh)
    worst = max((got[k][n] - want[k][n]).abs().max().item() for k in want for n in want[k])
    assert worst <= 1e-5, worst  # == encoding from scratch (other batch mates: float rounding only)
    logs = []
    encode(encode_config(tiny_model, folder, cache, shard_size=2), log=logs.append)
    assert any("up to date" in line for line in logs)


def test_out_of_memory_and_disk_full_are_short_messages(monkeypatch, tmp_path, fp32_cache):
    import errno

    from click.testing import CliRunner

    import stages.checkpoint
    import stages.train
    from pipeline import cli
    args = ["train", "--cache", str(fp32_cache), "--max-steps", "2", "--checkpoint-every", "1", "--num-workers", "0"]

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(stages.train, "training_step", oom)
    result = CliRunner().invoke(cli, args + ["--output", str(tmp_path / "a")])
    assert result.exit_code == 1 and "ran out of memory" in result.output and "--grad-accum" in result.output
    assert "Traceback" not in result.output
    monkeypatch.undo()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "b" / "checkpoint-1"))
    monkeypatch.setattr(stages.checkpoint, "save_checkpoint", full)
    result = CliRunner().invoke(cli, args + ["--output", str(tmp_path / "b")])
    assert result.exit_code == 1 and "disk full while writing" in result.output and "checkpoint-1" in result.output


def test_reading_an_imagefolder_writes_nothing_outside_the_named_folders(tmp_path, monkeypatch, image_folder):
    import datasets.config

    from stages.data import open_source
    hf_cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_cache))
    before = {p: p.stat().st_mtime for p in image_folder.rglob("*")}
    source = open_source(str(image_folder))
    assert [r.key for r in source.records] == [f"img_{i:03d}.png" for i in range(6)]
    assert source.read_bytes(source.records[0]) == (image_folder / "img_000.png").read_bytes()
    assert not hf_cache.exists()
    assert {p: p.stat().st_mtime for p in image_folder.rglob("*")} == before
