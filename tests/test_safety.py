"""Data safety, one test per item of the issue "locks, resumes that cannot destroy, caches that travel, nothing
written 0600": each reproduces the user's scenario through the CLI (two live processes where it is about
concurrency) and asserts the safe outcome: the one-line refusal, the untouched data, the recorded change."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cache import CacheReader
from cache.files import temporary_name
from cache.lock import LOCK_NAME
from stages.lora import LORA_WEIGHTS_NAME
from tests.conftest import REPO, RESOLUTION, invoke_cli, max_abs_diff, run_cli  # run_cli: where a live second process is the point
from tests.test_reliability import cache_contents


def tree(folder: Path, skip: str = "__pycache__") -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): equal trees are byte-equal data."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and skip not in p.parts}


@contextlib.contextmanager
def live(args, pause_at: str, gate: Path):
    """`pipeline.py ARGS` running in the background, paused at `pause_at` (e.g. step:1) until `gate` exists."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "SDXL_LORA_PAUSE_AT": pause_at, "SDXL_LORA_PAUSE_FILE": str(gate)}
    proc = subprocess.Popen([sys.executable, str(REPO / "pipeline.py"), *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_paused(proc, gate)
        yield proc
    finally:
        if proc.poll() is None:  # a failed assertion: do not leave it waiting
            proc.kill()
            proc.communicate()


def wait_paused(proc: subprocess.Popen, gate: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not Path(f"{gate}.paused").exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the first process ended before its pause point:\n{out[-2000:]}\n{err[-3000:]}")
        assert time.time() < deadline, "the first process never reached its pause point"
        time.sleep(0.1)


def finish(proc: subprocess.Popen, gate: Path) -> str:
    gate.touch()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    return out


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def train_args(cache, out, **flags) -> list:
    kw = dict(max_steps=2, batch_size=1, grad_accum=1, warmup_steps=0, learning_rate="1e-3", checkpoint_every=2,
              num_workers=0, device="cpu")
    kw.update(flags)
    args = ["train", "--cache", cache, "--output", out]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [v])
    return args


def encode_args(model, dataset, cache, *extra) -> list:
    return ["encode", "--model", model, "--dataset", dataset, "--cache", cache, "--resolution", RESOLUTION,
            "--cache-dtype", "fp32", "--num-workers", 0, "--device", "cpu", "--batch-size", 2, "--shard-size", 2, *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def lora_ranks(path: Path) -> set[int]:
    return {t.shape[0] for k, t in load_file(str(path)).items() if k.endswith("lora_A.weight")}


# 1. `demo --workdir DIR` replaced DIR/cache and deleted DIR/lora's checkpoints.
def test_1_demo_refuses_a_workdir_holding_what_it_did_not_create(tmp_path, fp32_cache):
    from stages.demo import DEMO_MARKER, DEMO_PARTS, EARLIER_PARTS, check_workdir
    from stages.errors import UserError
    work = tmp_path / "work"
    shutil.copytree(fp32_cache, work / "cache")
    (work / "lora" / "checkpoint-10").mkdir(parents=True)
    (work / "lora" / "checkpoint-10" / LORA_WEIGHTS_NAME).write_bytes(b"the user's weights")
    before = tree(work)
    line = one_line_error(invoke_cli("demo", "--workdir", work, "--steps", 1, check=False))
    assert "holds cache, lora, which the demo did not create" in line
    assert tree(work) == before and not (work / DEMO_MARKER).exists()

    own = tmp_path / "own"  # an earlier demo's workdir (an older demo's too) is the demo's to replace; nothing else
    for name in (*DEMO_PARTS.values(), *EARLIER_PARTS):
        (own / name).mkdir(parents=True)
    (own / DEMO_MARKER).write_text("")
    check_workdir(own)
    (own / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds notes.txt, which the demo did not create"):
        check_workdir(own)


# 2. `train --max-steps 10 --resume latest` with latest = checkpoint-28 trained -18 steps and overwrote checkpoint-10.
def test_2_resume_with_max_steps_at_or_below_the_checkpoint_is_refused_untouched(tmp_path, fp32_cache):
    out = tmp_path / "run"
    invoke_cli(*train_args(fp32_cache, out, max_steps=6))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    before = tree(out)
    for steps in (2, 6):  # below the latest checkpoint; equal to it (rerunning a finished resume)
        proc = invoke_cli(*train_args(fp32_cache, out, max_steps=steps, resume="latest"), check=False)
        line = one_line_error(proc)
        assert f"--max-steps {steps} is not beyond the step of {out / 'checkpoint-6'} (6)" in line
        assert "loading the UNet" not in proc.stdout
    assert tree(out) == before  # every checkpoint, the LoRA, the metrics and the model card byte-equal
    assert json.loads((out / "checkpoint-2" / "training_state.json").read_text())["step"] == 2


# 3. Two `train` processes on one --output both exited 0, their checkpoints and metrics interleaved.
def test_3_a_second_train_on_a_live_output_is_refused_naming_the_holder(tmp_path, fp32_cache):
    out, gate = tmp_path / "run", tmp_path / "gate"
    with live(train_args(fp32_cache, out, max_steps=4, rank=16), "step:1", gate) as first:
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["command"] == "train" and holder["host"] and holder["started"]
        second = run_cli(*train_args(fp32_cache, out, max_steps=4, rank=4, overwrite=True), check=False)
        line = one_line_error(second)
        assert f"{out} is in use by train (pid {first.pid} on {holder['host']}" in line
        assert str(out / LOCK_NAME) in line and "loading the UNet" not in second.stdout
        finish(first, gate)

    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # one run's rows only
    files = [out / LORA_WEIGHTS_NAME, *(out / f"checkpoint-{s}" / LORA_WEIGHTS_NAME for s in (2, 4))]
    assert all(lora_ranks(f) == {16} for f in files)
    assert json.loads((out / "train_config.json").read_text())["rank"] == 16
    assert "| 16 / 32 " in (out / "README.md").read_text()
    assert not (out / LOCK_NAME).exists()  # released on exit


# 4. Two `encode` processes on one --cache: a shared temporary name, a hijacked journal, orphan shards.
def test_4_a_second_encode_on_a_live_cache_is_refused_and_a_stale_lock_is_taken_over(tmp_path, tiny_model, image_folder):
    cache, gate = tmp_path / "cache", tmp_path / "gate"
    args = encode_args(tiny_model, image_folder, cache)
    with live(args, "shards:1", gate) as first:
        second = run_cli(*args, check=False)
        line = one_line_error(second)
        assert f"{cache} is in use by encode (pid {first.pid}" in line
        assert "resuming an unfinished encode" not in second.stdout and "loading VAE" not in second.stdout
        assert "encoded 6 samples" in finish(first, gate)

    reader = CacheReader(cache)
    assert reader.verify() == [] and reader.manifest.num_samples == 6
    on_disk = sorted(p.name for p in cache.iterdir())
    assert on_disk == sorted(["manifest.json", "empty_prompt.safetensors", *(s.file for s in reader.manifest.shards)])
    tmp_names = {temporary_name(cache / "shard-00000.safetensors") for _ in range(2)}  # two writers never share one
    assert len(tmp_names) == 2 and all(f".{os.getpid()}-" in p.name for p in tmp_names)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "x", "command": "encode"}
    (cache / LOCK_NAME).write_text(json.dumps(stale))  # left by a writer killed with -9
    rerun = run_cli(*args)
    assert "which is no longer running; taking over its stale lock" in rerun.stdout and "up to date" in rerun.stdout
    assert not (cache / LOCK_NAME).exists()


# 5. The default --cache ./cache is the project's own cache/ package when run from the repository root.
def test_5_default_cache_is_no_source_folder_and_encode_refuses_one_before_loading(tmp_path, tiny_model, image_folder):
    from stages.config import EncodeConfig, TrainConfig
    assert EncodeConfig().cache == TrainConfig().cache == "./sdxl-cache"
    assert not (REPO / "sdxl-cache" / "__init__.py").exists()
    readme = (REPO / "README.md").read_text()
    assert readme.count("| `--cache` | `./sdxl-cache` |") == 2 and not re.search(r"\./cache\b(?!-)", readme)
    package = tree(REPO / "cache")
    proc = invoke_cli(*encode_args(tiny_model, image_folder, "cache", "--overwrite"), check=False, cwd=REPO)
    line = one_line_error(proc)
    assert "cache is not a cache (it holds __init__.py" in line and "choose another --cache" in line
    assert "loading VAE" not in proc.stdout  # refused before the encoders load
    assert tree(REPO / "cache") == package and not (REPO / "cache" / LOCK_NAME).exists()


# 6. A relative --model broke `train` from another folder (or used another model there); so did a moved cache.
def test_6_cache_records_the_model_absolutely_and_a_moved_model_is_checked_by_hash(tmp_path, tiny_model, image_folder):
    from stages.sdxl import build_tiny_sdxl
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    shutil.copytree(tiny_model, work / "model")
    invoke_cli(*encode_args("model", image_folder, "cache"), cwd=work)  # relative paths, as typed by a user
    manifest = json.loads((work / "cache" / "manifest.json").read_text())
    assert manifest["encoder"]["model"] == str((work / "model").resolve())
    shutil.move(work / "cache", tmp_path / "moved-cache")  # the cache travels
    build_tiny_sdxl(elsewhere / "model", seed=1)  # another model at the same relative path, seen from elsewhere
    cache = tmp_path / "moved-cache"
    ok = invoke_cli(*train_args(cache, "a", max_steps=1), cwd=elsewhere)
    assert f"loading the UNet from {(work / 'model').resolve()}" in ok.stdout

    shutil.move(work / "model", tmp_path / "model-moved")  # now the model moves too
    line = one_line_error(invoke_cli(*train_args(cache, "b", max_steps=1), check=False, cwd=elsewhere))
    assert f"the cache's model {(work / 'model').resolve()} is not there" in line and "--model" in line
    other = elsewhere / "model"
    line = one_line_error(invoke_cli(*train_args(cache, "b", max_steps=1, model=other), check=False, cwd=elsewhere))
    assert f"--model {other} is not the cache's model {(work / 'model').resolve()}" in line
    assert "text_encoder, text_encoder_2, vae weights differ" in line and not (elsewhere / "b").exists()
    found = invoke_cli(*train_args(cache, "b", max_steps=1, model=tmp_path / "model-moved"), cwd=elsewhere)
    assert f"loading the UNet from {tmp_path / 'model-moved'}" in found.stdout
    assert (elsewhere / "b" / LORA_WEIGHTS_NAME).exists()


# 7. Resume ignored a changed --learning-rate (but recorded it), died on --rank with a traceback, and rerunning a
#    finished resume rewrote the model card with "final loss: nan".
def test_7_resume_refuses_shape_and_order_changes_and_applies_and_records_a_new_learning_rate(tmp_path, fp32_cache):
    out = tmp_path / "run"
    flags = dict(lr_scheduler="constant")
    invoke_cli(*train_args(fp32_cache, out, max_steps=2, **flags))
    same = tmp_path / "same-lr"
    shutil.copytree(out, same)
    before = tree(out)
    proc = invoke_cli(*train_args(fp32_cache, out, max_steps=4, resume="latest", rank=4, seed=7, **flags), check=False)
    line = one_line_error(proc)
    assert "was trained with --rank 16 --seed 42, this run asks for --rank 4 --seed 7" in line
    assert "loading the UNet" not in proc.stdout and tree(out) == before

    resumed = invoke_cli(*train_args(fp32_cache, out, max_steps=4, resume="latest", learning_rate="2e-3", **flags))
    assert "--learning-rate 0.001 -> 0.002" in resumed.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["lr"] for r in rows] == [1e-3, 1e-3, 2e-3, 2e-3]
    changes = {"learning_rate": [1e-3, 2e-3], "max_steps": [2, 4]}
    assert rows[2]["resume_changes"] == changes and "resume_changes" not in rows[3]
    config = json.loads((out / "train_config.json").read_text())
    assert config["learning_rate"] == 2e-3 and config["resolved"]["learning_rate"] == 2e-3
    assert config["resumes"] == [{"step": 2, "checkpoint": str(out / "checkpoint-2"), "changes": changes}]
    assert json.loads((out / "checkpoint-4" / "training_state.json").read_text())["run"]["resumes"] == config["resumes"]
    assert "resumed at step 2 with changed settings: learning_rate 0.0010 -> 0.0020" in (out / "README.md").read_text()
    invoke_cli(*train_args(fp32_cache, same, max_steps=4, resume="latest", **flags))  # the same resume at the old rate
    a, b = load_file(str(out / LORA_WEIGHTS_NAME)), load_file(str(same / LORA_WEIGHTS_NAME))
    assert max(max_abs_diff(a[k], b[k]) for k in a) > 1e-4  # the new rate was applied, not only recorded

    before = tree(out)
    again = invoke_cli(*train_args(fp32_cache, out, max_steps=4, resume="latest", learning_rate="2e-3", **flags), check=False)
    assert "is not beyond the step of" in one_line_error(again) and tree(out) == before  # the card keeps its loss


# 8. A caption-skipped input made every rerun stale; a corrupt shard needed a full --overwrite.
def test_8_rerun_is_up_to_date_despite_a_caption_skip_and_repairs_only_a_corrupt_shard(tmp_path, tiny_model):
    from stages.demo import make_images
    folder = make_images(tmp_path / "images", count=5, size=(80, 64), captions="txt")
    (folder / "img_001.txt").unlink()  # no caption: skipped
    cache = tmp_path / "cache"
    args = encode_args(tiny_model, folder, cache)
    invoke_cli(*args)
    assert [s["key"] for s in json.loads((cache / "manifest.json").read_text())["skipped"]] == ["img_001.png"]
    assert "is up to date (4 samples); nothing to do" in invoke_cli(*args).stdout

    reader = CacheReader(cache)
    original = {k: {n: t.clone() for n, t in v.items()} for k, v in cache_contents(cache).items()}  # not mmapped
    victim = reader.manifest.shards[1]
    held = sorted({s.key for s in reader.manifest.samples if s.shard == 1})
    data = bytearray((cache / victim.file).read_bytes())
    data[-10] ^= 0xFF
    (cache / victim.file).write_bytes(bytes(data))
    intact = {s.file: (cache / s.file).read_bytes() for s in reader.manifest.shards if s.file != victim.file}
    repaired = invoke_cli(*args).stdout
    assert f"2 samples unchanged; stale: 0 added, 0 changed, 0 removed; {len(held)} to encode again from 1 missing " \
           f"or corrupt shard(s) ({victim.file})" in repaired
    fixed = CacheReader(cache)
    assert fixed.verify() == [] and fixed.manifest.skipped == reader.manifest.skipped
    assert all((cache / name).read_bytes() == data for name, data in intact.items())  # kept shards untouched
    assert sorted(p.name for p in cache.glob("shard-*")) == sorted(s.file for s in fixed.manifest.shards)
    new = [s.file for s in fixed.manifest.shards if s.file not in intact]
    assert sorted({s.key for s in fixed.manifest.samples if fixed.manifest.shards[s.shard].file in new}) == held
    got = cache_contents(cache)
    assert got.keys() == original.keys()
    assert max(max_abs_diff(got[k][n], original[k][n]) for k in original for n in original[k]) <= 1e-5
    assert "up to date" in invoke_cli(*args).stdout


# 9. Shards and LoRA files were written 0600; `train --overwrite` kept the old validation images, logs/, loss.png.
def test_9_every_file_gets_the_umask_default_and_overwrite_removes_the_old_run(tmp_path, tiny_model, image_folder):
    cache, out = tmp_path / "cache", tmp_path / "run"
    from stages.sdxl import build_tiny_sdxl
    umask = os.umask(0o027)  # inherited by the CLI processes
    try:
        model = build_tiny_sdxl(tmp_path / "model")  # what the demo builds
        invoke_cli(*encode_args(tiny_model, image_folder, cache, "--validation-prompt", "a red circle"))
        invoke_cli(*train_args(cache, out, checkpoint_every=1, validate_every=1, validation_steps=2,
                            report_to="tensorboard"))
    finally:
        os.umask(umask)
    made = [p for folder in (cache, out, model) for p in [folder, *folder.rglob("*")]]
    assert {p.suffix for p in made} >= {".safetensors", ".json", ".jsonl", ".png", ".md"}
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in made}
    assert {p: m for p, m in modes.items() if m != ("0o750" if Path(p).is_dir() else "0o640")} == {}
    assert (out / "samples" / "step-00002.png").exists() and list((out / "logs").glob("events.out.tfevents.*"))
    (out / "notes.txt").write_text("not the run's")
    assert (out / "run.safetensors").exists()  # the kohya file, named after the folder
    invoke_cli(*train_args(cache, out, max_steps=1, checkpoint_every=0, overwrite=True, output_name="renamed"))
    assert sorted(p.name for p in out.iterdir()) == sorted(  # the old kohya file went with the old run
        [LORA_WEIGHTS_NAME, "README.md", "loss.png", "metrics.jsonl", "notes.txt", "train_config.json",
         "renamed.safetensors"])
    assert [r["step"] for r in metrics(out)] == [1]
    assert "validation_image" not in metrics(out)[0]
