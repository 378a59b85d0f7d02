"""Shared fixtures: the tiny SDXL model, a small captioned image folder, an encoded cache, the CLI.

Every test runs offline: the hub is switched off before anything imports huggingface_hub.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread, in this process and in every CLI subprocess: the tiny model's matmuls are far faster
# single-threaded on a 2-core CI machine, and in- and out-of-process runs compute identically.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 64  # tiny images: latents are 8x8


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from stages.sdxl import build_tiny_sdxl
    return build_tiny_sdxl(tmp_path_factory.mktemp("model") / "tiny-sdxl")


@pytest.fixture(scope="session")
def _sdxl_meta_unet():
    from diffusers import UNet2DConditionModel

    from stages.sdxl import SDXL_UNET_CONFIG
    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


@pytest.fixture
def sdxl_meta_unet(_sdxl_meta_unet):
    """A fresh full-size SDXL UNet on the meta device (shapes, no weights): built once per session, copied per call."""
    import copy
    return lambda: copy.deepcopy(_sdxl_meta_unet)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """6 captioned images of 80x64 (imagefolder convention: metadata.jsonl)."""
    from stages.demo import make_images
    return make_images(tmp_path_factory.mktemp("images") / "shapes", count=6, size=(80, 64))


def encode_config(model, dataset, cache, **overrides):
    from stages.config import EncodeConfig
    kw = dict(model=str(model), dataset=str(dataset), cache=str(cache), resolution=RESOLUTION, cache_dtype="fp32",
              num_workers=0, device="cpu", batch_size=4, shard_size=4)
    kw.update(overrides)
    return EncodeConfig(**kw)


@pytest.fixture(scope="session")
def fp32_cache(tmp_path_factory, tiny_model, image_folder) -> Path:
    """The image folder encoded by the tiny model at 64px, fp32, with flips, in shards of 4."""
    from stages.encode import encode
    cache = tmp_path_factory.mktemp("caches") / "fp32"
    encode(encode_config(tiny_model, image_folder, cache), log=lambda *a: None)
    return cache


def run_cli(*args, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python pipeline.py ARGS` in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "pipeline.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd or REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline.py {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def invoke_cli(*args, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`pipeline.py ARGS` in this process through click's CliRunner: the same command line, exit code, stdout and
    stderr as run_cli, without starting an interpreter (a traceback lands in stderr, as it would there)."""
    import traceback

    from click.testing import CliRunner

    from pipeline import cli
    before = os.getcwd()
    os.chdir(cwd or REPO)
    try:
        result = CliRunner().invoke(cli, list(map(str, args)))
    finally:
        os.chdir(before)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    proc = subprocess.CompletedProcess(["pipeline.py", *map(str, args)], result.exit_code, result.stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline.py {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def cli():
    """The CLI, in process (run_cli starts a fresh process where that is the point: kills, torchrun, environment)."""
    return invoke_cli


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
