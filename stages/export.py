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

`--format diffusers`: a kohya file -> `DIR/pytorch_lora_weights.safetensors` written as
`stages.lora.save_lora` writes it (keys and `{"r", "lora_alpha", "target_modules", ...}` metadata).
"""
from __future__ import annotations

import collections
import math
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from cache.files import atomic_path
from stages.config import EXPORT_FORMATS as FORMATS
from stages.config import ExportConfig
from stages.errors import UserError
from stages.lora import LORA_WEIGHTS_NAME, write_lora_file
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
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"]))
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
    bad = next((k for k in state if not (k.startswith("unet.") and ".lora" in k)), None)
    if bad is not None:
        raise UserError(f"{path} is not a diffusers UNet LoRA file (key {bad}); "
                        "a kohya file is imported with --format diffusers")
    config = None
    if isinstance(metadata, dict):
        config = {k[len("unet."):]: v for k, v in metadata.items() if k.startswith("unet.")} or None
    if config is not None and not {"r", "lora_alpha"} <= config.keys():
        raise UserError(f"the adapter metadata of {path} lacks r or lora_alpha")
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


def write_kohya(state: dict[str, torch.Tensor], metadata: dict[str, str], out: Path) -> None:
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=metadata)


# -------------------------------------------------------------------------------------------- stage
def _describe(ranks: dict[str, int], alphas: dict[str, float]) -> str:
    r = sorted(set(ranks.values()))
    a = sorted(set(alphas.values()))
    return (f"{len(ranks)} modules, rank {'/'.join(map(str, r))}, alpha {'/'.join(f'{x:g}' for x in a)}")


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
        state, config = read_diffusers_lora(file)
        if config and config.get("use_dora"):
            raise UserError("DoRA adapters have no plain kohya LoRA equivalent")
        if config is None:
            log(f"warning: {file} has no adapter metadata; exporting alpha = rank (scale 1, as diffusers loads it)")
        peft = to_peft(state)
        ranks = module_ranks(peft)
        alphas = module_alphas(ranks, config)
        kohya = peft_to_kohya(peft, alphas)
        metadata = {**KOHYA_METADATA,
                    "ss_network_dim": str(collections.Counter(ranks.values()).most_common(1)[0][0]),
                    "ss_network_alpha": str(collections.Counter(alphas.values()).most_common(1)[0][0])}
        write_kohya(kohya, metadata, out)
        log(f"wrote kohya LoRA ({_describe(ranks, alphas)}) to {out}")
        return out

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
