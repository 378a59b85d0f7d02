"""CacheReader: random access to one sample through safetensors' mmap (host memory stays flat as
the dataset grows). The order in which training visits samples is cache/sampler.py's."""
from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from cache.files import sha256_file
from cache.format import CacheError, Manifest


class CacheReader:
    """`reader[i]` -> dict of one sample's tensors (stored dtype) plus `key` and `caption`.

    Latents come back multiplied by the VAE scaling factor (after the shift, if any): what the UNet
    consumes. Opening checks that every shard exists with its recorded size; `verify()` also checks
    the sha256 of every shard.

    `resolution` selects one resolution of a multi-resolution cache (default: every sample stored).
    """

    def __init__(self, path: str | Path, resolution: int | None = None):
        self.path = Path(path)
        self.manifest = Manifest.load(self.path)
        m = self.manifest
        if resolution is not None and resolution not in m.resolutions:
            raise CacheError(f"cache {self.path} holds resolution(s) {', '.join(map(str, m.resolutions))}, "
                             f"not {resolution}")
        self.resolution = resolution
        self.samples = [s for s in m.samples if resolution is None or m.shard_resolution(s.shard) == resolution]
        for shard in self.manifest.shards + self.manifest.caption_shards:
            p = self.path / shard.file
            if not p.exists():
                raise CacheError(f"cache {self.path} is missing shard {shard.file}; rerun the encode command that made "
                                 "the cache to repair it")
            if p.stat().st_size != shard.bytes:
                raise CacheError(f"cache shard {p} has {p.stat().st_size} bytes, the manifest says {shard.bytes}: it is "
                                 "truncated or corrupt; rerun the encode command that made the cache to repair it")
        self._handles: dict[str, object] = {}  # shard file -> its open handle
        self.flipped = bool(m.preprocessing.get("flip"))
        self._shift = m.shift_factor or 0.0
        self._scale = m.scaling_factor

    def __len__(self) -> int:
        return len(self.samples)

    def at(self, resolution: int) -> "CacheReader":
        """This cache's samples of one resolution (itself where that is the only one)."""
        return self if self.manifest.resolutions == [resolution] else CacheReader(self.path, resolution)

    def size(self, i: int) -> tuple[int, int]:
        """(height, width) in pixels of sample i: its aspect-ratio bucket, or resolution²."""
        return self.manifest.shard_size(self.samples[i].shard)

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """Sample indices by (height, width), sizes in ascending order."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(len(self)):
            groups.setdefault(self.size(i), []).append(i)
        return dict(sorted(groups.items()))

    def __getstate__(self):  # picklable for DataLoader workers: handles are reopened lazily
        return {**self.__dict__, "_handles": {}}

    def _open(self, shard: int, shards: list | None = None):
        name = (self.manifest.shards if shards is None else shards)[shard].file
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.path / name), framework="pt")
        return self._handles[name]

    def tensor_names(self) -> list[str]:
        return list(self._open(0).keys()) if self.manifest.shards else []

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a cache of {len(self)}")
        info = self.samples[i]
        f = self._open(info.shard)
        sample = {"key": info.key, "caption": info.caption}
        for name in f.keys():
            value = f.get_slice(name)[info.row:info.row + 1][0]
            if name.startswith("latent_mean"):
                value = ((value.float() - self._shift) * self._scale).to(value.dtype)
            elif name.startswith("latent_std"):
                value = (value.float() * self._scale).to(value.dtype)
            sample[name] = value
        return sample

    def captions(self, i: int) -> int:
        """How many captions sample i has: 1, or 1 + its variants (format 2)."""
        return 1 + len(self.samples[i].variants or ())

    def caption_embeds(self, i: int, j: int) -> dict:
        """prompt_embeds (77, D) and pooled_prompt_embeds (P,) of caption j of sample i (0: the one in its shard)."""
        if j == 0:
            sample = self[i]
            return {k: sample[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}
        variant = self.samples[i].variants[j - 1]
        f = self._open(variant["shard"], self.manifest.caption_shards)
        row = variant["row"]
        return {k: f.get_slice(k)[row:row + 1][0] for k in ("prompt_embeds", "pooled_prompt_embeds")}

    def validation(self) -> dict | None:
        """The validation prompts and their embeddings (stored dtype), or None if none were encoded."""
        from cache.format import VALIDATION_NAME
        if not self.manifest.validation_prompts:
            return None
        path = self.path / VALIDATION_NAME
        if not path.exists():
            raise CacheError(f"cache {self.path} lists validation prompts but has no {VALIDATION_NAME}")
        from safetensors.torch import load_file
        return {"prompts": list(self.manifest.validation_prompts), **load_file(str(path))}

    def empty_prompt(self) -> dict | None:
        """The empty caption's prompt_embeds (77, D) and pooled_prompt_embeds (P,) (stored dtype), or None
        for a cache encoded before they were stored (rerunning encode adds them)."""
        from cache.format import EMPTY_PROMPT_NAME
        path = self.path / EMPTY_PROMPT_NAME
        if not path.exists():
            return None
        from safetensors.torch import load_file
        return load_file(str(path))

    def verify(self) -> list[str]:
        """Check every shard's size and sha256; returns the problems found (empty: intact)."""
        problems = []
        for shard in self.manifest.shards + self.manifest.caption_shards:
            p = self.path / shard.file
            if not p.exists():
                problems.append(f"{shard.file}: missing")
            elif p.stat().st_size != shard.bytes:
                problems.append(f"{shard.file}: {p.stat().st_size} bytes, expected {shard.bytes}")
            elif sha256_file(p) != shard.sha256:
                problems.append(f"{shard.file}: sha256 mismatch (corrupt)")
        return problems

