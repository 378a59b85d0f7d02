"""What `train` writes as LoRA files, at each checkpoint and at the end.

    checkpoint-N/pytorch_lora_weights.safetensors   the raw fp32 LoRA that resume continues (schedule-free: its
                                                    average x); the EMA, if kept, is in the training state
    checkpoint-N/<name>.safetensors                 its kohya / LyCORIS file
    pytorch_lora_weights.safetensors, <name>.safetensors
                                                    the final LoRA in --save-dtype: the EMA if kept, else the
                                                    weights (schedule-free: its average x)
    pytorch_lora_weights_raw.safetensors, <name>_raw.safetensors
                                                    with --ema-decay: the weights themselves, beside the EMA

`model` is stages/train.py's Model: its `final_weights(ema)` context puts the weights to save in place.
"""
from __future__ import annotations

from pathlib import Path

from stages import checkpoint
from stages.export import save_lora_files, write_kohya_file
from stages.lora import LORA_WEIGHTS_NAME


def save_training_checkpoint(model, out: Path, step: int, counters: dict, layout: dict, kohya_name: str | None,
                             keep: int | None) -> Path:
    """checkpoint-<step>/ (and its kohya file unless `kohya_name` is None); then keep the newest `keep`."""
    with model.final_weights(ema=False):  # schedule-free saves (and resumes) in eval mode
        folder = checkpoint.save_checkpoint(out, step, model.unet, model.states(), counters, layout, model.adapter)
    if kohya_name:
        write_kohya_file(folder / LORA_WEIGHTS_NAME, folder / f"{kohya_name}.safetensors", lambda *a: None)
    checkpoint.prune_checkpoints(out, keep)
    return folder


def save_final_lora(model, out: Path, kohya_name: str, save_dtype: str, kohya: bool, log) -> list[Path]:
    """The final LoRA files (the module docstring's list) in `out`."""
    written = []
    for suffix, ema in (("", True), ("_raw", False))[: 1 + (model.ema is not None)]:
        with model.final_weights(ema=ema):
            written += save_lora_files(model.unet, out, kohya_name, save_dtype, kohya, suffix, log, model.adapter)
    return written
