"""`train --sweep`: K LoRAs from one pass over the cache, each exactly the LoRA of a single run with its settings."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import stages.train
from cache.lock import LOCK_NAME, read_holder
from stages.budget import MemoryWatch
from stages.config import TrainConfig, sweep_members
from stages.errors import UserError
from stages.lora import LORA_WEIGHTS_NAME
from stages.sweep import plan_rounds
from stages.train import train

QUIET = {"log": lambda *a, **k: None}
# three members varying the learning rate, the rank and the offset noise together (one --sweep: zipped). Learning
# rates of real training: Adam turns the batched base's float rounding (~1e-7) into update differences where a
# gradient is near its eps, in proportion to the learning rate (at 1e-2 the tiny model's LoRAs differ by ~6e-5; the
# batched forward itself differs from a single one by ~1e-6 on the CPU, whatever the adapters).
SWEEP = "learning_rate=2e-3,1e-3,5e-4 rank=2,4,3 noise_offset=0,0.1,0.05"


def config(cache, output, **overrides) -> TrainConfig:
    kw = dict(cache=str(cache), output=str(output), max_steps=4, batch_size=2, grad_accum=2, warmup_steps=1, alpha=4.0,
              checkpoint_every=2, num_workers=0, device="cpu", lr_scheduler="cosine", weight_decay=0.1)
    kw.update(overrides)
    return TrainConfig(**kw)


def lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / LORA_WEIGHTS_NAME))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, fp32_cache):
    out = tmp_path_factory.mktemp("sweep") / "runs"
    return out, train(config(fp32_cache, out, sweep=(SWEEP,)), **QUIET)


@pytest.fixture(scope="module")
def singles(tmp_path_factory, fp32_cache):
    """Each member of SWEEP trained alone by a single `train`: {name: (its folder, its summary)}."""
    root = tmp_path_factory.mktemp("singles")
    return {name: (root / name, train(config(fp32_cache, root / name, learning_rate=member.learning_rate,
                                             rank=member.rank, noise_offset=member.noise_offset, checkpoint_every=0),
                                      **QUIET))
            for name, member in sweep_members(config(fp32_cache, root, sweep=(SWEEP,)))}


def test_each_member_is_the_single_run_with_its_settings(sweep, singles, fp32_cache):
    out, summary = sweep
    members = sweep_members(config(fp32_cache, out, sweep=(SWEEP,)))
    assert [m["name"] for m in sorted(summary["members"], key=lambda m: m["name"])] == sorted(n for n, _ in members)
    for name, member in members:
        folder, single = singles[name]
        got, want = lora(out / name), lora(folder)
        assert got.keys() == want.keys()
        diff = max((got[k] - want[k]).abs().max().item() for k in want)
        assert diff <= 1e-5, (name, diff)
        assert max(want[k].abs().max().item() for k in want if "lora_B" in k) > 50 * 1e-5, name  # it did train
        with safe_open(str(out / name / LORA_WEIGHTS_NAME), "pt") as a, safe_open(str(folder / LORA_WEIGHTS_NAME), "pt") as b:
            assert a.metadata() == b.metadata()  # alpha, rank, target modules: the single run's
        recorded = json.loads((out / name / "train_config.json").read_text())
        assert (recorded["learning_rate"], recorded["rank"], recorded["noise_offset"]) == \
            (member.learning_rate, member.rank, member.noise_offset) and recorded["sweep"] == []
        losses = [json.loads(line)["loss"] for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        want_losses = [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert losses == pytest.approx(want_losses, rel=1e-5, abs=1e-7)
        assert single["final_loss"] == pytest.approx(next(m["final_loss"] for m in summary["members"] if m["name"] == name), rel=1e-5)
        for f in ("loss.png", "README.md", f"{name}.safetensors", "checkpoint-2", "checkpoint-4"):
            assert (out / name / f).exists(), f


def test_sweep_json_ranks_members_and_the_png_overlays_them(sweep):
    out, summary = sweep
    saved = json.loads((out / "sweep.json").read_text())
    losses = [m["final_loss"] for m in saved["members"]]
    assert losses == sorted(losses) and len(losses) == 3 and saved["sweep"] == [SWEEP]
    assert saved["members"][0]["settings"].keys() == {"learning_rate", "rank", "noise_offset"}
    assert (out / "sweep.png").stat().st_size > 1000


def fit_together(monkeypatch, together: int) -> None:
    """--vram-budget's decision that `together` members fit at once (stages/plan.py fit_vram_budget, tests/test_plan.py),
    made on the CPU: the sweep trains in rounds."""
    monkeypatch.setattr(stages.train, "watch_memory",
                        lambda cfg, device, resolution, log, members: (cfg, MemoryWatch(device), together))


def test_rounds_are_consecutive_members_that_start_at_one_step():
    assert plan_rounds([0, 0, 0], 3) == [[0, 1, 2]] and plan_rounds([0, 0, 0], 2) == [[0, 1], [2]]
    assert plan_rounds([2, 2, 0, 0, 0], 2) == [[0, 1], [2, 3], [4]]  # a resumed round, then the rounds not started
    assert plan_rounds([4, 2, 2, 0], 4) == [[0], [1, 2], [3]]  # members at other steps never share a round


def test_a_sweep_in_rounds_trains_each_member_as_in_one_pass(sweep, fp32_cache, tmp_path, monkeypatch):
    out, one_pass = sweep
    fit_together(monkeypatch, 2)
    logs = []
    summary = train(config(fp32_cache, tmp_path / "runs", sweep=(SWEEP,)), log=logs.append)
    names = [name for name, _ in sweep_members(config(fp32_cache, out, sweep=(SWEEP,)))]
    assert f"round 1 of 2: {names[0]}, {names[1]}" in logs and f"round 2 of 2: {names[2]}" in logs
    for name in names:  # rounds of 2 and 1 replicas round differently from one forward of 3 (~1e-6; see above)
        got, want = lora(tmp_path / "runs" / name), lora(out / name)
        assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5, name
    saved = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert saved["rounds"] == [names[:2], names[2:]] and saved["members"] == summary["members"]
    assert [m["final_loss"] for m in saved["members"]] == pytest.approx(
        [next(m["final_loss"] for m in one_pass["members"] if m["name"] == r["name"]) for r in saved["members"]], rel=1e-5)
    assert [m["round"] for m in sorted(saved["members"], key=lambda m: names.index(m["name"]))] == [0, 0, 1]
    assert any(line.startswith("sweep of 3 members in 2 rounds, ranked by final loss") for line in logs)


def test_an_interrupted_sweep_in_rounds_resumes_its_member_and_leaves_the_finished_one(singles, fp32_cache, tmp_path,
                                                                                      monkeypatch):
    runs, names = tmp_path / "runs", list(singles)
    fit_together(monkeypatch, 1)  # rounds of one member: each one's LoRA is its single run's exactly

    class Killed(Exception):
        pass

    seen, holders = [], []

    def kill_at_step_3_of_round_2(kind, count):  # after round 2's checkpoint-2, as SDXL_LORA_KILL_AT would
        seen.append((kind, count))
        if seen.count(("step", 3)) == 2:
            holders.append(read_holder(runs / LOCK_NAME))  # OUTPUT stays locked from the first round to the last
            raise Killed
    monkeypatch.setattr(stages.train, "kill_point", kill_at_step_3_of_round_2)
    with pytest.raises(Killed):
        train(config(fp32_cache, runs, sweep=(SWEEP,)), **QUIET)
    assert holders[0]["pid"] == os.getpid() and not (runs / LOCK_NAME).exists()
    assert (runs / names[0] / LORA_WEIGHTS_NAME).exists() and not (runs / names[1] / LORA_WEIGHTS_NAME).exists()
    assert [p.name for p in (runs / names[1]).glob("checkpoint-*")] == ["checkpoint-2"]
    assert not list((runs / names[2]).glob("*"))  # round 3 never started
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (runs / names[0]).rglob("*") if p.is_file()}
    row = json.loads((runs / "sweep.json").read_text())["members"]

    monkeypatch.setattr(stages.train, "kill_point", lambda kind, count: None)
    logs = []
    train(config(fp32_cache, runs, sweep=(SWEEP,), resume="latest"), log=logs.append)
    assert f"{names[0]}: finished in the earlier run (see sweep.json); left as it is" in logs
    assert f"resumed from {runs / names[1] / 'checkpoint-2'} at step 2" in logs
    assert f"{names[2]}: no checkpoint yet; starts from step 0" in logs
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (runs / names[0]).rglob("*") if p.is_file()} == finished
    for name in names:
        got, want = lora(runs / name), lora(singles[name][0])
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    saved = json.loads((runs / "sweep.json").read_text())
    assert saved["rounds"] == [[n] for n in names] and len(saved["members"]) == 3
    assert next(m for m in saved["members"] if m["name"] == names[0]) == row[0]  # recorded by the first run
    steps = [json.loads(line)["step"] for line in (runs / names[1] / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_latest_of_a_sweep_is_bit_identical(sweep, fp32_cache, tmp_path):
    out, _ = sweep
    resumed = tmp_path / "runs"
    shutil.copytree(out, resumed)
    for member in resumed.iterdir():
        if member.is_dir():
            for name in (LORA_WEIGHTS_NAME, f"{member.name}.safetensors", "README.md", "loss.png"):
                (member / name).unlink()
            shutil.rmtree(member / "checkpoint-4")
    (resumed / "sweep.json").unlink()
    train(config(fp32_cache, resumed, sweep=(SWEEP,), resume="latest"), **QUIET)
    for member in out.iterdir():
        if member.is_dir():
            a, b = lora(member), lora(resumed / member.name)
            assert all(torch.equal(a[k], b[k]) for k in a), member.name


def test_a_diverging_member_stops_alone_and_members_may_adapt_other_modules(fp32_cache, tmp_path):
    logged, bad = [], "learning_rate=1e30,target_modules=attn"

    def log(line):  # when the member stops, sweep.json records it at once: a resume of the sweep leaves it stopped
        if f"{bad}: stopped" in line:
            logged.append(json.loads((tmp_path / "runs" / "sweep.json").read_text())["members"])
        logged.append(line)
    summary = train(config(fp32_cache, tmp_path / "runs", checkpoint_every=0, max_bad_steps=1,
                           sweep=("learning_rate=1e-3,1e30,5e-4 target_modules=to_q,to_v;attn;attn",)), log=log)
    assert [m["name"] for m in next(x for x in logged if isinstance(x, list))] == [bad]
    by_name = {m["name"]: m for m in summary["members"]}
    assert by_name[bad]["stopped_at"] < 4 and [m.get("steps") for m in summary["members"]] == [4, 4, None]
    assert not (tmp_path / "runs" / bad / LORA_WEIGHTS_NAME).exists()
    assert any(f"{bad}: stopped" in line and "the other members go on" in line for line in logged)
    # to_q and to_v hold every member's adapter (one batched matmul pair), to_k and to_out.0 only two
    for lr, targets in (("1e-3", "to_q,to_v"), ("5e-4", "attn")):
        name = f"learning_rate={lr},target_modules={targets}"
        train(config(fp32_cache, tmp_path / name, checkpoint_every=0, learning_rate=float(lr), target_modules=targets),
              **QUIET)
        got, want = lora(tmp_path / "runs" / name), lora(tmp_path / name)
        assert got.keys() == want.keys() and any("to_k" in k for k in got) == (targets == "attn")  # its own modules
        assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5  # its rows never met the NaNs


def test_what_cannot_be_swept_is_one_line_that_lists_what_can(cli, fp32_cache, tmp_path):
    result = cli("train", "--cache", fp32_cache, "--output", tmp_path / "o", "--sweep", "batch_size=1,2", check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "--sweep batch_size: not sweepable" in lines[0] and "learning_rate, rank, alpha" in lines[0]
    with pytest.raises(UserError, match="lora-type loha cannot share a batched forward"):
        sweep_members(config(fp32_cache, tmp_path, lora_type="loha", sweep=("learning_rate=1e-3,1e-4",)))


def test_member_folder_names_are_file_system_safe(tmp_path):
    members = sweep_members(TrainConfig(output=str(tmp_path), sweep=("rank_pattern=to_k=8;mid_block.*=2",
                                                                    "target_modules=to_q/x")))
    names = [n for n, _ in members]
    assert names == ["rank_pattern=to_k=8,target_modules=to_q_x", "rank_pattern=mid_block._=2,target_modules=to_q_x"]
    assert all(Path(c.output).parent == tmp_path for _, c in members)


def test_validation_renders_each_members_own_images(tmp_path, tiny_model, image_folder):
    import numpy as np
    from PIL import Image

    from stages.encode import encode
    from tests.conftest import encode_config
    cache = tmp_path / "cache"
    encode(encode_config(tiny_model, image_folder, cache, validation_prompt=("a red circle",)), **QUIET)
    options = dict(max_steps=2, checkpoint_every=0, validate_every=2, validation_steps=2)
    train(config(cache, tmp_path / "runs", sweep=("learning_rate=1e-2,1e-4",), **options), **QUIET)
    train(config(cache, tmp_path / "single", learning_rate=1e-2, **options), **QUIET)

    def image(folder):
        return np.asarray(Image.open(folder / "samples" / "step-00002.png"), dtype=np.int16)
    fast, slow = image(tmp_path / "runs" / "learning_rate=1e-2"), image(tmp_path / "runs" / "learning_rate=1e-4")
    assert np.abs(fast - image(tmp_path / "single")).max() <= 2  # its own adapter alone, as the single run renders
    assert np.abs(fast - slow).max() > 2


def test_validation_out_of_memory_beside_cuda_graphs_releases_them_and_renders_again(monkeypatch):
    """The graphs are released after the failed render's frames are gone, even where a reference cycle holds them (a
    frame that kept its exception): a recapture at 4 GiB failed by 60 MiB with ~1 GiB of them still allocated."""
    import gc
    import weakref
    from types import SimpleNamespace

    from stages.device import CudaGraphs
    from stages.sweep import validate
    calls, logged, failing, freed = [], [], [1], []  # failing: how many renders run out of memory next
    graphs = CudaGraphs(fn=None, state=[], log=logged.append)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(all(r() is None for r in held)))
    held = []

    class Activations:
        pass

    def validator(unet, scheduler, step, out, resolution):
        calls.append(step)
        if failing[0]:
            failing[0] -= 1
            activations = Activations()
            held.append(weakref.ref(activations))
            try:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            except torch.cuda.OutOfMemoryError as e:
                error = e  # noqa: F841 (frame -> error -> traceback -> frame: a cycle that only gc frees)
                raise
        return {"validation_image": f"samples/step-{step}.png"}

    model = SimpleNamespace(unet=None, noise_scheduler=None, graphs=graphs)
    graphs.graphs, graphs.pool = {"shape": "captured"}, "pool"
    gc.disable()  # no automatic collection: only the release's
    try:
        assert validate(model, validator, 5, Path("o"), 64, logged.append) == {"validation_image": "samples/step-5.png"}
    finally:
        gc.enable()
    assert calls == [5, 5] and graphs.graphs == {} and graphs.pool is None and "captured again" in logged[0]
    assert freed == [True]  # the failed render's activations were gone when the cache was emptied
    failing[0] = 1
    with pytest.raises(torch.cuda.OutOfMemoryError):  # nothing left to release: the error stands (train's message)
        validate(model, validator, 6, Path("o"), 64, logged.append)
    failing[0], model.graphs = 1, None
    with pytest.raises(torch.cuda.OutOfMemoryError):
        validate(model, validator, 7, Path("o"), 64, logged.append)


def test_members_of_one_layout_train_from_one_shared_buffer_like_single_runs(fp32_cache, tmp_path, monkeypatch):
    """A sweep of learning rates and offset noise (one layout): each layer's members are one strided view into one
    buffer (no per-forward stacking); each member still equals its single run."""
    from stages.lora import MixedBatch
    shared = []
    share = MixedBatch._share
    monkeypatch.setattr(MixedBatch, "_share", lambda self, *a: share(self, *a) or shared.append(self))
    members = "learning_rate=2e-3,1e-3 noise_offset=0,0.1"
    train(config(fp32_cache, tmp_path / "runs", max_steps=4, checkpoint_every=0, sweep=(members,)), **QUIET)
    assert len(shared) == 1 and len(shared[0].stacked) == len(shared[0].hooks) > 0  # every adapted layer
    values, grads = shared[0].buffers
    assert values.shape[0] == 2 and shared[0].member_buffers(1)[0].data_ptr() == values[1].data_ptr()
    for lr, offset in (("2e-3", "0"), ("1e-3", "0.1")):
        name = f"learning_rate={lr},noise_offset={offset}"
        train(config(fp32_cache, tmp_path / name, max_steps=4, checkpoint_every=0, learning_rate=float(lr),
                     noise_offset=float(offset)), **QUIET)
        got, want = lora(tmp_path / "runs" / name), lora(tmp_path / name)
        assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5, name
        assert max(want[k].abs().max().item() for k in want if "lora_B" in k) > 1e-3, name  # it trained
    # finished without checkpoints: a longer resume has nothing to continue from, and says so (never --overwrite)
    with pytest.raises(UserError, match="finished with no checkpoint to continue from") as error:
        train(config(fp32_cache, tmp_path / "runs", max_steps=6, checkpoint_every=0, sweep=(members,), resume="latest"),
              **QUIET)
    assert "--overwrite" not in str(error.value) and (tmp_path / "runs" / "sweep.json").exists()
