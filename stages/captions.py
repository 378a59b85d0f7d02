"""Caption variants: the texts `encode` embeds besides a sample's first caption, so that `train` can vary the
caption per visit without a text encoder.

A sample's captions are the ones its source gives (a list in the caption column, or the non-empty lines of its
.txt file), each followed by `--caption-variants N` augmented copies: tags (split at --tag-separator) shuffled
and/or dropped at random, the first --keep-tokens tags staying in place, as kohya sd-scripts' shuffle_caption /
caption_tag_dropout_rate / keep_tokens do on every step. Each copy is a pure function of (seed, key, index)
through cache/sampler.py's `generator`, so an encode reproduces its variants exactly.
"""
from __future__ import annotations

import torch

from cache.sampler import generator


def captions_of(caption) -> list[str]:
    """The captions a source gives one sample: a list as it is, a string as the one caption."""
    return list(caption) if isinstance(caption, (list, tuple)) else [caption]


def augment_tags(caption: str, separator: str, keep_tokens: int, shuffle: bool, dropout: float,
                 g: torch.Generator) -> str:
    """One augmented copy: the tags after the first `keep_tokens` shuffled (if `shuffle`), then each of them dropped
    with probability `dropout`; joined by the separator and a space, as kohya joins them."""
    tags = [t.strip() for t in caption.split(separator) if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        tail = [tail[i] for i in torch.randperm(len(tail), generator=g).tolist()]
    if dropout:
        tail = [t for t, u in zip(tail, torch.rand(len(tail), generator=g).tolist()) if u >= dropout]
    joiner = separator if separator.endswith(" ") else separator + " "
    return joiner.join(head + tail)


def caption_texts(caption, key: str, seed: int, variants: int = 0, separator: str = ",", keep_tokens: int = 0,
                  shuffle: bool = False, dropout: float = 0.0) -> list[str]:
    """Every caption of one sample, in order: each source caption, then its `variants` augmented copies."""
    texts = []
    for c, text in enumerate(captions_of(caption)):
        texts.append(text)
        texts += [augment_tags(text, separator, keep_tokens, shuffle, dropout,
                               generator(seed, f"caption-variant:{key}", c * variants + v)) for v in range(variants)]
    return texts
