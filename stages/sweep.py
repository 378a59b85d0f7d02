"""What each trained adapter writes, and `train --sweep`: several LoRAs from one pass over the cache.

    --sweep learning_rate=1e-4,5e-5 --sweep rank=8,16
      -> members: the cross product (stages/config.py sweep_members), each a TrainConfig with its own --output
         OUTPUT/<learning_rate=1e-4,rank=8>/ and its values
      -> one frozen UNet with one adapter per member; every micro-batch replicated once per member, replica k
         through adapter k (stages/lora.py MixedBatch) in one forward + backward; each member clips, steps and
         skips alone (stages/train.py training_step)
      -> per member (`Member`), exactly what a single `train` writes into its folder
      -> OUTPUT/sweep.json (members, settings, final losses), OUTPUT/sweep.png (loss curves), a ranked table

Where --vram-budget fits fewer members together (stages/plan.py), they train in rounds of as many as fit, one pass
over the cache each, in member order (`train_rounds`); sweep.json ranks every member of every round.

A single run is a sweep of one member: `Member` is what train.py does with every run's outputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import math
import os
from pathlib import Path

import torch

from cache.files import write_json_atomic
from cache.lock import lock_folder
from stages import checkpoint, distributed
from stages.config import TrainConfig, sweep_members, sweep_values
from stages.errors import UserError
from stages.lora import LORA_WEIGHTS_NAME
from stages.outputs import save_final_lora, save_training_checkpoint
from stages.paths import check_output_folder
from stages.report import MetricsLogger, plot_losses, plural, write_model_card

SWEEP_NAME = "sweep.json"


class Member:
    """One adapter's run and its folder: checkpoints, train_config.json, metrics.jsonl (+ tracker), the final LoRA,
    model card and loss.png. In a sweep (`name` set) too many non-finite steps stop this member alone, and `on_end(member,
    summary or None)` records its end (finished or stopped) in sweep.json."""

    def __init__(self, name: str | None, cfg: TrainConfig, resume: checkpoint.Resume | None, log, on_end=None):
        self.name, self.cfg, self.out, self.resume, self.log = name, cfg, Path(cfg.output), resume, log
        self.losses, self.stopped_at, self.model, self.on_end, self.round = [], None, None, on_end, 0

    def start(self, model, manifest, layout: dict, main: bool) -> int:
        """The resumed checkpoint loaded into `model`, train_config.json written; returns the first step."""
        self.model = model
        self.start_step, self.counters = checkpoint.restore(self.resume, model, self.cfg.weight_decay, self.log)
        self.run = checkpoint.run_record(self.cfg, model.resolved, manifest, self.resume)
        self.layout = {**layout, "run": self.run}
        if main:  # --output exists: its lock is in it
            write_json_atomic(self.out / "train_config.json", self.run)
            checkpoint.truncate_metrics(self.out / "metrics.jsonl", self.start_step)
        return self.start_step

    def open_logs(self, files: contextlib.ExitStack, main: bool) -> None:
        """metrics.jsonl (appended to: a resume truncated it at its checkpoint) and the tracker, on rank 0."""
        self.metrics = files.enter_context(open(self.out / "metrics.jsonl" if main else os.devnull, "a"))
        self.tracker = files.enter_context(MetricsLogger(self.cfg.report_to if main else "none", self.out,
                                                         self.start_step))

    def record(self, step: int, result: dict, row: dict, validator, resolution: int, main: bool, watch) -> None:
        """Step `step`'s metrics row (validation images at --validate-every, each cache's loss), its counters, its
        checkpoint; `watch` (stages/budget.py) stops a run whose measured memory is over --vram-budget."""
        cfg, counters = self.cfg, self.counters
        counters["skipped_steps"] += result["skipped"]
        counters["bad_in_a_row"] = counters["bad_in_a_row"] + 1 if result["bad"] else 0
        row = {"step": step + 1, **{k: result[k] for k in ("loss", "lr", "grad_norm", "skipped")}, **row}
        if self.resume and self.resume.changes and step == self.start_step:  # the first step with the changed settings
            row["resume_changes"] = self.resume.changes
        if validator and (step + 1) % cfg.validate_every == 0:
            mixed = self.model.mixed
            with self.model.final_weights(), mixed.only(self.model.adapter) if mixed else contextlib.nullcontext():
                row.update(validate(self.model, validator, step + 1, self.out, resolution, self.log))
        row.update(self.model.recipe.cache_loss_row())  # several caches: each one's loss
        watch.check(row, step + 1 - self.start_step)  # --vram-budget: the first steps' and validations' measured peaks
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        self.tracker.log(step + 1, row)
        if math.isfinite(result["loss"]):
            self.losses.append(result["loss"])
        if counters["bad_in_a_row"] >= cfg.max_bad_steps:
            message = (f"stopped: {counters['bad_in_a_row']} non-finite steps in a row at step {step + 1} "
                       "(lower --learning-rate, or use --mixed-precision bf16/no); checkpoints are intact")
            if self.name is None:
                raise UserError(message)
            if distributed.world_size() > 1:  # DDP reduces every adapter's gradients each step: none may drop out
                raise UserError(f"{self.name}: {message}; under torchrun this stops the whole sweep (resume it without "
                                "this member's value)")
            self.stopped_at = step + 1
            if main:
                self.on_end(self, None)
            self.log(f"{self.name}: {message}; the other members go on")
        elif main and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
            save_training_checkpoint(self.model, self.out, step + 1, counters, self.layout,
                                     cfg.kohya_name if cfg.kohya_file else None, cfg.checkpoints_total_limit)

    def finish(self, manifest, seconds: float, peak_gib: float | None, main: bool) -> dict:
        """The summary (a sweep's row in sweep.json first: a member with a final LoRA is recorded), the final LoRA
        files and last checkpoint, the summary logged, the model card and loss.png."""
        cfg, out, model, log = self.cfg, self.out, self.model, self.log
        last = self.losses[-10:]
        summary = {
            "output": str(out), "steps": cfg.max_steps, "trained_steps": cfg.max_steps - self.start_step,
            "final_loss": sum(last) / max(len(last), 1) if last else float("nan"),
            "seconds": seconds, "skipped_steps": self.counters["skipped_steps"],
            "peak_gib": peak_gib,  # of the training steps (validation is logged separately)
            "unet": model.unet,  # the trained peft UNet, for callers that use it in-process (tests, demo)
        }
        if main:
            if self.on_end:
                self.on_end(self, summary)
            save_final_lora(model, out, cfg.kohya_name, cfg.save_dtype, cfg.kohya_file, log)  # the EMA if kept, …_raw beside
            if cfg.checkpoint_every:
                save_training_checkpoint(model, out, cfg.max_steps, self.counters, self.layout,
                                         cfg.kohya_name if cfg.kohya_file else None, cfg.checkpoints_total_limit)
        log((f"{self.name}: " if self.name else "") + f"trained {plural(summary['trained_steps'], 'step')} in "
            f"{summary['seconds']:.1f} s; final loss {summary['final_loss']:.4f} (mean of the last "
            f"{plural(len(last), 'step')})"
            + (f"; peak GPU memory {summary['peak_gib']:.2f} GiB" if summary["peak_gib"] is not None else "")
            + (f"; {summary['skipped_steps']} non-finite step(s) skipped" if summary["skipped_steps"] else "")
            + f" -> {out / LORA_WEIGHTS_NAME}")
        if main:
            card = write_model_card(out, self.run, manifest, summary)
            plotted = plot_losses(out / "metrics.jsonl", out / "loss.png", log)
            log(f"model card -> {card}" + (f"; loss curve -> {out / 'loss.png'}" if plotted else ""))
        return summary


# ------------------------------------------------------------------------------------------ sweeps
def read_sweep(out: Path) -> dict:
    return json.loads((out / SWEEP_NAME).read_text()) if (out / SWEEP_NAME).exists() else {}


def claim_outputs(cfg: TrainConfig, members: list[tuple[str | None, TrainConfig]], manifest, world: int,
                  held: contextlib.ExitStack, log) -> list[Member]:
    """Every member's --output claimed (checkpoint.claim_output: lock, resume plan, earlier outputs) before any model
    loads; a sweep also locks OUTPUT (for the whole run, every round) and refuses an earlier sweep there without
    --resume / --overwrite. On resume, members recorded in sweep.json as stopped, or as finished at --max-steps (their
    final LoRA written), are left as they are; the others resume their newest checkpoint, or start without one."""
    if not cfg.sweep:
        return [Member(None, cfg, checkpoint.claim_output(Path(cfg.output), cfg, manifest, world, held, log), log)]
    out, swept = Path(cfg.output), [name for group in sweep_values(cfg.sweep) for name, _ in group]
    check_output_folder(str(out), "--output")
    if cfg.resume not in (None, "latest"):
        raise UserError(f"--resume {cfg.resume} with --sweep: pass --resume latest (every member resumes its newest "
                        "checkpoint)")
    held.enter_context(distributed.on_main(lock_folder, out, "train", log) or contextlib.nullcontext())
    earlier = read_sweep(out)
    if earlier and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out} holds an earlier sweep ({SWEEP_NAME}); pass --resume latest to continue it, or "
                        "--overwrite to start over")
    distributed.on_main(checkpoint.prepare_output, out, cfg.overwrite, None)  # a single run's outputs: refused / removed
    if cfg.overwrite:
        for name in (SWEEP_NAME, "sweep.png"):
            (out / name).unlink(missing_ok=True)
    rows = {r["name"]: r for r in earlier.get("members", [])} if cfg.resume else {}
    claimed = []
    for name, member_cfg in members:
        row, folder = rows.get(name, {}), Path(member_cfg.output)
        if row.get("stopped_at"):
            log(f"{name}: stopped in the earlier run (see {SWEEP_NAME}); not resumed")
            continue
        if row.get("steps") == member_cfg.max_steps and (folder / LORA_WEIGHTS_NAME).exists():
            log(f"{name}: finished in the earlier run (see {SWEEP_NAME}); left as it is")
            continue
        if cfg.resume and not checkpoint.list_checkpoints(folder):  # a later round's, not started yet
            if (folder / LORA_WEIGHTS_NAME).exists():
                raise UserError(f"--resume latest: {name} finished with no checkpoint to continue from ({folder} was "
                                "trained with --checkpoint-every 0): train its longer run into another --output")
            log(f"{name}: no checkpoint yet; starts from step 0")
            member_cfg = dataclasses.replace(member_cfg, resume=None)
        claimed.append(Member(name, member_cfg, checkpoint.claim_output(folder, member_cfg, manifest, world, held, log),
                              log, on_end=lambda m, summary: record_row(out, sweep_row(m, summary, swept))))
    if not claimed:
        raise UserError(f"--resume latest: every member of the sweep in {out} has finished or stopped; nothing to "
                        "train (a larger --max-steps continues the finished ones)")
    return claimed


def sweep_row(m: Member, summary: dict | None, swept: list[str]) -> dict:
    """A member's row of sweep.json: its swept settings, its round, its final loss or the step it stopped at."""
    return {"name": m.name, "output": str(m.out), "round": m.round, "settings": {k: getattr(m.cfg, k) for k in swept},
            **({k: summary[k] for k in ("final_loss", "steps", "seconds", "skipped_steps")} if summary
               else {"stopped_at": m.stopped_at})}


def record_row(out: Path, row: dict) -> None:
    """A member's row into OUTPUT/sweep.json as the member ends (finish_sweep ranks them all), so that a resume of an
    interrupted sweep leaves the members it records as finished or stopped as they are."""
    earlier = read_sweep(out)
    rows = {r["name"]: r for r in earlier.get("members", [])} | {row["name"]: row}
    write_json_atomic(out / SWEEP_NAME, {**earlier, "members": list(rows.values())})


def plan_rounds(steps: list[int], together: int) -> list[list[int]]:
    """The members (indices into `steps`, each member's first step) in rounds of at most `together` consecutive
    members that start at one step: a resumed round's members resume together, the later rounds' start at 0."""
    rounds: list[list[int]] = []
    for i, step in enumerate(steps):
        if rounds and len(rounds[-1]) < together and steps[rounds[-1][0]] == step:
            rounds[-1].append(i)
        else:
            rounds.append([i])
    return rounds


def train_members(cfg: TrainConfig, members: list[Member], together: int, train_pass, main: bool, log) -> dict:
    """Train the claimed members: `train_pass(members)` -> their summaries (None: stopped) is one pass over the cache
    with one UNet carrying their adapters. A single run's summary, or a sweep's rounds and finish_sweep's summary;
    every process returns once rank 0 has written the outputs."""
    summary = (finish_sweep(cfg, train_rounds(cfg, members, together, train_pass, log), main, log) if cfg.sweep
               else train_pass(members)[0])
    distributed.barrier()
    return summary


def train_rounds(cfg: TrainConfig, members: list[Member], together: int, train_pass, log) -> list[dict]:
    """A sweep's members in rounds (plan_rounds: at most `together` each, in member order), one pass each with a fresh
    UNet; returns their sweep.json rows."""
    swept = [name for group in sweep_values(cfg.sweep) for name, _ in group]
    first = 1 + max((r.get("round", 0) for r in read_sweep(Path(cfg.output)).get("members", [])), default=-1)
    rounds = plan_rounds([m.resume.step if m.resume else 0 for m in members], together)
    rows = []
    for k, indices in enumerate(rounds):
        group = [members[i] for i in indices]
        if len(rounds) > 1:
            log(f"round {k + 1} of {len(rounds)}: {', '.join(m.name for m in group)}")
        for m in group:
            m.round = first + k
        rows += [sweep_row(m, summary, swept) for m, summary in zip(group, train_pass(group))]
        for m in group:
            m.model = None  # the round's UNet (held in a cycle with its CUDA graphs) freed before the next one loads
        gc.collect()
        torch.cuda.empty_cache()
    if all(m.stopped_at is not None for m in members):
        raise UserError("stopped: every member of the sweep had too many non-finite steps in a row (see above); "
                        "checkpoints are intact")
    return rows


def finish_sweep(cfg: TrainConfig, rows: list[dict], main: bool, log) -> dict:
    """OUTPUT/sweep.json: the members' rows (this run's, and those an earlier run recorded and this resume left as
    they are), ranked by final loss, and the rounds they trained in; OUTPUT/sweep.png, the ranked table; returns the
    sweep's summary."""
    out = Path(cfg.output)
    if not main:
        return {"output": str(out), "members": rows}
    names = {r["name"] for r in rows}
    rows = rows + [r for r in read_sweep(out).get("members", []) if r["name"] not in names]
    rank = sorted(rows, key=lambda r: (r.get("final_loss") is None or not math.isfinite(r["final_loss"]),
                                       r.get("final_loss") or 0.0))
    position = {name: i for i, (name, _) in enumerate(sweep_members(cfg))}
    in_order = sorted(rows, key=lambda r: (r.get("round", 0), position.get(r["name"], len(position))))
    rounds = [[r["name"] for r in group] for _, group in itertools.groupby(in_order, key=lambda r: r.get("round", 0))]
    write_json_atomic(out / SWEEP_NAME, {"sweep": list(cfg.sweep), "ranked_by": "final_loss", "rounds": rounds,
                                         "members": rank})
    plot_losses({r["name"]: Path(r["output"]) / "metrics.jsonl" for r in rank}, out / "sweep.png", log)
    width = max(len(r["name"]) for r in rank)
    log(f"sweep of {plural(len(rank), 'member')}" + (f" in {plural(len(rounds), 'round')}" if len(rounds) > 1 else "")
        + ", ranked by final loss (mean of the last 10 steps):")
    for i, r in enumerate(rank, 1):
        result = f"{r['final_loss']:.4f}" if "final_loss" in r else f"stopped at step {r['stopped_at']}"
        log(f"  {i:>3}  {r['name']:<{width}}  {result}")
    log(f"-> {out / SWEEP_NAME}, {out / 'sweep.png'}")
    return {"output": str(out), "members": rank}


def validate(model, validator, step: int, out: Path, resolution: int, log) -> dict:
    """The validation row; out of GPU memory beside the CUDA graphs' memory pool (a small card), the graphs are
    dropped (captured again at the next step, ~1-4 s) and the images rendered in the freed memory."""
    try:
        return validator(model.unet, model.noise_scheduler, step, out, resolution)
    except torch.cuda.OutOfMemoryError:
        if not (model.graphs and model.graphs.graphs):
            raise
    model.graphs.release()  # out of the except block: the failed attempt's frames (its activations) can go
    log(f"note: validation at step {step} did not fit beside the CUDA graphs' memory; they are captured again after it")
    return validator(model.unet, model.noise_scheduler, step, out, resolution)
