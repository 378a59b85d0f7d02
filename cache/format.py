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
                                  mask, mask_flipped                   (N, 1, H/8, W/8) in [0, 1] (format 2, with
                                                                       `encode --masks` / `--alpha-mask`; ones where
                                                                       an image has no mask)
      validation.safetensors    optional: prompt_embeds (N, 77, 2048) and pooled_prompt_embeds (N, 1280) of the
                                manifest's validation_prompts, for rendering samples during training
      captions-00000.safetensors  optional (format 2): prompt_embeds (M, 77, 2048) and pooled_prompt_embeds (M, 1280)
                                of caption variants (a list caption, a .txt of several lines, `encode --caption-variants`),
                                each distinct text once; SampleInfo.variants points at their rows. A sample's first
                                caption stays in its image shard, so its latents are never duplicated
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

FORMAT_VERSION = 2  # 2: caption variants (captions-*.safetensors), masks, kohya repeats
READABLE_VERSIONS = (1, 2)  # a version-1 cache is a version-2 cache without any of them
VALUES_VERSION = 1  # the version of the encoded values, part of the fingerprint: format 2 changed none of them
MANIFEST_NAME = "manifest.json"
VALIDATION_NAME = "validation.safetensors"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
PROGRESS_NAME = "encode-progress.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
CAPTIONS_PATTERN = "captions-{:05d}.safetensors"  # caption-variant embeddings (format 2)
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
    variants: list[dict] | None = None  # format 2: the other captions' {"caption", "shard", "row"} (into
                                        # Manifest.caption_shards); None: the caption above is the only one


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
    caption_shards: list[ShardInfo] = field(default_factory=list)  # format 2: captions-*.safetensors
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
    def masked(self) -> bool:
        """Whether the shards hold masks (`encode --masks` / `--alpha-mask`)."""
        return bool(self.preprocessing.get("masks"))

    def repeats(self, key: str) -> int:
        """How often an epoch visits a sample: the N of its kohya folder `N_name/` (recorded by encode), else 1."""
        folders, parts = self.dataset.get("repeats") or {}, Path(key).parts
        return folders.get(parts[0], 1) if len(parts) > 1 else 1

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
                + ((self.repeats(s.key),) if self.repeats(s.key) != 1 else ())
                + (([v["caption"] for v in s.variants],) if s.variants else ()) for s in self.samples]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_samples"] = self.num_samples
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        if d.get("format_version") not in READABLE_VERSIONS:
            raise CacheError(f"cache format version {d.get('format_version')} is not supported "
                             f"(this version reads {', '.join(map(str, READABLE_VERSIONS))}); re-encode with --overwrite")
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        d["caption_shards"] = [ShardInfo(**s) for s in d.get("caption_shards", [])]
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
    payload = json.dumps({"format_version": VALUES_VERSION, "encoder_weights": encoder_weights,
                          "preprocessing": preprocessing, "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
