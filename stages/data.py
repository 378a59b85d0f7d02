"""Dataset sources -> records (key, caption, image bytes), and the SDXL preprocessing.

Sources: a hub dataset id, a local imagefolder (metadata.jsonl / metadata.csv), a folder written by
`datasets.save_to_disk`, or a kohya-style folder of images with same-named .txt captions (subfolders `N_name/`
give their images N repeats, as kohya does). A caption is a string, or a list of them (a list in the caption
column, a .txt file of several non-empty lines): several captions of one image.
Preprocessing follows diffusers' train_text_to_image_lora_sdxl.py: shorter side resized to the
resolution (bilinear), center or random crop, [-1, 1] pixels, and SDXL's time_ids. With aspect-ratio
buckets the target is the bucket (height, width) nearest the image's aspect ratio instead of the square.
"""
from __future__ import annotations

import glob
import hashlib
import io
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from stages.errors import UserError
from stages.paths import check_input, did_you_mean, looks_like_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
MAX_IMAGE_PIXELS = 178_956_970  # larger images are rejected as decompression bombs (PIL's own hard limit)
MIN_SIDE_FRACTION = 4  # shorter side below resolution / 4: too small to upscale usefully, rejected


@dataclass
class Record:
    """One dataset entry before decoding. `ref` locates the image bytes within its source."""
    key: str       # stable identity inside the dataset: relative path, or the row index
    caption: object  # as found in the source; validated by `check_caption`
    ref: object    # a file path (str) or a row index (int) for a `datasets` table


class Source:
    """A list of records plus a way to read one record's image bytes."""

    def __init__(self, name: str, records: list[Record], table=None, image_column: str | None = None,
                 repeats: dict[str, int] | None = None):
        self.name = name
        self.records = records
        self.repeats = repeats or {}  # kohya folder `N_name` -> N
        self._table = table
        self._image_column = image_column

    def read_bytes(self, rec: Record) -> bytes:
        if isinstance(rec.ref, str):
            with open(rec.ref, "rb") as f:
                return f.read()
        cell = self._table[rec.ref][self._image_column]
        if cell is None:
            raise ValueError("no image in this row")
        if cell.get("bytes") is not None:
            return cell["bytes"]
        with open(cell["path"], "rb") as f:
            return f.read()

    def identity(self, rec: Record, data: bytes) -> dict:
        """Where the sample came from, and a hash of its bytes (what makes a cached entry stale)."""
        where = {"path": rec.ref} if isinstance(rec.ref, str) else {"dataset": self.name, "index": rec.ref}
        return {**where, "sha256": hashlib.sha256(data).hexdigest()}


def open_source(dataset: str, split: str = "train", image_column: str = "image",
                caption_column: str = "text") -> Source:
    """Resolve --dataset to a Source (see module docstring for the accepted kinds)."""
    path = Path(dataset)
    if path.is_dir():
        check_input(dataset, "--dataset")
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            import datasets
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                if split not in table:
                    raise UserError(f"{dataset} has no split '{split}' (it has: {', '.join(table)})")
                table = table[split]
            return _table_source(str(path), table, image_column, caption_column)
        if any((path / m).exists() for m in METADATA_FILES):
            return _imagefolder_source(path, caption_column)
        return _kohya_source(path)
    if path.exists():
        raise UserError(f"--dataset must be a folder or a hub dataset id, not a file: {dataset}")
    if looks_like_path(dataset):
        raise UserError(f"dataset folder not found: {dataset}{did_you_mean(dataset)}")
    import datasets
    try:
        table = datasets.load_dataset(dataset, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"cannot load dataset '{dataset}' (split '{split}') from the hub, and there is no local folder "
                        f"of that name: {str(e).strip().splitlines()[0]}") from e
    return _table_source(dataset, table, image_column, caption_column)


def _imagefolder_source(root: Path, caption_column: str) -> Source:
    """A folder with metadata.jsonl or metadata.csv (imagefolder convention: `file_name` + caption column).

    Read directly rather than through `datasets.load_dataset("imagefolder")`, which would write an Arrow
    cache under ~/.cache: nothing is written outside the folders the user named.
    """
    import csv
    import json
    meta = next(root / m for m in METADATA_FILES if (root / m).exists())
    try:
        if meta.suffix == ".jsonl":
            rows = [json.loads(line) for line in meta.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        else:  # utf-8-sig: the byte-order mark Excel and Notepad write is not part of the first column's name
            with open(meta, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise UserError(f"{meta} is unreadable: {e}") from e
    columns = sorted({k for row in rows for k in row})
    missing = [c for c in ("file_name", caption_column) if c not in columns]
    if missing:
        raise UserError(f"{meta} has no column {', '.join(repr(c) for c in missing)} (columns: {', '.join(columns)}); "
                        "use --caption-column")
    records = [Record(str(Path(row["file_name"])), row.get(caption_column), str(root / row["file_name"]))
               for row in rows]
    return Source(str(root), records)


def _table_source(name, table, image_column, caption_column) -> Source:
    import datasets
    missing = [c for c in (image_column, caption_column) if c not in table.column_names]
    if missing:
        raise UserError(f"dataset {name} has no column {', '.join(repr(c) for c in missing)} "
                        f"(columns: {', '.join(table.column_names)}); use --image-column / --caption-column")
    # Raw bytes, decoded by us: a broken image becomes a recorded skip instead of a crash.
    table = table.cast_column(image_column, datasets.Image(decode=False))
    records = [Record(f"{i:08d}", c, i) for i, c in enumerate(table[caption_column])]
    return Source(name, records, table, image_column)


KOHYA_FOLDER = re.compile(r"(\d+)_.+")  # kohya's dataset subfolder: N repeats, then the name


def _kohya_source(root: Path) -> Source:
    """Images with a same-named .txt caption beside each (the kohya convention); top-level subfolders named
    `N_name` give their images N repeats per epoch."""
    repeats = {p.name: int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := KOHYA_FOLDER.fullmatch(p.name))}
    if any(n < 1 for n in repeats.values()):
        raise UserError(f"{root}: kohya folder(s) {', '.join(k for k, n in repeats.items() if n < 1)} have 0 repeats: "
                        "name them N_name with N >= 1")
    records = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        txt = path.with_suffix(".txt")
        caption = _read_caption_file(txt) if txt.exists() else None
        records.append(Record(str(path.relative_to(root)), caption, str(path)))
    return Source(str(root), records, repeats=repeats)


def _read_caption_file(txt: Path):
    """The caption, or the list of captions of a file with several non-empty lines."""
    data = txt.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # without a byte-order mark (Windows editors write one)
    except UnicodeDecodeError:
        return data  # check_caption reports it
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines if len(lines) > 1 else text.strip()


def first_caption(caption):
    """The caption stored with the image (a list's first; what identifies the sample), as found otherwise."""
    return caption[0] if isinstance(caption, list) and caption else caption


def check_caption(caption) -> str | None:
    """None when the caption is usable, else the reason to skip the sample."""
    if isinstance(caption, list):
        return next((f"caption {i + 1} of {len(caption)}: {reason}" for i, c in enumerate(caption)
                     if (reason := check_caption(c))), None) if caption else "empty caption list"
    if caption is None:
        return "missing caption"
    if isinstance(caption, bytes):
        return "caption is not UTF-8"
    if not isinstance(caption, str):
        return f"caption is not text ({type(caption).__name__})"
    if not caption.strip():
        return "empty caption"
    return None


def decode_image(data: bytes) -> Image.Image:
    """Decode to RGB: EXIF orientation applied, transparency composited on white."""
    if not data:
        raise ValueError("empty file")
    Image.MAX_IMAGE_PIXELS = None  # checked below, before any pixel is decoded, with our own message
    with Image.open(io.BytesIO(data)) as im:
        if im.width * im.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{im.width}x{im.height} pixels exceeds the {MAX_IMAGE_PIXELS:,}-pixel limit "
                             "(possible decompression bomb)")
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def find_mask(masks: str, key: str) -> Path | None:
    """The mask of the image `key` in the folder `masks`: same relative folder and stem, any image extension;
    else the same stem at the folder's top level; None when there is none."""
    stem = Path(key).with_suffix("")
    for candidate in (Path(masks) / stem, Path(masks) / stem.name):
        for path in sorted(candidate.parent.glob(f"{glob.escape(candidate.name)}.*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                return path
    return None


def decode_mask(data: bytes, alpha: bool) -> Image.Image | None:
    """A mask as a grayscale image ("L", white = learn): a mask file's gray levels, or with `alpha` the image's
    own alpha channel (None where it has none); EXIF orientation applied as to the image."""
    Image.MAX_IMAGE_PIXELS = None  # decode_image has checked the size of the image it belongs to
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    if not alpha:
        return im.convert("L")
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A")
    return None


@dataclass
class Preprocessed:
    pixels: torch.Tensor          # (3, H, W) in [-1, 1]
    time_ids: torch.Tensor        # (6,) original_h, original_w, crop_top, crop_left, target_h, target_w
    time_ids_flipped: torch.Tensor  # the same crop seen in the mirrored image
    mask: torch.Tensor | None = None  # (1, H/8, W/8) in [0, 1]: the mask's crop, area-averaged to latent pixels


def bucket_sizes(resolution: int, step: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (height, width) for a resolution: sides multiples of `step`, for each width the
    tallest height with area <= resolution², and each bucket's transpose; aspect ratios within
    1/max_aspect .. max_aspect; the square resolution² is one of them (as in kohya's and SDXL's bucket lists)."""
    sizes = set()
    for width in range(step, resolution * resolution // step + 1, step):
        height = resolution * resolution // width // step * step
        if height < step:
            break
        if max(width, height) / min(width, height) <= max_aspect:
            sizes.update({(height, width), (width, height)})
    return sorted(sizes, key=lambda hw: (hw[1] / hw[0], hw))


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to the image's (in log space; ties: the first listed)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def resize_to_cover(image: Image.Image, height: int, width: int) -> Image.Image:
    """Bilinear resize to the smallest size covering height x width, the binding side exact and the other
    truncated; for a square target this is torchvision's Resize(side) (resize_shorter_side)."""
    w, h = image.size
    if width * h >= height * w:  # the width binds
        new_w, new_h = width, max(height, int(width * h / w))
    else:
        new_w, new_h = max(width, int(height * w / h)), height
    return image.resize((new_w, new_h), Image.BILINEAR)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size, BILINEAR) on a PIL image: shorter side -> size, longer truncated."""
    return resize_to_cover(image, size, size)


def crop_origin(height: int, width: int, target: tuple[int, int], center_crop: bool,
                rng: random.Random) -> tuple[int, int]:
    """Top-left corner of a target (h, w) crop: centered as diffusers rounds it, or uniform like RandomCrop."""
    th, tw = target
    if center_crop:
        return max(0, int(round((height - th) / 2.0))), max(0, int(round((width - tw) / 2.0)))
    return rng.randint(0, height - th), rng.randint(0, width - tw)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """uint8 HWC -> float (3, H, W) in [-1, 1] (ToTensor + Normalize([0.5], [0.5]))."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() * 2.0 - 1.0


LATENT_FACTOR = 8  # SDXL's VAE: one latent pixel per 8x8 image pixels


def preprocess(image: Image.Image, resolution: int, center_crop: bool, crop_seed: str,
               size: tuple[int, int] | None = None, mask: Image.Image | None = None) -> Preprocessed:
    """Resize, crop and normalize one image to `size` (height, width; default the square resolution²);
    the crop of a random-crop cache is fixed by crop_seed. A `mask` ("L") is resized and cropped exactly like
    the image (first brought to the image's size), then averaged over each latent pixel's 8x8 image pixels."""
    th, tw = size or (resolution, resolution)
    original_h, original_w = image.height, image.width
    image = resize_to_cover(image, th, tw)
    resized_width = image.width
    top, left = crop_origin(image.height, image.width, (th, tw), center_crop, random.Random(crop_seed))
    image = image.crop((left, top, left + tw, top + th))
    if mask is not None:
        mask = mask if mask.size == (original_w, original_h) else mask.resize((original_w, original_h), Image.BILINEAR)
        mask = resize_to_cover(mask, th, tw).crop((left, top, left + tw, top + th))
        mask = torch.nn.functional.avg_pool2d(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None],
                                              LATENT_FACTOR)
    # Mirroring the crop equals cropping the mirrored image at the mirrored left edge.
    left_flipped = resized_width - tw - left
    original = (original_h, original_w)
    return Preprocessed(
        pixels=to_pixels(image),
        time_ids=time_ids(original, (top, left), (th, tw)),
        time_ids_flipped=time_ids(original, (top, left_flipped), (th, tw)),
        mask=mask,
    )


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size) -> torch.Tensor:
    """SDXL micro-conditioning: original_size + crops_coords_top_left + target_size (h, w; an int: square)."""
    if isinstance(target_size, int):
        target_size = (target_size, target_size)
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
