"""The shard cache: the only package that knows the on-disk format (see cache/format.py)."""
from cache.format import FORMAT_VERSION, CacheError, Manifest, SampleInfo, ShardInfo
from cache.mixture import CacheMixture, open_caches
from cache.reader import CacheReader
from cache.sampler import bucket_epoch_batches, epoch_order
from cache.writer import CacheWriter

__all__ = ["FORMAT_VERSION", "CacheError", "CacheMixture", "CacheReader", "CacheWriter", "Manifest", "SampleInfo", "ShardInfo",
           "bucket_epoch_batches", "epoch_order", "open_caches"]
