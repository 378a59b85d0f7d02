"""GPU tests: the pass/fail checks of the GPU sessions recorded in bench/RESULTS.md, run on a CUDA machine with

    python -m pytest -m gpu tests/gpu

CPU CI deselects them (`-m "not gpu"`). They never skip: without CUDA every test here fails with a message
saying so. Imports of the project happen inside fixtures and tests, so collecting this folder on CPU imports
nothing but torch. The tiny model (`tiny_model`) comes from tests/conftest.py; the helpers below are imported
by the tests as `from tests.gpu.conftest import ...` (as the CPU tests import tests.conftest).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def require_cuda():
    """Session-scoped and autouse, so it runs before any (expensive) fixture of these tests."""
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu needs a CUDA GPU (torch.cuda.is_available() is False); on a machine without one, "
                    "deselect these tests with -m \"not gpu\"", pytrace=False)


def run_pipeline(*args, check: bool = True, timeout: int = 590) -> subprocess.CompletedProcess:
    """`python pipeline.py ARGS` in a fresh process from the repo root, as a user would run it. The CPU suite's
    OMP_NUM_THREADS=1 (tests/conftest.py) is dropped: quantized bases are built on the CPU, with all its cores."""
    return run_pipelines(args, check=check, timeout=timeout)[0]


def run_pipelines(*runs, check: bool = True, timeout: int = 590) -> list[subprocess.CompletedProcess]:
    """run_pipeline for each argument list in `runs`, all at once (each tiny run is mostly start-up: imports, CUDA)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    commands = [[sys.executable, str(REPO / "pipeline.py"), *map(str, args)] for args in runs]
    started = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
               for c in commands]
    done = []
    try:
        for command, proc in zip(commands, started):
            stdout, stderr = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(command, proc.returncode, stdout, stderr))
    finally:
        for proc in started:
            proc.kill()  # a no-op for the finished ones; the rest, after a timeout or a failed assertion
    for command, proc in zip(commands, done) if check else ():
        assert proc.returncode == 0, (f"{' '.join(command[1:])} failed ({proc.returncode}):\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return done


@pytest.fixture(scope="session")
def sdxl_cache_512(tmp_path_factory) -> Path:
    """64 synthetic samples with SDXL's shapes at 512², recorded as made for random:sdxl (the full-size UNet
    architecture with random weights): the cache of the GPU sessions' `train` runs."""
    from stages.bench import write_synthetic_cache
    folder = tmp_path_factory.mktemp("gpu-caches") / "syn512"
    write_synthetic_cache(folder, num_samples=64, resolution=512)
    return folder


def read_metrics(output: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def load_lora(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from stages.lora import LORA_WEIGHTS_NAME
    return {k: v.float() for k, v in load_file(str(Path(folder) / LORA_WEIGHTS_NAME)).items()}


def max_abs_lora_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a, "the two LoRA files hold different tensors"
    return max((a[k] - b[k]).abs().max().item() for k in a)
