"""Attach, save and load the UNet LoRA, through peft and diffusers' own LoRA helpers.

The saved file is diffusers' `pytorch_lora_weights.safetensors` (keys `unet.…lora_A/B.weight`) with
the adapter config in its metadata, so `StableDiffusionXLPipeline.load_lora_weights(dir)` applies
the trained scale alpha/rank. Without that metadata diffusers assumes alpha = rank, and an r16/alpha32
adapter would load at half strength.

Variants (`--lora-type`): lora and dora (peft LoraConfig, use_dora) load with `load_lora_weights`;
loha and lokr (peft LoHaConfig / LoKrConfig; keys `…hada_w1_a`, `…lokr_w1`, ...) are refused by
diffusers' SDXL loader, so their metadata also names the peft_type and `load_into_pipeline` (or the
README's snippet) loads them through peft.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from cache.files import atomic_path
from stages.config import LORA_TYPES

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def lora_config(rank: int, alpha: float, target_modules: list[str], lora_type: str = "lora",
                rank_pattern: dict[str, int] | None = None):
    """The peft config of `lora_type`; every variant starts exactly equal to the base model."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig
    kw = dict(r=rank, target_modules=target_modules, rank_pattern=dict(rank_pattern or {}))
    if lora_type in ("lora", "dora"):  # Gaussian A, zero B (DoRA: magnitudes = the base weights' norms)
        return LoraConfig(lora_alpha=alpha, init_lora_weights="gaussian", use_dora=lora_type == "dora", **kw)
    if lora_type == "loha":  # hada_w2_b starts at zero
        return LoHaConfig(alpha=alpha, **kw)
    if lora_type == "lokr":  # lokr_w2 (or lokr_w2_b) starts at zero
        return LoKrConfig(alpha=alpha, **kw)
    raise ValueError(f"--lora-type {lora_type}: expected one of {', '.join(LORA_TYPES)}")


def adapter_metadata(config) -> dict:
    """The config kwargs the adapter is rebuilt from when loading: LoraConfig's as diffusers reads them, or
    (LoHa, LoKr) LoHaConfig's / LoKrConfig's plus peft_type."""
    meta = {"r": config.r, "target_modules": sorted(config.target_modules)}
    if config.peft_type == "LORA":
        meta.update(lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, use_dora=bool(config.use_dora))
    else:
        meta.update(peft_type=str(config.peft_type.value), alpha=config.alpha,
                    use_effective_conv2d=config.use_effective_conv2d)
        if config.peft_type == "LOKR":
            meta.update(decompose_both=config.decompose_both, decompose_factor=config.decompose_factor)
    for key in ("rank_pattern", "alpha_pattern"):
        if getattr(config, key):
            meta[key] = dict(getattr(config, key))
    return meta


def attach_lora(unet, rank: int, alpha: float, target_modules: list[str], lora_type: str = "lora",
                rank_pattern: dict[str, int] | None = None, adapter: str = "default"):
    """Freeze the UNet, add the adapter named `adapter` (beside those already attached), keep its parameters in
    fp32; returns its parameters. It is left the only active adapter (a sweep's: `MixedBatch`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import get_pattern_key
    if not getattr(unet, "peft_config", None):
        unet.requires_grad_(False)
    with warnings.catch_warnings():  # a sweep's further adapters: peft warns that the UNet holds several, as meant
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(lora_config(rank, alpha, target_modules, lora_type, rank_pattern), adapter_name=adapter)
    named = adapter_parameters(unet, adapter)
    if not named:
        raise ValueError(f"no module of the UNet matches --target-modules {','.join(target_modules)}")
    adapted = [name for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer) and adapter in m.active_adapters]
    for key in rank_pattern or {}:  # peft ignores a pattern that matches nothing: a typo would go unnoticed
        if not any(get_pattern_key([key], name) == key for name in adapted):
            raise ValueError(f"--rank-pattern {key}: matches no module of --target-modules {','.join(target_modules)}")
    for _, p in named:
        p.data = p.data.float()
    return [p for _, p in named]


def adapter_parameters(unet, adapter: str = "default") -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the adapter's trainable tensors, in module order."""
    return [(n, p) for n, p in unet.named_parameters() if p.requires_grad and re.search(rf"\.{adapter}(\.|$)", n)]


class MixedBatch:
    """A sweep's adapters trained side by side in one forward: each micro-batch holds one replica per adapter (equal,
    contiguous blocks of rows), and replica k goes through adapter k only. peft's own mixed-batch forward
    (`adapter_names`) picks rows with Python index lists, a host-to-device copy that a CUDA graph cannot capture;
    here each peft LoRA layer runs its base layer alone (no adapter active) and a forward hook adds every adapter's
    term to its block's rows, as peft's LoRA forward computes it: lora_B(lora_A(dropout(x))) × scaling (adapters
    without dropout on a Linear layer: as one pair of batched matmuls, ranks padded to the largest). Plain LoRA only (DoRA's magnitude term is not added). The routing stays until the next `route`, so gradient checkpointing's
    recomputation in backward routes alike.

    With `shared` (members of one layout: same modules, ranks, learning-rate groups; one process), every member's
    LoRA lives in a row of one buffer (`buffers`; each member's optimizer steps its row) and each layer's members'
    A and B are one strided view into it, used by the batched matmuls as they are: no per-forward stacking, and one
    gradient accumulation per layer instead of one per member."""

    def __init__(self, unet, adapters: list[str], named: list[list[tuple[str, torch.nn.Parameter]]], shared: bool = False):
        from peft.tuners.lora import LoraLayer
        self.adapters, self.blocks = list(adapters), list(adapters)
        layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
        for m in layers:
            m.set_adapter([])  # peft's forward: the base layer alone (this also stops the adapters' gradients)
        for members in named:
            for _, p in members:
                p.requires_grad_(True)
        self.hooks = [m.register_forward_hook(self._add) for m in layers]
        layout = {tuple((n.replace(f".{a}.", "."), tuple(p.shape)) for n, p in members) for a, members in zip(adapters, named)}
        self.buffers, self.stacked = None, {}  # stacked: layer -> (A, B) views over every member
        if shared and len(layout) == 1:
            self._share(layers, [p for _, p in named[0]])

    def _share(self, layers: list, params: list[torch.nn.Parameter]) -> None:
        from stages.optim import flat_layout
        # each member's view of the shared gradients has the buffer's strides, which autograd notes once as a warning
        warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
        offsets, size = flat_layout(params)
        values = torch.zeros(len(self.adapters), size, dtype=torch.float32, device=params[0].device)
        self.buffers = (values, torch.zeros_like(values))
        where = {id(p): offset for p, offset in zip(params, offsets)}

        def view(p: torch.Tensor) -> torch.nn.Parameter:  # every member's copy of p: (K, *p.shape), strided
            rows = slice(where[id(p)], where[id(p)] + p.numel())
            leaf = torch.nn.Parameter(values[:, rows].view(-1, *p.shape))
            leaf.grad = self.buffers[1][:, rows].view(-1, *p.shape)
            return leaf
        first = self.adapters[0]
        for m in layers:
            if self._stackable(m, self.adapters) and len({m.scaling[a] for a in self.adapters}) == 1:
                self.stacked[m] = (view(m.lora_A[first].weight), view(m.lora_B[first].weight))

    def member_buffers(self, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Member k's row of the shared buffers (its FlatParams' values and gradients), None if not shared."""
        return (self.buffers[0][k], self.buffers[1][k]) if self.buffers else None

    def _add(self, layer, args, output):
        blocks, x = self.blocks, args[0]
        if output.shape[0] % len(blocks):
            raise RuntimeError(f"a batch of {output.shape[0]} rows is no set of {len(blocks)} replicas: route() it, or "
                               "forward inside only(adapter)")
        if self._stackable(layer, blocks):  # one batched matmul pair for every adapter: (K, rows, in) @ (K, in, r) @ (K, r, out)
            xk = layer._cast_input_dtype(x, layer.lora_A[blocks[0]].weight.dtype).reshape(len(blocks), -1, x.shape[-1])
            ranks, scalings = [layer.r[a] for a in blocks], [layer.scaling[a] for a in blocks]
            scale = scalings[0]
            if layer in self.stacked and blocks == self.adapters:  # every member, in the shared buffer's order
                A, B = self.stacked[layer]
            elif len(set(ranks)) == 1 and len(set(scalings)) == 1:
                A = torch.stack([layer.lora_A[a].weight for a in blocks])  # (K, r, in)
                B = torch.stack([layer.lora_B[a].weight for a in blocks])  # (K, out, r)
            else:  # ranks padded with zeros to the largest (exact: the padding adds zero products), scaling in B
                r, scale = max(ranks), None
                A = torch.stack([F.pad(layer.lora_A[a].weight, (0, 0, 0, r - k)) for a, k in zip(blocks, ranks)])
                B = torch.stack([F.pad(layer.lora_B[a].weight * s, (0, r - k)) for a, k, s in zip(blocks, ranks, scalings)])
            term = torch.bmm(torch.bmm(xk, A.transpose(1, 2)), B.transpose(1, 2))
            output += (term if scale is None else term * scale).reshape(output.shape).to(output.dtype)
            return output
        rows = output.shape[0] // len(blocks)
        for k, adapter in enumerate(blocks):
            if adapter in layer.lora_A:  # another adapter's --target-modules may leave this layer out
                lora_A, block = layer.lora_A[adapter], slice(k * rows, (k + 1) * rows)
                h = lora_A(layer.lora_dropout[adapter](layer._cast_input_dtype(x[block], lora_A.weight.dtype)))
                output[block] += (layer.lora_B[adapter](h) * layer.scaling[adapter]).to(output.dtype)
        return output

    @staticmethod
    def _stackable(layer, blocks: list[str]) -> bool:
        """Every block's adapter on this Linear layer, without dropout (a sweep of learning rates, optimizers, losses,
        ranks, alphas): their terms are one pair of batched matmuls instead of K pairs (ranks padded to the largest)."""
        return (len(blocks) > 1 and all(a in layer.lora_A for a in blocks)
                and all(isinstance(layer.lora_A[a], torch.nn.Linear) for a in blocks)
                and all(isinstance(layer.lora_dropout[a], torch.nn.Identity) for a in blocks))

    def route(self, adapters: list[str]) -> None:
        """The rows of the next forwards: block k (of len(adapters) equal blocks) through adapters[k]."""
        self.blocks = list(adapters)

    @contextlib.contextmanager
    def only(self, adapter: str):
        """Inside the block every row goes through `adapter` (validation images)."""
        blocks, self.blocks = self.blocks, [adapter]
        try:
            yield
        finally:
            self.blocks = blocks


def lora_state_dict(unet, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's key names (`…lora_A.weight`, `…lora_B.weight`), without `unet.`.

    All keys in one style on purpose: diffusers converts old-style keys (`lora.down/up`) only when the
    first key is old-style, so a file mixing both styles (which diffusers' convert_state_dict_to_diffusers
    produces for targets beyond attention) would silently lose weights on load.
    """
    from peft.utils import get_peft_model_state_dict
    return get_peft_model_state_dict(unet, adapter_name=adapter)


def write_lora_file(folder: str | Path, state: dict[str, torch.Tensor], metadata: dict,
                    name: str = LORA_WEIGHTS_NAME) -> Path:
    """Write `folder/name` (peft keys, adapter metadata) through diffusers' `save_lora_weights`, atomically:
    with the default name, what `load_lora_weights(folder)` reads with the right alpha."""
    from diffusers import StableDiffusionXLPipeline
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / name) as tmp:
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name=tmp.name,
                                                    unet_lora_adapter_metadata=metadata, safe_serialization=True)
    return folder / name


def save_lora(unet, folder: str | Path, dtype: torch.dtype = torch.float32, name: str = LORA_WEIGHTS_NAME,
              adapter: str = "default") -> Path:
    """Write the UNet's adapter `adapter`, its tensors as `dtype`, as `name` (with alpha metadata) into `folder`:
    the file of a single run, whatever the adapter's name in this UNet."""
    return write_lora_file(folder, {k: v.detach().to(dtype).cpu() for k, v in lora_state_dict(unet, adapter).items()},
                           adapter_metadata(unet.peft_config[adapter]), name)


def load_lora_weights_into(unet, folder: str | Path, adapter: str = "default") -> None:
    """Load a saved LoRA file back into the (already attached) peft adapter, exactly (resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    state = load_file(str(Path(folder) / LORA_WEIGHTS_NAME))
    state = {k.removeprefix("unet."): v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name=adapter)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA file in {folder} does not fit this adapter: {result.unexpected_keys[:3]}")


def load_into_pipeline(pipe, folder: str | Path, adapter_name: str | None = None) -> None:
    """Load a saved adapter of any --lora-type into a diffusers SDXL pipeline.

    lora and dora: diffusers' own `load_lora_weights`. loha and lokr, which that loader refuses: peft, with
    the config rebuilt from the file's metadata (`add_adapter` + `set_peft_model_state_dict`), the same
    steps as the README's snippet. `cross_attention_kwargs={"scale": s}` scales every variant.
    """
    import json

    from peft import LoHaConfig, LoKrConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(folder) / LORA_WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        raw = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    meta = {k.removeprefix("unet."): v for k, v in raw.items() if k.startswith("unet.")}
    peft_type = meta.pop("peft_type", "LORA")
    if peft_type == "LORA":
        pipe.load_lora_weights(str(folder), adapter_name=adapter_name)
        return
    adapter_name = adapter_name or "default_0"
    pipe.unet.add_adapter({"LOHA": LoHaConfig, "LOKR": LoKrConfig}[peft_type](**meta), adapter_name=adapter_name)
    state = {k.removeprefix("unet."): v for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(pipe.unet, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{peft_type} file in {folder} does not fit this UNet: {result.unexpected_keys[:3]}")
