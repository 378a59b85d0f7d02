"""Checkpoints of a training run, and the output folder they live in.

    OUTPUT/checkpoint-<step>/
      pytorch_lora_weights.safetensors   the LoRA at that step (loads like the final one)
      training_state.safetensors         optimizer, lr scheduler and grad scaler tensors (no pickle)
      training_state.json                step, counters, the process layout, and the states' structure

A checkpoint folder appears whole (written under a temporary name unique to the writer, then renamed). Nothing
random is stored: the data order and every draw are regenerated from (seed, position) on resume.
training_state.json also records the run's settings ("run": what train_config.json holds), so that a resume
can keep what must not change and record what does (plan_resume).
"""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cache.files import TMP_SUFFIX, atomic_path, temporary_name, write_bytes_atomic, write_json_atomic
from cache.lock import lock_folder
from stages import distributed
from stages.config import flag_name, parse_rank_pattern, resolve_target_modules
from stages.errors import UserError
from stages.paths import check_output_folder, did_you_mean
from stages.lora import LORA_WEIGHTS_NAME, load_lora_weights_into, save_lora
from stages.report import CARD_NAME, FALLBACK_CARD_NAME, is_ours

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


def save_checkpoint(out: Path, step: int, unet, states: dict, counters: dict, layout: dict,
                    adapter: str = "default") -> Path:
    """checkpoint-<step>/: the LoRA (the UNet's adapter `adapter`) + `states` (name -> state dict: optimizer, lr scheduler, scaler) + step."""
    final = out / f"checkpoint-{step}"
    tmp = temporary_name(final)
    tmp.mkdir(parents=True)
    save_lora(unet, tmp, adapter=adapter)
    tensors: dict = {}
    structure = split_tensors(states, tensors)
    with atomic_path(tmp / STATE_TENSORS_NAME) as path:  # the default file mode (safetensors alone writes 0600)
        save_file(tensors, str(path))
    write_json_atomic(tmp / STATE_NAME, {"step": step, "counters": counters, "state": structure, **layout})
    shutil.rmtree(final, ignore_errors=True)  # only ever the same step's (an unusable one that resume fell back past)
    tmp.rename(final)
    return final


def load_checkpoint(folder: Path, unet, adapter: str = "default") -> tuple[int, dict, dict]:
    """Load the checkpoint's LoRA into `unet`'s adapter `adapter`; returns (step, counters, states) for the caller to restore."""
    saved = json.loads((folder / STATE_NAME).read_text())
    load_lora_weights_into(unet, folder, adapter)
    states = join_tensors(saved["state"], load_file(str(folder / STATE_TENSORS_NAME)))
    return saved["step"], saved["counters"], states


def check_resume_layout(folder: Path, batch_size: int, world: int, log) -> None:
    """Resume needs the checkpoint's global micro-batch (batch_size × processes): then the positions and
    random draws continue exactly. The same number of processes and --batch-size always qualifies."""
    saved = json.loads((folder / STATE_NAME).read_text())
    saved_world, saved_global = saved.get("world_size", 1), saved.get("global_batch_size")
    if saved_global == batch_size * world or (saved_global is None and saved_world == world):
        if saved_world != world:
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
        if path.exists() and not path.is_dir():
            raise UserError(f"--resume {resume} is a file, not a checkpoint folder: pass latest or a checkpoint-N folder")
        if not path.is_dir():
            found = [p.name for p in list_checkpoints(out)] if out.is_dir() else []
            raise UserError(f"--resume {resume}: no such checkpoint folder{did_you_mean(path)}; pass latest or a "
                            "checkpoint-N folder" + (f" ({out} holds {', '.join(found)})" if found else ""))
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


def checkpoint_step(folder: Path) -> int:
    return json.loads((folder / STATE_NAME).read_text())["step"]


# ------------------------------------------------------------------------------------------ resume
# A resume keeps these exactly: they fix the adapter's shape, the data order and the optimizer state's layout.
# (The global micro-batch, --batch-size × processes, is check_resume_layout's.) Every other setting may change
# (more steps, another learning rate, checkpoint cadence, validation, ...): applied, and recorded as a change.
KEPT_ON_RESUME = ("rank", "alpha", "target_modules", "lora_type", "rank_pattern", "grad_accum", "seed", "optimizer",
                  "loraplus_lr_ratio", "block_lr", "ema_decay")  # the adapter's shape, the data order, the states' layout
NORMALIZE = {"target_modules": lambda v: sorted(resolve_target_modules(v)), "rank_pattern": parse_rank_pattern,
             "alpha": float, "sweep": tuple}


@dataclass
class Resume:
    folder: Path     # the checkpoint
    step: int        # its optimizer step
    recorded: dict   # the run record it was saved with ({} for checkpoints of older versions)
    changes: dict    # setting -> [the checkpoint's value, this run's value]


def _differs(name: str, recorded, value) -> bool:
    norm = NORMALIZE.get(name) if recorded is not None and value is not None else None
    return (norm(recorded) != norm(value)) if norm else recorded != value


def _recorded_run(folder: Path) -> dict:
    """The settings a checkpoint was trained with: its own record, else (older versions) its run's train_config.json."""
    saved = json.loads((folder / STATE_NAME).read_text())
    if "run" in saved:
        return saved["run"]
    config = folder.parent / "train_config.json"
    return json.loads(config.read_text()) if config.exists() else {}


def plan_resume(out: Path, cfg, manifest, world: int, log) -> Resume:
    """Before any model loads: the checkpoint to resume, refused where it cannot continue this run unchanged
    (another adapter shape, data order or cache, no steps left, a newer checkpoint it would replace), and the
    settings this run changes."""
    folder = find_checkpoint(out, cfg.resume, log)
    step = checkpoint_step(folder)
    if cfg.overwrite and (cfg.resume == "latest" or folder.resolve().parent == out.resolve()):
        raise UserError(f"--resume {cfg.resume} with --overwrite: --overwrite would delete the checkpoint to resume; "
                        "pass one of them")
    if cfg.max_steps <= step:
        raise UserError(f"--max-steps {cfg.max_steps} is not beyond the step of {folder} ({step}): nothing to train; "
                        "pass a larger --max-steps to continue, or start over without --resume and with --overwrite")
    newer = [p for p in list_checkpoints(out) if int(p.name.split("-", 1)[1]) > step and checkpoint_problem(p) is None]
    if newer:
        raise UserError(f"--resume {folder}: {out} holds newer checkpoints ({', '.join(p.name for p in newer)}) that "
                        "this run would replace with other states; resume latest, or move them away first")
    check_resume_layout(folder, cfg.batch_size, world, log)
    recorded = _recorded_run(folder)
    if not recorded:
        log(f"note: {folder} records no settings (an older version): resuming with this run's as given")
        return Resume(folder, step, {}, {})
    kept = [k for k in KEPT_ON_RESUME if k in recorded and _differs(k, recorded[k], getattr(cfg, k))]
    if kept:
        raise UserError(f"--resume: {folder} was trained with " + " ".join(f"{flag_name(k)} {recorded[k]}" for k in kept)
                        + ", this run asks for " + " ".join(f"{flag_name(k)} {getattr(cfg, k)}" for k in kept)
                        + ": a resume keeps the adapter's shape and the data order; pass the checkpoint's values, "
                        "or train into another --output")
    if recorded.get("cache_fingerprint") not in (None, manifest.fingerprint):
        raise UserError(f"--resume: {folder} was trained from a cache encoded with other settings (fingerprint "
                        f"{recorded['cache_fingerprint'][:12]}…, --cache {cfg.cache} has {manifest.fingerprint[:12]}…); "
                        "resume with the cache it was trained on")
    if recorded.get("cache_samples") not in (None, manifest.samples_digest()):
        raise UserError(f"--resume: --cache {cfg.cache} holds other samples (or another order) than when {folder} "
                        "was trained, which would change the data order; resume with the cache as it was, or start over")
    changes = {k: [recorded[k], v] for k, v in asdict(cfg).items()
               if k in recorded and k not in ("resume", "overwrite") and _differs(k, recorded[k], v)}
    if changes:
        log(f"resuming {folder} with changed settings (recorded in train_config.json and metrics.jsonl): "
            + ", ".join(f"{flag_name(k)} {a} -> {b}" for k, (a, b) in changes.items()))
    return Resume(folder, step, recorded, changes)


def run_record(cfg, resolved: dict, manifest, resume: Resume | None) -> dict:
    """What train_config.json and every checkpoint record of a run: its settings, what "auto" became, the cache it
    reads, and the resumes it went through (each with the settings it changed)."""
    resumes = resume.recorded.get("resumes", []) + [{"step": resume.step, "checkpoint": str(resume.folder),
                                                    "changes": resume.changes}] if resume else []
    return {**asdict(cfg), "resolved": resolved, "cache_fingerprint": manifest.fingerprint,
            "cache_samples": manifest.samples_digest(), **({"resumes": resumes} if resumes else {})}


def restore(resume: Resume | None, model, weight_decay: float, log) -> tuple[int, dict]:
    """(first step, counters) of the run: a resumed checkpoint's LoRA and states loaded into `model` (train.Model)."""
    if resume is None:
        return 0, {"skipped_steps": 0, "bad_in_a_row": 0}
    step, counters, states = load_checkpoint(resume.folder, model.unet, model.adapter)
    model.load_states(states, weight_decay)
    model.flat.check_views()
    log(f"resumed from {resume.folder} at step {step}")
    return step, counters


def set_hyperparameters(optimizer, lr_scheduler, lrs: list[float], weight_decay: float) -> None:
    """After loading a checkpoint's optimizer and scheduler states: this run's learning rate of each parameter
    group (`lrs`: LoRA+ and --block-lr groups carry their multipliers) and weight decay, at the schedule's position
    (a resume may change them: applied, never silently kept)."""
    lr_scheduler.base_lrs = list(lrs)
    for group, lr, factor in zip(optimizer.param_groups, lrs, lr_scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = lr, weight_decay
        group["lr"] = lr * factor(lr_scheduler.last_epoch)  # what the scheduler's step computes: same float
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# ------------------------------------------------------------------------------------------ output folder
RUN_FILES = (LORA_WEIGHTS_NAME, "metrics.jsonl", "train_config.json", "loss.png")  # what a run writes into --output
RUN_GLOBS = ("checkpoint-*", f".checkpoint-*{TMP_SUFFIX}", "samples/step-*.png", "logs/events.out.tfevents.*")


def _recorded_lora_files(out: Path) -> tuple[str, ...]:
    """The run in out/train_config.json's other LoRA files: the raw weights beside an EMA, its kohya file(s)."""
    try:
        name = json.loads((out / "train_config.json").read_text()).get("output_name") or out.resolve().name
    except (OSError, ValueError, AttributeError):
        return ()  # no record of ours: files named like the folder may be the user's
    return ("pytorch_lora_weights_raw.safetensors", f"{name}.safetensors", f"{name}_raw.safetensors")


def remove_run(out: Path) -> None:
    """Delete everything an earlier run wrote into `out` (its model card only where it is ours); other files stay."""
    recorded = _recorded_lora_files(out)
    for pattern in RUN_GLOBS:
        for p in out.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for name in RUN_FILES + recorded + tuple(n for n in (CARD_NAME, FALLBACK_CARD_NAME) if is_ours(out / n)):
        (out / name).unlink(missing_ok=True)
    for name in ("samples", "logs"):
        if (out / name).is_dir() and not any((out / name).iterdir()):
            (out / name).rmdir()


def claim_output(out: Path, cfg, manifest, world: int, held: contextlib.ExitStack, log) -> Resume | None:
    """--output for this run, before any model loads: its lock (rank 0, held until `held` closes: a second writer
    is refused), the checkpoint to resume (plan_resume), an earlier run's outputs refused or removed (prepare_output)."""
    check_output_folder(str(out), "--output")
    held.enter_context(distributed.on_main(lock_folder, out, "train", log) or contextlib.nullcontext())
    resume = plan_resume(out, cfg, manifest, world, log) if cfg.resume else None
    distributed.on_main(prepare_output, out, cfg.overwrite, cfg.resume)
    return resume


def prepare_output(out: Path, overwrite: bool, resume: str | None) -> None:
    """Refuse to clobber a finished LoRA or another run's checkpoints without --overwrite; with it, remove the
    earlier run's outputs completely. Checkpoint folders a killed writer left half-written are removed too."""
    if not out.exists():
        return
    for p in out.glob(f".checkpoint-*{TMP_SUFFIX}"):  # the lock is ours: no other writer is making them
        shutil.rmtree(p)
    finished = (out / LORA_WEIGHTS_NAME).exists()
    checkpoints = list_checkpoints(out)
    if overwrite:
        remove_run(out)
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
