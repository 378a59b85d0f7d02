"""The deterministic order in which training visits the cache, and every random draw's seed.

One seeding scheme for everything: `generator(seed, stream, index)` is a CPU generator that is a pure
function of the run's seed, the name of what is drawn and an index (epoch, stream position, micro-batch,
optimizer step). Nothing random is stored: resume regenerates the order and the draws from the position.

    position p (0, 1, 2, ...: the p-th sample the run visits, all processes together)
      -> with several caches: the cache of p's global micro-batch (MixtureStream), and p's position in it
      -> epoch order (square caches) or bucketed global micro-batches -> cache index (kohya repeats: an epoch
         holds a sample as often as its folder's N_)
      -> orientation (flip) and caption variant drawn per position
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


def caption_choice(seed, position: int, count: int) -> int:
    """Which of a sample's `count` captions a visit uses (uniform); 0 without drawing when it has one."""
    return int(torch.randint(count, (), generator=generator(seed, "caption-variant", position))) if count > 1 else 0


class CacheStream(Dataset):
    """Item p = the p-th sample the run visits.

    Square caches: epoch p // N in that epoch's order. Bucketed caches: global micro-batches of `batch`
    positions, each filled from one bucket (bucket_epoch_batches). The orientation and, where a sample has
    several, its caption are drawn per position. With `masks`, items carry the sample's mask (ones without)."""

    KEYS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "time_ids")
    ORIENTED = ("latent_mean", "latent_std", "time_ids", "mask")  # the keys with a _flipped twin

    def __init__(self, reader: CacheReader, seed, batch: int = 1, masks: bool = False):
        self.reader, self.seed, self.batch = reader, seed, batch
        self.keys = self.KEYS + (("mask",) if masks else ())
        self._orders: dict[int, object] = {}
        m = reader.manifest  # kohya repeats: an epoch holds sample i repeats[i] times
        repeats = [m.repeats(s.key) for s in reader.samples] if m.dataset.get("repeats") else None
        self._visits = range(len(reader)) if repeats is None else [i for i, r in enumerate(repeats) for _ in range(r)]
        self._buckets = [[i for i in members for _ in range(repeats[i] if repeats else 1)]
                         for members in reader.buckets().values()] if m.bucketed else None
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
        n = len(self._visits)
        epoch = p // n
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(n, self.seed, epoch)}
        return self._visits[int(self._orders[epoch][p % n])]

    def __getitem__(self, position: int) -> dict:
        index = self.index_at(position)
        sample = self.reader[index]
        if "mask" in self.keys and "mask" not in sample:  # a sample of a cache without masks counts fully
            sample["mask"] = sample["mask_flipped"] = torch.ones_like(sample["latent_mean"][:1])
        if (choice := caption_choice(self.seed, position, self.reader.captions(index))):
            sample.update(self.reader.caption_embeds(index, choice))
        suffix = "_flipped" if self.reader.flipped and use_flipped(self.seed, position) else ""
        return {**{k: sample[k + suffix if k in self.ORIENTED else k] for k in self.keys},
                "position": torch.tensor(position)}  # per-sample draws of the recipe (caption dropout, strata)


def mixture_counts(weights: list[float], n: int) -> list[int]:
    """n split in proportion to `weights` by largest remainders (ties: the earlier cache): every count is within 1
    of n × weight / total, and the counts sum to n."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))[:n - sum(counts)]:
        counts[i] += 1
    return counts


class MixtureSchedule:
    """Which cache each global micro-batch m comes from, a pure function of (seed, m // block).

    Micro-batches are dealt in blocks of `block`: block b gives cache i mixture_counts(weights, (b+1)·block)[i] -
    mixture_counts(weights, b·block)[i] micro-batches in an order shuffled per (seed, b). So after every whole block
    each cache has had its share within 1, and within a block at most `block` off. `at(m)` is (cache, how many of
    that cache's micro-batches came before m)."""

    def __init__(self, weights: list[float], block: int, seed):
        self.weights, self.block, self.seed = weights, block, seed
        self._cached: tuple[int, list[int], list[int]] | None = None  # (block, counts before it, its cache order)

    def _block(self, b: int) -> tuple[list[int], list[int]]:
        if self._cached is None or self._cached[0] != b:
            before, after = mixture_counts(self.weights, b * self.block), mixture_counts(self.weights, (b + 1) * self.block)
            labels = [i for i, (x, y) in enumerate(zip(before, after)) for _ in range(y - x)]
            order = torch.randperm(len(labels), generator=generator(self.seed, "mixture", b)).tolist()
            self._cached = (b, before, [labels[k] for k in order])
        return self._cached[1], self._cached[2]

    def at(self, m: int) -> tuple[int, int]:
        b, offset = divmod(m, self.block)
        before, labels = self._block(b)
        cache = labels[offset]
        return cache, before[cache] + labels[:offset].count(cache)


class MixtureStream(Dataset):
    """Item p of several caches: global micro-batches (`batch` positions) come whole from one cache, as
    MixtureSchedule deals them, so a micro-batch has one shape and one loss weight; cache i's k-th micro-batch
    is the k-th of its own CacheStream (seeded apart per cache). Items carry their global `position` (the
    recipe's per-sample draws) and their `cache`."""

    def __init__(self, mixture, seed, batch: int = 1, masks: bool = False):
        self.batch = batch
        self.streams = [CacheStream(r, f"{seed}/cache{i}", batch, masks) for i, r in enumerate(mixture.readers)]
        # a block: at least every cache's micro-batches of one epoch together, and at least 2 for the rarest cache
        per_epoch = sum(-(-sum(r.manifest.repeats(s.key) for s in r.samples) // batch) for r in mixture.readers)
        block = max(per_epoch, -(-2 * sum(mixture.weights) // min(mixture.weights)))
        self.schedule = MixtureSchedule(mixture.weights, int(block), seed)

    def __len__(self):
        return 1 << 62

    def __getitem__(self, position: int) -> dict:
        micro, slot = divmod(position, self.batch)
        cache, k = self.schedule.at(micro)
        return {**self.streams[cache][k * self.batch + slot], "position": torch.tensor(position),
                "cache": torch.tensor(cache)}


def make_stream(reader, seed: int, batch: int, masks: bool = False) -> Dataset:
    """The stream of a cache (CacheStream) or of several (MixtureStream: cache/mixture.py's CacheMixture)."""
    return MixtureStream(reader, seed, batch, masks) if hasattr(reader, "readers") else CacheStream(reader, seed, batch, masks)


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
                  num_workers: int = 0, masks: bool = False):
    """Yield (optimizer_step, [micro-batch dicts on device]) from `first_step` to the last stage's end, stage
    by stage of the resolution schedule `stages` ((resolution, first step, end step), in optimizer steps).

    Under torchrun, rank r gets its slice of every global micro-batch of batch_size × world_size: the
    positions, in the order, of one process training with that batch."""
    for resolution, start, end in stages:
        if end <= first_step:
            continue
        # positions count on from the previous stage: its epoch order continues instead of starting over
        stream = make_stream(reader.at(resolution), seed, batch_size * world_size, masks)
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
