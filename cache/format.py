"""The on-disk cache format: a folder of safetensors shards plus manifest.json, written last.

    CACHE/
      shard-00000.safetensors   tensors stacked over the shard's samples (one shape per shard: one
                                resolution, and with --buckets one aspect-ratio bucket; recorded in
                                the manifest's ShardInfo.resolution and .size):
                                  latent_mean, latent_std              (N, 4, H/8, W/8)  VAE latent_dist, unscaled
                                  latent_mean_flipped, latent_std_flipped  (with flips)
                                  prompt_embeds                        (N, 77, 2048)
                                  pooled_prompt_embeds                 (N, 1280)
                                  time_ids, time_ids_flipped           (N, 6) float32 always
      validation.safetensors    optional: prompt_embeds (N, 77, 2048) and pooled_prompt_embeds (N, 1280) of the
                                manifest's validation_prompts, for rendering samples during training
      empty_prompt.safetensors  prompt_embeds (77, 2048) and pooled_prompt_embeds (1280,) of the empty caption "",
                                for `train --caption-dropout`; written by every encode (added by a rerun to
                                caches made before it existed, without re-encoding the samples)
      manifest.json             Manifest below; its presence means the cache is complete
      encode-progress.json      only while an encode is unfinished (resume journal)

    A multi-resolution cache (encode --resolution 512,768,1024) holds every sample once per resolution:
    manifest.samples has one SampleInfo per (sample, resolution), pointing into shards of that resolution.

    An encode under torchrun (N processes) writes shard-r<rank>-00000.safetensors, ... and one journal per
    rank, encode-progress-r<rank>.json; rank 0 merges the journals into the one manifest (merge_parts).

Latents are stored as the VAE produced them; CacheReader applies the recorded scaling (and shift)
factor, so readers get what the UNet consumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cache.files import write_json_atomic

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VALIDATION_NAME = "validation.safetensors"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
PROGRESS_NAME = "encode-progress.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
RANK_SHARD_PATTERN = "shard-r{rank}-{index:05d}.safetensors"  # one rank's shards under torchrun
RANK_PROGRESS_PATTERN = "encode-progress-r{}.json"  # one rank's journal under torchrun
DTYPES = ("fp16", "bf16", "fp32")


class CacheError(Exception):
    """A cache that is missing, incomplete, corrupt or does not fit the request."""


@dataclass
class ShardInfo:
    file: str          # basename inside the cache folder
    num_samples: int
    bytes: int
    sha256: str
    resolution: int | None = None   # the --resolution its samples were encoded for (None: the cache's only one)
    size: list[int] | None = None   # [height, width] in pixels of every sample in it (None: resolution²)


@dataclass
class SampleInfo:
    key: str           # identity inside the dataset (relative path or row index)
    caption: str
    source: dict       # {"path": ...} or {"dataset": ..., "index": ...}, plus "sha256" of the image bytes
    shard: int         # index into Manifest.shards
    row: int           # row inside that shard


@dataclass
class Manifest:
    fingerprint: str   # hash of everything that changes encoded values (see `fingerprint`)
    encoder: dict      # model, revision, variant, vae, and per-part weight hashes
    preprocessing: dict  # resolution (an int, or a list for a multi-resolution cache), center_crop, flip,
                         # and buckets ({"step", "max_aspect"}) when encoded with --buckets
    dtype: str         # storage dtype of latents and embeddings: fp16 | bf16 | fp32
    scaling_factor: float  # vae.config.scaling_factor (0.13025 for SDXL)
    shift_factor: float | None  # vae.config.shift_factor (None for SDXL)
    dataset: dict = field(default_factory=dict)  # name, split, num_records, records_sha256 (keys+captions)
    config: dict = field(default_factory=dict)   # the resolved encode settings (not fingerprinted)
    validation_prompts: list[str] = field(default_factory=list)  # rows of validation.safetensors
    shards: list[ShardInfo] = field(default_factory=list)
    samples: list[SampleInfo] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"key", "reason"} of inputs not encoded
    format_version: int = FORMAT_VERSION
    created: str = ""

    @property
    def num_samples(self) -> int:
        """Images stored (a multi-resolution cache stores each once per resolution)."""
        return len({s.key for s in self.samples})

    @property
    def resolutions(self) -> list[int]:
        """The resolutions stored: one, or several for `encode --resolution 512,768,1024`."""
        r = self.preprocessing.get("resolution")
        return sorted(r) if isinstance(r, list) else [r]

    @property
    def bucketed(self) -> bool:
        return bool(self.preprocessing.get("buckets"))

    def shard_resolution(self, shard: int) -> int:
        return self.shards[shard].resolution or self.resolutions[0]

    def shard_size(self, shard: int) -> tuple[int, int]:
        """(height, width) in pixels of the samples of a shard."""
        size = self.shards[shard].size
        return tuple(size) if size else (self.shard_resolution(shard),) * 2

    def bucket_counts(self) -> dict[tuple[int, tuple[int, int]], int]:
        """Samples per (resolution, (height, width)), in that order."""
        counts: dict = {}
        for s in self.samples:
            key = (self.shard_resolution(s.shard), self.shard_size(s.shard))
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def samples_digest(self) -> str:
        """sha256 of the samples in their order (key, caption, image hash, shape): what the training order is made
        from, so a resumed run can tell that the cache still holds the data it was trained on."""
        rows = [(s.key, s.caption, s.source.get("sha256"), self.shard_resolution(s.shard), self.shard_size(s.shard))
                for s in self.samples]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_samples"] = self.num_samples
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        if d.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"cache format version {d.get('format_version')} is not supported "
                             f"(this version reads {FORMAT_VERSION}); re-encode with --overwrite")
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        d["samples"] = [SampleInfo(**s) for s in d["samples"]]
        return cls(**d)

    def save(self, folder: Path) -> None:
        write_json_atomic(Path(folder) / MANIFEST_NAME, self.to_json())

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if Path(folder).exists() and not Path(folder).is_dir():
            raise CacheError(f"cache {folder} is a file, not a cache folder: give the folder `encode --cache` wrote")
        if not Path(folder).is_dir():
            raise CacheError(f"cache folder not found: {folder}")
        if not os.access(folder, os.R_OK | os.X_OK):
            raise CacheError(f"cache {folder}: permission denied (it cannot be read)")
        if not path.exists():
            hint = " (an encode is unfinished: rerun it to complete)" if (Path(folder) / PROGRESS_NAME).exists() else ""
            raise CacheError(f"{folder} is not a complete cache: no {MANIFEST_NAME}{hint}")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CacheError(f"{path} is unreadable or incomplete ({type(e).__name__}: {e})") from e


def fingerprint(encoder_weights: dict, preprocessing: dict, dtype: str) -> str:
    """Hash of what changes encoded values: encoder weights+configs, preprocessing, dtype, format.

    Training hyperparameters never enter, so no training setting can invalidate a cache.
    """
    payload = json.dumps({"format_version": FORMAT_VERSION, "encoder_weights": encoder_weights,
                          "preprocessing": preprocessing, "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
