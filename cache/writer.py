"""Shard writer: samples are buffered, written as one safetensors shard under a temporary name,
fsynced and renamed; a progress journal after each shard makes an interrupted encode resumable;
the manifest is written last."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cache.files import TMP_SUFFIX, atomic_path, sha256_file, write_json_atomic
from cache.format import (CAPTIONS_PATTERN, FORMAT_VERSION, MANIFEST_NAME, PROGRESS_NAME, RANK_PROGRESS_PATTERN, RANK_SHARD_PATTERN, SHARD_PATTERN,
                          CacheError, Manifest, SampleInfo, ShardInfo)

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP32_TENSORS = ("time_ids", "time_ids_flipped")  # integers up to 4k+: exact only in fp32
MAX_BUFFERED_SHARDS = 4  # with several groups (buckets, resolutions): queue up to this many shards' worth


class CacheWriter:
    """Collects samples into shards and records them for the manifest. Shards never mix groups (resolution and
    bucket): when one group has `shard_size` samples queued (or all together MAX_BUFFERED_SHARDS × that), every
    queued group is written as its own shard, so shards of small groups can hold fewer samples.

    `manifest` holds everything but the shards/samples the writer fills in; `records_done` counts
    the input records consumed (encoded or skipped) up to the last flushed shard, which is where an
    interrupted encode resumes.

    With `rank` (torchrun), the writer holds one part of a multi-process encode: its shards are named
    shard-r<rank>-*, its journal encode-progress-r<rank>.json, and finish() leaves the journal for
    merge_parts (rank 0, after every rank has finished) instead of writing the manifest.
    """

    def __init__(self, folder: Path, manifest: Manifest, shard_size: int, resume: bool = False,
                 rank: int | None = None, world_size: int = 1):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.folder = Path(folder)
        self.manifest = manifest
        self.shard_size = shard_size
        self.records_done = 0
        self.rank, self.world_size = rank, world_size
        self.progress_path = self.folder / (PROGRESS_NAME if rank is None else RANK_PROGRESS_PATTERN.format(rank))
        # shards, samples and skips the manifest held before this writer (kept ones of an updated cache)
        self.base = [len(manifest.shards), len(manifest.samples), len(manifest.skipped)]
        self._buffers: dict[object, list] = {}  # group -> queued (tensors, key, caption, source)
        self._pending_skips: list[dict] = []
        self._pending_records = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_progress()

    # -- resume journal --------------------------------------------------------------------
    def _load_progress(self) -> None:
        import json
        path = self.progress_path
        if not path.exists():
            return
        state = json.loads(path.read_text())
        if self.rank is not None and (state.get("world_size") != self.world_size or state.get("base") != self.base):
            return  # a part of another run (another split or another starting cache): not this one's progress
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
        part = {} if self.rank is None else {"rank": self.rank, "world_size": self.world_size, "base": self.base}
        write_json_atomic(self.progress_path, {"records_done": self.records_done, "manifest": self.manifest.to_json(),
                                               **part})

    # -- writing ---------------------------------------------------------------------------
    def add(self, tensors: dict[str, torch.Tensor], key: str, caption: str, source: dict, group=None) -> None:
        """Queue one encoded sample (unbatched tensors) consumed from one input record."""
        self.add_record([(group, tensors)], key, caption, source)

    def add_record(self, samples: list[tuple[object, dict[str, torch.Tensor]]], key: str, caption: str,
                   source: dict) -> None:
        """Queue the encoded samples of one input record: (group, tensors) per resolution. A group is
        (resolution, height, width): shards never mix groups. None: the cache's single shape."""
        for group, tensors in samples:
            self._buffers.setdefault(group, []).append((tensors, key, caption, source))
        self._pending_records += 1
        # Flush when one group has a full shard, or when all groups together hold MAX_BUFFERED_SHARDS shards' worth
        # (bounded host memory); only whole records are ever queued, so records_done stays an exact resume point.
        sizes = [len(b) for b in self._buffers.values()]
        if max(sizes) >= self.shard_size or sum(sizes) >= self.shard_size * MAX_BUFFERED_SHARDS:
            self.flush()

    def skip(self, key: str, reason: str, caption: str | None = None, sha256: str | None = None) -> None:
        """Record an input that could not be used (it counts as consumed); caption and sha256 let a
        later encode tell whether it has changed since."""
        self._pending_skips.append({"key": key, "reason": reason, "caption": caption, "sha256": sha256})
        self._pending_records += 1

    def flush(self) -> None:
        """Write the buffered samples as one shard per group, then journal the progress: every record
        consumed so far is then on disk, which is what makes `records_done` a safe place to resume."""
        for group, buffer in self._buffers.items():
            self._write_shard(group, buffer)
        self._buffers = {}
        self.manifest.skipped.extend(self._pending_skips)
        self._pending_skips = []
        self.records_done += self._pending_records
        self._pending_records = 0
        self._save_progress()

    def _write_shard(self, group, buffer: list) -> None:
        index = len(self.manifest.shards)
        taken, number = {s.file for s in self.manifest.shards}, index  # a repaired cache's list has gaps in its names
        while (name := SHARD_PATTERN.format(number) if self.rank is None
               else RANK_SHARD_PATTERN.format(rank=self.rank, index=number)) in taken:
            number += 1
        dtype = TORCH_DTYPES[self.manifest.dtype]
        stacked = {k: torch.stack([t[k] for t, *_ in buffer]).to(torch.float32 if k in FP32_TENSORS else dtype).contiguous()
                   for k in buffer[0][0]}
        path = self.folder / name
        with atomic_path(path) as tmp:
            save_file(stacked, str(tmp), metadata={"format": "sdxl-lora-cache"})
        resolution, size = (None, None) if group is None else (group[0], list(group[1:]))
        self.manifest.shards.append(ShardInfo(name, len(buffer), path.stat().st_size, sha256_file(path),
                                              resolution, size))
        self.manifest.samples.extend(SampleInfo(key, caption, source, shard=index, row=row)
                                     for row, (_, key, caption, source) in enumerate(buffer))

    def finish(self) -> Manifest:
        """Flush the last shard, write the manifest (last), drop the journal. A rank's writer only flushes:
        its journal is its part, for merge_parts."""
        self.flush()
        if self.rank is not None:
            return self.manifest
        self.manifest.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.manifest.save(self.folder)
        (self.folder / PROGRESS_NAME).unlink(missing_ok=True)
        return self.manifest


def foreign_entries(folder: Path) -> list[str]:
    """Names in `folder` that no encode writes: a folder holding any is not a cache, and encode never writes into it."""
    from cache.format import EMPTY_PROMPT_NAME, VALIDATION_NAME
    from cache.lock import LOCK_NAME
    own = {MANIFEST_NAME, PROGRESS_NAME, VALIDATION_NAME, EMPTY_PROMPT_NAME, LOCK_NAME}
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name not in own and not p.match(RANK_PROGRESS_PATTERN.format("*"))
                  and not p.match("shard-*.safetensors") and not p.match("captions-*.safetensors")
                  and not p.match(f".*{TMP_SUFFIX}"))


def corrupt_shards(folder: Path, manifest: Manifest) -> list[int]:
    """Indices of the manifest's shards that are missing or fail their size or sha256."""
    bad = []
    for i, shard in enumerate(manifest.shards):
        p = Path(folder) / shard.file
        if not p.exists() or p.stat().st_size != shard.bytes or sha256_file(p) != shard.sha256:
            bad.append(i)
    return bad


def drop_shards(manifest: Manifest, samples: list[SampleInfo], drop: list[int]) -> tuple[list, list]:
    """(shards, samples) with the shards `drop` left out and `samples` (none in them) pointing at the new positions."""
    import dataclasses
    kept = [i for i in range(len(manifest.shards)) if i not in set(drop)]
    position = {old: new for new, old in enumerate(kept)}
    return [manifest.shards[i] for i in kept], [dataclasses.replace(s, shard=position[s.shard]) for s in samples]


def remove_cache_files(folder: Path) -> None:
    """Delete a cache's own files (manifest first, so it is never complete-looking while half gone)."""
    folder = Path(folder)
    from cache.format import EMPTY_PROMPT_NAME, VALIDATION_NAME
    for name in (MANIFEST_NAME, PROGRESS_NAME, VALIDATION_NAME, EMPTY_PROMPT_NAME):
        (folder / name).unlink(missing_ok=True)
    for p in folder.glob(RANK_PROGRESS_PATTERN.format("*")):
        p.unlink()
    for pattern in ("shard-*.safetensors", "captions-*.safetensors", f".shard-*{TMP_SUFFIX}", f".captions-*{TMP_SUFFIX}"):
        for p in folder.glob(pattern):
            p.unlink()


def _write_embeddings(folder: Path, name: str, manifest: Manifest, prompt_embeds: torch.Tensor,
                      pooled_prompt_embeds: torch.Tensor) -> None:
    """Write an (embeds, pooled) pair in the cache's dtype as `name`, atomically."""
    dtype = TORCH_DTYPES[manifest.dtype]
    with atomic_path(folder / name) as tmp:
        save_file({"prompt_embeds": prompt_embeds.to(dtype).contiguous(),
                   "pooled_prompt_embeds": pooled_prompt_embeds.to(dtype).contiguous()}, str(tmp))


def write_caption_shard(folder: Path, manifest: Manifest, prompt_embeds: torch.Tensor,
                        pooled_prompt_embeds: torch.Tensor) -> ShardInfo:
    """Write caption-variant embeddings, (M, 77, D) and (M, P), as a new captions-*.safetensors (atomically, under
    the first free name) and return its ShardInfo; the caller records it in manifest.caption_shards."""
    folder = Path(folder)
    number = 0
    while (folder / CAPTIONS_PATTERN.format(number)).exists():
        number += 1
    path = folder / CAPTIONS_PATTERN.format(number)
    _write_embeddings(folder, path.name, manifest, prompt_embeds, pooled_prompt_embeds)
    return ShardInfo(path.name, len(prompt_embeds), path.stat().st_size, sha256_file(path))


def set_variants(folder: Path, manifest: Manifest, wanted: dict[str, list[str]], embed, shard_size: int) -> int:
    """Make every sample's caption variants `wanted[key]` (texts beside its first caption), then save the manifest.

    Texts already stored (by any sample) keep their rows; the others are embedded by `embed(texts) -> (prompt_embeds,
    pooled_prompt_embeds)` into new captions-*.safetensors of at most `shard_size` rows; caption shards no sample
    points at any more are left out of the manifest, then deleted. The image shards are not touched. Returns the
    number of texts embedded."""
    folder = Path(folder)
    if all([v["caption"] for v in s.variants or ()] == wanted.get(s.key, []) for s in manifest.samples):
        return 0
    stored = {v["caption"]: (v["shard"], v["row"]) for s in manifest.samples for v in s.variants or ()}
    missing = list(dict.fromkeys(t for s in manifest.samples for t in wanted.get(s.key, []) if t not in stored))
    shards = list(manifest.caption_shards)
    for start in range(0, len(missing), shard_size):
        texts = missing[start:start + shard_size]
        prompt_embeds, pooled_prompt_embeds = embed(texts)
        shards.append(write_caption_shard(folder, manifest, prompt_embeds, pooled_prompt_embeds))
        stored.update({text: (len(shards) - 1, row) for row, text in enumerate(texts)})
    used = sorted({stored[t][0] for s in manifest.samples for t in wanted.get(s.key, [])})
    position = {old: new for new, old in enumerate(used)}
    manifest.caption_shards = [shards[i] for i in used]
    for s in manifest.samples:
        s.variants = [{"caption": t, "shard": position[stored[t][0]], "row": stored[t][1]}
                      for t in wanted.get(s.key, [])] or None
    manifest.format_version = FORMAT_VERSION  # a version-1 cache given variants is a version-2 cache
    manifest.save(folder)
    kept = {c.file for c in manifest.caption_shards}
    for p in folder.glob("captions-*.safetensors"):
        if p.name not in kept:
            p.unlink()
    return len(missing)


def write_validation(folder: Path, manifest: Manifest, prompts: list[str], prompt_embeds: torch.Tensor,
                     pooled_prompt_embeds: torch.Tensor) -> None:
    """Store validation prompts' embeddings (atomically), then record the prompts in the manifest."""
    from cache.format import VALIDATION_NAME
    _write_embeddings(Path(folder), VALIDATION_NAME, manifest, prompt_embeds, pooled_prompt_embeds)
    manifest.validation_prompts = list(prompts)
    manifest.save(folder)


def write_empty_prompt(folder: Path, manifest: Manifest, prompt_embeds: torch.Tensor,
                       pooled_prompt_embeds: torch.Tensor) -> None:
    """Store the empty caption's embeddings, (77, D) and (P,), once per cache (atomically), for caption dropout."""
    from cache.format import EMPTY_PROMPT_NAME
    _write_embeddings(Path(folder), EMPTY_PROMPT_NAME, manifest, prompt_embeds, pooled_prompt_embeds)


def unfinished_encode(folder: Path) -> tuple[int, dict] | None:
    """(number of processes, journal manifest JSON) of an unfinished encode in `folder`, or None."""
    import json
    folder = Path(folder)
    if (folder / PROGRESS_NAME).exists():
        return 1, json.loads((folder / PROGRESS_NAME).read_text())["manifest"]
    for path in sorted(folder.glob(RANK_PROGRESS_PATTERN.format("*"))):
        state = json.loads(path.read_text())
        return state["world_size"], state["manifest"]
    return None


def merge_parts(folder: Path, world_size: int) -> Manifest:
    """Combine the parts of a `world_size`-process encode (the ranks' journals) into the one manifest and
    write it (last), then drop the journals.

    Rank r encoded the r-th contiguous block of the records, so its samples and skips, appended in rank
    order after the kept ones they all share, are in the order a single process would have written them.
    """
    import dataclasses
    import json
    folder = Path(folder)
    states = []
    for r in range(world_size):
        path = folder / RANK_PROGRESS_PATTERN.format(r)
        if not path.exists():
            raise CacheError(f"{folder}: rank {r}'s part of the encode is missing ({path.name})")
        states.append(json.loads(path.read_text()))
    parts = [Manifest.from_json(s["manifest"]) for s in states]
    n_shards, n_samples, n_skipped = states[0]["base"]
    merged = Manifest.from_json(states[0]["manifest"])  # every part carries the same settings and kept prefix
    merged.shards, merged.samples, merged.skipped = (merged.shards[:n_shards], merged.samples[:n_samples],
                                                     merged.skipped[:n_skipped])
    for r, (state, part) in enumerate(zip(states, parts)):
        if part.fingerprint != merged.fingerprint or state["base"] != states[0]["base"]:
            raise CacheError(f"{folder}: rank {r}'s part was encoded with other settings or from another cache")
        if state.get("world_size") != world_size:
            raise CacheError(f"{folder}: rank {r}'s part belongs to an encode by {state.get('world_size')} processes")
        offset = len(merged.shards) - n_shards  # the part's shard i becomes merged shard i + offset
        merged.shards.extend(part.shards[n_shards:])
        merged.samples.extend(dataclasses.replace(s, shard=s.shard + offset) for s in part.samples[n_samples:])
        merged.skipped.extend(part.skipped[n_skipped:])
    merged.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    merged.save(folder)
    for r in range(world_size):
        (folder / RANK_PROGRESS_PATTERN.format(r)).unlink(missing_ok=True)
    return merged
