"""The single-file SDXL writer round-trips through diffusers' own single-file loaders, offline."""
from __future__ import annotations

import socket

import pytest
import torch
from safetensors import safe_open

from stages.sdxl import build_tiny_sdxl
from tests.ldm_checkpoint import (CLIP_L_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX,
                                  write_single_file)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers folder, single-file checkpoint written from it)."""
    root = tmp_path_factory.mktemp("ldm")
    folder = build_tiny_sdxl(root / "tiny")
    return folder, write_single_file(folder, root / "tiny_sdxl.safetensors")


@pytest.fixture(scope="module")
def originals(tiny):
    """The diffusers-folder models, as from_pretrained loads them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    folder, _ = tiny
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    return {name: cls.from_pretrained(folder, subfolder=name) for name, cls in classes.items()}


@pytest.fixture
def offline(monkeypatch):
    """No hub: offline mode on, and any attempt to open a network connection fails the test."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module, name: str) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    assert set(got) == set(want), (f"{name}: missing {sorted(set(want) - set(got))[:5]}, "
                                   f"unexpected {sorted(set(got) - set(want))[:5]}")
    differing = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differing, f"{name}: {len(differing)} tensors differ, e.g. {differing[:5]}"


def test_layout_is_original_sdxl(tiny, originals):
    _, ckpt = tiny
    with safe_open(str(ckpt), "pt") as f:
        keys = set(f.keys())
        text_projection = f.get_tensor(OPEN_CLIP_PREFIX + "text_projection")
        vae_q = f.get_tensor(VAE_PREFIX + "encoder.mid.attn_1.q.weight")
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX + "text_model.", OPEN_CLIP_PREFIX)
    assert all(k.startswith(prefixes) for k in keys)
    # the keys diffusers uses to recognise each part of an SDXL single file
    for key in ("model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.label_emb.0.0.weight",
                # an up block with attention keeps its upsampler after the transformer (slot 2, not 1)
                "model.diffusion_model.output_blocks.2.2.conv.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
                CLIP_L_PREFIX + "text_model.embeddings.position_embedding.weight",
                OPEN_CLIP_PREFIX + "positional_embedding",
                OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"):
        assert key in keys, key
    # open_clip stores the projection as (width, proj_dim), the transpose of the HF Linear weight
    assert torch.equal(text_projection, originals["text_encoder_2"].text_projection.weight.T)
    assert vae_q.ndim == 4  # LDM VAE attention is 1x1 convolutions
    n_params = sum(len(m.state_dict()) for m in originals.values())
    assert len(keys) == n_params - 3 * 2 * 2  # OpenCLIP fuses q/k/v: 3 layers x (weight, bias) x 3 -> 1


def test_pipeline_from_single_file(tiny, originals, offline):
    from diffusers import StableDiffusionXLPipeline
    folder, ckpt = tiny
    pipe = StableDiffusionXLPipeline.from_single_file(str(ckpt), config=str(folder), torch_dtype=torch.float32)
    for name in COMPONENTS:
        assert_same_weights(getattr(pipe, name), originals[name], name)


def test_unet_from_single_file(tiny, originals, offline):
    from diffusers import UNet2DConditionModel
    folder, ckpt = tiny
    unet = UNet2DConditionModel.from_single_file(str(ckpt), config=str(folder), subfolder="unet")
    assert_same_weights(unet, originals["unet"], "unet")


def test_full_size_sdxl_unet_keys_round_trip(sdxl_meta_unet):
    """The config-driven UNet mapping also gives real SDXL's key layout (weights on the meta device)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from tests.ldm_checkpoint import convert_unet
    unet = sdxl_meta_unet()
    state = unet.state_dict()
    ldm = convert_unet(state, dict(unet.config))
    for key in ("input_blocks.3.0.op.weight", "input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.9.ff.net.2.weight", "output_blocks.2.2.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.0.skip_connection.weight"):
        assert UNET_PREFIX + key in ldm, key
    assert set(convert_ldm_unet_checkpoint(ldm, dict(unet.config))) == set(state)
