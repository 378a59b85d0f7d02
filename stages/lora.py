"""Attach, save and load the UNet LoRA, through peft and diffusers' own LoRA helpers.

The saved file is diffusers' `pytorch_lora_weights.safetensors` (keys `unet.…lora_A/B.weight`) with
the adapter config in its metadata, so `StableDiffusionXLPipeline.load_lora_weights(dir)` applies
the trained scale alpha/rank. Without that metadata diffusers assumes alpha = rank, and an r16/alpha32
adapter would load at half strength.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def lora_config(rank: int, alpha: float, target_modules: list[str]):
    from peft import LoraConfig
    # Gaussian A, zero B: the adapted model starts exactly equal to the base.
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)


def adapter_metadata(config) -> dict:
    """The LoraConfig kwargs diffusers rebuilds the adapter from when loading."""
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
            "lora_dropout": config.lora_dropout, "use_dora": bool(config.use_dora)}


def attach_lora(unet, rank: int, alpha: float, target_modules: list[str]):
    """Freeze the UNet, add a LoRA adapter, keep the LoRA parameters in fp32; returns them."""
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, alpha, target_modules))
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no module of the UNet matches --target-modules {','.join(target_modules)}")
    for p in params:
        p.data = p.data.float()
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's key names (`…lora_A.weight`, `…lora_B.weight`), without `unet.`.

    All keys in one style on purpose: diffusers converts old-style keys (`lora.down/up`) only when the
    first key is old-style, so a file mixing both styles (which diffusers' convert_state_dict_to_diffusers
    produces for targets beyond attention) would silently lose weights on load.
    """
    from peft.utils import get_peft_model_state_dict
    return get_peft_model_state_dict(unet)


def save_lora(unet, folder: str | Path) -> Path:
    """Write pytorch_lora_weights.safetensors (with alpha metadata) into `folder`, atomically."""
    from diffusers import StableDiffusionXLPipeline
    folder = Path(folder)
    tmp = folder / ".tmp-lora"  # inside the output folder: nothing is written outside it
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp, unet_lora_layers={k: v.detach().float().cpu() for k, v in lora_state_dict(unet).items()},
        unet_lora_adapter_metadata=adapter_metadata(unet.peft_config["default"]), safe_serialization=True)
    with open(tmp / LORA_WEIGHTS_NAME, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp / LORA_WEIGHTS_NAME, folder / LORA_WEIGHTS_NAME)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder / LORA_WEIGHTS_NAME


def load_lora_weights_into(unet, folder: str | Path) -> None:
    """Load a saved LoRA file back into the (already attached) peft adapter, exactly (resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    state = load_file(str(Path(folder) / LORA_WEIGHTS_NAME))
    state = {k.removeprefix("unet."): v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA file in {folder} does not fit this adapter: {result.unexpected_keys[:3]}")
