"""The deterministic order in which training visits the cache, and every random draw's seed.

One seeding scheme for everything: `generator(seed, stream, index)` is a CPU generator that is a pure
function of the run's seed, the name of what is drawn and an index (epoch, stream position, micro-batch,
optimizer step). Nothing random is stored: resume regenerates the order and the draws from the position.

    position p (0, 1, 2, ...: the p-th sample the run visits, all processes together)
      -> epoch order (square caches) or bucketed global micro-batches -> cache index
      -> orientation (flip) drawn per position
    under torchrun, rank r takes its `batch` rows of every global micro-batch of batch × world positions
"""
from __future__ import annotations

import hashlib

import torch
from torch.utils.data import DataLoader, Dataset

from cache.reader import CacheReader


def generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, stream name, index), independent of other streams."""
    digest = hashlib.sha256(f"{seed}:{stream}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation that is a pure function of (seed, epoch)."""
    return torch.randperm(num_samples, generator=generator(seed, "epoch", epoch))


def bucket_epoch_batches(buckets: list[list[int]], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch of a bucketed cache, a pure function of (seed, epoch).

    Each bucket's samples are shuffled and cut into batches of `batch`; a bucket's last batch is filled up
    with the first samples of its own shuffled order, so every batch has one shape and every sample is seen
    at least once (exactly once when `batch` divides the bucket; always with batch 1). The batches of all
    buckets are then shuffled together: a bucket is visited in proportion to its size, spread over the epoch."""
    g = generator(seed, "epoch", epoch)
    batches = []
    for members in buckets:
        order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
        short = -len(order) % batch
        order += (order * (short // len(order) + 1))[:short]
        batches += [order[i:i + batch] for i in range(0, len(order), batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def use_flipped(seed: int, position: int) -> bool:
    """The per-sample, per-visit orientation choice (p = 0.5)."""
    return bool(torch.rand((), generator=generator(seed, "flip", position)) < 0.5)


class CacheStream(Dataset):
    """Item p = the p-th sample the run visits.

    Square caches: epoch p // N in that epoch's order. Bucketed caches: global micro-batches of `batch`
    positions, each filled from one bucket (bucket_epoch_batches). The orientation is drawn per position."""

    KEYS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "time_ids")

    def __init__(self, reader: CacheReader, seed: int, batch: int = 1):
        self.reader, self.seed, self.batch = reader, seed, batch
        self._orders: dict[int, object] = {}
        self._buckets = list(reader.buckets().values()) if reader.manifest.bucketed else None
        if self._buckets:
            self._batches_per_epoch = sum(-(-len(members) // batch) for members in self._buckets)

    def __len__(self):  # positions are unbounded; the sampler decides which are visited
        return 1 << 62

    def index_at(self, position: int) -> int:
        """The cache index visited at `position`."""
        p = position
        if self._buckets:
            micro, slot = divmod(p, self.batch)
            epoch, k = divmod(micro, self._batches_per_epoch)
            if epoch not in self._orders:
                self._orders = {epoch: bucket_epoch_batches(self._buckets, self.batch, self.seed, epoch)}
            return self._orders[epoch][k][slot]
        n = len(self.reader)
        epoch = p // n
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(n, self.seed, epoch)}
        return int(self._orders[epoch][p % n])

    def __getitem__(self, position: int) -> dict:
        sample = self.reader[self.index_at(position)]
        suffix = "_flipped" if self.reader.flipped and use_flipped(self.seed, position) else ""
        return {**{k: sample[k + suffix if k in ("latent_mean", "latent_std", "time_ids") else k] for k in self.KEYS},
                "position": torch.tensor(position)}  # per-sample draws of the recipe (caption dropout, strata)


def note_small_buckets(manifest, global_batch: int, log) -> None:
    """Say which buckets are smaller than a global micro-batch: their batches repeat samples every epoch."""
    small = sorted((n, r, hw) for (r, hw), n in manifest.bucket_counts().items() if n % global_batch and n < global_batch)
    if small:
        log(f"note: {len(small)} bucket(s) hold fewer samples than a global micro-batch of {global_batch} "
            f"(e.g. {small[0][2][1]}x{small[0][2][0]} at {small[0][1]}: {small[0][0]}); their batches repeat samples "
            "every epoch, so they weigh more: a smaller --batch-size or a larger --bucket-step avoids it")


class RankPositions:
    """The stream positions one rank visits: its `batch` rows of every global micro-batch of batch × world
    positions, micro-batches [first, last). With world 1: range(first * batch, last * batch)."""

    def __init__(self, first: int, last: int, batch: int, rank: int = 0, world: int = 1):
        self.first, self.last, self.batch, self.rank, self.world = first, last, batch, rank, world

    def __len__(self):
        return max(self.last - self.first, 0) * self.batch

    def __iter__(self):
        for m in range(self.first, self.last):
            start = (m * self.world + self.rank) * self.batch
            yield from range(start, start + self.batch)


def micro_batches(reader: CacheReader, stages: list[tuple[int, int, int]], seed: int, batch_size: int,
                  grad_accum: int, first_step: int, device: torch.device, rank: int = 0, world_size: int = 1,
                  num_workers: int = 0):
    """Yield (optimizer_step, [micro-batch dicts on device]) from `first_step` to the last stage's end, stage
    by stage of the resolution schedule `stages` ((resolution, first step, end step), in optimizer steps).

    Under torchrun, rank r gets its slice of every global micro-batch of batch_size × world_size: the
    positions, in the order, of one process training with that batch."""
    one = len(reader.manifest.resolutions) == 1
    for resolution, start, end in stages:
        if end <= first_step:
            continue
        # positions count on from the previous stage: its epoch order continues instead of starting over
        stream = CacheStream(reader if one else CacheReader(reader.path, resolution), seed,
                             batch=batch_size * world_size)
        begin = max(start, first_step)
        positions = RankPositions(begin * grad_accum, end * grad_accum, batch_size, rank, world_size)
        loader = DataLoader(stream, batch_size=batch_size, sampler=positions,
                            num_workers=num_workers, pin_memory=device.type == "cuda",
                            persistent_workers=False, prefetch_factor=4 if num_workers else None)
        step, group = begin, []
        for batch in loader:
            group.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            if len(group) == grad_accum:
                yield step, group
                step, group = step + 1, []
