"""Duplicate images across and within splits, and unsupported image formats."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

import autotl._console as console_mod
from autotl.data import UNSUPPORTED_IMAGE_EXTENSIONS, scan_dataset
from autotl.duplicates import NEAR_DUPLICATE_BITS, dhash, near_pairs, popcount
from autotl.errors import AutotlError

from conftest import SHARED_DATA


def photo(seed: int, size=(160, 120)) -> Image.Image:
    """A smooth 'photo': a random low-resolution colour field upsampled, plus a bright disc."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    a = np.asarray(low, dtype=np.float32)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.1, 0.25) * h
    a[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = 250.0
    return Image.fromarray(np.clip(a + rng.normal(0, 4, a.shape), 0, 255).astype(np.uint8))


def write(root: Path, rel: str, seed: int, **kw) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(seed).save(path, **kw)
    return path


def split_layout(root: Path, n: int = 4) -> Path:
    """train/ and val/ with cat and dog, every image distinct."""
    for split, base in (("train", 0), ("val", 100)):
        for ci, c in enumerate(("cat", "dog")):
            for i in range(n):
                write(root, f"{split}/{c}/{c}{i}.png", base + 10 * ci + i)
    return root


def exact(index):
    return [d for d in index.duplicates if d.kind == "exact"]


def near(index):
    return [d for d in index.duplicates if d.kind == "near"]


@pytest.fixture
def logged(monkeypatch):
    """What autotl._console.log prints, as plain text."""
    buf = io.StringIO()
    monkeypatch.setattr(console_mod, "console", type(console_mod.console)(file=buf, width=300, color_system=None))
    monkeypatch.setattr(console_mod, "_state", {"quiet": False})
    return buf


# --------------------------------------------------------------------------- exact copies across splits


def test_identical_image_in_train_and_val_is_listed(tmp_path, logged):
    root = split_layout(tmp_path / "d")
    shutil.copy(root / "train/cat/cat1.png", root / "val/cat/leak.png")
    idx = scan_dataset(root)
    [d] = exact(idx)
    assert (d.path, d.original) == (root / "val/cat/leak.png", root / "train/cat/cat1.png")
    assert (d.split, d.original_split, d.label, d.issue, d.action) == ("val", "train", "cat", "leak", "kept")
    assert root / "val/cat/leak.png" in {s.path for s in idx.val}  # warn keeps it
    doc = json.loads(json.dumps(idx.to_json()))
    assert doc["n_duplicates"] == {"exact": 1, "leaks": 1, "dropped": 0, "near": 0}
    assert doc["duplicates"] == [{
        "kind": "exact", "issue": "leak", "action": "kept", "path": str(root / "val/cat/leak.png"),
        "split": "val", "class": "cat", "original": str(root / "train/cat/cat1.png"), "original_split": "train",
        "original_class": "cat", "distance": 0,
    }]
    text = logged.getvalue()
    assert "1 byte-identical copy" in text and "val/cat/leak.png (val, cat) = train/cat/cat1.png (train, cat)" in text
    assert "--duplicates drop" in text
    table = Console(file=io.StringIO(), width=200, color_system=None)
    table.print(idx.summary_table())
    assert "1 byte-identical copy (1 across splits)" in table.file.getvalue()


def test_drop_removes_val_and_test_copies_and_keeps_the_train_copy(tmp_path, logged):
    root = split_layout(tmp_path / "d")
    write(root, "test/dog/t0.png", 500)
    (root / "test/cat").mkdir()
    shutil.copy(root / "train/dog/dog2.png", root / "val/dog/copy.png")
    shutil.copy(root / "train/dog/dog2.png", root / "test/dog/copy.png")
    shutil.copy(root / "val/cat/cat0.png", root / "test/cat/from_val.png")  # val vs test: the test copy goes
    warned = scan_dataset(root)
    idx = scan_dataset(root, duplicates="drop")
    assert {(d.path.relative_to(root).as_posix(), d.original.relative_to(root).as_posix(), d.action) for d in exact(idx)} == {
        ("val/dog/copy.png", "train/dog/dog2.png", "dropped"),
        ("test/dog/copy.png", "train/dog/dog2.png", "dropped"),
        ("test/cat/from_val.png", "val/cat/cat0.png", "dropped"),
    }
    kept = {s.path for split in ("train", "val", "test") for s in idx.samples(split)}
    assert root / "train/dog/dog2.png" in kept and root / "val/cat/cat0.png" in kept
    assert not {root / "val/dog/copy.png", root / "test/dog/copy.png", root / "test/cat/from_val.png"} & kept
    assert (len(idx.val), len(idx.test)) == (len(warned.val) - 1, len(warned.test) - 2)
    assert idx.to_json()["n_duplicates"] == {"exact": 3, "leaks": 3, "dropped": 3, "near": 0}
    assert idx.fingerprint() != warned.fingerprint()
    assert idx.fingerprint() == scan_dataset(root, duplicates="drop").fingerprint()
    assert "3 dropped" in logged.getvalue() and "copy.png (val, dog) = train/dog/dog2.png (train, dog): dropped" in logged.getvalue()


def test_drop_that_empties_a_val_class_says_why(tmp_path):
    root = split_layout(tmp_path / "d", n=2)
    for f in (root / "val/cat").iterdir():
        f.unlink()
    shutil.copy(root / "train/cat/cat0.png", root / "val/cat/copy.png")
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root, duplicates="drop")
    assert "1 dropped as byte-identical copies" in str(ei.value) and str(root / "val/cat") in str(ei.value)


def test_error_mode_refuses_naming_both_files(tmp_path):
    root = split_layout(tmp_path / "d")
    shutil.copy(root / "train/cat/cat1.png", root / "val/dog/leak.png")
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root, duplicates="error")
    msg = str(ei.value)
    assert "\n" not in msg and str(root / "val/dog/leak.png") in msg and str(root / "train/cat/cat1.png") in msg
    assert "byte-identical" in msg and "--duplicates drop" in msg
    scan_dataset(split_layout(tmp_path / "clean"), duplicates="error")  # clean data passes


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(AutotlError, match="--duplicates"):
        scan_dataset(split_layout(tmp_path / "d"), duplicates="delete")


def test_copies_within_a_split_and_label_conflicts(tmp_path):
    root = tmp_path / "d"
    for c, base in (("cat", 0), ("dog", 100)):
        for i in range(6):
            write(root, f"{c}/{c}{i}.png", base + i)
    shutil.copy(root / "cat/cat0.png", root / "cat/cat0_again.png")  # a redundant copy
    shutil.copy(root / "cat/cat1.png", root / "dog/which.png")  # a label conflict
    idx = scan_dataset(root)
    issues = {d.path.name: (d.issue, d.action) for d in exact(idx)}
    assert issues == {"cat0_again.png": ("copy", "kept"), "which.png": ("conflict", "kept")}
    assert {d.original.name for d in exact(idx)} == {"cat0.png", "cat1.png"}
    dropped = scan_dataset(root, duplicates="drop")
    issues = {d.path.name: (d.issue, d.action) for d in exact(dropped)}
    assert issues == {"cat0_again.png": ("copy", "dropped"), "which.png": ("conflict", "kept")}  # which label is right?
    paths = {s.path for s in dropped.train + dropped.val}
    assert root / "cat/cat0.png" in paths and root / "cat/cat0_again.png" not in paths and root / "dog/which.png" in paths
    assert idx.duplicate_groups() == sorted([sorted([root / "cat/cat0_again.png", root / "cat/cat0.png"], key=str),
                                             sorted([root / "cat/cat1.png", root / "dog/which.png"], key=str)],
                                            key=lambda g: str(g[0]))


def test_made_split_keeps_identical_files_on_one_side(tmp_path):
    root = tmp_path / "d"
    for c, base in (("cat", 0), ("dog", 100)):
        for i in range(10):
            p = write(root, f"{c}/{c}{i}.png", base + i)
            shutil.copy(p, root / c / f"{c}{i}_copy.png")
            if i < 3:  # three copies, one in a sub-folder
                (root / c / "nested").mkdir(exist_ok=True)
                shutil.copy(p, root / c / "nested" / f"{c}{i}_third.png")
    for seed in range(8):
        idx = scan_dataset(root, seed=seed, val_fraction=0.2)
        side = {s.path: split for split in ("train", "val") for s in idx.samples(split)}
        assert len(side) == 46
        for c in ("cat", "dog"):
            for i in range(10):
                copies = [root / c / f"{c}{i}.png", root / c / f"{c}{i}_copy.png"]
                copies += [root / c / "nested" / f"{c}{i}_third.png"] if i < 3 else []
                assert len({side[p] for p in copies}) == 1, (seed, copies)
        assert all(d.issue == "copy" and d.split == d.original_split for d in exact(idx))
        assert idx.counts()["cat"]["val"] in (4, 5, 6) and len(idx.val) >= 4  # 2 of 10 distinct images per class
    assert len({frozenset(s.path for s in scan_dataset(root, seed=k).val) for k in range(4)}) > 1


def test_made_split_unchanged_without_duplicates(tmp_path, make_image_folder):
    """The grouping draws exactly as before when every file is distinct (one unit per file)."""
    import zlib

    root = make_image_folder(tmp_path / "d", classes={"a": 17, "b": 9}, size=(8, 8))
    idx = scan_dataset(root, seed=3, val_fraction=0.3)
    assert idx.duplicates == []
    for c in ("a", "b"):
        files = sorted((root / c).iterdir())
        n = len(files)
        k = min(n - 1, max(1, int(np.floor(0.3 * n + 0.5))))
        rng = np.random.default_rng([3, zlib.crc32(c.encode())])
        expected = {files[i] for i in rng.permutation(n)[:k]}
        assert {s.path for s in idx.val if s.path.parent.name == c} == expected


def test_class_of_copies_of_one_image_is_split_with_a_warning_or_refused_with_drop(tmp_path):
    root = tmp_path / "d"
    write(root, "cat/a.png", 1)
    shutil.copy(root / "cat/a.png", root / "cat/b.png")
    for i in range(3):
        write(root, f"dog/{i}.png", 10 + i)
    idx = scan_dataset(root)  # warn never refuses the data: the copy lands in val and is listed as a leak
    [d] = exact(idx)
    assert {d.split, d.original_split} == {"train", "val"} and d.issue == "leak"
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root, duplicates="drop")
    assert "only 1 readable image (1 more dropped as byte-identical copies)" in str(ei.value)


def test_exact_copies_found_without_verify(tmp_path):
    root = split_layout(tmp_path / "d")
    shutil.copy(root / "train/cat/cat1.png", root / "val/cat/leak.png")
    idx = scan_dataset(root, verify=False)
    assert [d.path for d in idx.duplicates] == [root / "val/cat/leak.png"]


# --------------------------------------------------------------------------- near-duplicates


def test_reencoded_or_resized_copy_is_a_near_duplicate_a_different_image_is_not(tmp_path):
    root = split_layout(tmp_path / "d")
    src = photo(3)  # train/cat/cat3.png
    src.save(root / "val/cat/reencoded.jpg", quality=60)
    src.resize((144, 108), Image.Resampling.LANCZOS).save(root / "val/dog/smaller.jpg", quality=85)
    photo(777).save(root / "val/cat/other.jpg", quality=60)
    idx = scan_dataset(root, duplicates="error")  # near-duplicates never raise
    pairs = {(d.path.name, d.original.relative_to(root).as_posix()): d for d in near(idx)}
    assert set(pairs) == {("reencoded.jpg", "train/cat/cat3.png"), ("smaller.jpg", "train/cat/cat3.png"),
                          ("smaller.jpg", "val/cat/reencoded.jpg")}  # other.jpg is in no pair
    d = pairs[("reencoded.jpg", "train/cat/cat3.png")]
    assert d.action == "kept" and d.issue == "leak" and d.distance <= NEAR_DUPLICATE_BITS
    assert pairs[("smaller.jpg", "train/cat/cat3.png")].label == "dog"
    assert exact(idx) == [] and idx.to_json()["n_duplicates"]["near"] == 3
    assert scan_dataset(root, verify=False).duplicates == []  # the perceptual hash needs the decode


def test_exact_copy_is_not_also_listed_as_near(tmp_path):
    root = split_layout(tmp_path / "d")
    shutil.copy(root / "train/cat/cat1.png", root / "val/cat/leak.png")
    idx = scan_dataset(root)
    assert [d.kind for d in idx.duplicates] == ["exact"]


def test_dhash_ignores_flat_and_tiny_images():
    assert dhash(Image.new("RGB", (64, 48), (120, 30, 200))) is None
    h = dhash(photo(1))
    assert isinstance(h, int) and 0 <= h < 2**64
    assert dhash(photo(1).convert("L")) == h or popcount(np.array([h ^ dhash(photo(1).convert("L"))], np.uint64))[0] <= 2


def test_near_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, 400).astype(np.uint64)
    for i in range(0, 60, 3):  # plant close pairs: flip 0..6 random bits
        flips = rng.choice(64, size=i % 7, replace=False)
        h[i + 1] = h[i] ^ np.uint64(sum(1 << int(f) for f in flips))
    h[200:210] = h[199]  # a big group of equal hashes
    got = near_pairs(h, max_bits=4)
    d = popcount(h[:, None] ^ h[None, :])
    ii, jj = np.nonzero(np.triu(d <= 4, 1))
    assert got == [(int(i), int(j), int(d[i, j])) for i, j in zip(ii, jj)]
    assert near_pairs([], 4) == [] and near_pairs([5], 4) == []


@pytest.mark.skipif(not (SHARED_DATA / "cats_vs_dogs").is_dir(), reason="needs ../shared/data/cats_vs_dogs")
def test_cats_vs_dogs_no_copies_one_known_near_duplicate():
    root = SHARED_DATA / "cats_vs_dogs"
    t = time.perf_counter()
    idx = scan_dataset(root)
    seconds = time.perf_counter() - t
    assert exact(idx) == []
    pairs = {frozenset((d.path.name, d.original.name)) for d in near(idx)}
    assert frozenset(("dog.180.jpg", "dog.74.jpg")) in pairs  # the same puppies, re-encoded
    assert len(pairs) <= 3
    assert seconds < 60


# --------------------------------------------------------------------------- unsupported formats


def test_gif_and_heic_in_class_folders_are_listed_as_skipped(tmp_path, logged):
    root = split_layout(tmp_path / "d")
    photo(1).save(root / "train/cat/anim.gif")
    (root / "train/dog/IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (root / "val/dog/deep").mkdir()
    (root / "val/dog/deep/raw.CR2").write_bytes(b"II*\x00")
    (root / "train/cat/notes.txt").write_text("not an image")
    (root / "train/cat/.hidden.heic").write_bytes(b"x")
    idx = scan_dataset(root)
    assert dict(idx.skipped) == {
        root / "train/cat/anim.gif": "unsupported format .gif: " + UNSUPPORTED_IMAGE_EXTENSIONS[".gif"],
        root / "train/dog/IMG_0001.HEIC": "unsupported format .heic: convert to JPEG or PNG",
        root / "val/dog/deep/raw.CR2": "unsupported format .cr2: convert to JPEG or PNG",
    }
    assert "IMG_0001.HEIC: unsupported format .heic" in logged.getvalue()
    assert len(idx.train) == 8 and len(idx.val) == 8


def test_class_of_only_heic_files_says_they_were_skipped(tmp_path):
    root = split_layout(tmp_path / "d")
    shutil.rmtree(root / "val/cat")
    (root / "val/cat").mkdir()
    for i in range(3):
        (root / "val/cat" / f"p{i}.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(AutotlError) as ei:
        scan_dataset(root)
    assert "no readable images (3 skipped)" in str(ei.value)
