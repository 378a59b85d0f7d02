"""Several caches in one run (`train --cache A --cache B:0.25`): opened and checked together, and seen by training
as one reader. The order in which they are mixed is cache/sampler.py's (MixtureStream)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cache.format import CacheError
from cache.reader import CacheReader


class MixtureManifest:
    """What training reads of a manifest, for several caches: the first cache's encoder, dataset and validation
    prompts; the resolutions all of them hold; a fingerprint and samples digest of them all (a resume checks them)."""

    def __init__(self, manifests: list, weights: list[float]):
        self.manifests, self.weights = manifests, weights

    def __getattr__(self, name):  # encoder, dataset, preprocessing, dtype, ...: the first cache's
        return getattr(self.__dict__["manifests"][0], name)

    @property
    def resolutions(self) -> list[int]:
        return sorted(set.intersection(*(set(m.resolutions) for m in self.manifests)))

    @property
    def bucketed(self) -> bool:
        return any(m.bucketed for m in self.manifests)

    @property
    def masked(self) -> bool:
        return any(m.masked for m in self.manifests)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([m.fingerprint for m in self.manifests]).encode()).hexdigest()

    def samples_digest(self) -> str:
        """The caches' samples and the weights they are drawn with: both fix the data order."""
        rows = [(m.samples_digest(), w) for m, w in zip(self.manifests, self.weights)]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def bucket_counts(self) -> dict:
        counts: dict = {}
        for m in self.manifests:
            for key, n in m.bucket_counts().items():
                counts[key] = counts.get(key, 0) + n
        return dict(sorted(counts.items()))


class CacheMixture:
    """Caches read together: `readers`, their draw `weights` and `loss_weights` (cache/sampler.py's MixtureStream
    mixes them). Where one reader is expected (the model check, validation prompts, the empty caption), the first
    cache answers."""

    def __init__(self, readers: list[CacheReader], weights: list[float], loss_weights: list[float]):
        self.readers, self.weights, self.loss_weights = readers, weights, loss_weights
        self.manifest = MixtureManifest([r.manifest for r in readers], weights)
        self.path = readers[0].path

    def __len__(self) -> int:
        return sum(len(r) for r in self.readers)

    def __getitem__(self, i: int) -> dict:
        return self.readers[0][i]

    def at(self, resolution: int) -> "CacheMixture":
        return CacheMixture([r.at(resolution) for r in self.readers], self.weights, self.loss_weights)

    def empty_prompt(self) -> dict | None:
        return self.readers[0].empty_prompt()

    def validation(self) -> dict | None:
        return self.readers[0].validation()

    def verify(self) -> list[str]:
        return [f"{r.path}: {p}" for r in self.readers for p in r.verify()]


def open_caches(specs: list[tuple[str, float, float]], masked_loss: bool = False) -> CacheReader | CacheMixture:
    """One cache's reader, or several caches' mixture after checking that they come from the same encoders (the
    weights' hashes recorded at encode time) and have a resolution in common: a difference is named. With
    `masked_loss`, at least one of them must hold masks."""
    readers = [CacheReader(path) for path, _, _ in specs]
    for reader in readers:
        if len(reader) == 0:
            raise CacheError(f"cache {reader.path} holds no samples")
    if masked_loss and not any(r.manifest.masked for r in readers):
        raise CacheError(f"--masked-loss needs masks in the cache: encode {readers[0].path} again with --masks DIR or "
                         "--alpha-mask")
    if len(readers) == 1:
        return readers[0]
    first = readers[0]
    for reader in readers[1:]:
        a, b = first.manifest.encoder.get("weights", {}), reader.manifest.encoder.get("weights", {})
        differ = [part for part in dict.fromkeys([*a, *b]) if a.get(part) != b.get(part)]
        if differ:
            raise CacheError(f"--cache {reader.path} was encoded with other {', '.join(differ)} weights than --cache "
                             f"{first.path} ({reader.manifest.encoder.get('model')} vs {first.manifest.encoder.get('model')}): "
                             "caches mixed in one run must come from the same VAE and text encoders")
    common = set.intersection(*(set(r.manifest.resolutions) for r in readers))
    if not common:
        raise CacheError("the caches share no resolution: " + "; ".join(
            f"{r.path} holds {', '.join(map(str, r.manifest.resolutions))}" for r in readers)
            + ": encode them at the resolution the run trains at")
    return CacheMixture(readers, [w for _, w, _ in specs], [lw for _, _, lw in specs])


def cache_names(paths: list[str]) -> list[str]:
    """Short names of the caches for per-cache metrics: the folder names, numbered where two are alike."""
    names = [Path(p).name or str(p) for p in paths]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
