"""GPU tests: the pass/fail checks of the GPU sessions recorded in bench/RESULTS.md, run on a CUDA machine with

    python -m pytest -m gpu tests/gpu

CPU CI deselects them (`-m "not gpu"`). They never skip: without CUDA every test here fails with a message
saying so. Imports of the project happen inside fixtures and tests, so collecting this folder on CPU imports
nothing but torch. The tiny model (`tiny_model`) comes from tests/conftest.py; the helpers below are imported
by the tests as `from tests.gpu.conftest import ...` (as the CPU tests import tests.conftest).
"""
from __future__ import annotations

import contextlib
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
    """run_pipeline for each argument list in `runs`, all at once (each tiny run is mostly start-up: imports, CUDA),
    within one `timeout` for all; their output goes through files (no pipe fills up), and on a timeout each run's
    process group is killed and its output kept in the error."""
    import signal
    import tempfile
    import time
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    commands = [[sys.executable, str(REPO / "pipeline.py"), *map(str, args)] for args in runs]
    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as files:
        outputs = [(files.enter_context(tempfile.TemporaryFile("w+")), files.enter_context(tempfile.TemporaryFile("w+")))
                   for _ in commands]
        started = [subprocess.Popen(c, stdout=out, stderr=err, text=True, env=env, cwd=REPO, start_new_session=True)
                   for c, (out, err) in zip(commands, outputs)]
        late = None
        try:
            for command, proc in zip(commands, started):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as e:
            late = e
        finally:
            for proc in started:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        done = []
        for command, proc, (out, err) in zip(commands, started, outputs):
            out.seek(0), err.seek(0)
            done.append(subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read()))
    for command, proc in zip(commands, done):
        if late or (check and proc.returncode != 0):
            assert proc.returncode == 0, (f"{' '.join(command[1:])} failed ({proc.returncode}"
                                          f"{', killed at the ' + str(timeout) + ' s timeout' if late else ''}):\n"
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
