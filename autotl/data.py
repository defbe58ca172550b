"""Scan an image folder into a ``DatasetIndex``: classes, train/val/test samples, skipped files.

Two layouts are understood:

* class-per-folder: ``root/<class>/**/*.jpg``; a seeded, stratified validation split is made;
* split layout (chosen when ``root/train`` exists): ``root/train/<class>``, ``root/val/<class>``
  (also spelled ``valid`` / ``validation``; when missing, a stratified split of train is made)
  and an optional ``root/test/<class>``.

Hidden files and folders (``.name``), ``__MACOSX`` / ``@eaDir`` folders and files without an
image extension are ignored. Images nested deeper inside a class folder belong to that class.
With ``verify=True`` every image is decoded once; every file that cannot be read is listed in
``DatasetIndex.skipped`` with a reason, never silently dropped. Problems the user must fix raise
``AutotlError`` with a one-line message naming the folder and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from autotl._console import log, progress
from autotl._images import UnreadableImageError, check_image, is_image_path
from autotl.errors import AutotlError

__all__ = ["Sample", "DatasetIndex", "scan_dataset", "SPLITS"]

SPLITS = ("train", "val", "test")
_VAL_NAMES = ("val", "valid", "validation")
_JUNK_DIRS = {"__macosx", "@eadir", "__pycache__"}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class DatasetIndex:
    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[tuple[Path, str]]
    split: str  # "folders" or e.g. "stratified 10% val, seed 0"
    # (size, mtime_ns) per file at scan time, so that fingerprint() describes what was scanned.
    _stats: dict[Path, tuple[int, int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def samples(self, split: str) -> list[Sample]:
        """The samples of ``"train"``, ``"val"`` or ``"test"``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{class: {"train": n, "val": n, "test": n}}`` in class order."""
        out = {c: {s: 0 for s in SPLITS} for c in self.classes}
        for split in SPLITS:
            for s in getattr(self, split):
                out[self.classes[s.label]][split] += 1
        return out

    def fingerprint(self) -> str:
        """sha256 over relative paths, sizes, mtimes (ns), labels, subsets, classes and split.

        Two scans of an unchanged folder give the same fingerprint; adding, removing, editing,
        relabelling or re-splitting any file (skipped ones included) changes it.
        """
        h = hashlib.sha256()
        h.update(json.dumps({"classes": self.classes, "split": self.split}).encode())
        rows = []
        for split in SPLITS:
            for s in getattr(self, split):
                rows.append((self._rel(s.path), split, str(s.label), *map(str, self._stat(s.path))))
        for path, reason in self.skipped:
            rows.append((self._rel(path), "skipped", reason, *map(str, self._stat(path))))
        for row in sorted(rows):
            h.update(("\t".join(row) + "\n").encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def to_json(self) -> dict:
        return {
            "root": str(self.root),
            "classes": list(self.classes),
            "split": self.split,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test": len(self.test),
            "counts": self.counts(),
            "skipped": [{"path": str(p), "reason": r} for p, r in self.skipped],
            "fingerprint": self.fingerprint(),
        }

    def summary_table(self) -> Table:
        """A rich table: one row per class with train/val/test counts, a total row, skipped count."""
        table = Table(title=_line(str(self.root)), title_justify="left")
        table.add_column("class")
        for split in SPLITS:
            table.add_column(split, justify="right")
        counts = self.counts()
        for name in self.classes:
            table.add_row(escape(name), *(str(counts[name][s]) for s in SPLITS))
        table.add_section()
        table.add_row("total", str(len(self.train)), str(len(self.val)), str(len(self.test)), style="bold")
        n = len(self.skipped)
        table.caption = _line(f"split: {self.split}; {n} unreadable file{'s' if n != 1 else ''} skipped")
        table.caption_justify = "left"
        return table

    def _rel(self, path: Path) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return Path(path).as_posix()

    def _stat(self, path: Path) -> tuple[int, int]:
        if path not in self._stats:
            self._stats[path] = _stat(path)
        return self._stats[path]


def scan_dataset(
    root: str | os.PathLike, *, val_fraction: float = 0.1, seed: int = 0, verify: bool = True
) -> DatasetIndex:
    """Index the image folder ``root`` (see the module docstring for the layouts).

    ``val_fraction`` and ``seed`` only matter when a validation split has to be made: per class,
    ``max(1, round(val_fraction * n))`` images (leaving at least one for training) are drawn with
    ``numpy.random.default_rng([seed, crc32(class name)])`` from the sorted file list, so the split
    does not depend on directory listing order, nor on which other classes exist.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise AutotlError(f"--val-fraction {val_fraction}: must be between 0 and 1 (exclusive), e.g. 0.1")
    if int(seed) < 0:
        raise AutotlError(f"--seed {seed}: must be a non-negative integer")
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    if not root.exists():
        raise AutotlError(
            f"{root}: data folder does not exist; pass a folder with one sub-folder of images per class"
        )
    if not root.is_dir():
        raise AutotlError(f"{root}: is not a folder; pass a folder with one sub-folder of images per class")

    skipped: list[tuple[Path, str]] = []
    top = _list_dir(root, skipped)
    dirs = {e.name.lower(): Path(e.path) for e in top if is_folder_entry(e)}
    train_dir = dirs.get("train")
    val_dirs = [dirs[n] for n in _VAL_NAMES if n in dirs]
    test_dir = dirs.get("test")
    if train_dir is not None and not val_dirs and test_dir is None and not _has_subdirs(train_dir):
        train_dir = None  # a class that happens to be called "train" (bus/, car/, train/)

    # ---- discover files per (subset, class)
    found: dict[str, dict[str, list[Path]]] = {}
    class_dirs: dict[tuple[str, str], Path] = {}
    if train_dir is not None:
        if len(val_dirs) > 1:
            names = " and ".join(f"{d.name}/" for d in val_dirs)
            raise AutotlError(f"{root}: has both {names}; keep a single validation folder named val/")
        layout_dirs = {"train": train_dir, "test": test_dir}
        if val_dirs:
            layout_dirs["val"] = val_dirs[0]
        for name, path in dirs.items():
            if path not in layout_dirs.values() and _has_images(path):
                raise AutotlError(
                    f"{path}: folder with images next to {train_dir.name}/ is not used; a split layout "
                    f"holds only train/, val/ and test/: move it into train/ or remove it"
                )
        _skip_loose_images(top, skipped)
        for subset in SPLITS:
            sub_root = layout_dirs.get(subset)
            if sub_root is None:
                continue
            entries = _list_dir(sub_root, skipped)
            _skip_loose_images(entries, skipped)
            found[subset] = {}
            for e in entries:
                if is_folder_entry(e):
                    found[subset][e.name] = walk_images(Path(e.path), skipped)
                    class_dirs[(subset, e.name)] = Path(e.path)
        class_root = train_dir
    else:
        for name in ("val", "valid", "validation", "test"):
            if name in dirs and _has_images(dirs[name]):
                raise AutotlError(
                    f"{root}: has {dirs[name].name}/ but no train/; a split layout needs "
                    f"{root / 'train'}/<class>/ (or drop {dirs[name].name}/ and use one folder per class)"
                )
        _skip_loose_images(top, skipped)
        found["train"] = {}
        for e in top:
            if is_folder_entry(e):
                found["train"][e.name] = walk_images(Path(e.path), skipped)
                class_dirs[("train", e.name)] = Path(e.path)
        class_root = root

    classes = sorted(found["train"])
    if not classes:
        raise AutotlError(
            f"{class_root}: no class folders found; put the images of each class in their own "
            f"sub-folder ({class_root}/<class>/*.jpg)"
        )
    if len(classes) < 2:
        raise AutotlError(
            f"{class_root}: found only one class folder ({classes[0]}/); needs at least two classes: "
            f"add a sub-folder per class"
        )
    for subset in ("val", "test"):
        extra = sorted(set(found.get(subset, {})) - set(classes))
        if extra:
            path = class_dirs[(subset, extra[0])]
            raise AutotlError(
                f"{path}: class '{extra[0]}' is in {path.parent.name}/ but not in "
                f"{class_root.name}/; add {class_root / extra[0]}/ or remove it"
                + (f" (also: {', '.join(extra[1:])})" if len(extra) > 1 else "")
            )
    if "val" in found:
        missing = [c for c in classes if c not in found["val"]]
        if missing:
            val_root = layout_dirs["val"]
            raise AutotlError(
                f"{val_root / missing[0]}: class '{missing[0]}' is in {class_root.name}/ but missing "
                f"from {val_root.name}/; add validation images for it or remove the class"
                + (f" (also: {', '.join(missing[1:])})" if len(missing) > 1 else "")
            )

    # ---- duplicates (one file reachable twice: symlinks, hard-linked folders)
    _check_duplicates(found)

    # ---- cheap checks always, full decode when verifying
    all_files = [p for subset in found.values() for files in subset.values() for p in files]
    stats, bad = _check_files(all_files, verify)
    skipped.extend(bad)
    bad_set = {p for p, _ in bad}
    n_bad: dict[tuple[str, str], int] = {}
    for subset, per_class in found.items():
        for name, files in per_class.items():
            n_bad[(subset, name)] = sum(p in bad_set for p in files)
            per_class[name] = [p for p in files if p not in bad_set]

    # ---- every class needs images
    subsets_needing_all = ["train"] + (["val"] if "val" in found else [])
    for subset in subsets_needing_all:
        empty = [c for c in classes if not found[subset][c]]
        if empty:
            path = class_dirs[(subset, empty[0])]
            raise AutotlError(
                f"{path}: class folder has no readable images ({n_bad[(subset, empty[0])]} skipped); "
                f"add images or remove the folder"
                + (f" (also empty: {', '.join(empty[1:])})" if len(empty) > 1 else "")
            )

    # ---- assemble
    label = {c: i for i, c in enumerate(classes)}
    train = [Sample(p, label[c]) for c in classes for p in found["train"][c]]
    test = [Sample(p, label[c]) for c in classes for p in found.get("test", {}).get(c, [])]
    if "val" in found:
        val = [Sample(p, label[c]) for c in classes for p in found["val"][c]]
        split = "folders"
    else:
        train, val = [], []
        for c in classes:
            files = found["train"][c]
            if len(files) < 2:
                raise AutotlError(
                    f"{class_dirs[('train', c)]}: class folder has only {len(files)} readable image; "
                    f"needs at least 2 to hold out a validation image: add images"
                    + (" or provide a val/ folder" if train_dir is not None else "")
                )
            tr, va = _stratified(files, c, val_fraction, seed)
            train += [Sample(p, label[c]) for p in tr]
            val += [Sample(p, label[c]) for p in va]
        split = f"stratified {float(val_fraction) * 100:g}% val, seed {seed}"

    skipped.sort(key=lambda t: str(t[0]))
    index = DatasetIndex(
        root=root, classes=classes, train=train, val=val, test=test, skipped=skipped, split=split
    )
    index._stats = stats
    if skipped:
        _log_skipped(skipped)
    return index


# --------------------------------------------------------------------------- internals


def _line(text: str) -> Text:
    """A table title/caption that is not wrapped to the (narrow) table width."""
    return Text(text, no_wrap=True, overflow="ignore")


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _hidden(name: str) -> bool:
    return name.startswith(".")


def is_folder_entry(entry: os.DirEntry) -> bool:
    """A visible, non-junk folder (or a symlink to one): what may hold a class or its images."""
    if _hidden(entry.name) or entry.name.lower() in _JUNK_DIRS:
        return False
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _list_dir(path: Path, skipped: list[tuple[Path, str]]) -> list[os.DirEntry]:
    """Non-hidden entries of ``path`` sorted by name (listing order never matters)."""
    try:
        with os.scandir(path) as it:
            entries = [e for e in it if not _hidden(e.name)]
    except PermissionError:
        skipped.append((path, "permission denied (folder)"))
        return []
    except OSError as exc:
        skipped.append((path, f"cannot list folder ({exc.strerror or exc})"))
        return []
    return sorted(entries, key=lambda e: e.name)


def _is_image_entry(entry: os.DirEntry) -> bool:
    if not is_image_path(entry.name):
        return False
    try:
        return not entry.is_dir()  # an image-named file, or a (possibly broken) symlink to one
    except OSError:
        return True


def _skip_loose_images(entries: list[os.DirEntry], skipped: list[tuple[Path, str]]) -> None:
    for e in entries:
        if _is_image_entry(e):
            skipped.append((Path(e.path), "not inside a class folder"))


def walk_images(folder: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    """Image files under ``folder`` (recursively, following symlinked folders once), sorted."""
    out: list[Path] = []
    seen = {os.path.realpath(folder)}
    stack = [folder]
    while stack:
        d = stack.pop()
        for e in _list_dir(d, skipped):
            if is_folder_entry(e):
                real = os.path.realpath(e.path)
                if real not in seen:
                    seen.add(real)
                    stack.append(Path(e.path))
            elif _is_image_entry(e):
                out.append(Path(e.path))
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def _has_subdirs(folder: Path) -> bool:
    return any(is_folder_entry(e) for e in _list_dir(folder, []))


def _has_images(folder: Path) -> bool:
    return bool(walk_images(folder, []))


def _check_duplicates(found: dict[str, dict[str, list[Path]]]) -> None:
    """One file reachable through two paths (symlinks, hard links) would leak between classes/splits."""
    first: dict[object, Path] = {}
    for subset in SPLITS:
        for name in sorted(found.get(subset, {})):
            for p in found[subset][name]:
                for key in _identity(p):
                    if key in first:
                        raise AutotlError(
                            f"{p}: is the same file as {first[key]} (a symlink or hard link); an image may "
                            f"appear only once in the data: remove one of them"
                        )
                for key in _identity(p):
                    first[key] = p


def _identity(path: Path) -> list[object]:
    keys: list[object] = [os.path.realpath(path)]
    try:
        st = os.stat(path)
    except OSError:
        return keys
    if st.st_nlink > 1 and st.st_ino:  # hard links share an inode
        keys.append((st.st_dev, st.st_ino))
    return keys


def _check_one(path: Path, verify: bool) -> tuple[tuple[int, int], str | None]:
    try:
        st = os.stat(path)
    except OSError:
        reason = "broken symlink" if os.path.islink(path) else "file not found"
        return (-1, -1), reason
    stat = (st.st_size, st.st_mtime_ns)
    if not os.path.isfile(path):
        return stat, "not a file"
    if st.st_size == 0:
        return stat, "0-byte file"
    if verify:
        try:
            check_image(path)
        except UnreadableImageError as exc:
            return stat, exc.reason
    return stat, None


def _check_files(files: list[Path], verify: bool) -> tuple[dict[Path, tuple[int, int]], list[tuple[Path, str]]]:
    """Stat every file (and decode it when ``verify``); Pillow releases the GIL while decoding."""
    stats: dict[Path, tuple[int, int]] = {}
    bad: list[tuple[Path, str]] = []
    workers = max(1, min(16, os.cpu_count() or 1)) if verify else 1
    with progress("Checking images" if verify else "Listing images", total=len(files)) as task:
        if workers == 1 or len(files) < 64:
            results = (_check_one(p, verify) for p in files)
            for p, (stat, reason) in zip(files, results):
                stats[p] = stat
                if reason is not None:
                    bad.append((p, reason))
                task.advance()
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autotl-scan") as pool:
                results = pool.map(_check_one, files, [verify] * len(files), chunksize=16)
                for p, (stat, reason) in zip(files, results):
                    stats[p] = stat
                    if reason is not None:
                        bad.append((p, reason))
                    task.advance()
    return stats, bad


def _stratified(files: list[Path], class_name: str, val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    n = len(files)
    k = min(n - 1, max(1, int(np.floor(val_fraction * n + 0.5))))
    rng = np.random.default_rng([int(seed), zlib.crc32(class_name.encode("utf-8", "surrogateescape"))])
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.permutation(n)[:k]] = True
    return [p for p, c in zip(files, chosen) if not c], [p for p, c in zip(files, chosen) if c]


def _log_skipped(skipped: list[tuple[Path, str]], shown: int = 5) -> None:
    n = len(skipped)
    log(f"[yellow]Skipped {n} unreadable file{'s' if n != 1 else ''}:[/yellow]")
    for p, r in skipped[:shown]:
        log(f"  {escape(str(p))}: {escape(r)}", soft_wrap=True)
    if n > shown:
        log(f"  ... and {n - shown} more (see 'skipped' in the --json output)")
