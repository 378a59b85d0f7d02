"""bench/pretrain_demo_model.py's model: SDXL's architecture, small enough to ship (the issue: <= 15 MB in fp16)."""
from __future__ import annotations

import torch

from bench.pretrain_demo_model import TEXT_1, TEXT_2, unet_config, vae_config
from stages.sdxl import SDXL_UNET_CONFIG, SDXL_VAE_CONFIG


def test_the_demo_model_has_sdxls_architecture_in_under_15_mb():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet, vae = unet_config(64), vae_config(64)
    for key in ("down_block_types", "up_block_types", "addition_embed_type", "in_channels", "use_linear_projection"):
        assert unet[key] == SDXL_UNET_CONFIG[key], key
    for key in ("down_block_types", "up_block_types", "latent_channels"):
        assert vae[key] == SDXL_VAE_CONFIG[key], key
    assert unet["cross_attention_dim"] == TEXT_1["hidden_size"] + TEXT_2["hidden_size"]  # both encoders' states
    assert unet["projection_class_embeddings_input_dim"] == TEXT_2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    with torch.device("meta"):
        text = [cls(CLIPTextConfig(**c, vocab_size=200, max_position_embeddings=77))
                for cls, c in ((CLIPTextModel, TEXT_1), (CLIPTextModelWithProjection, TEXT_2))]
        modules = [UNet2DConditionModel(**unet), AutoencoderKL(**vae), *text]
    params = sum(p.numel() for m in modules for p in m.parameters())
    assert 5e6 < params <= 7.5e6  # UNet and VAE stored in fp16, the text encoders (0.25 M) in fp32: < 15 MB
    assert unet_config(128)["sample_size"] == 16 and vae_config(128)["sample_size"] == 128
