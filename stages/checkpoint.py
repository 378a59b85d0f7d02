"""Checkpoints of a training run, and the output folder they live in.

    OUTPUT/checkpoint-<step>/
      pytorch_lora_weights.safetensors   the LoRA at that step (loads like the final one)
      training_state.safetensors         optimizer, lr scheduler and grad scaler tensors (no pickle)
      training_state.json                step, counters, the process layout, and the states' structure

A checkpoint folder appears whole (written as .checkpoint-<step>.tmp, then renamed). Nothing random is
stored: the data order and every draw are regenerated from (seed, position) on resume.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cache.files import atomic_path, write_bytes_atomic, write_json_atomic
from stages.errors import UserError
from stages.lora import LORA_WEIGHTS_NAME, load_lora_weights_into, save_lora

STATE_NAME = "training_state.json"
STATE_TENSORS_NAME = "training_state.safetensors"


def split_tensors(obj, tensors: dict, path: str = "s"):
    """A JSON-able copy of a state dict with every tensor moved into `tensors` (no pickle anywhere).

    Dicts become {"__dict__": [[key, value], ...]} so that integer keys (optimizer state) survive.
    """
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, split_tensors(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def join_tensors(obj, tensors: dict):
    """Inverse of split_tensors."""
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def save_checkpoint(out: Path, step: int, unet, states: dict, counters: dict, layout: dict) -> Path:
    """checkpoint-<step>/: the LoRA + `states` (name -> state dict: optimizer, lr scheduler, scaler) + step."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_lora(unet, tmp)
    tensors: dict = {}
    structure = split_tensors(states, tensors)
    with atomic_path(tmp / STATE_TENSORS_NAME) as path:  # the default file mode (safetensors writes 0600)
        save_file(tensors, str(path))
    write_json_atomic(tmp / STATE_NAME, {"step": step, "counters": counters, "state": structure, **layout})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_checkpoint(folder: Path, unet) -> tuple[int, dict, dict]:
    """Load the checkpoint's LoRA into `unet`; returns (step, counters, states) for the caller to restore."""
    saved = json.loads((folder / STATE_NAME).read_text())
    load_lora_weights_into(unet, folder)
    states = join_tensors(saved["state"], load_file(str(folder / STATE_TENSORS_NAME)))
    return saved["step"], saved["counters"], states


def check_resume_layout(folder: Path, batch_size: int, world: int, log) -> None:
    """Resume needs the checkpoint's global micro-batch (batch_size × processes): then the positions and
    random draws continue exactly. The same number of processes and --batch-size always qualifies."""
    saved = json.loads((folder / STATE_NAME).read_text())
    saved_world, saved_global = saved.get("world_size", 1), saved.get("global_batch_size")
    if saved_world == world:
        return
    if saved_global == batch_size * world:
        log(f"note: {folder} was trained by {saved_world} process(es) and resumes with {world}: the same global "
            f"micro-batch of {saved_global}, so the same samples and random draws (equal up to float rounding)")
        return
    raise UserError(f"--resume {folder}: it was trained by {saved_world} process(es)"
                    + (f" with a global micro-batch of {saved_global} (--batch-size × processes)" if saved_global else "")
                    + f", this run has {world} × --batch-size {batch_size}; resume with torchrun --nproc-per-node "
                    f"{saved_world} and the same --batch-size"
                    + (f", or any N with --batch-size {saved_global} / N" if saved_global else ""))


def checkpoint_problem(folder: Path) -> str | None:
    """None if `folder` is a complete, readable checkpoint; else what is wrong with it."""
    from safetensors import safe_open
    try:
        saved = json.loads((folder / STATE_NAME).read_text())
        if not isinstance(saved.get("step"), int):
            return f"{STATE_NAME} has no step"
        for name in (STATE_TENSORS_NAME, LORA_WEIGHTS_NAME):
            with safe_open(str(folder / name), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)  # header and offsets must be consistent
    except Exception as e:  # unreadable JSON, a truncated or corrupt safetensors file (SafetensorError), ...
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def list_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders in `out`, oldest first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def find_checkpoint(out: Path, resume: str, log) -> Path:
    """The checkpoint to resume: a given folder, or the newest intact one (falling back past corrupt ones)."""
    if resume != "latest":
        path = Path(resume)
        problem = checkpoint_problem(path)
        if problem:
            raise UserError(f"--resume {resume}: not a usable checkpoint ({problem})")
        return path
    for path in reversed(list_checkpoints(out)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log(f"warning: {path} is unusable ({problem}); trying the previous checkpoint")
    raise UserError(f"--resume latest: no usable checkpoint in {out}")


def prune_checkpoints(out: Path, keep: int | None) -> None:
    if keep:
        for path in list_checkpoints(out)[:-keep]:
            shutil.rmtree(path)


def prepare_output(out: Path, overwrite: bool, resume: str | None) -> None:
    """Refuse to clobber a finished LoRA or another run's checkpoints without --overwrite."""
    if not out.exists():
        return
    finished = (out / LORA_WEIGHTS_NAME).exists()
    checkpoints = list(out.glob("checkpoint-*"))
    if overwrite:
        for p in checkpoints:
            shutil.rmtree(p)
        for name in (LORA_WEIGHTS_NAME, "metrics.jsonl", "train_config.json"):
            (out / name).unlink(missing_ok=True)
    elif finished and not resume:
        raise UserError(f"{out} already holds a finished LoRA; pass --overwrite to replace it, or choose another --output")
    elif checkpoints and not resume:
        raise UserError(f"{out} holds checkpoints of an earlier run; pass --resume latest to continue it, "
                        "or --overwrite to start over")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows after the checkpoint so the log matches an uninterrupted run."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_bytes_atomic(path, "".join(r + "\n" for r in rows).encode())
