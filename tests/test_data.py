"""Behaviour of the data-reading layer: autotl._images (load_rgb) and autotl.data (scan_dataset)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from autotl._images import IMAGE_EXTENSIONS, UnreadableImageError, check_image, is_image_path, load_rgb
from autotl.data import DatasetIndex, Sample, scan_dataset
from autotl.errors import AutotlError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def rgb_noise(size=(32, 24), seed=0) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_bad_files(folder: Path) -> dict[Path, str]:
    """0-byte, truncated JPEG, truncated PNG, random bytes and text named .jpg -> expected reasons."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {}
    p = folder / "zero.jpg"
    p.write_bytes(b"")
    bad[p] = "0-byte file"
    buf = io.BytesIO()
    rgb_noise((64, 48)).save(buf, "JPEG", quality=90)
    p = folder / "trunc.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad[p] = "truncated image"
    buf = io.BytesIO()
    rgb_noise((64, 48), seed=1).save(buf, "PNG")
    p = folder / "trunc.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad[p] = "truncated image"
    p = folder / "noise.png"
    p.write_bytes(np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes())
    bad[p] = "not an image"
    p = folder / "notes.jpg"
    p.write_text("this is a text file, not a photo\n")
    bad[p] = "not an image"
    return bad


def all_sample_paths(index: DatasetIndex) -> list[Path]:
    return [s.path for s in index.train + index.val + index.test]


def rel(paths, root) -> set[str]:
    return {Path(p).relative_to(root).as_posix() for p in paths}


def assert_user_error(excinfo, *must_contain: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for part in must_contain:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


# =========================================================================== _images


def test_images_module_does_not_import_torch():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_images', {str(REPO / 'autotl' / '_images.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("name", ["a.jpg", "a.JPG", "b.JpEg", "c.png", "d.PNG", "e.bmp", "f.webp", "g.tif", "h.TIFF"])
def test_image_extensions_case_insensitive(name):
    assert is_image_path(name) and is_image_path(Path("x") / name)


@pytest.mark.parametrize("name", ["a.txt", ".DS_Store", "b.gif", "c.jpg.txt", "jpg", "d.json"])
def test_non_image_extensions(name):
    assert not is_image_path(name)


def test_extension_set():
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@pytest.mark.parametrize(
    "mode,fmt",
    [("RGB", "JPEG"), ("RGB", "PNG"), ("RGB", "BMP"), ("RGB", "WEBP"), ("RGB", "TIFF"), ("L", "JPEG"),
     ("L", "PNG"), ("1", "PNG"), ("P", "PNG"), ("P", "BMP"), ("LA", "PNG"), ("RGBA", "PNG"), ("RGBA", "WEBP"),
     ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF")],
)
def test_load_rgb_every_mode_gives_loaded_rgb(tmp_path, mode, fmt):
    base = rgb_noise((30, 20))
    if mode in ("I;16", "I", "F"):
        arr = np.random.default_rng(0).integers(0, 65536, (20, 30))
        img = Image.fromarray(arr.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        assert img.mode == mode
    else:
        img = base.convert(mode)
    p = save(img, tmp_path / f"x.{fmt.lower()}", format=fmt)
    out = load_rgb(p)
    assert out.mode == "RGB" and out.size == (30, 20)
    p.unlink()  # fully loaded: pixels available after the file is gone
    assert np.asarray(out).shape == (20, 30, 3)


def test_greyscale_pixel_values(tmp_path):
    p = save(Image.new("L", (5, 4), 77), tmp_path / "g.png")
    assert load_rgb(p).getpixel((2, 2)) == (77, 77, 77)
    bw = Image.new("1", (5, 4), 0)
    bw.putpixel((1, 1), 1)
    p = save(bw, tmp_path / "b.png")
    out = load_rgb(p)
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 0)


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # transparent red: white, not red
    img.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red: pink
    img.putpixel((2, 0), (0, 0, 255, 255))  # opaque blue stays blue
    out = load_rgb(save(img, tmp_path / "a.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = out.getpixel((1, 0))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    assert out.getpixel((2, 0)) == (0, 0, 255)


def test_la_and_palette_transparency_composited_on_white(tmp_path):
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    out = load_rgb(save(la, tmp_path / "la.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)

    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    pal.putpixel((1, 0), 1)
    p = save(pal, tmp_path / "p.png", transparency=0)  # index 0 (black) is transparent
    assert Image.open(p).mode == "P" and "transparency" in Image.open(p).info
    out = load_rgb(p)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 200, 30)

    grey_key = Image.new("L", (2, 1), 5)
    grey_key.putpixel((1, 0), 90)
    out = load_rgb(save(grey_key, tmp_path / "l_trns.png", transparency=5))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (90, 90, 90)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_scaled_not_clipped(tmp_path, fmt):
    arr = np.array([[0, 257, 32896, 65535, 1000]], dtype=np.uint16)
    p = save(Image.fromarray(arr), tmp_path / f"g16.{fmt.lower()}", format=fmt)
    assert Image.open(p).mode.startswith("I;16")
    out = np.asarray(load_rgb(p))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255, 4]  # round(v / 257); clipping would give 255s
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_cmyk_converted(tmp_path):
    img = Image.new("CMYK", (4, 2), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 0))  # cyan
    img.putpixel((2, 0), (0, 0, 0, 255))  # black
    out = load_rgb(save(img, tmp_path / "c.tif"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 255, 255)
    assert out.getpixel((2, 0)) == (0, 0, 0)
    jpg = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)  # red
    assert Image.open(jpg).mode == "CMYK"
    r, g, b = load_rgb(jpg).getpixel((8, 8))
    assert r > 230 and g < 25 and b < 25


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # red marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    p = save(img, tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_rgb(p)
    assert out.size == (20, 40)  # width and height swapped
    r, g, b = out.getpixel((16, 3))  # the marker is now in the top-right corner
    assert r > 200 and b < 60
    r, g, b = out.getpixel((3, 3))
    assert b > 200 and r < 60


def test_bad_exif_does_not_make_image_unreadable(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 99  # nonsense orientation
    out = load_rgb(save(rgb_noise(), tmp_path / "e.jpg", exif=exif))
    assert out.size == (32, 24)


def test_unreadable_files_raise_with_reason(tmp_path):
    for path, reason in write_bad_files(tmp_path).items():
        with pytest.raises(UnreadableImageError) as ei:
            load_rgb(path)
        assert ei.value.path == path and ei.value.reason == reason, (path, ei.value.reason)
        assert str(path) in str(ei.value)
        with pytest.raises(UnreadableImageError):
            check_image(path)
    with pytest.raises(UnreadableImageError) as ei:
        load_rgb(tmp_path / "missing.jpg")
    assert ei.value.reason == "file not found"
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(UnreadableImageError) as ei:
        load_rgb(tmp_path / "dir.jpg")
    assert ei.value.reason == "not a file"
    assert issubclass(UnreadableImageError, Exception)


def test_truncated_jpeg_detected_even_with_draft(tmp_path):
    buf = io.BytesIO()
    rgb_noise((400, 300)).save(buf, "JPEG", quality=90)
    p = tmp_path / "t.jpg"
    p.write_bytes(buf.getvalue()[: int(len(buf.getvalue()) * 0.8)])
    with pytest.raises(UnreadableImageError) as ei:
        load_rgb(p, draft_size=(32, 32))
    assert ei.value.reason == "truncated image"
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_draft_size_keeps_at_least_requested_size(tmp_path):
    p = save(rgb_noise((400, 300)), tmp_path / "big.jpg")
    out = load_rgb(p, draft_size=(100, 100))
    assert out.mode == "RGB" and 100 <= out.size[0] < 400 and 100 <= out.size[1] < 300


def test_decompression_bomb_is_unreadable(tmp_path, monkeypatch):
    p = save(rgb_noise((48, 40)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UnreadableImageError) as ei:
        load_rgb(p)
    assert ei.value.reason.startswith("image too large")


def test_unreadable_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(UnreadableImageError("/x/a.jpg", "0-byte file")))
    assert e.path == Path("/x/a.jpg") and e.reason == "0-byte file"


# =========================================================================== scan_dataset: basics


def test_class_per_folder_scan(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"dog": 20, "cat": 12, "bird": 3})
    idx = scan_dataset(root)
    assert idx.classes == ["bird", "cat", "dog"]  # sorted, labels follow
    assert idx.root == root and idx.split == "stratified 10% val, seed 0"
    assert idx.counts() == {
        "bird": {"train": 2, "val": 1, "test": 0},  # max(1, round(0.3))
        "cat": {"train": 11, "val": 1, "test": 0},
        "dog": {"train": 18, "val": 2, "test": 0},
    }
    for s in idx.train + idx.val:
        assert isinstance(s, Sample) and s.path.is_absolute()
        assert s.path.parent.name == idx.classes[s.label]
    assert idx.test == [] and idx.skipped == []
    assert {c for s in idx.val for c in [s.label]} == {0, 1, 2}  # every class has a val image


def test_split_deterministic_no_overlap_nothing_lost(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"a": 20, "b": 15, "c": 2}, size=(8, 8))
    bad = write_bad_files(root / "b")
    a, b = scan_dataset(root, val_fraction=0.25, seed=3), scan_dataset(root, val_fraction=0.25, seed=3)
    assert a.train == b.train and a.val == b.val and a.skipped == b.skipped
    tr, va = {s.path for s in a.train}, {s.path for s in a.val}
    assert not tr & va
    all_files = {p for p in root.rglob("*") if p.is_file()}
    assert tr | va | {p for p, _ in a.skipped} == all_files
    assert len(a.train) + len(a.val) + len(a.skipped) == len(all_files)
    assert dict(a.skipped) == bad
    assert {s.label for s in a.val} == {0, 1, 2}
    assert a.counts()["a"]["val"] == 5 and a.counts()["c"] == {"train": 1, "val": 1, "test": 0}
    c = scan_dataset(root, val_fraction=0.25, seed=4)
    assert {s.path for s in c.val} != va  # the seed matters
    assert c.split == "stratified 25% val, seed 4"


def test_split_independent_of_listing_order_and_location(tmp_path, make_image_folder, monkeypatch):
    root = make_image_folder(tmp_path / "d", classes={"a": 30, "b": 30}, size=(8, 8))
    (root / "a" / "sub").mkdir()
    for i in range(5):
        shutil.copy(root / "a" / f"a_{i:03d}.png", root / "a" / "sub" / f"x{i}.png")
    ref = scan_dataset(root, seed=1)
    copy = tmp_path / "elsewhere"
    shutil.copytree(root, copy)

    real_scandir = os.scandir
    rng = np.random.default_rng(0)

    class Shuffled:
        def __init__(self, path):
            with real_scandir(path) as it:
                self.entries = list(it)
            rng.shuffle(self.entries)

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(os, "scandir", Shuffled)
    shuffled = scan_dataset(copy, seed=1)
    assert rel([s.path for s in shuffled.val], copy) == rel([s.path for s in ref.val], root)
    assert rel([s.path for s in shuffled.train], copy) == rel([s.path for s in ref.train], root)
    assert [s.label for s in shuffled.train] == [s.label for s in ref.train]


def test_adding_a_class_does_not_reshuffle_others(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"a": 30, "b": 30}, size=(8, 8))
    before = {s.path for s in scan_dataset(root).val}
    make_image_folder(tmp_path / "d", classes={"c": 10}, size=(8, 8))
    after = scan_dataset(root)
    assert {s.path for s in after.val if s.path.parent.name != "c"} == before


def test_skipped_files_listed_with_reasons(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 6, "dog": 6}, size=(8, 8))
    bad = write_bad_files(root / "dog")
    idx = scan_dataset(root)
    assert dict(idx.skipped) == bad
    assert all(isinstance(p, Path) and r for p, r in idx.skipped)
    assert not set(all_sample_paths(idx)) & set(bad)
    assert idx.counts()["dog"]["train"] + idx.counts()["dog"]["val"] == 6


def test_many_files_checked_in_parallel(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"a": 40, "b": 40}, size=(6, 6))
    bad = write_bad_files(root / "a")
    idx = scan_dataset(root)
    assert dict(idx.skipped) == bad and len(idx.train) + len(idx.val) == 80


def test_verify_false_skips_decoding_but_not_cheap_checks(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 4, "dog": 4}, size=(8, 8))
    bad = write_bad_files(root / "dog")
    idx = scan_dataset(root, verify=False)
    assert dict(idx.skipped) == {root / "dog" / "zero.jpg": "0-byte file"}
    assert set(bad) - {root / "dog" / "zero.jpg"} <= set(all_sample_paths(idx))


def test_hidden_junk_non_images_ignored_nested_and_uppercase_included(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 3, "dog": 3}, size=(8, 8))
    img = rgb_noise((8, 8))
    save(img, root / "cat" / "UPPER.JPG")
    save(img, root / "cat" / "Mixed.Png")
    save(img, root / "cat" / "deep" / "deeper" / "nested.png")
    save(img, root / "cat" / ".hidden.png")
    (root / "cat" / "._AppleDouble.jpg").write_bytes(b"\x00\x05\x16\x07 not an image")
    save(img, root / "cat" / ".thumbs" / "t.png")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "cat" / "notes.txt").write_text("labels by Bob")
    (root / "cat" / "meta.json").write_text("{}")
    save(img, root / ".cache" / "x.png")  # hidden folder at the top is not a class
    save(img, root / "__MACOSX" / "cat" / "y.png")
    (root / "README.md").write_text("my data")
    idx = scan_dataset(root)
    assert idx.classes == ["cat", "dog"] and idx.skipped == []
    assert rel(all_sample_paths(idx), root) == {
        *(f"cat/cat_{i:03d}.png" for i in range(3)),
        *(f"dog/dog_{i:03d}.png" for i in range(3)),
        "cat/UPPER.JPG",
        "cat/Mixed.Png",
        "cat/deep/deeper/nested.png",
    }


def test_loose_images_at_root_listed_as_skipped(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 3, "dog": 3}, size=(8, 8))
    save(rgb_noise(), root / "stray.jpg")
    idx = scan_dataset(root)
    assert idx.skipped == [(root / "stray.jpg", "not inside a class folder")]


def test_same_file_name_in_two_classes_is_fine(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(2):
            save(rgb_noise(seed=i + (cls == "dog") * 10), tmp_path / cls / f"img{i}.png")
    idx = scan_dataset(tmp_path)
    assert len(all_sample_paths(idx)) == 4


def test_symlinked_folder_inside_class_followed_once(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 3, "dog": 3}, size=(8, 8))
    extra = tmp_path / "extra_cats"
    for i in range(2):
        save(rgb_noise(seed=i), extra / f"e{i}.png")
    (root / "cat" / "more").symlink_to(extra, target_is_directory=True)
    (extra / "loop").symlink_to(extra, target_is_directory=True)  # a loop must not hang the scan
    idx = scan_dataset(root)
    assert idx.counts()["cat"]["train"] + idx.counts()["cat"]["val"] == 5


# =========================================================================== fingerprint / json / table


def test_fingerprint_stable_and_sensitive(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 5, "dog": 5}, size=(8, 8))
    fp = scan_dataset(root).fingerprint()
    assert len(fp) == 64 and fp == scan_dataset(root).fingerprint()

    moved = tmp_path / "moved"
    shutil.copytree(root, moved)  # copy2 keeps mtimes: same data, different place
    assert scan_dataset(moved).fingerprint() == fp

    assert scan_dataset(root, seed=1).fingerprint() != fp  # different split

    f = root / "cat" / "cat_000.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched
    fp_touched = scan_dataset(root).fingerprint()
    assert fp_touched != fp

    save(rgb_noise((9, 9)), f)  # modified content
    fp_modified = scan_dataset(root).fingerprint()
    assert fp_modified not in (fp, fp_touched)

    save(rgb_noise((8, 8)), root / "dog" / "new.png")  # added
    fp_added = scan_dataset(root).fingerprint()
    assert fp_added not in (fp, fp_touched, fp_modified)

    (root / "dog" / "bad.jpg").write_bytes(b"")  # even a skipped file counts
    assert scan_dataset(root).fingerprint() != fp_added


def test_fingerprint_changes_when_a_file_moves_class(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(3):
            save(rgb_noise(seed=i), tmp_path / "d" / cls / f"{cls}{i}.png")
    fp = scan_dataset(tmp_path / "d").fingerprint()
    os.replace(tmp_path / "d" / "cat" / "cat0.png", tmp_path / "d" / "dog" / "cat0.png")
    save(rgb_noise(seed=7), tmp_path / "d" / "cat" / "cat9.png")
    assert scan_dataset(tmp_path / "d").fingerprint() != fp


def test_to_json_and_summary_table(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 6, "dog": 8}, size=(8, 8))
    (root / "dog" / "empty.jpg").write_bytes(b"")
    idx = scan_dataset(root)
    doc = json.loads(json.dumps(idx.to_json()))
    assert doc["root"] == str(root) and doc["classes"] == ["cat", "dog"]
    assert doc["split"] == "stratified 10% val, seed 0"
    assert (doc["n_train"], doc["n_val"], doc["n_test"]) == (12, 2, 0)
    assert doc["counts"]["dog"] == {"train": 7, "val": 1, "test": 0}
    assert doc["skipped"] == [{"path": str(root / "dog" / "empty.jpg"), "reason": "0-byte file"}]
    assert doc["fingerprint"] == idx.fingerprint()

    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(idx.summary_table())
    text = console.file.getvalue()
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]]
             for line in text.splitlines() if line.count("│") >= 5}
    assert lines["cat"] == ["5", "1", "0"] and lines["dog"] == ["7", "1", "0"]
    assert lines["total"] == ["12", "2", "0"]
    assert "1 unreadable file skipped" in text


# =========================================================================== split layout


def test_class_named_train_is_a_class(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"bus": 3, "car": 3, "train": 3}, size=(8, 8))
    idx = scan_dataset(root)
    assert idx.classes == ["bus", "car", "train"] and len(idx.train) + len(idx.val) == 9


def test_split_layout_train_without_class_folders(tmp_path):
    for split in ("train", "val"):
        for i in range(2):
            save(rgb_noise(seed=i), tmp_path / split / f"{i}.png")
    with pytest.raises(AutotlError) as ei:
        scan_dataset(tmp_path)
    assert_user_error(ei, str(tmp_path / "train"), "no class folders")



def test_split_layout_honoured(tmp_path, make_image_folder):
    root = make_image_folder(
        tmp_path / "d", classes={"cat": (5, 2, 3), "dog": (6, 3, 0)}, splits=("train", "val", "test"), size=(8, 8)
    )
    idx = scan_dataset(root, val_fraction=0.5)  # val_fraction is irrelevant: val/ exists
    assert idx.split == "folders" and idx.classes == ["cat", "dog"]
    assert idx.counts() == {"cat": {"train": 5, "val": 2, "test": 3}, "dog": {"train": 6, "val": 3, "test": 0}}
    for split in ("train", "val", "test"):
        for s in idx.samples(split):
            assert s.path.parent.parent.name == split and s.path.parent.name == idx.classes[s.label]


def test_split_layout_test_optional(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": (4, 2), "dog": (4, 2)}, splits=("train", "val"), size=(8, 8))
    idx = scan_dataset(root)
    assert idx.test == [] and len(idx.train) == 8 and len(idx.val) == 4 and idx.split == "folders"


def test_split_layout_without_val_is_split_from_train(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": (10, 2), "dog": (10, 2)}, splits=("train", "test"), size=(8, 8))
    idx = scan_dataset(root, val_fraction=0.2, seed=5)
    assert idx.split == "stratified 20% val, seed 5"
    assert idx.counts() == {"cat": {"train": 8, "val": 2, "test": 2}, "dog": {"train": 8, "val": 2, "test": 2}}
    assert all(s.path.parent.parent.name == "train" for s in idx.train + idx.val)
    assert all(s.path.parent.parent.name == "test" for s in idx.test)


def test_split_layout_accepts_valid_folder_name(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": (3, 1), "dog": (3, 1)}, splits=("train", "valid"), size=(8, 8))
    idx = scan_dataset(root)
    assert idx.split == "folders" and len(idx.val) == 2


def test_split_layout_skips_bad_files_in_every_split(tmp_path, make_image_folder):
    root = make_image_folder(
        tmp_path / "d", classes={"cat": (3, 1, 1), "dog": (3, 1, 1)}, splits=("train", "val", "test"), size=(8, 8)
    )
    (root / "val" / "cat" / "z.jpg").write_bytes(b"")
    (root / "test" / "dog" / "z.png").write_text("nope")
    save(rgb_noise(), root / "train" / "loose.png")
    idx = scan_dataset(root)
    assert dict(idx.skipped) == {
        root / "val" / "cat" / "z.jpg": "0-byte file",
        root / "test" / "dog" / "z.png": "not an image",
        root / "train" / "loose.png": "not inside a class folder",
    }


# =========================================================================== errors


def test_error_root_missing(tmp_path):
    with pytest.raises(AutotlError) as ei:
        scan_dataset(tmp_path / "nope")
    assert_user_error(ei, str(tmp_path / "nope"), "does not exist")


def test_error_root_is_a_file(tmp_path):
    f = save(rgb_noise(), tmp_path / "one.jpg")
    with pytest.raises(AutotlError) as ei:
        scan_dataset(f)
    assert_user_error(ei, str(f), "not a folder")


@pytest.mark.parametrize("with_loose_files", [False, True])
def test_error_no_class_folders(tmp_path, with_loose_files):
    if with_loose_files:
        save(rgb_noise(), tmp_path / "a.jpg")
        (tmp_path / "notes.txt").write_text("x")
        (tmp_path / ".hidden").mkdir()
    with pytest.raises(AutotlError) as ei:
        scan_dataset(tmp_path)
    assert_user_error(ei, str(tmp_path), "no class folders")


def test_error_only_one_class(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 5}, size=(8, 8))
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root), "needs at least two classes", "cat")


def test_error_class_with_only_unreadable_images(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 5, "dog": 5}, size=(8, 8))
    (root / "emu").mkdir()
    (root / "emu" / "a.jpg").write_bytes(b"")
    (root / "emu" / "b.png").write_text("x")
    (root / "emu" / "c.jpg").write_text("y")
    (root / "emu" / "readme.txt").write_text("not counted")
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, f"{root / 'emu'}: class folder has no readable images (3 skipped)", "add images or remove")


def test_error_empty_class_folder(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 5, "dog": 5}, size=(8, 8))
    (root / "zebra").mkdir()
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root / "zebra"), "no readable images (0 skipped)")


def test_error_class_too_small_to_split(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 5, "dog": 1}, size=(8, 8))
    (root / "dog" / "broken.jpg").write_bytes(b"")
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root / "dog"), "only 1 readable image", "at least 2")


def test_single_image_class_fine_when_val_folder_given(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": (1, 1), "dog": (3, 1)}, splits=("train", "val"), size=(8, 8))
    assert scan_dataset(root).counts()["cat"] == {"train": 1, "val": 1, "test": 0}


def test_error_val_has_class_train_lacks(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": (3, 1), "dog": (3, 1), "emu": (0, 1)}, splits=("train", "val"), size=(8, 8))
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root / "val" / "emu"), "'emu'", "not in train/")


def test_error_test_has_class_train_lacks(tmp_path, make_image_folder):
    root = make_image_folder(
        tmp_path / "d", classes={"cat": (3, 1, 1), "dog": (3, 1, 1), "emu": (0, 0, 1)}, splits=("train", "val", "test"), size=(8, 8)
    )
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root / "test" / "emu"), "'emu'")


def test_error_train_class_missing_from_val(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": (3, 1), "dog": (3, 0)}, splits=("train", "val"), size=(8, 8))
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root / "val" / "dog"), "'dog'", "missing from val/")


def test_error_val_class_folder_unreadable(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": (3, 1), "dog": (3, 0)}, splits=("train", "val"), size=(8, 8))
    (root / "val" / "dog").mkdir()
    (root / "val" / "dog" / "x.jpg").write_bytes(b"")
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root / "val" / "dog"), "no readable images (1 skipped)")


def test_missing_test_class_is_fine(tmp_path, make_image_folder):
    root = make_image_folder(
        tmp_path / "d", classes={"cat": (3, 1, 1), "dog": (3, 1, 0)}, splits=("train", "val", "test"), size=(8, 8)
    )
    assert scan_dataset(root).counts()["dog"]["test"] == 0


def test_error_same_file_through_symlink_in_two_classes(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 3, "dog": 3}, size=(8, 8))
    (root / "dog" / "sneaky.png").symlink_to(root / "cat" / "cat_001.png")
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root / "dog" / "sneaky.png"), str(root / "cat" / "cat_001.png"), "same file")


def test_error_same_file_through_hard_link(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": 3, "dog": 3}, size=(8, 8))
    os.link(root / "cat" / "cat_002.png", root / "dog" / "copy.png")
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root / "dog" / "copy.png"), str(root / "cat" / "cat_002.png"), "same file")


def test_error_same_file_in_train_and_val(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": (3, 0), "dog": (3, 1)}, splits=("train", "val"), size=(8, 8))
    (root / "val" / "cat").symlink_to(root / "train" / "cat", target_is_directory=True)
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root / "val" / "cat"), str(root / "train" / "cat"), "same file")


def test_error_val_without_train(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"cat": (3, 1), "dog": (3, 1)}, splits=("training", "val"), size=(8, 8))
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root), "no train/")


def test_error_two_validation_folders(tmp_path, make_image_folder):
    root = make_image_folder(
        tmp_path / "d", classes={"cat": (3, 1, 1), "dog": (3, 1, 1)}, splits=("train", "val", "valid"), size=(8, 8)
    )
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root), "val/ and valid/")


def test_error_unused_image_folder_next_to_train(tmp_path, make_image_folder):
    root = make_image_folder(
        tmp_path / "d", classes={"cat": (3, 1, 1), "dog": (3, 1, 1)}, splits=("train", "val", "extra"), size=(8, 8)
    )
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert_user_error(ei, str(root / "extra"), "not used")


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_error_bad_val_fraction(tmp_path, make_image_folder, bad):
    root = make_image_folder(tmp_path / "d", classes={"cat": 3, "dog": 3}, size=(8, 8))
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root, val_fraction=bad)
    assert_user_error(ei, "--val-fraction", "between 0 and 1")


def test_scan_does_not_spam_stdout(tmp_path, make_image_folder, capsys):
    root = make_image_folder(tmp_path / "d", classes={"cat": 3, "dog": 3}, size=(8, 8))
    (root / "cat" / "z.jpg").write_bytes(b"")
    scan_dataset(root)
    assert capsys.readouterr().out == ""  # stdout is reserved for --json
