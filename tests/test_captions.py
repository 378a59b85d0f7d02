"""Caption variants (issue 18, items 1, 2 and 6): several captions per image and tag-shuffled / tag-dropped copies,
each embedded once into caption shards and picked per visit by `train` without a text encoder; a rerun with
another --caption-variants changes only the texts; version-1 caches still read."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from cache import CacheReader
from cache.format import MANIFEST_NAME
from cache.sampler import CacheStream, caption_choice
from stages.captions import augment_tags, caption_texts
from stages.encode import describe, encode, encode_prompts
from stages.errors import UserError
from tests.conftest import encode_config

TAGS = "1girl, solo, red hair, smile, outdoors, blue sky, tree"


def test_shuffles_keep_the_first_k_tags_and_are_reproducible_by_seed():
    texts = caption_texts(TAGS, "a.png", seed=7, variants=6, keep_tokens=2, shuffle=True)
    assert texts[0] == TAGS and len(texts) == 7
    tags = [t.strip() for t in TAGS.split(",")]
    for text in texts[1:]:
        got = text.split(", ")
        assert got[:2] == tags[:2] and sorted(got[2:]) == sorted(tags[2:])  # the rest: the same tags, moved
    assert len(set(texts[1:])) > 1  # they do differ from each other
    assert caption_texts(TAGS, "a.png", seed=7, variants=6, keep_tokens=2, shuffle=True) == texts
    assert caption_texts(TAGS, "a.png", seed=8, variants=6, keep_tokens=2, shuffle=True) != texts
    assert caption_texts(TAGS, "b.png", seed=7, variants=6, keep_tokens=2, shuffle=True) != texts  # per sample


def test_tag_dropout_respects_keep_tokens_and_its_rate():
    g = torch.Generator().manual_seed(0)
    copies = [augment_tags(TAGS, ",", 1, False, 0.5, g).split(", ") for _ in range(400)]
    assert all(c[0] == "1girl" for c in copies)
    assert all(c[1:] == [t for t in TAGS.split(", ")[1:] if t in c[1:]] for c in copies)  # order kept, tags dropped
    kept = sum(len(c) - 1 for c in copies) / (400 * 6)
    assert 0.45 < kept < 0.55
    assert augment_tags(TAGS, ",", 3, False, 1.0, g) == "1girl, solo, red hair"


def test_several_captions_come_from_a_list_column_and_from_txt_lines(tmp_path):
    from stages.data import open_source
    from stages.demo import make_images
    folder = make_images(tmp_path / "txt", count=2, captions="txt")
    (folder / "img_000.txt").write_text("first line\n\n  second line \n")
    records = {r.key: r.caption for r in open_source(str(folder)).records}
    assert records["img_000.png"] == ["first line", "second line"] and isinstance(records["img_001.png"], str)


@pytest.fixture(scope="module")
def variant_cache(tmp_path_factory, tiny_model):
    """Three images: one with a list of two captions, all tag captions, encoded with 2 shuffled copies each."""
    from stages.demo import make_images
    folder = make_images(tmp_path_factory.mktemp("variants") / "images", count=3)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = ["red, circle, green background", "a drawing, simple, flat"]
    rows[1]["text"] = "blue, square, white, background"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path_factory.mktemp("variants") / "cache"
    encode(encode_config(tiny_model, folder, cache, caption_variants=2, shuffle_tags=True, keep_tokens=1),
           log=lambda *a: None)
    return folder, cache


def test_each_variant_embedding_equals_encode_prompt_of_its_text(variant_cache, tiny_model):
    from stages.sdxl import ModelSource, load_encoders
    _, cache = variant_cache
    reader = CacheReader(cache)
    parts = load_encoders(ModelSource(str(tiny_model)))
    encoders = ((parts["tokenizer"], parts["tokenizer_2"]), (parts["text_encoder"], parts["text_encoder_2"]))
    by_key = {s.key: i for i, s in enumerate(reader.samples)}
    first = reader.samples[by_key["img_000.png"]]
    texts = [first.caption] + [v["caption"] for v in first.variants]
    assert len(texts) == 6 and texts[0] == "red, circle, green background" and texts[3] == "a drawing, simple, flat"
    checked = 0
    for i, s in enumerate(reader.samples):
        for j, text in enumerate([s.caption] + [v["caption"] for v in s.variants or ()]):
            embeds, pooled = encode_prompts(*encoders, [text])
            got = reader.caption_embeds(i, j)
            assert (got["prompt_embeds"] - embeds[0]).abs().max() <= 1e-5, (s.key, text)
            assert (got["pooled_prompt_embeds"] - pooled[0]).abs().max() <= 1e-5, (s.key, text)
            checked += 1
    assert checked == 6 + 3 + 3
    assert "captions         4.00 per sample" in describe(reader.manifest)


def test_train_draws_one_caption_per_visit_as_a_function_of_seed_and_position(variant_cache):
    _, cache = variant_cache
    reader = CacheReader(cache)
    stream = CacheStream(reader, seed=3)
    for p in range(24):
        i = stream.index_at(p)
        j = caption_choice(3, p, reader.captions(i))
        assert torch.equal(stream[p]["prompt_embeds"], reader.caption_embeds(i, j)["prompt_embeds"])
    picks = [caption_choice(3, p, 6) for p in range(600)]
    assert set(picks) == set(range(6)) and all(60 < picks.count(j) < 140 for j in range(6))
    assert caption_choice(3, 5, 1) == 0


def test_a_rerun_with_another_count_changes_only_the_caption_texts(variant_cache, tiny_model, tmp_path):
    folder, cache = variant_cache
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    shards = {p.name: p.stat().st_mtime_ns for p in copy.glob("shard-*")}
    logs = []
    encode(encode_config(tiny_model, folder, copy, caption_variants=3, shuffle_tags=True, keep_tokens=1), log=logs.append)
    assert any("up to date" in line for line in logs)  # no image encoded again
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("shard-*")} == shards
    reader = CacheReader(copy)
    assert [reader.captions(i) for i in range(len(reader))] == [8, 4, 4]
    encode(encode_config(tiny_model, folder, copy), log=logs.append)  # no variants: their shards go
    reader = CacheReader(copy)
    assert [reader.captions(i) for i in range(len(reader))] == [2, 1, 1]  # the list's second caption stays
    kept = [c.file for c in reader.manifest.caption_shards]  # the one holding that caption; the others deleted
    assert reader.verify() == [] and len(kept) == 1 and sorted(p.name for p in copy.glob("captions-*")) == kept


def test_variant_options_are_checked_before_anything_loads():
    with pytest.raises(UserError, match="--caption-variants 2: say how the copies differ"):
        encode_config("m", "d", "c", caption_variants=2)
    with pytest.raises(UserError, match="give their number with --caption-variants N"):
        encode_config("m", "d", "c", shuffle_tags=True)


def test_a_version_1_cache_still_reads_and_trains(fp32_cache, tmp_path):
    """A version-1 cache is what the code wrote before format 2: no caption shards, no variants or masks."""
    old = tmp_path / "v1"
    shutil.copytree(fp32_cache, old)
    d = json.loads((old / MANIFEST_NAME).read_text())
    d["format_version"] = 1
    del d["caption_shards"]
    for s in d["samples"]:
        del s["variants"]
    (old / MANIFEST_NAME).write_text(json.dumps(d))
    reader, new = CacheReader(old), CacheReader(fp32_cache)
    assert reader.manifest.format_version == 1 and reader.manifest.samples_digest() == new.manifest.samples_digest()
    assert reader.manifest.fingerprint == new.manifest.fingerprint
    a, b = CacheStream(reader, seed=1), CacheStream(new, seed=1)
    for p in range(8):
        assert all(torch.equal(a[p][k], b[p][k]) for k in CacheStream.KEYS)
