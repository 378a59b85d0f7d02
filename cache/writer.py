"""Shard writer: samples are buffered, written as one safetensors shard under a temporary name,
fsynced and renamed; a progress journal after each shard makes an interrupted encode resumable;
the manifest is written last."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cache.format import (MANIFEST_NAME, PROGRESS_NAME, SHARD_PATTERN, CacheError, Manifest, SampleInfo,
                          ShardInfo, fsync_dir, sha256_file, write_json_atomic)

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP32_TENSORS = ("time_ids", "time_ids_flipped")  # integers up to 4k+: exact only in fp32


class CacheWriter:
    """Collects samples into shards of `shard_size` and records them for the manifest.

    `manifest` holds everything but the shards/samples the writer fills in; `records_done` counts
    the input records consumed (encoded or skipped) up to the last flushed shard, which is where an
    interrupted encode resumes.
    """

    def __init__(self, folder: Path, manifest: Manifest, shard_size: int, resume: bool = False):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.folder = Path(folder)
        self.manifest = manifest
        self.shard_size = shard_size
        self.records_done = 0
        self._buffer: list[tuple[dict, SampleInfo]] = []
        self._pending_skips: list[dict] = []
        self._pending_records = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_progress()

    # -- resume journal --------------------------------------------------------------------
    def _load_progress(self) -> None:
        import json
        path = self.folder / PROGRESS_NAME
        if not path.exists():
            return
        state = json.loads(path.read_text())
        saved = Manifest.from_json(state["manifest"])
        if saved.fingerprint != self.manifest.fingerprint:
            raise CacheError(f"{self.folder} holds an unfinished encode with other settings; "
                             "rerun that command, or pass --overwrite to start over")
        for shard in saved.shards:  # a shard listed in the journal must be intact
            p = self.folder / shard.file
            if not p.exists() or p.stat().st_size != shard.bytes:
                raise CacheError(f"unfinished encode in {self.folder}: shard {shard.file} is missing or "
                                 "truncated; pass --overwrite to start over")
        self.manifest.shards, self.manifest.samples, self.manifest.skipped = saved.shards, saved.samples, saved.skipped
        self.records_done = state["records_done"]

    def _save_progress(self) -> None:
        write_json_atomic(self.folder / PROGRESS_NAME,
                          {"records_done": self.records_done, "manifest": self.manifest.to_json()})

    # -- writing ---------------------------------------------------------------------------
    def add(self, tensors: dict[str, torch.Tensor], key: str, caption: str, source: dict) -> None:
        """Queue one encoded sample (unbatched tensors) consumed from one input record."""
        self._buffer.append((tensors, SampleInfo(key, caption, source, shard=len(self.manifest.shards),
                                                 row=len(self._buffer))))
        self._pending_records += 1
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def skip(self, key: str, reason: str, caption: str | None = None, sha256: str | None = None) -> None:
        """Record an input that could not be used (it counts as consumed); caption and sha256 let a
        later encode tell whether it has changed since."""
        self._pending_skips.append({"key": key, "reason": reason, "caption": caption, "sha256": sha256})
        self._pending_records += 1

    def flush(self) -> None:
        """Write the buffered samples as one shard, then journal the progress."""
        if self._buffer:
            index = len(self.manifest.shards)
            name = SHARD_PATTERN.format(index)
            dtype = TORCH_DTYPES[self.manifest.dtype]
            stacked = {
                k: torch.stack([t[k] for t, _ in self._buffer]).to(torch.float32 if k in FP32_TENSORS else dtype).contiguous()
                for k in self._buffer[0][0]
            }
            path = self.folder / name
            tmp = self.folder / f".{name}.tmp"
            save_file(stacked, str(tmp), metadata={"format": "sdxl-lora-cache"})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(self.folder)
            self.manifest.shards.append(ShardInfo(name, len(self._buffer), path.stat().st_size, sha256_file(path)))
            self.manifest.samples.extend(info for _, info in self._buffer)
            self._buffer = []
        self.manifest.skipped.extend(self._pending_skips)
        self._pending_skips = []
        self.records_done += self._pending_records
        self._pending_records = 0
        self._save_progress()

    def finish(self) -> Manifest:
        """Flush the last shard, write the manifest (last), drop the journal."""
        self.flush()
        self.manifest.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.manifest.save(self.folder)
        (self.folder / PROGRESS_NAME).unlink(missing_ok=True)
        return self.manifest


def remove_cache_files(folder: Path) -> None:
    """Delete a cache's own files (manifest first, so it is never complete-looking while half gone)."""
    folder = Path(folder)
    from cache.format import VALIDATION_NAME
    for name in (MANIFEST_NAME, PROGRESS_NAME, VALIDATION_NAME):
        (folder / name).unlink(missing_ok=True)
    for p in folder.glob("shard-*.safetensors"):
        p.unlink()
    for p in folder.glob(".shard-*.safetensors.tmp"):
        p.unlink()


def write_validation(folder: Path, manifest: Manifest, prompts: list[str], prompt_embeds: torch.Tensor,
                     pooled_prompt_embeds: torch.Tensor) -> None:
    """Store validation prompts' embeddings (atomically), then record the prompts in the manifest."""
    from cache.format import VALIDATION_NAME
    folder = Path(folder)
    tmp = folder / f".{VALIDATION_NAME}.tmp"
    dtype = TORCH_DTYPES[manifest.dtype]
    save_file({"prompt_embeds": prompt_embeds.to(dtype).contiguous(),
               "pooled_prompt_embeds": pooled_prompt_embeds.to(dtype).contiguous()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / VALIDATION_NAME)
    manifest.validation_prompts = list(prompts)
    manifest.save(folder)
