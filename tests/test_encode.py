"""Stage 1 (encode): model sources, numerical parity with diffusers, and the command line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cache import CacheReader, Manifest
from stages.data import decode_image, preprocess, resize_shorter_side, to_pixels
from stages.encode import encode, weights_hash
from stages.errors import UserError

from tests.conftest import RESOLUTION, encode_config, max_abs_diff, run_cli

TOL = 1e-5
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def quiet(*args):
    pass


def shard_tensors(cache: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard, concatenated over shards in manifest order."""
    m = Manifest.load(cache)
    parts: dict[str, list] = {}
    for shard in m.shards:
        with safe_open(str(cache / shard.file), framework="pt") as f:
            for k in f.keys():
                parts.setdefault(k, []).append(f.get_tensor(k))
    return {k: torch.cat(v) for k, v in parts.items()}


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def write_kohya(folder: Path, items: dict[str, tuple[bytes, str]]) -> Path:
    """A kohya folder: name -> (image bytes, caption written to the same-named .txt)."""
    folder.mkdir(parents=True)
    for name, (data, caption) in items.items():
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline.from_pretrained(str(tiny_model), torch_dtype=torch.float32)


@torch.no_grad()
def vae_latents(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: what the UNet consumes, latent_dist.{mean,std} * scaling_factor."""
    dist = vae.encode(pixels.float()).latent_dist
    return dist.mean * vae.config.scaling_factor, dist.std * vae.config.scaling_factor


def preprocessed(cache_manifest: Manifest, center_crop: bool = True, seed: int = 42) -> list:
    return [preprocess(decode_image(Path(s.source["path"]).read_bytes()), RESOLUTION, center_crop,
                       crop_seed=f"{seed}:{s.key}") for s in cache_manifest.samples]


# ------------------------------------------------------------------------------------------ parity
def test_prompt_embeds_match_diffusers_encode_prompt(fp32_cache, pipe):
    reader = CacheReader(fp32_cache)
    assert len(reader) == 6
    for i in range(len(reader)):
        sample = reader[i]
        assert sample["prompt_embeds"].dtype == torch.float32
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(sample["caption"], device="cpu", num_images_per_prompt=1,
                                                         do_classifier_free_guidance=False)
        assert sample["prompt_embeds"].shape == prompt_embeds[0].shape == (77, 96)
        assert sample["pooled_prompt_embeds"].shape == pooled[0].shape == (32,)
        assert max_abs_diff(sample["prompt_embeds"], prompt_embeds[0]) <= TOL, sample["key"]
        assert max_abs_diff(sample["pooled_prompt_embeds"], pooled[0]) <= TOL, sample["key"]
    # not vacuous: different captions give different embeddings
    assert max_abs_diff(reader[0]["prompt_embeds"], reader[1]["prompt_embeds"]) > 1e-3
    assert max_abs_diff(reader[0]["pooled_prompt_embeds"], reader[1]["pooled_prompt_embeds"]) > 1e-3


def test_latents_match_vae_on_preprocessed_pixels(fp32_cache, pipe):
    reader = CacheReader(fp32_cache)
    pres = preprocessed(reader.manifest)
    mean, std = vae_latents(pipe.vae, torch.stack([p.pixels for p in pres]))
    assert mean.abs().max() > 1e-2 and (std > 0).all()
    for i, pre in enumerate(pres):
        sample = reader[i]
        assert sample["latent_mean"].shape == (4, RESOLUTION // 8, RESOLUTION // 8)
        assert max_abs_diff(sample["latent_mean"], mean[i]) <= TOL, sample["key"]
        assert max_abs_diff(sample["latent_std"], std[i]) <= TOL, sample["key"]
        assert torch.equal(sample["time_ids"], pre.time_ids)
        assert sample["time_ids"].tolist() == [64, 80, 0, 8, 64, 64]


def test_flipped_entries_encode_the_mirrored_pixels(fp32_cache, pipe):
    reader = CacheReader(fp32_cache)
    pres = preprocessed(reader.manifest)
    mean, std = vae_latents(pipe.vae, torch.stack([p.pixels.flip(-1) for p in pres]))
    for i, pre in enumerate(pres):
        sample = reader[i]
        assert max_abs_diff(sample["latent_mean_flipped"], mean[i]) <= TOL, sample["key"]
        assert max_abs_diff(sample["latent_std_flipped"], std[i]) <= TOL, sample["key"]
        # 80 px resized width, left 8: the mirrored crop starts at 80 - 64 - 8
        assert sample["time_ids_flipped"].tolist() == [64, 80, 0, 8, 64, 64]
        assert torch.equal(sample["time_ids_flipped"], pre.time_ids_flipped)
    # not vacuous: the mirror is a different latent
    assert max(max_abs_diff(reader[i]["latent_mean"], reader[i]["latent_mean_flipped"]) for i in range(6)) > 1e-2


@pytest.fixture(scope="module")
def random_crop_cache(tmp_path_factory, tiny_model):
    from stages.demo import make_images
    root = tmp_path_factory.mktemp("random_crop")
    images = make_images(root / "wide", count=4, size=(120, 64), seed=5)
    cache = root / "cache"
    encode(encode_config(tiny_model, images, cache, center_crop=False, seed=42), log=quiet)
    return cache


def test_random_crop_recorded_and_flipped_latent_is_mirror_of_crop(random_crop_cache, pipe):
    reader = CacheReader(random_crop_cache)
    assert reader.manifest.preprocessing["center_crop"] is False
    crops, lefts = [], []
    for i in range(len(reader)):
        sample = reader[i]
        image = decode_image(Path(reader.manifest.samples[i].source["path"]).read_bytes())
        resized = resize_shorter_side(image, RESOLUTION)
        assert resized.size == (120, 64)
        h, w, top, left, th, tw = (int(v) for v in sample["time_ids"])
        assert (h, w, th, tw) == (64, 120, 64, 64) and top == 0 and 0 <= left <= 120 - 64
        assert sample["time_ids_flipped"].tolist() == [64, 120, 0, 120 - 64 - left, 64, 64]
        crops.append(to_pixels(resized.crop((left, top, left + 64, top + 64))))
        lefts.append(left)
        # the crop is a function of (seed, key)
        pre = preprocess(image, RESOLUTION, False, crop_seed=f"42:{sample['key']}")
        assert torch.equal(pre.time_ids, sample["time_ids"])
    assert any(left != 28 for left in lefts), lefts  # 28 would be the center crop
    pixels = torch.stack(crops)
    mean, std = vae_latents(pipe.vae, pixels)
    mean_f, std_f = vae_latents(pipe.vae, pixels.flip(-1))
    for i in range(len(reader)):
        sample = reader[i]
        assert max_abs_diff(sample["latent_mean"], mean[i]) <= TOL
        assert max_abs_diff(sample["latent_std"], std[i]) <= TOL
        assert max_abs_diff(sample["latent_mean_flipped"], mean_f[i]) <= TOL
        assert max_abs_diff(sample["latent_std_flipped"], std_f[i]) <= TOL


# ------------------------------------------------------------------------------------ model sources
@pytest.fixture(scope="module")
def single_file_cache(tmp_path_factory, tiny_model, image_folder):
    from tests.ldm_checkpoint import write_single_file
    root = tmp_path_factory.mktemp("single_file")
    ckpt = write_single_file(tiny_model, root / "tiny_sdxl.safetensors")
    cache = root / "cache"
    encode(encode_config(ckpt, image_folder, cache, model_config=str(tiny_model)), log=quiet)
    return cache


def test_single_file_checkpoint_gives_the_folder_cache(single_file_cache, fp32_cache):
    m = Manifest.load(single_file_cache)
    assert m.encoder["kind"] == "single_file" and m.encoder["model_config"] is not None
    assert [s.key for s in m.samples] == [s.key for s in Manifest.load(fp32_cache).samples]
    got, want = shard_tensors(single_file_cache), shard_tensors(fp32_cache)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_single_file_checkpoint_weights_fingerprints_match_folder(single_file_cache, fp32_cache):
    """Same weights, same hashes: the fingerprint must not depend on where the weights were loaded from."""
    m, ref = Manifest.load(single_file_cache), Manifest.load(fp32_cache)
    assert m.encoder["weights"] == ref.encoder["weights"]
    assert m.fingerprint == ref.fingerprint


def test_weights_hash_does_not_depend_on_model_location(tiny_model, tmp_path):
    from stages.sdxl import ModelSource, load_encoders
    moved = Path(shutil.copytree(tiny_model, tmp_path / "moved", ignore=shutil.ignore_patterns("unet")))
    a, b = load_encoders(ModelSource(str(tiny_model))), load_encoders(ModelSource(str(moved)))
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert weights_hash(a[name]) == weights_hash(b[name]), name
    # and it does see the weights
    b["vae"].encoder.conv_in.bias.data[0] += 1.0
    assert weights_hash(a["vae"]) != weights_hash(b["vae"])


def test_hub_id_through_offline_hub_cache(tmp_path, monkeypatch, tiny_model, image_folder, fp32_cache):
    hub = tmp_path / "hub"
    repo = hub / "models--tiny--sdxl"
    shutil.copytree(tiny_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    proc = run_cli("encode", "--model", "tiny/sdxl", "--dataset", image_folder, "--cache", cache,
                   "--resolution", RESOLUTION, "--num-workers", 0, "--cache-dtype", "fp32",
                   "--batch-size", 4, "--shard-size", 4)
    assert "encoded 6 samples" in proc.stdout
    m = Manifest.load(cache)
    assert m.encoder["model"] == "tiny/sdxl" and m.encoder["kind"] == "hub"
    got, want = shard_tensors(cache), shard_tensors(fp32_cache)
    assert torch.equal(got["prompt_embeds"], want["prompt_embeds"])
    assert torch.equal(got["pooled_prompt_embeds"], want["pooled_prompt_embeds"])
    assert torch.equal(got["latent_mean"], want["latent_mean"])


def test_missing_model_part_is_one_line_error(tmp_path, tiny_model, image_folder, cli):
    broken = Path(shutil.copytree(tiny_model, tmp_path / "no_te2", ignore=shutil.ignore_patterns("unet")))
    shutil.rmtree(broken / "text_encoder_2")
    cache = tmp_path / "cache"
    proc = cli("encode", "--model", broken, "--dataset", image_folder, "--cache", cache,
               "--resolution", RESOLUTION, "--num-workers", 0, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error:") and "'text_encoder_2'" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not cache.exists()


# -------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory, tiny_model, image_folder):
    """The README's encode command (defaults: fp16, center crop, flip), as a user runs it."""
    cache = tmp_path_factory.mktemp("cli") / "cache"
    proc = run_cli("encode", "--model", tiny_model, "--dataset", image_folder, "--cache", cache,
                   "--resolution", RESOLUTION, "--num-workers", 0)
    return cache, proc


def test_cli_encode_happy_path(cli_cache):
    cache, proc = cli_cache
    assert proc.returncode == 0
    summary = [line for line in proc.stdout.splitlines() if line.startswith("encoded ")]
    assert len(summary) == 1 and summary[0].startswith("encoded 6 samples (0 skipped) into 1 shard(s)")
    assert summary[0].endswith(f"-> {cache}")
    assert "Traceback" not in proc.stderr
    m = Manifest.load(cache)
    assert m.num_samples == 6 and m.dtype == "fp16" and m.preprocessing["resolution"] == RESOLUTION
    assert sorted(p.name for p in cache.iterdir()) == ["empty_prompt.safetensors", "manifest.json",
                                                       "shard-00000.safetensors"]


def test_fp16_default_cache_close_to_fp32(cli_cache, fp32_cache):
    fp16, fp32 = CacheReader(cli_cache[0]), CacheReader(fp32_cache)
    assert fp16.manifest.fingerprint != fp32.manifest.fingerprint
    assert len(fp16) == len(fp32) == 6
    for i in range(6):
        a, b = fp16[i], fp32[i]
        assert a["key"] == b["key"]
        for name in ("latent_mean", "latent_std", "latent_mean_flipped", "latent_std_flipped",
                     "prompt_embeds", "pooled_prompt_embeds"):
            assert a[name].dtype == torch.float16, name
            torch.testing.assert_close(a[name].float(), b[name], rtol=2e-3, atol=1e-5, msg=name)
        for name in ("time_ids", "time_ids_flipped"):  # exact integers, kept in fp32
            assert a[name].dtype == torch.float32 and torch.equal(a[name], b[name])


def test_cli_info_and_verify(cli_cache, tmp_path):
    from click.testing import CliRunner

    from pipeline import cli as pipeline_cli
    cache, _ = cli_cache
    runner = CliRunner()
    plain = runner.invoke(pipeline_cli, ["info", str(cache)])
    assert plain.exit_code == 0, plain.output
    m = Manifest.load(cache)
    for expected in ("format version   2", "samples          6 (0 skipped)", "resolution       64",
                     "crop             center", "flip             True", "dtype            fp16",
                     f"fingerprint      {m.fingerprint}", f"dataset          {m.dataset['name']} [train]"):
        assert expected in plain.stdout.splitlines(), expected
    assert "intact" not in plain.stdout
    assert f"model            {m.encoder['model']}" in plain.stdout.splitlines()  # no "(revision None, variant None)"
    assert "vae override     none (the model's own VAE)" in plain.stdout.splitlines() and "None" not in plain.stdout

    verified = runner.invoke(pipeline_cli, ["info", str(cache), "--verify"])
    assert verified.exit_code == 0, verified.output
    assert verified.stdout.startswith(plain.stdout.rstrip("\n"))
    assert verified.stdout.splitlines()[-1] == "verified         all 1 shard(s) intact"

    damaged = Path(shutil.copytree(cache, tmp_path / "damaged"))
    shard = damaged / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = runner.invoke(pipeline_cli, ["info", str(damaged), "--verify"])
    assert bad.exit_code == 1
    assert "corrupt          shard-00000.safetensors: sha256 mismatch (corrupt)" in bad.stdout
    assert "1 shard(s) failed verification" in bad.stderr and "intact" not in bad.stdout


def test_cli_refuses_other_resolution_and_keeps_cache(cli_cache, tiny_model, image_folder, cli):
    cache, _ = cli_cache
    before = file_bytes(cache)
    proc = cli("encode", "--model", tiny_model, "--dataset", image_folder, "--cache", cache,
               "--resolution", 2 * RESOLUTION, "--num-workers", 0, check=False)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "resolution 64 -> 128" in lines[0] and "--overwrite" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert file_bytes(cache) == before


def test_overwrite_replaces_then_same_settings_up_to_date(fp32_cache, tmp_path, tiny_model, image_folder):
    cache = Path(shutil.copytree(fp32_cache, tmp_path / "cache"))
    assert len(Manifest.load(cache).shards) == 2
    smaller = encode_config(tiny_model, image_folder, cache, resolution=32, shard_size=8)
    with pytest.raises(UserError, match="resolution 64 -> 32"):
        encode(smaller, log=quiet)
    smaller.overwrite = True
    m = encode(smaller, log=quiet)
    assert m.preprocessing["resolution"] == 32 and m.num_samples == 6
    assert sorted(p.name for p in cache.iterdir()) == ["empty_prompt.safetensors", "manifest.json",
                                                       "shard-00000.safetensors"]  # old shard 1 gone
    reader = CacheReader(cache)
    assert reader.verify() == []
    assert reader[0]["latent_mean"].shape == (4, 4, 4)
    assert reader[0]["time_ids"].tolist() == [64, 80, 0, 4, 32, 32]  # 80x64 -> 40x32, left 4

    before = file_bytes(cache)
    smaller.overwrite = False
    logs = []
    again = encode(smaller, log=logs.append)
    assert any("up to date (6 samples); nothing to do" in line for line in logs), logs
    assert not any(line.startswith("encoded ") for line in logs)
    assert again == Manifest.load(cache)
    assert file_bytes(cache) == before


def test_cli_only_broken_images_fails_with_one_line(tmp_path, tiny_model, cli):
    images = write_kohya(tmp_path / "broken", {"empty.png": (b"", "an empty file"),
                                                "text.jpg": (b"just some text, not a jpeg\n", "a text file")})
    cache = tmp_path / "cache"
    proc = cli("encode", "--model", tiny_model, "--dataset", images, "--cache", cache,
               "--resolution", RESOLUTION, "--num-workers", 0, check=False)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "no usable images" in lines[0] and "all 2 inputs were skipped" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    skipped = json.loads((cache / "manifest.json").read_text())["skipped"]
    assert [s["key"] for s in skipped] == ["empty.png", "text.jpg"]
    assert skipped[0]["reason"] == "cannot decode image: ValueError: empty file"
    assert skipped[1]["reason"].startswith("cannot decode image: UnidentifiedImageError")


def test_rerun_after_no_usable_images_fails_again(tmp_path, tiny_model):
    """Repeating a failed encode must not report an empty cache as 'up to date' and succeed."""
    images = write_kohya(tmp_path / "broken", {"empty.png": (b"", "an empty file")})
    cfg = encode_config(tiny_model, images, tmp_path / "cache")
    with pytest.raises(UserError, match="no usable images"):
        encode(cfg, log=quiet)
    with pytest.raises(UserError, match="no usable images"):
        encode(cfg, log=quiet)


def test_broken_image_is_skipped_with_reason(tmp_path, tiny_model, image_folder):
    good = sorted(image_folder.glob("*.png"))[:2]
    images = write_kohya(tmp_path / "mixed", {
        "a_good.png": (good[0].read_bytes(), "a good image"),
        "b_broken.png": (good[1].read_bytes()[:40], "a truncated image"),
        "c_good.png": (good[1].read_bytes(), "another good image"),
    })
    logs = []
    m = encode(encode_config(tiny_model, images, tmp_path / "cache"), log=logs.append)
    assert [s.key for s in m.samples] == ["a_good.png", "c_good.png"]
    assert [s.caption for s in m.samples] == ["a good image", "another good image"]
    assert len(m.skipped) == 1 and m.skipped[0]["key"] == "b_broken.png"
    assert m.skipped[0]["reason"].startswith("cannot decode image: ")
    assert Manifest.load(tmp_path / "cache").skipped == m.skipped
    assert any(line.startswith("skipped 1 input(s)") for line in logs), logs
    assert any(line.startswith("encoded 2 samples (1 skipped)") for line in logs), logs
    reader = CacheReader(tmp_path / "cache")
    assert len(reader) == 2 and reader[1]["key"] == "c_good.png"


def test_skip_reasons_show_no_python_objects(tmp_path):
    from stages.data import Record, Source
    from stages.encode import PreprocessDataset
    (tmp_path / "x.png").write_bytes(b"this is not an image")
    source = Source(str(tmp_path), [Record("x.png", "a caption", str(tmp_path / "x.png"))])
    item = PreprocessDataset(source, source.records, encode_config("m", tmp_path, tmp_path / "c"))[0]
    assert item["skip"] == "cannot decode image: UnidentifiedImageError: cannot identify image file"  # no <_io.BytesIO …>


def test_long_captions_warn_with_count(tmp_path, tiny_model, image_folder, pipe):
    src = sorted(image_folder.glob("*.png"))[:3]
    long_1 = "a very long caption about a red circle " * 12
    long_2 = "another long caption, green squares everywhere " * 10
    images = write_kohya(tmp_path / "long", {"a.png": (src[0].read_bytes(), "short caption"),
                                              "b.png": (src[1].read_bytes(), long_1),
                                              "c.png": (src[2].read_bytes(), long_2)})
    logs = []
    m = encode(encode_config(tiny_model, images, tmp_path / "cache"), log=logs.append)
    assert [s.caption for s in m.samples] == ["short caption", long_1.strip(), long_2.strip()]
    warnings = [line for line in logs if "longer than 77 tokens" in line]
    assert warnings == ["warning: 2 caption(s) are longer than 77 tokens and were truncated to their first 77 "
                        "tokens: b.png, c.png"]
    # the truncated caption is encoded as diffusers encodes it (first 77 tokens)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(long_1.strip(), device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)
    sample = CacheReader(tmp_path / "cache")[1]
    assert max_abs_diff(sample["prompt_embeds"], prompt_embeds[0]) <= TOL
    assert max_abs_diff(sample["pooled_prompt_embeds"], pooled[0]) <= TOL
