"""Stage 1 inputs: every dataset source kind -> records, and the SDXL preprocessing / image decoding."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.data import (decode_image, open_source, preprocess, resize_shorter_side,
                         to_pixels)
from stages.errors import UserError

from tests.conftest import RESOLUTION


# ------------------------------------------------------------------------------------------ helpers
def rgb_array(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def png_bytes(image: Image.Image, **save_kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **save_kw)
    return buf.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def jsonl_captions(folder: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return {r["file_name"]: r["text"] for r in rows}


def assert_records(source, expected: list[tuple[str, str, Path]]) -> None:
    """The source's records are exactly (key, caption) in this order, and each decodes to its file's pixels."""
    assert [(r.key, r.caption) for r in source.records] == [(k, c) for k, c, _ in expected]
    for rec, (_, _, path) in zip(source.records, expected):
        data = source.read_bytes(rec)
        assert data == Path(path).read_bytes(), rec.key
        decoded = decode_image(data)
        assert decoded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(decoded), rgb_array(path), err_msg=rec.key)
        assert source.identity(rec, data)["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def image_files(image_folder) -> list[Path]:
    files = sorted(image_folder.glob("*.png"))
    assert len(files) == 6
    return files


# ------------------------------------------------------------------------------------------ sources
def test_imagefolder_metadata_jsonl(image_folder, image_files):
    source = open_source(str(image_folder))
    captions = jsonl_captions(image_folder)
    expected = [(p.name, captions[p.name], p) for p in image_files]
    assert expected[0][1].startswith("a ") and expected[0][1].endswith(" background")
    assert_records(source, expected)
    assert all(Path(r.ref).resolve() == (image_folder / r.key).resolve() for r in source.records)
    assert source.identity(source.records[0], b"x")["path"] == source.records[0].ref


def test_imagefolder_metadata_csv(tmp_path, image_files):
    folder = tmp_path / "csv_images"
    folder.mkdir()
    expected = []
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for i, p in enumerate(image_files[:4]):
            shutil.copy(p, folder / p.name)
            caption = f'csv caption {i}, with a comma and "quotes"'
            writer.writerow([p.name, caption])
            expected.append((p.name, caption, folder / p.name))
    assert_records(open_source(str(folder)), expected)


def test_kohya_folder_txt_captions(tmp_path):
    from stages.demo import make_images
    folder = make_images(tmp_path / "kohya", count=4, size=(72, 64), captions="txt")
    (folder / "img_001.txt").write_text("  padded caption with newline\n")  # stripped
    (folder / "notes.md").write_text("not an image")  # ignored: not an image extension
    assert not (folder / "metadata.jsonl").exists()
    files = sorted(folder.glob("*.png"))
    expected = [(p.name, p.with_suffix(".txt").read_text().strip(), p) for p in files]
    assert expected[1][1] == "padded caption with newline"
    assert expected[0][1].startswith("a ")
    assert_records(open_source(str(folder)), expected)


def test_a_byte_order_mark_is_not_part_of_captions_or_column_names(tmp_path, image_files):
    """Windows editors and Excel's "CSV UTF-8" start files with U+FEFF: it must not reach a caption or a header."""
    kohya, csv_folder, jsonl_folder = (tmp_path / n for n in ("kohya", "csv", "jsonl"))
    for folder in (kohya, csv_folder, jsonl_folder):
        folder.mkdir()
        shutil.copy(image_files[0], folder / "a.png")
    (kohya / "a.txt").write_bytes("\ufeffa caption".encode("utf-8"))
    (csv_folder / "metadata.csv").write_bytes("\ufefffile_name,text\r\na.png,a caption\r\n".encode("utf-8"))
    (jsonl_folder / "metadata.jsonl").write_bytes('\ufeff{"file_name": "a.png", "text": "a caption"}\n'.encode("utf-8"))
    for folder in (kohya, csv_folder, jsonl_folder):
        assert [(r.key, r.caption) for r in open_source(str(folder)).records] == [("a.png", "a caption")], folder.name


def test_kohya_folder_missing_and_bad_captions(tmp_path):
    from stages.data import check_caption
    folder = tmp_path / "kohya_bad"
    folder.mkdir()
    for name in ("a.png", "b.jpg", "c.png"):
        noise_image(8, 8).save(folder / name)
    (folder / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    (folder / "c.txt").write_text("   ")
    records = open_source(str(folder)).records
    assert [r.key for r in records] == ["a.png", "b.jpg", "c.png"]
    assert [check_caption(r.caption) for r in records] == ["missing caption", "caption is not UTF-8", "empty caption"]
    assert check_caption("ok") is None


def test_save_to_disk_folder(tmp_path, image_files):
    import datasets
    files = image_files[:5]
    captions = [f"disk caption {i}" for i in range(len(files))]
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in files], "text": captions,
                                     "extra": list(range(len(files)))}).cast_column("image", datasets.Image())
    out = tmp_path / "saved"
    ds.save_to_disk(str(out))
    source = open_source(str(out))
    expected = [(f"{i:08d}", c, p) for i, (c, p) in enumerate(zip(captions, files))]
    assert_records(source, expected)
    assert [r.ref for r in source.records] == list(range(len(files)))
    assert source.identity(source.records[2], b"")["index"] == 2


def test_save_to_disk_dataset_dict_split(tmp_path, image_files):
    import datasets
    train = datasets.Dataset.from_dict({"image": [str(image_files[0])], "text": ["train one"]})
    valid = datasets.Dataset.from_dict({"image": [str(image_files[1]), str(image_files[2])],
                                        "text": ["valid one", "valid two"]})
    dd = datasets.DatasetDict({"train": train.cast_column("image", datasets.Image()),
                               "validation": valid.cast_column("image", datasets.Image())})
    out = tmp_path / "saved_dict"
    dd.save_to_disk(str(out))
    source = open_source(str(out), split="validation")
    assert_records(source, [("00000000", "valid one", image_files[1]), ("00000001", "valid two", image_files[2])])
    with pytest.raises(UserError, match="no split 'test'.*train, validation"):
        open_source(str(out), split="test")


def test_hub_dataset_through_mocked_load_dataset(monkeypatch, image_files):
    """A hub id goes to datasets.load_dataset(id, split=...); rows carry embedded bytes as hub parquet does."""
    import datasets
    files = image_files[:3]
    table = datasets.Dataset.from_dict({
        "picture": [{"bytes": p.read_bytes(), "path": p.name} for p in files],
        "prompt": ["hub caption a", "hub caption b", "hub caption c"],
    }).cast_column("picture", datasets.Image())
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return table
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = open_source("someone/tiny-captions", split="validation", image_column="picture", caption_column="prompt")
    assert calls == [(("someone/tiny-captions",), {"split": "validation"})]
    assert source.name == "someone/tiny-captions"
    assert_records(source, [(f"{i:08d}", f"hub caption {c}", p) for i, (c, p) in enumerate(zip("abc", files))])
    assert source.identity(source.records[1], b"")["dataset"] == "someone/tiny-captions"


def test_hub_dataset_load_error_is_user_error(monkeypatch):
    import datasets

    def missing(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub\nmore")
    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(UserError, match=r"cannot load dataset 'nobody/nothing' \(split 'train'\) from the hub, and there is no local folder .*doesn't exist") as e:
        open_source("nobody/nothing")
    assert "\n" not in str(e.value)


def test_missing_columns_named(tmp_path, image_files):
    import datasets
    ds = datasets.Dataset.from_dict({"image": [str(image_files[0])], "text": ["x"]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(UserError) as e:
        open_source(str(tmp_path / "d"), image_column="picture", caption_column="prompt")
    msg = str(e.value)
    assert "'picture'" in msg and "'prompt'" in msg
    assert "columns: image, text" in msg
    with pytest.raises(UserError) as e:
        open_source(str(tmp_path / "d"), caption_column="caption")
    assert "'caption'" in str(e.value) and "'image'" not in str(e.value).split("(")[0]


def test_dataset_path_errors(tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"")
    with pytest.raises(UserError, match="not a file"):
        open_source(str(f))
    with pytest.raises(UserError, match="dataset folder not found"):
        open_source(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("size,expected", [((80, 64), (80, 64)), ((200, 100), (128, 64)), ((64, 80), (64, 80)),
                                           ((100, 300), (64, 192)), ((50, 40), (80, 64)), ((64, 64), (64, 64))])
def test_resize_shorter_side_is_pil_bilinear(size, expected):
    image = noise_image(*size)
    resized = resize_shorter_side(image, RESOLUTION)
    assert resized.size == expected
    np.testing.assert_array_equal(np.asarray(resized), np.asarray(image.resize(expected, Image.BILINEAR)))


def test_to_pixels_range_and_layout():
    image = Image.fromarray(np.array([[[0, 255, 51], [255, 0, 102]]], dtype=np.uint8))  # 1x2 RGB
    px = to_pixels(image)
    assert px.shape == (3, 1, 2) and px.dtype == torch.float32
    expected = torch.tensor([[[-1.0, 1.0]], [[1.0, -1.0]], [[51 / 127.5 - 1, 102 / 127.5 - 1]]])
    assert torch.allclose(px, expected, atol=1e-6)


def test_center_crop_time_ids_80x64():
    image = noise_image(80, 64)
    pre = preprocess(image, RESOLUTION, True, crop_seed="42:x")
    assert pre.time_ids.tolist() == [64, 80, 0, 8, 64, 64]
    assert pre.time_ids.dtype == torch.float32
    assert pre.time_ids_flipped.tolist() == [64, 80, 0, 80 - 64 - 8, 64, 64]
    assert pre.pixels.shape == (3, 64, 64)
    assert torch.equal(pre.pixels, to_pixels(image.crop((8, 0, 72, 64))))


def test_center_crop_uneven_margin_and_flip():
    """81 px wide: the 17 px margin rounds (as diffusers) to left=8, so the mirrored crop starts at 9."""
    image = noise_image(81, 64, seed=3)
    pre = preprocess(image, RESOLUTION, True, crop_seed="s")
    assert pre.time_ids.tolist() == [64, 81, 0, 8, 64, 64]
    assert pre.time_ids_flipped.tolist() == [64, 81, 0, 9, 64, 64]
    mirrored = to_pixels(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((9, 0, 73, 64)))
    assert torch.equal(pre.pixels.flip(-1), mirrored)


def test_center_crop_after_resize_uses_resized_sizes():
    image = noise_image(200, 100, seed=1)  # -> 128x64, crop left 32
    pre = preprocess(image, RESOLUTION, True, crop_seed="s")
    assert pre.time_ids.tolist() == [100, 200, 0, 32, 64, 64]
    assert pre.time_ids_flipped.tolist() == [100, 200, 0, 128 - 64 - 32, 64, 64]
    resized = image.resize((128, 64), Image.BILINEAR)
    assert torch.equal(pre.pixels, to_pixels(resized.crop((32, 0, 96, 64))))
    tall = preprocess(noise_image(100, 300), RESOLUTION, True, crop_seed="s")  # -> 64x192, top 64
    assert tall.time_ids.tolist() == [300, 100, 64, 0, 64, 64]
    assert tall.time_ids_flipped.tolist() == [300, 100, 64, 0, 64, 64]


def test_random_crop_deterministic_per_seed_and_recorded():
    image = noise_image(200, 100, seed=2)  # resized 128x64: left in [0, 64]
    resized = resize_shorter_side(image, RESOLUTION)
    a = preprocess(image, RESOLUTION, False, crop_seed="42:img_000.png")
    b = preprocess(image, RESOLUTION, False, crop_seed="42:img_000.png")
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.time_ids, b.time_ids)
    assert torch.equal(a.time_ids_flipped, b.time_ids_flipped)
    lefts = set()
    for seed in range(12):
        pre = preprocess(image, RESOLUTION, False, crop_seed=f"{seed}:img_000.png")
        top, left = int(pre.time_ids[2]), int(pre.time_ids[3])
        assert top == 0 and 0 <= left <= 64
        assert pre.time_ids[:2].tolist() == [100, 200] and pre.time_ids[4:].tolist() == [64, 64]
        assert int(pre.time_ids_flipped[3]) == 128 - 64 - left
        assert torch.equal(pre.pixels, to_pixels(resized.crop((left, top, left + 64, top + 64))))
        lefts.add(left)
    assert len(lefts) > 1, lefts  # the seed changes the crop


# ----------------------------------------------------------------------------------------- decoding
def test_decode_rgba_composited_on_white():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)      # fully transparent: white
    rgba[0, 1] = (10, 20, 30, 255)    # opaque: unchanged
    rgba[0, 2] = (0, 0, 0, 128)       # half transparent black on white: ~127
    rgba[1, :] = (200, 100, 50, 255)
    out = decode_image(png_bytes(Image.fromarray(rgba, "RGBA")))
    assert out.mode == "RGB" and out.size == (3, 2)
    px = np.asarray(out).astype(int)
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[0, 1].tolist() == [10, 20, 30]
    assert np.abs(px[0, 2] - 127).max() <= 1
    assert (px[1] == [200, 100, 50]).all()


def test_decode_la_composited_on_white():
    la = Image.fromarray(np.array([[[40, 0], [40, 255]]], dtype=np.uint8), "LA")
    px = np.asarray(decode_image(png_bytes(la)))
    assert px.tolist() == [[[255, 255, 255], [40, 40, 40]]]


def test_decode_palette_with_and_without_transparency():
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    for x, index in enumerate((0, 1, 2)):
        pal.putpixel((x, 0), index)
    px = np.asarray(decode_image(png_bytes(pal)))
    assert px.tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]
    px = np.asarray(decode_image(png_bytes(pal, transparency=1)))  # index 1 transparent -> white
    assert px.tolist() == [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]]


def test_decode_grayscale():
    gray = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), "L")
    out = decode_image(png_bytes(gray))
    assert out.mode == "RGB"
    assert np.asarray(out).tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]


def test_decode_exif_orientation_6_rotates():
    """Stored 40x20, left half red / right half blue; orientation 6 = rotate 90 degrees clockwise to show."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buf.getvalue())
    assert out.size == (20, 40)  # width and height swapped
    px = np.asarray(out).astype(int)
    top, bottom = px[:16].reshape(-1, 3).mean(0), px[24:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50, top        # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 50, bottom
    # and the orientation survives into time_ids as the displayed (portrait) size
    assert preprocess(out, 16, True, crop_seed="s").time_ids[:2].tolist() == [40, 20]


def test_decode_16_bit_grayscale():
    a = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    data = png_bytes(Image.fromarray(a))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    assert out.mode == "RGB"
    assert np.asarray(out)[..., 0].tolist() == [[0, 100], [255, 200]]
    assert (np.asarray(out) == np.asarray(out)[..., :1]).all()


def test_decode_rejects_empty_and_non_images():
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"")
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        decode_image(b"this is a text file named photo.jpg\n")
    good = png_bytes(noise_image(64, 64))
    with pytest.raises(OSError, match="truncated"):
        decode_image(good[: len(good) // 2])
