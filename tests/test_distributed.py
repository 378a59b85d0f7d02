"""torchrun on CPU (gloo, 2 processes): two ranks with batch b train like one process with batch 2b,
a two-rank encode holds what a one-process encode holds, rank 0 alone writes, resume rules."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cache import CacheReader
from stages.lora import LORA_WEIGHTS_NAME
from stages.train import train
from tests.conftest import REPO, RESOLUTION, max_abs_diff
from tests.test_train import QUIET, train_config

# Adam divides by sqrt(v) + 1e-8, so float rounding in near-zero gradients (which DDP's per-rank sums
# round differently from one batch of 2b) moves weights by about lr * 1e-2: a small lr keeps that below 1e-5.
TRAIN = dict(max_steps=4, grad_accum=2, warmup_steps=0, learning_rate=1e-4, rank=4, alpha=8.0, checkpoint_every=2,
             optimizer="adamw")


def torchrun(*args, nproc: int = 2, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node N pipeline.py ARGS`, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "pipeline.py"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun pipeline.py {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc


def train_args(cache, output, batch_size: int, **extra) -> list:
    kw = {**TRAIN, "batch_size": batch_size, **extra}
    args = ["train", "--cache", cache, "--output", output, "--num-workers", 0, "--device", "cpu"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fp32_cache):
    """The same 4 steps trained by 2 ranks with batch 2 (torchrun) and by one process with batch 4."""
    root = tmp_path_factory.mktemp("ddp")
    proc = torchrun(*train_args(fp32_cache, root / "two", batch_size=2))
    train(train_config(fp32_cache, root / "one", batch_size=4, **TRAIN), **QUIET)
    return root / "two", root / "one", proc


def test_two_ranks_with_batch_b_train_like_one_process_with_batch_2b(runs):
    two, one, proc = runs
    m2, m1 = metrics(two), metrics(one)
    assert [r["step"] for r in m2] == [1, 2, 3, 4]  # rank 0 alone writes: one row per step, no duplicates
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(m2, m1)) <= 1e-5, ([r["loss"] for r in m2], [r["loss"] for r in m1])
    assert [a["lr"] for a in m2] == [b["lr"] for b in m1]
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(m2, m1)) <= 1e-5
    assert len({round(r["loss"], 5) for r in m2}) == 4  # real, varying losses

    a, b = load_file(str(two / LORA_WEIGHTS_NAME)), load_file(str(one / LORA_WEIGHTS_NAME))
    assert a.keys() == b.keys()
    assert max(max_abs_diff(a[k], b[k]) for k in a) <= 1e-5
    moved = max(b[k].abs().max().item() for k in b if k.endswith("lora_B.weight"))  # B starts at zero
    assert moved > 2e-4  # training changed the LoRA far more than the tolerance: the comparison has teeth

    config = json.loads((two / "train_config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["effective_batch"] == 8
    assert config["resolved"]["learning_rate"] == 1e-4  # unchanged without --scale-lr
    assert "effective batch 8 (batch 2 × grad-accum 2 × 2 processes)" in proc.stdout
    assert proc.stdout.count("trained 4 steps") == 1 and proc.stdout.count("loading the UNet") == 1
    state = json.loads((two / "checkpoint-2" / "training_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch_size"] == 4
    files = sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    assert [f for f in files if f.endswith(LORA_WEIGHTS_NAME)] == [
        f"checkpoint-2/{LORA_WEIGHTS_NAME}", f"checkpoint-4/{LORA_WEIGHTS_NAME}", LORA_WEIGHTS_NAME]
    assert not [f for f in files if ".tmp" in f]


def test_resume_with_two_ranks_is_bit_identical_and_other_layouts_are_checked(runs, fp32_cache, tmp_path):
    two, one, _ = runs
    part = tmp_path / "part"
    shutil.copytree(two, part)
    # A crash after checkpoint-2: the final LoRA and checkpoint-4 never got written, one row past the checkpoint.
    (part / LORA_WEIGHTS_NAME).unlink()
    shutil.rmtree(part / "checkpoint-4")
    (part / "metrics.jsonl").write_text("".join(line + "\n" for line in (two / "metrics.jsonl").read_text().splitlines()[:3]))
    crashed = tmp_path / "crashed"
    shutil.copytree(part, crashed)

    proc = torchrun(*train_args(fp32_cache, part, batch_size=2, resume="latest"))
    assert "resumed from" in proc.stdout
    a, b = load_file(str(two / LORA_WEIGHTS_NAME)), load_file(str(part / LORA_WEIGHTS_NAME))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(part)] == [r["loss"] for r in metrics(two)]

    from stages.errors import UserError
    with pytest.raises(UserError, match="trained by 2 process.*--nproc-per-node 2.*--batch-size 4 / N"):
        train(train_config(fp32_cache, crashed, batch_size=2, **{**TRAIN, "resume": "latest"}), **QUIET)
    # One process with the same global micro-batch (4) continues exactly the same samples and draws.
    notes = []
    train(train_config(fp32_cache, crashed, batch_size=4, **{**TRAIN, "resume": "latest"}), log=notes.append)
    assert any("resumes with 1" in n for n in notes)
    a, b = load_file(str(one / LORA_WEIGHTS_NAME)), load_file(str(crashed / LORA_WEIGHTS_NAME))
    assert max(max_abs_diff(a[k], b[k]) for k in a) <= 1e-5
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(metrics(crashed), metrics(one))) <= 1e-5


def test_two_rank_encode_holds_what_one_process_encodes(tmp_path, tiny_model, image_folder, fp32_cache):
    """Same samples in the same order, same tensors up to float rounding; a killed run resumes per rank."""
    from stages.encode import encode
    from stages.errors import UserError
    from tests.conftest import encode_config
    cache = tmp_path / "cache"
    args = ["encode", "--model", tiny_model, "--dataset", image_folder, "--cache", cache, "--resolution", RESOLUTION,
            "--cache-dtype", "fp32", "--num-workers", 0, "--device", "cpu", "--batch-size", 4, "--shard-size", 2]
    killed = torchrun(*args, env={"SDXL_LORA_KILL_AT": "shards:1"}, check=False)  # each rank dies after its 1st shard
    assert killed.returncode != 0 and not (cache / "manifest.json").exists()
    assert sorted(p.name for p in cache.glob("encode-progress*.json"))  # the ranks' journals
    with pytest.raises(UserError, match="unfinished encode by 2 process"):
        encode(encode_config(tiny_model, image_folder, cache), **QUIET)
    proc = torchrun(*args)
    assert proc.stdout.count("encoded 6 samples") == 1

    one, two = CacheReader(fp32_cache), CacheReader(cache)
    assert two.verify() == []
    names = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert [n for n in names if n.startswith("shard-")] == ["shard-r0-00000.safetensors", "shard-r0-00001.safetensors",
                                                            "shard-r1-00000.safetensors", "shard-r1-00001.safetensors"]
    assert [n for n in names if n.endswith(".json")] == ["manifest.json"]  # one manifest; the journals are gone
    m1, m2 = one.manifest, two.manifest
    assert m2.fingerprint == m1.fingerprint and m2.skipped == m1.skipped
    assert [(s.key, s.caption, s.source) for s in m2.samples] == [(s.key, s.caption, s.source) for s in m1.samples]
    worst = 0.0
    for i in range(len(one)):
        x, y = one[i], two[i]
        assert x.keys() == y.keys() and x["key"] == y["key"]
        worst = max([worst] + [max_abs_diff(x[k], y[k]) for k in x if torch.is_tensor(x[k])])
    assert worst <= 1e-5


def test_a_sweep_under_torchrun_trains_each_member_like_one_process(fp32_cache, tmp_path):
    """Two ranks with batch 2 train each member of a sweep like one process with batch 4 (DDP over every adapter)."""
    sweep = "learning_rate=1e-4,5e-5"
    torchrun(*train_args(fp32_cache, tmp_path / "two", batch_size=2, checkpoint_every=0, max_steps=2), "--sweep", sweep)
    train(train_config(fp32_cache, tmp_path / "one", batch_size=4, **{**TRAIN, "checkpoint_every": 0, "max_steps": 2},
                       sweep=(sweep,)), **QUIET)
    for name in ("learning_rate=1e-4", "learning_rate=5e-5"):
        two, one = (load_file(str(tmp_path / run / name / LORA_WEIGHTS_NAME)) for run in ("two", "one"))
        assert two.keys() == one.keys() and max(max_abs_diff(two[k], one[k]) for k in one) <= 1e-5, name
        assert max(v.abs().max().item() for k, v in one.items() if "lora_B" in k) > 1e-4, name  # it trained
        assert [r["step"] for r in metrics(tmp_path / "two" / name)] == [1, 2]
    assert json.loads((tmp_path / "two" / "sweep.json").read_text())["members"][0]["name"].startswith("learning_rate=")


def test_a_diverging_sweep_member_under_torchrun_stops_the_sweep_in_one_line(fp32_cache, tmp_path):
    proc = torchrun(*train_args(fp32_cache, tmp_path / "two", batch_size=2, checkpoint_every=0, max_steps=3,
                                max_bad_steps=1), "--sweep", "learning_rate=1e-4,1e30", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode != 0 and errors and errors[0].startswith("Error: learning_rate=1e30: stopped")
    # each rank ends with the one line; the only traceback is torchrun's own report of a failed child
    assert "under torchrun this stops the whole sweep" in errors[0] and 'stages/' not in proc.stderr, proc.stderr[-3000:]
