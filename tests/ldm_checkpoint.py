"""Write a diffusers SDXL pipeline folder as one "original" (SGM / A1111 / ComfyUI) single-file checkpoint.

Test helper: it turns the tiny SDXL folder of `stages.sdxl.build_tiny_sdxl` into the kind of
`.safetensors` file people download from model sites, so the single-file loading path
(`StableDiffusionXLPipeline.from_single_file(path, config=folder)`,
`UNet2DConditionModel.from_single_file(path, config=folder, subfolder="unet")`) can be tested offline.

Key layout written (the one diffusers' single-file loader reads):

    model.diffusion_model.*                 UNet, LDM layout (input_blocks / middle_block / output_blocks)
    first_stage_model.*                     VAE, LDM layout (encoder.down / decoder.up / mid.attn_1)
    conditioner.embedders.0.transformer.*   CLIP-L text encoder, Hugging Face layout (text_model.*)
    conditioner.embedders.1.model.*         OpenCLIP-bigG text encoder, open_clip layout
                                            (transformer.resblocks.N.attn.in_proj_weight, ln_final,
                                            token_embedding, positional_embedding, text_projection)

Source: the reverse of diffusers' forward conversion in `diffusers/loaders/single_file_utils.py`
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`), after the mapping tables of diffusers'
`scripts/convert_diffusers_to_original_sdxl.py`. Unlike that script, the block indices come from the
UNet/VAE configs instead of SDXL's hard-coded counts, every key must be mapped (an unknown key is an
error, not silently copied), the OpenCLIP `text_projection` is written transposed without `.weight`
(as open_clip stores it and as diffusers reads it), and CLIP-L keys always carry `text_model.`
(transformers >= 5.6 saves `CLIPTextModel` without that prefix).

Deliberate differences from a real SDXL file: no `position_ids` buffers (diffusers does not need
them and transformers no longer has them as persistent weights), no `logit_scale`, no EMA, no
`denoiser.*` sigmas; nothing diffusers reads is missing.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# Top-level UNet layers (diffusers name -> LDM name), as DIFFUSERS_TO_LDM_MAPPING["unet"] in diffusers.
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",   # SDXL text_time micro-conditioning
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Layers inside a UNet ResnetBlock2D (diffusers -> LDM ResBlock).
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# Top-level VAE layers (diffusers -> LDM).
VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
# Layers inside a VAE ResnetBlock2D that are renamed (the others keep their names).
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# Layers of the VAE mid-block attention (diffusers Attention -> LDM AttnBlock, whose q/k/v/proj_out
# are 1x1 convolutions: their weights gain two trailing unit dimensions).
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_ATTENTION_CONVS = {"q", "k", "v", "proj_out"}
# Layers of one OpenCLIP residual block (HF CLIPEncoderLayer -> open_clip ResidualAttentionBlock);
# q/k/v are handled separately (fused into in_proj_weight / in_proj_bias).
OPEN_CLIP_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


# ------------------------------------------------------------------------------------------------
# Reading the diffusers folder

def read_component(folder: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The saved weights of one pipeline component (`unet`, `vae`, ...), single or sharded safetensors."""
    sub = Path(folder) / name
    for stem in ("diffusion_pytorch_model", "model"):
        index = sub / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(sub / shard).items()}
        single = sub / f"{stem}.safetensors"
        if single.is_file():
            return load_file(single)
    raise FileNotFoundError(f"no safetensors weights in {sub}")


def read_config(folder: str | Path, name: str) -> dict:
    return json.loads((Path(folder) / name / "config.json").read_text())


def _match(key: str, pattern: str) -> re.Match | None:
    """Match `pattern` (named groups) at the start of `key`; what follows its '.' is group `rest`."""
    return re.match(pattern + r"\.(?P<rest>.+)$", key)


def _rename_head(rest: str, table: dict[str, str]) -> str:
    """Rename the leading layer name of `rest` ('conv1.weight' -> 'in_layers.2.weight') using `table`."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


# ------------------------------------------------------------------------------------------------
# UNet

def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """One diffusers UNet2DConditionModel key -> its LDM (`openaimodel.UNetModel`) key, without prefix.

    LDM numbers the UNet as flat sequences: input_blocks.0 is conv_in, then each down block i
    contributes `layers_per_block` [ResBlock, SpatialTransformer] entries followed by one
    Downsample entry (except the last block); output_blocks holds `layers_per_block + 1` entries
    per up block, the last of which also carries the Upsample (after the ResBlock, or after the
    ResBlock and SpatialTransformer when the block has attention).
    """
    n = layers_per_block

    def input_index(m: re.Match) -> int:    # resnet/attention j of down block b
        return (n + 1) * int(m["b"]) + int(m["j"]) + 1

    def output_index(m: re.Match) -> int:   # resnet/attention j of up block b
        return (n + 1) * int(m["b"]) + int(m["j"])

    for head, ldm in UNET_TOP_LEVEL.items():
        if key.startswith(head + "."):
            return ldm + key[len(head):]

    if m := _match(key, r"down_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)"):
        return f"input_blocks.{input_index(m)}.0.{_rename_head(m['rest'], UNET_RESNET)}"
    if m := _match(key, r"down_blocks\.(?P<b>\d+)\.attentions\.(?P<j>\d+)"):
        return f"input_blocks.{input_index(m)}.1.{m['rest']}"
    if m := _match(key, r"down_blocks\.(?P<b>\d+)\.downsamplers\.0\.conv"):
        return f"input_blocks.{(n + 1) * (int(m['b']) + 1)}.0.op.{m['rest']}"

    if m := _match(key, r"mid_block\.resnets\.(?P<j>\d+)"):
        return f"middle_block.{2 * int(m['j'])}.{_rename_head(m['rest'], UNET_RESNET)}"
    if m := _match(key, r"mid_block\.attentions\.(?P<j>\d+)"):
        return f"middle_block.{2 * int(m['j']) + 1}.{m['rest']}"

    if m := _match(key, r"up_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)"):
        return f"output_blocks.{output_index(m)}.0.{_rename_head(m['rest'], UNET_RESNET)}"
    if m := _match(key, r"up_blocks\.(?P<b>\d+)\.attentions\.(?P<j>\d+)"):
        return f"output_blocks.{output_index(m)}.1.{m['rest']}"
    if m := _match(key, r"up_blocks\.(?P<b>\d+)\.upsamplers\.0\.conv"):
        b = int(m["b"])
        slot = 2 if b in up_blocks_with_attention else 1
        return f"output_blocks.{(n + 1) * b + n}.{slot}.conv.{m['rest']}"

    raise KeyError(f"UNet key with no LDM equivalent: {key}")


def convert_unet(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n = config["layers_per_block"]
    if not isinstance(n, int):
        raise ValueError("per-block layers_per_block lists have no LDM equivalent (diffusers reads an int)")
    if config.get("addition_embed_type") not in (None, "text_time") or config.get("class_embed_type"):
        raise ValueError("only the SDXL text_time (or no) additional embedding is supported")
    with_attention = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    return {UNET_PREFIX + unet_key_to_ldm(k, n, with_attention): v for k, v in state.items()}


# ------------------------------------------------------------------------------------------------
# VAE

def vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM (`AutoencoderKL` of ldm/sgm) key, without prefix.

    The decoder's up blocks are numbered in reverse: diffusers up_blocks.0 (lowest resolution) is
    LDM decoder.up.{num_up_blocks - 1}.
    """
    for head, ldm in VAE_TOP_LEVEL.items():
        if key.startswith(head + "."):
            return ldm + key[len(head):]

    if m := _match(key, r"encoder\.down_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)"):
        return f"encoder.down.{m['b']}.block.{m['j']}.{_rename_head(m['rest'], VAE_RESNET)}"
    if m := _match(key, r"encoder\.down_blocks\.(?P<b>\d+)\.downsamplers\.0"):
        return f"encoder.down.{m['b']}.downsample.{m['rest']}"
    if m := _match(key, r"decoder\.up_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)"):
        return f"decoder.up.{num_up_blocks - 1 - int(m['b'])}.block.{m['j']}.{_rename_head(m['rest'], VAE_RESNET)}"
    if m := _match(key, r"decoder\.up_blocks\.(?P<b>\d+)\.upsamplers\.0"):
        return f"decoder.up.{num_up_blocks - 1 - int(m['b'])}.upsample.{m['rest']}"
    if m := _match(key, r"(?P<part>encoder|decoder)\.mid_block\.resnets\.(?P<j>\d+)"):
        return f"{m['part']}.mid.block_{int(m['j']) + 1}.{_rename_head(m['rest'], VAE_RESNET)}"
    if m := _match(key, r"(?P<part>encoder|decoder)\.mid_block\.attentions\.0"):
        renamed = _rename_head(m["rest"], VAE_ATTENTION)
        if renamed == m["rest"]:
            raise KeyError(f"VAE attention key with no LDM equivalent: {key}")
        return f"{m['part']}.mid.attn_1.{renamed}"

    raise KeyError(f"VAE key with no LDM equivalent: {key}")


def convert_vae(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    out = {}
    num_up = len(config["up_block_types"])
    for key, value in state.items():
        ldm = vae_key_to_ldm(key, num_up)
        layer, _, param = ldm.rpartition(".")
        if ".mid.attn_1." in ldm and layer.rsplit(".", 1)[-1] in VAE_ATTENTION_CONVS and param == "weight":
            value = value.reshape(*value.shape, 1, 1)   # Linear (out, in) -> Conv2d 1x1 (out, in, 1, 1)
        out[VAE_PREFIX + ldm] = value
    return out


# ------------------------------------------------------------------------------------------------
# Text encoders

def convert_clip_l(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel -> `conditioner.embedders.0.transformer.text_model.*` (HF layout, prefixed)."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith("text_model."):
            key = "text_model." + key   # transformers >= 5.6 saves CLIPTextModel without text_model.
        out[CLIP_L_PREFIX + key] = value
    return out


def convert_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPTextModelWithProjection -> open_clip text tower under `conditioner.embedders.1.model.`."""
    out = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.removeprefix("final_layer_norm.")] = value
        elif key == "text_projection.weight":
            # nn.Linear weight (proj_dim, width); open_clip applies `x @ text_projection` (width, proj_dim).
            out["text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
        elif m := _match(key, r"encoder\.layers\.(?P<i>\d+)"):
            renamed = _rename_head(m["rest"], OPEN_CLIP_BLOCK)
            if renamed == m["rest"]:
                raise KeyError(f"OpenCLIP key with no open_clip equivalent: {key}")
            out[f"transformer.resblocks.{m['i']}.{renamed}"] = value
        else:
            raise KeyError(f"OpenCLIP key with no open_clip equivalent: {key}")
    # nn.MultiheadAttention packs q, k, v (in that order) along dim 0 of in_proj_weight / in_proj_bias.
    for (i, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"text encoder 2 layer {i}: incomplete q/k/v {param}s {sorted(parts)}")
        out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


# ------------------------------------------------------------------------------------------------

def convert_pipeline(pipeline_folder: str | Path) -> dict[str, torch.Tensor]:
    """The whole single-file state dict of a diffusers SDXL pipeline folder."""
    folder = Path(pipeline_folder)
    parts = [
        convert_unet(read_component(folder, "unet"), read_config(folder, "unet")),
        convert_vae(read_component(folder, "vae"), read_config(folder, "vae")),
        convert_clip_l(read_component(folder, "text_encoder")),
        convert_open_clip(read_component(folder, "text_encoder_2")),
    ]
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        clash = merged.keys() & part.keys()
        if clash:
            raise KeyError(f"duplicate single-file keys: {sorted(clash)[:5]}")
        merged.update(part)
    return merged


def write_single_file(pipeline_folder: str | Path, out_path: str | Path,
                      dtype: torch.dtype | None = None) -> Path:
    """Write `pipeline_folder` (diffusers SDXL layout) as one original-layout `.safetensors` file.

    `dtype` casts floating-point tensors (default: keep the stored dtype). Returns `out_path`.
    """
    state = convert_pipeline(pipeline_folder)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_path), metadata={"format": "pt"})
    return out_path
