"""Stage 1: run every image once through the FP32 VAE and both text encoders into the shard cache.

    dataset records -> decode + preprocess (worker processes) -> VAE latent_dist (mean, std) of the
    image and of its mirror -> prompt embeddings of the caption -> CacheWriter shards -> manifest
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cache.format import EMPTY_PROMPT_NAME, FORMAT_VERSION, MANIFEST_NAME, VALIDATION_NAME, CacheError, Manifest, fingerprint
from cache.lock import lock_folder
from cache.writer import (CacheWriter, corrupt_shards, drop_shards, foreign_entries, merge_parts, remove_cache_files,
                          set_variants, unfinished_encode, write_empty_prompt, write_validation)
from stages import distributed
from stages.captions import caption_texts
from stages.config import EncodeConfig
from stages.data import (MIN_SIDE_FRACTION, Source, bucket_sizes, check_caption, decode_image, decode_mask, find_mask,
                         first_caption, nearest_bucket, open_source, preprocess)
from stages.device import resolve_device
from stages.errors import UserError, clean, kill_point
from stages.paths import check_output_folder
from stages.sdxl import ModelSource, absolute_path, check_vae, load_encoders, weights_hash


@torch.no_grad()
def encode_prompts(tokenizers, text_encoders, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt embeddings, as StableDiffusionXLPipeline.encode_prompt computes them (no clip-skip).

    Returns prompt_embeds (B, 77, 768+1280) = penultimate hidden states of both encoders, concatenated,
    and pooled_prompt_embeds (B, 1280) = text_encoder_2's projected text_embeds.
    """
    token_ids = [tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids for tokenizer in tokenizers]
    return encode_token_ids(text_encoders, token_ids)


@torch.no_grad()
def encode_token_ids(text_encoders, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_prompts from token ids (B, 77) per encoder."""
    hidden, pooled = [], None
    for ids, encoder in zip(token_ids, text_encoders):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's: text_embeds of CLIPTextModelWithProjection
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 VAE posterior: (mean, std), each (B, 4, H/8, W/8), unscaled."""
    dist = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist
    return dist.mean, dist.std


def truncated_keys(tokenizers, items: list[dict]) -> list[str]:
    """Keys of the items whose caption is longer than a tokenizer's 77 tokens (the rest is cut off)."""
    return [item["key"] for item in items
            if any(len(tok(item["caption"]).input_ids) > tok.model_max_length for tok in tokenizers)]


class PreprocessDataset(Dataset):
    """Decodes and preprocesses one record per item; failures come back as a skip reason."""

    def __len__(self):
        return len(self.records)

    def __init__(self, source: Source, records: list, cfg: EncodeConfig):
        self.source, self.records, self.cfg = source, records, cfg
        self.resolutions = cfg.resolutions
        self.buckets = {r: bucket_sizes(r, cfg.bucket_step, cfg.bucket_max_aspect) for r in self.resolutions} \
            if cfg.buckets else None

    def __getitem__(self, i):
        rec = self.records[i]
        item = {"key": rec.key, "caption": first_caption(rec.caption)}
        reason = check_caption(rec.caption)
        if reason:
            return {**item, "skip": reason}
        try:
            data = self.source.read_bytes(rec)
        except OSError as e:
            return {**item, "skip": clean(f"cannot read: {e}")}
        item["source"] = self.source.identity(rec, data)
        try:
            image = decode_image(data)
        except Exception as e:  # any decoder failure is a property of the file: record and skip
            return {**item, "skip": clean(f"cannot decode image: {type(e).__name__}: {e}")}
        mask, mask_path = None, find_mask(self.cfg.masks, rec.key) if self.cfg.masks else None
        try:
            if mask_path:
                mask_bytes = mask_path.read_bytes()
                item["source"]["mask_sha256"] = hashlib.sha256(mask_bytes).hexdigest()
                mask = decode_mask(mask_bytes, alpha=False)
            elif self.cfg.alpha_mask:
                mask = decode_mask(data, alpha=True)
        except Exception as e:  # as with images: a property of the file, recorded as a skip
            return {**item, "skip": clean(f"cannot decode mask {mask_path or '(alpha)'}: {type(e).__name__}: {e}")}
        largest = max(self.resolutions)
        if min(image.size) * MIN_SIDE_FRACTION < largest:
            return {**item, "skip": f"image is {image.width}x{image.height}: shorter side below "
                                    f"{largest}/{MIN_SIDE_FRACTION}, too small to upscale"}
        item["pre"] = []  # ((resolution, height, width), Preprocessed) per resolution; group None: a plain square cache
        plain = not self.buckets and len(self.resolutions) == 1  # its shards stay readable by earlier versions
        for r in self.resolutions:
            size = nearest_bucket(image.height, image.width, self.buckets[r]) if self.buckets else (r, r)
            pre = preprocess(image, r, self.cfg.center_crop, crop_seed=f"{self.cfg.seed}:{rec.key}", size=size, mask=mask)
            item["pre"].append((None if plain else (r, *size), pre))
        return item


@dataclass
class Staleness:
    """How an existing cache (same settings) compares with the dataset as it is now."""
    kept: list        # SampleInfo still valid
    kept_skips: list  # skip records whose input is unchanged (still unusable)
    todo: list        # Records to encode: added, changed, or previously skipped but changed
    added: list[str]
    changed: list[str]
    removed: list[str]
    repaired: list[str] = field(default_factory=list)  # unchanged, but stored in a corrupt shard: encoded again

    @property
    def up_to_date(self) -> bool:
        return not (self.todo or self.removed)


def find_stale(old: Manifest, source: Source, corrupt: list[int] = (), masks: str | None = None) -> Staleness:
    """Compare every record's (first) caption, image bytes and mask file (sha256) with what the manifest recorded;
    samples in the `corrupt` shards are encoded again. Captions beyond the first are set_variants' business."""
    samples: dict[str, list] = {}  # key -> its SampleInfo per resolution
    for s in old.samples:
        samples.setdefault(s.key, []).append(s)
    skips = {s["key"]: s for s in old.skipped}
    st = Staleness([], [], [], [], [], [])
    for rec in source.records:
        try:
            digest = hashlib.sha256(source.read_bytes(rec)).hexdigest()
        except (OSError, ValueError):
            digest = None
        caption = first_caption(rec.caption) if isinstance(first_caption(rec.caption), str) else None
        mask = find_mask(masks, rec.key) if masks else None
        mask_digest = hashlib.sha256(mask.read_bytes()).hexdigest() if mask else None
        if rec.key in samples:
            s = samples[rec.key][0]
            if s.caption != caption or s.source.get("sha256") != digest or s.source.get("mask_sha256") != mask_digest:
                st.changed.append(rec.key)
                st.todo.append(rec)
            elif any(x.shard in corrupt for x in samples[rec.key]):
                st.repaired.append(rec.key)
                st.todo.append(rec)
            else:
                st.kept.extend(samples[rec.key])
        elif rec.key in skips:
            s = skips[rec.key]
            # skipped for its caption (no sha256 recorded: the image was never read): unchanged while the caption is
            if s.get("caption") == caption and (s.get("sha256") == digest or check_caption(rec.caption)):
                st.kept_skips.append(s)
            else:
                st.changed.append(rec.key)
                st.todo.append(rec)
        else:
            st.added.append(rec.key)
            st.todo.append(rec)
    current = {r.key for r in source.records}
    st.removed = [k for k in list(samples) + list(skips) if k not in current]
    return st


def _names(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _describe_difference(old: Manifest, new: Manifest) -> str:
    diffs = []
    for part, value in new.encoder["weights"].items():
        if old.encoder.get("weights", {}).get(part) != value:
            diffs.append(f"{part} weights")
    for k in dict.fromkeys([*new.preprocessing, *old.preprocessing]):
        if old.preprocessing.get(k) != new.preprocessing.get(k):
            diffs.append(f"{k} {old.preprocessing.get(k)} -> {new.preprocessing.get(k)}")
    if old.dtype != new.dtype:
        diffs.append(f"cache dtype {old.dtype} -> {new.dtype}")
    if old.dataset.get("records_sha256") != new.dataset.get("records_sha256"):
        diffs.append("dataset records (files or captions)")
    return ", ".join(diffs) or "format"


def encode(cfg: EncodeConfig, log=print) -> Manifest:
    """Build (or resume, update, repair, or confirm) the cache described by cfg; returns its manifest."""
    with contextlib.ExitStack() as held:  # the cache's lock, from before the encoders load until the cache is complete
        return _encode(cfg, log, held)


def _encode(cfg: EncodeConfig, log, held: contextlib.ExitStack) -> Manifest:
    manifest, parts, source = _encode_samples(cfg, log, held)
    if manifest is not None and not cfg.dry_run and distributed.is_main():
        _store_variants(cfg, manifest, source, parts, log)
    if cfg.validation_prompt and manifest is not None and not cfg.dry_run and distributed.is_main():
        prompts = list(cfg.validation_prompt)
        if manifest.validation_prompts != prompts or not (Path(cfg.cache) / VALIDATION_NAME).exists():
            embeds, pooled = encode_prompts((parts["tokenizer"], parts["tokenizer_2"]),
                                            (parts["text_encoder"], parts["text_encoder_2"]), prompts)
            write_validation(Path(cfg.cache), manifest, prompts, embeds.cpu(), pooled.cpu())
            log(f"stored {len(prompts)} validation prompt(s) for `train --validate-every`")
    if manifest is not None and not cfg.dry_run and distributed.is_main() \
            and not (Path(cfg.cache) / EMPTY_PROMPT_NAME).exists():  # once per cache, for `train --caption-dropout`
        embeds, pooled = encode_prompts((parts["tokenizer"], parts["tokenizer_2"]),
                                        (parts["text_encoder"], parts["text_encoder_2"]), [""])
        write_empty_prompt(Path(cfg.cache), manifest, embeds[0].cpu(), pooled[0].cpu())
        log("stored the empty caption's embedding for `train --caption-dropout`")
    distributed.barrier()  # torchrun: every process returns once rank 0 has completed the cache
    return manifest


def _store_variants(cfg: EncodeConfig, manifest: Manifest, source: Source, parts: dict, log) -> None:
    """Every sample's captions beyond its first (its source's other captions, --caption-variants copies), embedded
    once per distinct text into caption shards; a rerun with other settings adds and removes only texts."""
    captions = {r.key: r.caption for r in source.records}
    wanted = {s.key: caption_texts(captions[s.key], s.key, cfg.seed, cfg.caption_variants, cfg.tag_separator,
                                   cfg.keep_tokens, cfg.shuffle_tags, cfg.tag_dropout)[1:] for s in manifest.samples}

    def embed(texts):
        return (t.cpu() for t in encode_prompts((parts["tokenizer"], parts["tokenizer_2"]),
                                                (parts["text_encoder"], parts["text_encoder_2"]), texts))
    added = set_variants(Path(cfg.cache), manifest, wanted, embed, cfg.shard_size)
    if added:
        log(f"stored {added} caption variant text(s); {sum(len(v) for v in wanted.values())} variant(s) over "
            f"{sum(bool(v) for v in wanted.values())} sample(s)")


def _encode_samples(cfg: EncodeConfig, log, held: contextlib.ExitStack) -> tuple[Manifest | None, dict, Source]:
    if cfg.cache_dtype not in ("fp16", "bf16", "fp32"):
        raise UserError(f"--cache-dtype must be fp16, bf16 or fp32, not {cfg.cache_dtype}")
    device = distributed.setup(resolve_device(cfg.device))  # torchrun: join the process group, cuda:LOCAL_RANK
    rank, world = distributed.rank(), distributed.world_size()
    log = log if rank == 0 else (lambda *a, **k: None)
    cache = Path(cfg.cache)
    started = time.time()
    model = ModelSource(cfg.model, cfg.revision, cfg.variant, cfg.model_config).check()  # paths first: nothing loads
    check_vae(cfg.vae)
    check_output_folder(cfg.cache, "--cache", dry_run=cfg.dry_run)
    if cfg.masks and not Path(cfg.masks).is_dir():
        raise UserError(f"--masks {cfg.masks}: no such folder (it holds a grayscale mask per image, named like the image)")

    source = open_source(cfg.dataset, cfg.split, cfg.image_column, cfg.caption_column)
    if not source.records:
        raise UserError(f"no images found in dataset {cfg.dataset}")
    record_ids = hashlib.sha256(json.dumps([(r.key, r.caption if isinstance(r.caption, (str, list)) else None)
                                            for r in source.records]).encode()).hexdigest()

    if cache.exists() and not (cache / MANIFEST_NAME).exists() and not unfinished_encode(cache) \
            and (foreign := foreign_entries(cache)):
        raise UserError(f"{cache} is not a cache (it holds {_names(foreign, 3)}); encode writes only into a new or "
                        "empty folder or an existing cache: choose another --cache")
    if not cfg.dry_run:  # one writer per cache: a second encode is refused before anything loads
        held.enter_context(distributed.on_main(lock_folder, cache, "encode", log) or contextlib.nullcontext())
    unfinished = None if cfg.overwrite else unfinished_encode(cache)  # (processes, journal manifest)
    if unfinished and unfinished[0] != world:
        raise UserError(f"{cache} holds an unfinished encode by {unfinished[0]} process(es), this one has {world}: "
                        "rerun it with the same number of processes (torchrun --nproc-per-node), "
                        "or pass --overwrite to start over")

    log(f"loading VAE and text encoders from {cfg.model}" + (f" (VAE: {cfg.vae})" if cfg.vae else ""))
    parts = load_encoders(model, cfg.vae)
    vae, tokenizers = parts["vae"], (parts["tokenizer"], parts["tokenizer_2"])
    text_encoders = (parts["text_encoder"], parts["text_encoder_2"])
    weights = {name: weights_hash(parts[name]) for name in ("vae", "text_encoder", "text_encoder_2")}
    resolutions = cfg.resolutions
    preprocessing = {"resolution": resolutions[0] if len(resolutions) == 1 else resolutions,
                     "center_crop": cfg.center_crop, "flip": cfg.flip}
    if cfg.buckets:  # recorded only when on, so that caches made before buckets existed keep their fingerprint
        preprocessing["buckets"] = {"step": cfg.bucket_step, "max_aspect": cfg.bucket_max_aspect}
    if cfg.masks or cfg.alpha_mask:  # likewise: the shards then hold masks
        preprocessing["masks"] = "alpha" if cfg.alpha_mask else "folder"

    manifest = Manifest(
        fingerprint=fingerprint(weights, preprocessing, cfg.cache_dtype),
        encoder={**model.resolved().describe(), "vae": absolute_path(cfg.vae), "weights": weights},
        preprocessing=preprocessing, dtype=cfg.cache_dtype,
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=getattr(vae.config, "shift_factor", None),
        dataset={"name": cfg.dataset, "split": cfg.split, "num_records": len(source.records),
                 "records_sha256": record_ids, **({"repeats": source.repeats} if source.repeats else {})},
        config={**asdict(cfg), "resolution": preprocessing["resolution"]},
    )

    todo = source.records
    if (cache / MANIFEST_NAME).exists() and not cfg.overwrite:
        try:
            old = Manifest.load(cache)
        except CacheError as e:
            raise UserError(f"{e}; pass --overwrite to replace it") from e
        if old.fingerprint != manifest.fingerprint:
            report = f"cache {cache} was made with other settings ({_describe_difference(old, manifest)})"
            if cfg.dry_run:
                log(f"{report}: every sample is stale; only --overwrite can rebuild it")
                return old, parts, source
            raise UserError(f"{report}; a partial update is impossible: pass --overwrite to replace it, "
                            "or choose another --cache")
        corrupt = corrupt_shards(cache, old)
        stale = find_stale(old, source, corrupt, cfg.masks)
        if stale.up_to_date:
            if not old.samples:
                raise UserError(f"no usable images in {cfg.dataset}: all {len(old.skipped)} inputs were skipped "
                                f"(see {cache / MANIFEST_NAME})")
            if old.dataset.get("repeats") != manifest.dataset.get("repeats") and not cfg.dry_run and rank == 0:
                old.dataset["repeats"], old.format_version = manifest.dataset.get("repeats"), FORMAT_VERSION
                old.save(cache)  # kohya folders of a cache encoded before repeats were recorded
                log(f"recorded the kohya folders' repeats: {old.dataset['repeats']}")
            log(f"cache {cache} is up to date ({old.num_samples} samples); nothing to do")
            return old, parts, source
        log(f"cache {cache}: {len({s.key for s in stale.kept})} samples unchanged; stale: {len(stale.added)} added"
            + (f" ({_names(stale.added)})" if stale.added else "")
            + f", {len(stale.changed)} changed" + (f" ({_names(stale.changed)})" if stale.changed else "")
            + f", {len(stale.removed)} removed" + (f" ({_names(stale.removed)})" if stale.removed else "")
            + (f"; {len(stale.repaired)} to encode again from {len(corrupt)} missing or corrupt shard(s) "
               f"({_names([old.shards[i].file for i in corrupt])})" if corrupt else ""))
        if cfg.dry_run:
            return old, parts, source
        # Append-only update: kept samples stay where they are, stale ones go into new shards; corrupt shards leave
        # the manifest (their samples are among the stale ones) and are deleted.
        manifest.shards, manifest.samples = drop_shards(old, stale.kept, corrupt)
        manifest.skipped = stale.kept_skips
        if rank == 0:
            for i in corrupt:
                (cache / old.shards[i].file).unlink(missing_ok=True)
        manifest.validation_prompts = old.validation_prompts
        todo = stale.todo
    elif cfg.dry_run:
        log(f"no complete cache in {cache}: all {len(source.records)} records would be encoded")
        return None, parts, source
    elif cfg.overwrite:
        if rank == 0:
            remove_cache_files(cache)
    elif unfinished:
        journal = unfinished[1]
        if journal.get("dataset", {}).get("records_sha256") != record_ids:
            raise UserError(f"{cache} holds an unfinished encode of other data; rerun that command, "
                            "or pass --overwrite to start over")

    part = {}
    if world > 1:  # torchrun: rank r encodes the r-th contiguous block of the records into its own shards
        todo, part = todo[len(todo) * rank // world:len(todo) * (rank + 1) // world], {"rank": rank, "world_size": world}
    distributed.barrier()  # every rank has looked at the folder before any of them writes to it
    writer = CacheWriter(cache, manifest, cfg.shard_size, resume=True, **part)
    if writer.records_done:
        log(f"resuming an unfinished encode: {writer.records_done}/{len(todo)} records already done")
    vae.to(device)
    for te in text_encoders:
        te.to(device)

    loader = DataLoader(PreprocessDataset(source, todo[writer.records_done:], cfg), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, collate_fn=list)
    truncated, loop_started, done_before = [], time.time(), writer.records_done
    with tqdm(total=len(todo), initial=writer.records_done, desc="encode", unit="img", disable=rank != 0) as bar:
        for batch in loader:
            good = [item for item in batch if "skip" not in item]
            if good:
                encoded = _encode_batch(good, vae, tokenizers, text_encoders, cfg.flip, bool(cfg.masks or cfg.alpha_mask))
                truncated += truncated_keys(tokenizers, good)
            for item in batch:
                if "skip" in item:
                    writer.skip(item["key"], item["skip"], caption=item["caption"] if isinstance(item["caption"], str) else None,
                                sha256=item.get("source", {}).get("sha256"))
                else:
                    writer.add_record(encoded.pop(0), item["key"], item["caption"], item["source"])
                kill_point("shards", len(writer.manifest.shards))
            bar.update(len(batch))
    manifest = writer.finish()
    if world > 1:  # once every rank has finished its part, rank 0 merges the parts into the one manifest
        distributed.barrier()
        manifest = distributed.on_main(merge_parts, cache, world) or Manifest.load(cache)
    count = distributed.sum_across_ranks(len(truncated))
    if count:
        log(f"warning: {count} caption(s) are longer than 77 tokens and were truncated to their first 77 tokens: "
            f"{_names(truncated)}" + (" (this process's)" if world > 1 else ""))
    if manifest.skipped:
        log(f"skipped {len(manifest.skipped)} input(s); reasons are listed under 'skipped' in {cache / MANIFEST_NAME}")
    if not manifest.samples:
        raise UserError(f"no usable images in {cfg.dataset}: all {len(manifest.skipped)} inputs were skipped "
                        f"(see {cache / MANIFEST_NAME})")
    total_bytes = sum(s.bytes for s in manifest.shards)
    rate = (len(todo) - done_before) / max(time.time() - loop_started, 1e-9)  # this process, models loaded
    log(f"encoded {manifest.num_samples} samples ({len(manifest.skipped)} skipped) into {len(manifest.shards)} "
        f"shard(s), {total_bytes / 1e6:.1f} MB, in {time.time() - started:.1f} s ({rate:.1f} images/s after "
        f"loading the encoders) -> {cache}")
    return manifest, parts, source


def _encode_batch(items: list[dict], vae, tokenizers, text_encoders, flip: bool, masked: bool = False) -> list[list]:
    """Encode a batch of preprocessed items; returns per item its [(group, dict of unbatched tensors)], one
    per resolution. The VAE sees one pass per image shape (a resolution and bucket), mirrored copies included.
    `masked`: every sample also gets its mask (ones for an image without one), mirrored too."""
    prompt_embeds, pooled = (t.cpu() for t in encode_prompts(tokenizers, text_encoders, [item["caption"] for item in items]))
    by_shape: dict[tuple, list[tuple[int, int]]] = {}  # pixel shape -> (item, resolution slot)
    for i, item in enumerate(items):
        for j, (_, pre) in enumerate(item["pre"]):
            by_shape.setdefault(tuple(pre.pixels.shape), []).append((i, j))
    latents = {}  # (item, slot) -> (mean, std, mean_flipped, std_flipped)
    for members in by_shape.values():
        pixels = torch.stack([items[i]["pre"][j][1].pixels for i, j in members]).to(vae.device)  # (B, 3, H, W)
        n = len(members)
        if flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])  # mirrored copies encoded in the same pass
        mean, std = (t.cpu() for t in encode_latents(vae, pixels))  # one device->host copy per tensor, not per sample
        for k, member in enumerate(members):
            latents[member] = (mean[k], std[k]) + ((mean[n + k], std[n + k]) if flip else ())
    out = []
    for i, item in enumerate(items):
        record = []
        for j, (group, pre) in enumerate(item["pre"]):
            lat = latents[(i, j)]
            sample = {"latent_mean": lat[0], "latent_std": lat[1], "prompt_embeds": prompt_embeds[i],
                      "pooled_prompt_embeds": pooled[i], "time_ids": pre.time_ids}
            if masked:
                sample["mask"] = pre.mask if pre.mask is not None else torch.ones_like(lat[0][:1])
            if flip:
                sample.update(latent_mean_flipped=lat[2], latent_std_flipped=lat[3], time_ids_flipped=pre.time_ids_flipped,
                              **({"mask_flipped": sample["mask"].flip(-1)} if masked else {}))
            record.append((group, {k: v.detach().clone() for k, v in sample.items()}))  # own storage, not a view
        out.append(record)
    return out


def describe(manifest: Manifest) -> str:
    """The manifest for humans (`pipeline.py info`)."""
    m = manifest
    total = sum(s.bytes for s in m.shards)
    lines = [
        f"format version   {m.format_version}",
        f"created          {m.created}",
        f"samples          {m.num_samples} ({len(m.skipped)} skipped)",
        f"shards           {len(m.shards)}, {total / 1e6:.1f} MB",
        f"model            {m.encoder.get('model')}" + "".join(f", {k} {m.encoder[k]}" for k in ("revision", "variant")
                                                                 if m.encoder.get(k)),
        "vae override     " + (m.encoder.get("vae") or "none (the model's own VAE)"),
        f"dataset          {m.dataset.get('name')} [{m.dataset.get('split')}]",
        f"resolution       {', '.join(map(str, m.resolutions))}",
        f"crop             {'center' if m.preprocessing.get('center_crop') else 'random (recorded)'}",
        f"flip             {m.preprocessing.get('flip')}",
        f"dtype            {m.dtype}",
        f"scaling factor   {m.scaling_factor}" + (f", shift {m.shift_factor}" if m.shift_factor else ""),
        f"fingerprint      {m.fingerprint}",
    ]
    captions = {s.key: 1 + len(s.variants or ()) for s in m.samples}
    if any(n > 1 for n in captions.values()):
        lines.append(f"captions         {sum(captions.values()) / len(captions):.2f} per sample on average (up to "
                     f"{max(captions.values())}; {sum(n > 1 for n in captions.values())} samples with several), "
                     f"{sum(c.num_samples for c in m.caption_shards)} variant text(s) in {len(m.caption_shards)} "
                     "caption shard(s)")
    if m.dataset.get("repeats"):
        lines.append("kohya repeats    " + ", ".join(f"{folder}: {n}" for folder, n in sorted(m.dataset["repeats"].items())))
    if m.masked:
        files = len({s.key for s in m.samples if s.source.get("mask_sha256")})
        lines.append("masks            " + ("the images' alpha channels" if m.preprocessing["masks"] == "alpha" else
                                            f"{files} mask file(s)") + " (ones where an image has none)")
    if m.bucketed:
        counts = m.bucket_counts()
        for r in m.resolutions:
            lines.append(f"buckets at {r:<6d}" + ", ".join(f"{w}x{h}: {n}" for (res, (h, w)), n in counts.items()
                                                           if res == r))
    for s in m.skipped[:20]:
        lines.append(f"skipped          {s['key']}: {s['reason']}")
    if len(m.skipped) > 20:
        lines.append(f"skipped          ... and {len(m.skipped) - 20} more (see manifest.json)")
    return "\n".join(lines)
