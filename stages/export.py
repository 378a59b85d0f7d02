"""Export a trained LoRA to the kohya / A1111 / ComfyUI file format, and import such a file back.

`--format kohya`: our `pytorch_lora_weights.safetensors` (diffusers keys `unet.…lora.down.weight`, the
adapter config in the `lora_adapter_metadata` header) -> one `.safetensors` file in the layout kohya's
sd-scripts writes for SDXL: per module `lora_unet_<name>.lora_down.weight`, `….lora_up.weight` and a
float32 scalar `….alpha`, so every tool applies the trained scale alpha/rank. `<name>` is the module's
original (LDM / SGM) UNet path with `.` -> `_`, e.g. `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`:

* kohya sd-scripts trains SDXL on the LDM UNet and writes exactly these names;
* ComfyUI (`comfy/lora.py: model_lora_keys_unet`) maps `"lora_unet_" + key.replace(".", "_")` for every
  `diffusion_model.*` weight of the loaded checkpoint, i.e. these names (it also maps diffusers-style
  names through `comfy/utils.py: unet_to_diffusers`); Forge reuses ComfyUI's key map;
* A1111 (`extensions-builtin/Lora/networks.py: load_network`) looks the name up after
  `"lora_unet" -> "diffusion_model"` in the LDM model's module names ("SDXL loras seem to already have
  correct compvis keys");
* diffusers' `load_lora_weights` maps them back (`_maybe_map_sgm_blocks_to_diffusers`, then
  `_convert_non_diffusers_lora_to_diffusers`); every export is checked through that very code.
  (Its kohya path honours per-module alphas only when they are equal across attention projections:
  the `alpha_pattern` keys it builds for to_q/k/v/out never match. A1111 and ComfyUI read each `.alpha`.)

DoRA, LoHa and LoKr go into the same file in LyCORIS's key layout (`lycoris/modules/{locon,loha,lokr}.py`:
`custom_state_dict` / the kohya wrapper), under the same module names, each with its `.alpha`:

* LoHa: `….hada_w1_a` (out, r), `….hada_w1_b` (r, in·k·k), `….hada_w2_a`, `….hada_w2_b`; applied as
  (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/r, peft's `LoHaLayer.get_delta_weight`;
* LoKr: `….lokr_w1` or `….lokr_w1_a/_b`, `….lokr_w2` or `….lokr_w2_a/_b`; applied as kron(w1, w2) · alpha/r
  where a factor is decomposed, and · 1 where both are full (the loaders' rule, LyCORIS's `use_w1 and use_w2`),
  so for a full/full module peft's alpha/r is folded into `lokr_w1` and `.alpha` is written as r;
* DoRA: the LoRA keys plus `….dora_scale`, peft's magnitude vector shaped (out, 1[, 1, 1]): the magnitude of each
  *output* channel (LyCORIS's `wd_on_out=True`, its default since "Use correct weight decomposition by default").

Checked against the loaders' source: ComfyUI `comfy/lora.py: load_lora` (`.alpha`, `.dora_scale`, `hada_*`,
`lokr_*` names; `calculate_weight`: LoHa alpha / w1_b.shape[0], LoKr alpha / dim only where a factor is
decomposed), `comfy/weight_adapter/{loha,lokr,lora}.py`; A1111 `extensions-builtin/Lora/network_hada.py`,
`network_lokr.py` (the same names and scale rule). Caveat for DoRA: ComfyUI's `weight_decompose`
(`comfy/weight_adapter/base.py`) and A1111's `NetworkModule.apply_weight_decompose` normalise the merged weight
per *input* channel (the older LyCORIS `wd_on_out=False` layout, dora_scale (1, in)); peft, LyCORIS's default and
this file use output channels, so those two loaders apply a DoRA file differently from peft (export says so).

`--format diffusers`: a kohya file -> `DIR/pytorch_lora_weights.safetensors` written as
`stages.lora.save_lora` writes it (keys and `{"r", "lora_alpha", "target_modules", ...}` metadata).
"""
from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from cache.files import atomic_path
from stages.config import EXPORT_FORMATS as FORMATS
from stages.config import ExportConfig
from stages.errors import UserError
from stages.lora import LORA_WEIGHTS_NAME, save_lora, write_lora_file
from stages.paths import check_output_file, check_output_folder

# SDXL's UNet (and the tiny test model): 2 resnets per down block, 3 per up block. The LDM block
# indices depend on it; diffusers' loader assumes the same when it maps them back.
LAYERS_PER_BLOCK = 2
# kohya sd-scripts' metadata keys; A1111 lists a LoRA under SDXL only when ss_base_model_version
# starts with "sdxl_" (extensions-builtin/Lora/network.py: NetworkOnDisk.detect_version).
KOHYA_METADATA = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"}


# ------------------------------------------------------------------------------------ pure conversions
def to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our file's UNet keys (without `unet.`) -> peft keys `<module>.lora_A.weight` / `.lora_B.weight`.

    Source: diffusers' `convert_unet_state_dict_to_peft` (diffusers/utils/state_dict_utils.py), the
    conversion `load_lora_adapter` applies; the same one `stages.lora.load_lora_weights_into` uses.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    peft = convert_unet_state_dict_to_peft(state)
    for key in peft:
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"unsupported LoRA key {key}: only plain LoRA A/B weights can be converted "
                            "(no DoRA magnitudes, no LoRA biases)")
    modules = {k.rsplit(".lora_", 1)[0] for k in peft}
    for m in modules:
        if f"{m}.lora_A.weight" not in peft or f"{m}.lora_B.weight" not in peft:
            raise UserError(f"LoRA module {m} lacks its lora_A or lora_B weight")
    return peft


def module_ranks(peft: dict[str, torch.Tensor]) -> dict[str, int]:
    """Rank of each module: the rows of its lora_A (kohya: lora_down) weight."""
    return {k[: -len(".lora_A.weight")]: v.shape[0] for k, v in peft.items() if k.endswith(".lora_A.weight")}


def module_alphas(ranks: dict[str, int], config: dict | None) -> dict[str, float]:
    """The kohya alpha of every module, so that alpha_kohya / rank equals the scale peft applies.

    `config` is the adapter metadata without its `unet.` prefix (`r`, `lora_alpha`, optional
    `rank_pattern`, `alpha_pattern`, `use_rslora`); a pattern key is resolved per module with peft's
    own `get_pattern_key` (peft/tuners/lora/model.py: `_create_and_replace`). Without metadata
    diffusers loads every module at scale 1, i.e. alpha = rank.
    """
    if not config:
        return {m: float(r) for m, r in ranks.items()}
    from peft.utils.other import get_pattern_key
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    alphas = {}
    for module, rank in ranks.items():
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
        if r != rank:
            raise UserError(f"the LoRA metadata says rank {r} for {module} but its weights have rank {rank}")
        default = config["lora_alpha"] if "lora_alpha" in config else config["alpha"]  # LoHa / LoKr: alpha
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), default))
        # rsLoRA scales by alpha/sqrt(r); kohya tools always by alpha/rank.
        alphas[module] = alpha * math.sqrt(r) if config.get("use_rslora") else alpha
    return alphas


def kohya_module_to_ldm(name: str, layers_per_block: int = LAYERS_PER_BLOCK) -> str:
    """`lora_unet_<diffusers path>` -> `lora_unet_<LDM path>` (dots already `_`), as sd-scripts names SDXL.

    Source: the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers` and `_convert_unet_lora_key`
    (diffusers/loaders/lora_conversion_utils.py), the same table as ComfyUI's `comfy/utils.py:
    unet_to_diffusers` and A1111's `convert_diffusers_name_to_compvis`: down block b, layer j ->
    input_blocks.{1 + b*(n+1) + j}; up block b, layer j -> output_blocks.{b*(n+1) + j}; mid block ->
    middle_block.{0,1,2}; slot .0 = resnet, .1 = attention, ResBlock layers renamed.
    """
    n = layers_per_block
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection"}
    top = {"conv_in": "input_blocks_0_0", "conv_out": "out_2", "time_embedding_linear_1": "time_embed_0",
           "time_embedding_linear_2": "time_embed_2", "add_embedding_linear_1": "label_emb_0_0",
           "add_embedding_linear_2": "label_emb_0_2"}
    prefix = "lora_unet_"
    if not name.startswith(prefix):
        raise UserError(f"not a UNet LoRA module: {name}")
    path = name[len(prefix):]

    def inner(kind: str, rest: str) -> str:  # what follows the block index: slot and layer
        if kind == "attentions":
            return f"1_{rest}"  # SpatialTransformer: same layer names as diffusers' Transformer2DModel
        if rest not in resnet:
            raise UserError(f"LoRA module {name} has no kohya (LDM) name")
        return f"0_{resnet[rest]}"

    if path in top:
        ldm = top[path]
    elif m := re.fullmatch(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", path):
        ldm = f"input_blocks_{1 + int(m[1]) * (n + 1) + int(m[3])}_{inner(m[2], m[4])}"
    elif m := re.fullmatch(r"down_blocks_(\d+)_downsamplers_0_conv", path):
        ldm = f"input_blocks_{(int(m[1]) + 1) * (n + 1)}_0_op"
    elif m := re.fullmatch(r"mid_block_attentions_0_(.+)", path):
        ldm = f"middle_block_1_{m[1]}"
    elif m := re.fullmatch(r"mid_block_resnets_([01])_(.+)", path):
        ldm = f"middle_block_{2 * int(m[1])}_{inner('resnets', m[2])[2:]}"
    elif m := re.fullmatch(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", path):
        ldm = f"output_blocks_{int(m[1]) * (n + 1) + int(m[3])}_{inner(m[2], m[4])}"
    elif m := re.fullmatch(r"up_blocks_(\d+)_upsamplers_0_conv", path):
        # SDXL's upsampling up blocks (0, 1) have attention, so the Upsample sits in slot 2.
        ldm = f"output_blocks_{int(m[1]) * (n + 1) + n}_2_conv"
    else:
        raise UserError(f"LoRA module {name} has no kohya (LDM) name")
    return prefix + ldm


def diffusers_loader_view(kohya: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What diffusers' `load_lora_weights` makes of a kohya state dict: peft keys (no `unet.`).

    Source: `StableDiffusionXLPipeline.lora_state_dict` (its kohya branch:
    `_maybe_map_sgm_blocks_to_diffusers` + `_convert_non_diffusers_lora_to_diffusers`) followed by
    `convert_unet_state_dict_to_peft`, as `load_lora_into_unet` does. Tensors are passed through, not copied.
    """
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    try:
        state, _ = StableDiffusionXLPipeline.lora_state_dict(
            dict(kohya), unet_config=SimpleNamespace(layers_per_block=LAYERS_PER_BLOCK))
    except (ValueError, KeyError, IndexError) as e:
        raise UserError(f"diffusers cannot read this kohya LoRA: {str(e).strip().splitlines()[0]}") from None
    if any(not k.startswith("unet.") for k in state):
        raise UserError("diffusers reads text-encoder weights from this kohya LoRA; only UNet LoRAs are supported")
    return convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state.items()})


def peft_to_kohya(peft: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """peft UNet LoRA -> kohya state dict with LDM module names and a float32 scalar alpha per module.

    Source: diffusers' `convert_state_dict_to_kohya` (lora_A/B -> lora_down/up, `lora_unet_` prefix,
    `.` -> `_`); its alpha (an int64 equal to the rank, i.e. scale 1) is replaced by `alphas`, and the
    diffusers-style module names by `kohya_module_to_ldm`. The result is read back through diffusers'
    loader (`diffusers_loader_view`) and must give back exactly `peft`.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    converted = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft.items()})
    module_of = {id(v): k.rsplit(".lora_", 1)[0] for k, v in peft.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        name, _, part = key.partition(".")
        if part == "alpha":
            continue
        if part not in ("lora_down.weight", "lora_up.weight"):
            raise UserError(f"unexpected key {key} in the kohya conversion")
        ldm = kohya_module_to_ldm(name)
        out[f"{ldm}.{part}"] = value
        if part == "lora_down.weight":
            out[f"{ldm}.alpha"] = torch.tensor(alphas[module_of[id(value)]], dtype=torch.float32)
    back = diffusers_loader_view(out)
    if back.keys() != peft.keys() or any(back[k] is not peft[k] for k in peft):
        missing = sorted(set(peft) ^ set(back))[:2]
        raise UserError(f"the kohya names of this LoRA do not map back in diffusers: {missing}")
    return out


def kohya_to_peft(kohya: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """A kohya UNet LoRA -> (peft state dict, rank per module, alpha per module).

    Names come from diffusers' own loader (`diffusers_loader_view`); each module's alpha is read from
    its `.alpha` tensor (absent: alpha = rank, scale 1, as diffusers, ComfyUI and A1111 do).
    """
    unet = [k for k in kohya if k.startswith("lora_unet_")]
    if not unet:
        raise UserError("no `lora_unet_…` keys: not a kohya SDXL UNet LoRA")
    other = sorted(set(kohya) - set(unet))
    if other:
        what = "text-encoder LoRA weights" if other[0].startswith("lora_te") else f"other keys ({other[0]})"
        raise UserError(f"the file also holds {what}; only UNet LoRAs can be imported")
    for key in unet:
        part = key.partition(".")[2]
        if part not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise UserError(f"unsupported key {key}: only plain LoRA (lora_down / lora_up / alpha) can be imported")
    peft = diffusers_loader_view(kohya)
    kohya_name = {id(v): k.partition(".")[0] for k, v in kohya.items()}
    ranks = module_ranks(peft)
    alphas = {}
    for module in ranks:
        alpha_key = kohya_name[id(peft[f"{module}.lora_A.weight"])] + ".alpha"
        if alpha_key in kohya:
            alpha = kohya[alpha_key].float().item()
            alphas[module] = float(f"{alpha:.7g}")  # float32 -> the short decimal it came from (8.0, 0.1)
        else:
            alphas[module] = float(ranks[module])
    return peft, ranks, alphas


LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
MAGNITUDE = "lora_magnitude_vector"  # peft's DoRA magnitude: (out,) for Linear, (1, out, 1, 1) for Conv2d


def ldm_name(module: str) -> str:
    """A UNet module path -> its kohya / LyCORIS name, `lora_unet_<LDM path>`."""
    return kohya_module_to_ldm("lora_unet_" + module.replace(".", "_"))


def lycoris_to_kohya(state: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """peft LoHa / LoKr tensors (keys `<module>.hada_w1_a`, `<module>.lokr_w1`, ...) -> (LyCORIS state dict with
    LDM module names and a float32 `.alpha` each, rank per module, alpha per module). See the module docstring."""
    parts = LOHA_PARTS if config.get("peft_type") == "LOHA" else LOKR_PARTS
    by_module: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in state.items():
        module, _, part = key.rpartition(".")
        if part not in parts:
            raise UserError(f"unsupported {config.get('peft_type')} key {key}: only {', '.join(parts)} are exported "
                            "(no Tucker / effective-conv2d factors)")
        by_module[module][part] = value
    from peft.utils.other import get_pattern_key
    rank_pattern = config.get("rank_pattern") or {}
    ranks = {m: rank_pattern.get(get_pattern_key(rank_pattern.keys(), m), config["r"]) for m in by_module}
    alphas = module_alphas(ranks, config)
    out: dict[str, torch.Tensor] = {}
    for module, tensors in by_module.items():
        name, rank, alpha = ldm_name(module), ranks[module], alphas[module]
        decomposed = [tensors[p] for p in ("hada_w1_b", "hada_w2_b", "lokr_w1_b", "lokr_w2_b") if p in tensors]
        if any(t.shape[0] != rank for t in decomposed):
            raise UserError(f"the LoRA metadata says rank {rank} for {module} but its weights disagree")
        if "lokr_w1" in tensors and "lokr_w2" in tensors:  # full/full: the loaders apply scale 1
            tensors = {**tensors, "lokr_w1": tensors["lokr_w1"] * (alpha / rank)}
            alpha = float(rank)
        out.update({f"{name}.{part}": value for part, value in tensors.items()})
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out, ranks, alphas


def _describe(ranks: dict[str, int], alphas: dict[str, float]) -> str:
    r = sorted(set(ranks.values()))
    a = sorted(set(alphas.values()))
    return (f"{len(ranks)} modules, rank {'/'.join(map(str, r))}, alpha {'/'.join(f'{x:g}' for x in a)}")


def kohya_state(state: dict[str, torch.Tensor], config: dict | None, log) -> tuple[dict[str, torch.Tensor], dict, str]:
    """Our LoRA file's UNet tensors (without `unet.`) and adapter metadata -> (the kohya / LyCORIS state dict,
    its safetensors header fields, a description for the log). Plain LoRA through `peft_to_kohya`; DoRA adds `.dora_scale`; LoHa / LoKr
    through `lycoris_to_kohya`."""
    peft_type = (config or {}).get("peft_type", "LORA")
    if config is None:
        log("warning: the LoRA file has no adapter metadata; exporting alpha = rank (scale 1, as diffusers loads it)")
    if peft_type in ("LOHA", "LOKR"):
        kohya, ranks, alphas = lycoris_to_kohya(state, config)
        args = {"algo": peft_type.lower()}
    else:
        magnitudes = {k[: -len(MAGNITUDE) - 1]: v for k, v in state.items() if k.endswith(MAGNITUDE)}
        peft = to_peft({k: v for k, v in state.items() if not k.endswith(MAGNITUDE)})
        ranks = module_ranks(peft)
        alphas = module_alphas(ranks, config)
        kohya = peft_to_kohya(peft, alphas)
        for module, magnitude in magnitudes.items():  # DoRA: (out, 1) / (out, 1, 1, 1), the output-channel layout
            down = peft[f"{module}.lora_A.weight"]
            kohya[f"{ldm_name(module)}.dora_scale"] = magnitude.reshape(-1, *[1] * (down.ndim - 1))
        args = {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"} if magnitudes else None
        if magnitudes:
            log("note: DoRA's dora_scale is per output channel (peft, LyCORIS); ComfyUI and A1111/Forge normalise "
                "per input channel, so they apply this file differently from peft and diffusers (see README)")
    metadata = {**KOHYA_METADATA,
                "ss_network_dim": str(collections.Counter(ranks.values()).most_common(1)[0][0]),
                "ss_network_alpha": str(collections.Counter(alphas.values()).most_common(1)[0][0])}
    if args:
        metadata.update(ss_network_module="lycoris.kohya", ss_network_args=json.dumps(args))
    return kohya, metadata, _describe(ranks, alphas)


def adapter_config(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """Adapter metadata as `stages.lora.adapter_metadata` writes it, plus rank/alpha patterns when modules differ.

    The most common rank and alpha become `r` / `lora_alpha` (as diffusers' `get_peft_kwargs`); the
    others are keyed `^<module path>` (as diffusers keys its rank patterns), which peft's
    `get_pattern_key` matches only at that module. `target_modules` are the full module paths.
    """
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks), "lora_dropout": 0.0, "use_dora": False}
    rank_pattern = {f"^{m}": v for m, v in sorted(ranks.items()) if v != r}
    alpha_pattern = {f"^{m}": v for m, v in sorted(alphas.items()) if v != alpha}
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    if alpha_pattern:
        config["alpha_pattern"] = alpha_pattern
    return config


# -------------------------------------------------------------------------------------------- files
def read_diffusers_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Our LoRA file -> (its UNet state dict without `unet.`, adapter metadata without `unet.` or None)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(str(path))
        from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata
        metadata = _load_sft_state_dict_metadata(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read LoRA file {path}: {str(e).strip().splitlines()[0]}") from None
    if not state:
        raise UserError(f"{path} holds no tensors: not a LoRA file")
    adapter_key = (".lora", *(f".{p}" for p in LOHA_PARTS + LOKR_PARTS))
    bad = next((k for k in state if not (k.startswith("unet.") and any(a in k for a in adapter_key))), None)
    if bad is not None:
        raise UserError(f"{path} is not a diffusers UNet LoRA file (key {bad}); "
                        "a kohya file is imported with --format diffusers")
    config = None
    if isinstance(metadata, dict):
        config = {k[len("unet."):]: v for k, v in metadata.items() if k.startswith("unet.")} or None
    if config is not None and not ("r" in config and ("lora_alpha" in config or "alpha" in config)):
        raise UserError(f"the adapter metadata of {path} lacks r or its alpha")
    return {k[len("unet."):]: v for k, v in state.items()}, config


def read_kohya_lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read LoRA file {path}: {str(e).strip().splitlines()[0]}") from None
    if not state:
        raise UserError(f"{path} holds no tensors: not a LoRA file")
    return state


def refuse_existing(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise UserError(f"{target} is a folder, not a file")
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it")


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file with a deterministic header, so equal inputs give equal bytes (and equal sha256, which
    A1111 shows): tensors and metadata sorted by name. safetensors' own writer orders the metadata by a per-process
    hash. Layout (safetensors' format spec): header length (u64, little-endian), the JSON header padded with spaces
    to a multiple of 8, then each tensor's little-endian bytes at its data_offsets."""
    header, blobs, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def write_kohya(state: dict[str, torch.Tensor], metadata: dict[str, str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_bytes(safetensors_bytes(state, metadata))


def write_kohya_file(lora_file: Path, out: Path, log=print) -> Path:
    """Our `pytorch_lora_weights.safetensors` -> the kohya / LyCORIS file `out` (what `export --format kohya` and
    `train` write: the same bytes for the same input)."""
    state, config = read_diffusers_lora(lora_file)
    kohya, metadata, description = kohya_state(state, config, log)
    write_kohya(kohya, {**metadata, "ss_output_name": out.stem}, out)
    log(f"wrote kohya LoRA ({description}) to {out}")
    return out


SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --save-dtype


def save_lora_files(unet, folder: Path, name: str, save_dtype: str = "fp32", kohya: bool = True, suffix: str = "",
                    log=print, adapter: str = "default") -> list[Path]:
    """`train`'s LoRA files in `folder`: pytorch_lora_weights<suffix>.safetensors (diffusers) and, with `kohya`,
    <name><suffix>.safetensors converted from it (what `export --format kohya` writes), tensors as `save_dtype`."""
    lora = save_lora(unet, folder, SAVE_DTYPES[save_dtype], LORA_WEIGHTS_NAME.replace(".", f"{suffix}.", 1), adapter)
    return [lora] + ([write_kohya_file(lora, Path(folder) / f"{name}{suffix}.safetensors", log)] if kohya else [])


# -------------------------------------------------------------------------------------------- stage
def export(cfg: ExportConfig, log=print) -> Path:
    """Convert cfg.lora to cfg.format at cfg.out; returns the file written."""
    if cfg.format not in FORMATS:
        raise UserError(f"unknown --format {cfg.format!r}: choose one of {', '.join(FORMATS)}")
    if not cfg.lora:
        raise UserError("--lora is required")
    if not cfg.out:
        raise UserError("--out is required")
    source, out = Path(cfg.lora), Path(cfg.out)

    if cfg.format == "kohya":
        file = source / LORA_WEIGHTS_NAME if source.is_dir() else source
        if not source.exists():
            raise UserError(f"LoRA folder not found: {source}")
        if not file.is_file():
            raise UserError(f"no {LORA_WEIGHTS_NAME} in {source}: not a LoRA folder written by `train`")
        if out.suffix != ".safetensors":
            raise UserError(f"--out {out} must be a .safetensors file (what A1111 / ComfyUI list)")
        check_output_file(cfg.out, "--out")
        refuse_existing(out, cfg.overwrite)
        return write_kohya_file(file, out, log)

    # diffusers: import a kohya file into a LoRA folder
    if not source.exists():
        raise UserError(f"LoRA file not found: {source}")
    if not source.is_file():
        raise UserError(f"--lora {source} must be a kohya .safetensors file for --format diffusers")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} must be a folder for --format diffusers")
    check_output_folder(cfg.out, "--out")
    refuse_existing(out / LORA_WEIGHTS_NAME, cfg.overwrite)
    peft, ranks, alphas = kohya_to_peft(read_kohya_lora(source))
    written = write_lora_file(out, peft, adapter_config(ranks, alphas))  # peft keys, as stages.lora.save_lora
    log(f"wrote diffusers LoRA ({_describe(ranks, alphas)}) to {written}")
    return written
