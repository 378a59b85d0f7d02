"""Benchmark helpers: a synthetic cache shaped like SDXL's, for measuring `train` without a dataset."""
from __future__ import annotations

from pathlib import Path

import torch

from cache.format import Manifest, fingerprint
from cache.writer import CacheWriter
from stages.sdxl import RANDOM_SDXL


def write_synthetic_cache(folder: str | Path, num_samples: int = 64, resolution: int = 512, dtype: str = "fp16",
                          seed: int = 0, text_width: int = 2048, pooled_width: int = 1280,
                          model: str = RANDOM_SDXL) -> Manifest:
    """A cache of random tensors with SDXL's shapes (flips included), recorded as made for `model`."""
    g = torch.Generator().manual_seed(seed)
    latent = (4, resolution // 8, resolution // 8)
    preprocessing = {"resolution": resolution, "center_crop": True, "flip": True, "synthetic": True}
    manifest = Manifest(fingerprint=fingerprint({"synthetic": seed}, preprocessing, dtype),
                        encoder={"model": model, "revision": None, "variant": None, "model_config": None,
                                 "weights": {"synthetic": str(seed)}},
                        preprocessing=preprocessing, dtype=dtype, scaling_factor=0.13025, shift_factor=None,
                        dataset={"name": "synthetic", "split": "train", "num_records": num_samples})
    writer = CacheWriter(Path(folder), manifest, shard_size=256)
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    for i in range(num_samples):
        writer.add({
            "latent_mean": torch.randn(latent, generator=g) * 5, "latent_std": torch.rand(latent, generator=g) * 0.1,
            "latent_mean_flipped": torch.randn(latent, generator=g) * 5,
            "latent_std_flipped": torch.rand(latent, generator=g) * 0.1,
            "prompt_embeds": torch.randn(77, text_width, generator=g),
            "pooled_prompt_embeds": torch.randn(pooled_width, generator=g),
            "time_ids": ids, "time_ids_flipped": ids,
        }, key=f"{i:08d}", caption=f"synthetic sample {i}", source={"synthetic": i})
    return writer.finish()
