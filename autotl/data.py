"""Scan an image folder (or a label file) into a ``DatasetIndex``: classes, train/val/test samples, skipped files.

Three layouts are understood:

* class-per-folder: ``root/<class>/**/*.jpg``; a seeded, stratified validation split is made;
* split layout (chosen when ``root/train`` exists): ``root/train/<class>``, ``root/val/<class>``
  (also spelled ``valid`` / ``validation``; when missing, a stratified split of train is made)
  and an optional ``root/test/<class>``;
* a label file (``.csv``, ``.tsv``): one row per image with its path (relative to the file's
  folder) and label, and optionally a ``split`` column (train / val / test); read by
  ``autotl._labels``. Its rows fill the same (split, class) -> files table the folders fill, and
  one index construction serves both: a label file listing the images of class folders gives
  the index those folders give (classes, samples, the made validation split). The index's root
  is then the folder holding every listed image (the class folders' parent), wherever the file is.

Hidden files and folders (``.name``), ``__MACOSX`` / ``@eaDir`` folders and files without an
image extension are ignored. Images nested deeper inside a class folder belong to that class.
With ``verify=True`` every image is decoded once; every file that cannot be read is listed in
``DatasetIndex.skipped`` with a reason, never silently dropped; so is every image in a format
autotl does not read (``.gif``, ``.heic``, camera raw, ...: ``UNSUPPORTED_IMAGE_EXTENSIONS``).
Problems the user must fix raise ``AutotlError`` with a one-line message naming the folder and
the fix.

Duplicates: every file is hashed once (sha256 of its bytes); byte-identical files are listed in
``DatasetIndex.duplicates`` (with ``duplicates="drop"`` the extra copies are removed, with
``"error"`` the scan refuses). A made validation split keeps byte-identical files on one side.
When verifying, near-duplicates (a 64-bit dHash of the decoded thumbnail) are listed too (warn
only). See ``autotl.duplicates``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from autotl._console import log, progress
from autotl._images import UnreadableImageError, is_image_path, load_rgb
from autotl._labels import LABEL_FILE_EXTENSIONS, LabelFile, is_label_file, read_label_file
from autotl.duplicates import DUPLICATE_MODES, Duplicate, content_digest, dhash, near_pairs, similar, thumbnail
from autotl.errors import AutotlError

__all__ = ["Sample", "DatasetIndex", "Duplicate", "scan_dataset", "SPLITS", "UNSUPPORTED_IMAGE_EXTENSIONS"]

SPLITS = ("train", "val", "test")
_VAL_NAMES = ("val", "valid", "validation")
_JUNK_DIRS = {"__macosx", "@eadir", "__pycache__"}

_TO_JPEG = "convert to JPEG or PNG"
#: Image-like extensions (lower-cased) that autotl does not read -> the fix. Such files inside a
#: class folder are listed in ``DatasetIndex.skipped`` as "unsupported format .heic: convert to
#: JPEG or PNG"; an extension that ``autotl._images.IMAGE_EXTENSIONS`` supports always wins.
UNSUPPORTED_IMAGE_EXTENSIONS: dict[str, str] = {
    ".gif": "convert to PNG (animations: extract the frames)",
    ".heic": _TO_JPEG, ".heif": _TO_JPEG, ".hif": _TO_JPEG, ".avif": _TO_JPEG, ".jxl": _TO_JPEG,
    ".jp2": _TO_JPEG, ".j2k": _TO_JPEG, ".jpx": _TO_JPEG,
    ".jfif": "rename to .jpg", ".jpe": "rename to .jpg", ".pjpeg": "rename to .jpg",
    ".apng": "convert to PNG", ".ico": "convert to PNG", ".icns": "convert to PNG",
    ".svg": "render to PNG", ".psd": _TO_JPEG, ".xcf": _TO_JPEG, ".eps": "render to PNG", ".pdf": "render to PNG",
    ".tga": _TO_JPEG, ".pcx": _TO_JPEG, ".ppm": _TO_JPEG, ".pgm": _TO_JPEG, ".pbm": _TO_JPEG, ".pnm": _TO_JPEG,
    ".exr": _TO_JPEG, ".hdr": _TO_JPEG, ".dds": _TO_JPEG,
    **{ext: _TO_JPEG for ext in (".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".orf",
                                 ".rw2", ".raf", ".pef", ".srw", ".x3f", ".3fr", ".erf", ".kdc", ".mrw", ".raw")},
}


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
    # Byte-identical copies ("exact", kept or dropped) and near-duplicate pairs ("near", kept).
    duplicates: list[Duplicate] = field(default_factory=list)
    # Where the labels came from when they came from a file ({"path", "sha256", "delimiter", "columns",
    # "rows"}; None for folders). Provenance, not content: a label file and the class folders it
    # mirrors index the same data, so it takes no part in equality or the fingerprint.
    label_file: dict[str, Any] | None = field(default=None, compare=False)
    # (size, mtime_ns) per file at scan time, so that fingerprint() describes what was scanned.
    _stats: dict[Path, tuple[int, int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def source(self) -> Path:
        """What to scan again for the same index: the label file, else the folder."""
        return Path(self.label_file["path"]) if self.label_file else self.root

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
        for d in self.duplicates:
            if d.action == "dropped":
                rows.append((self._rel(d.path), "dropped", self._rel(d.original), *map(str, self._stat(d.path))))
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
            "duplicates": [d.to_json() for d in self.duplicates],
            "n_duplicates": self.duplicate_counts(),
            "fingerprint": self.fingerprint(),
            **({"label_file": dict(self.label_file)} if self.label_file else {}),
        }

    def duplicate_counts(self) -> dict[str, int]:
        """``exact`` copies (of which ``leaks``: in another split than the original; ``dropped``) and ``near`` pairs."""
        exact = [d for d in self.duplicates if d.kind == "exact"]
        return {
            "exact": len(exact),
            "leaks": sum(d.issue == "leak" for d in exact),
            "dropped": sum(d.action == "dropped" for d in exact),
            "near": sum(d.kind == "near" for d in self.duplicates),
        }

    def duplicate_groups(self, near: bool = False) -> list[list[Path]]:
        """Files still in the index that are byte-identical copies of each other (with ``near``,
        near-duplicates too), as sorted groups of paths: what a fold planner keeps on one side."""
        present = {s.path for split in SPLITS for s in getattr(self, split)}
        parent: dict[Path, Path] = {}

        def find(p: Path) -> Path:
            while parent.setdefault(p, p) != p:
                parent[p] = parent[parent[p]]
                p = parent[p]
            return p

        for d in self.duplicates:
            if (near or d.kind == "exact") and d.path in present and d.original in present:
                parent[find(d.path)] = find(d.original)
        groups: dict[Path, list[Path]] = {}
        for p in parent:
            groups.setdefault(find(p), []).append(p)
        return sorted((sorted(g, key=str) for g in groups.values() if len(g) > 1), key=lambda g: str(g[0]))

    def summary_table(self) -> Table:
        """A rich table: one row per class with train/val/test counts, a total row, skipped count."""
        table = Table(title=_line(str(self.source)), title_justify="left")
        table.add_column("class")
        for split in SPLITS:
            table.add_column(split, justify="right")
        counts = self.counts()
        for name in self.classes:
            table.add_row(escape(name), *(str(counts[name][s]) for s in SPLITS))
        table.add_section()
        table.add_row("total", str(len(self.train)), str(len(self.val)), str(len(self.test)), style="bold")
        n = len(self.skipped)
        caption = f"split: {self.split}; {n} unreadable file{'s' if n != 1 else ''} skipped"
        dup = self.duplicate_counts()
        if dup["exact"]:
            caption += f"; {dup['exact']} byte-identical cop{'ies' if dup['exact'] != 1 else 'y'}"
            caption += f" ({dup['dropped']} dropped)" if dup["dropped"] else f" ({dup['leaks']} across splits)"
        if dup["near"]:
            caption += f"; {dup['near']} near-duplicate pair{'s' if dup['near'] != 1 else ''}"
        table.caption = _line(caption)
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
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    verify: bool = True,
    duplicates: str = "warn",
    path_column: str | None = None,
    label_column: str | None = None,
) -> DatasetIndex:
    """Index the image folder or label file ``root`` (see the module docstring for the layouts).

    ``val_fraction`` and ``seed`` only matter when a validation split has to be made: per class,
    ``max(1, round(val_fraction * n))`` images (leaving at least one for training) are drawn with
    ``numpy.random.default_rng([seed, crc32(class name)])`` from the sorted file list, so the split
    does not depend on directory listing order, nor on which other classes exist. Byte-identical
    files of one class are drawn as one unit, so they land on the same side (unless the class holds
    copies of a single image only; identical files in two classes are a label conflict, listed as
    such: a val copy with the other label cannot inflate the score).

    ``duplicates`` says what to do with byte-identical files (found by content hash; always
    listed in ``index.duplicates`` and logged):

    * ``"warn"`` (default): keep them all;
    * ``"drop"``: keep the first copy (train before val before test, then class and path order)
      and remove every copy in a later split (the leak) or in the same split and class (a
      redundant copy); copies in the same split but another class (a label conflict: which label
      is right is unknown) are kept. Each dropped file is listed with ``action="dropped"``;
    * ``"error"``: raise ``AutotlError`` naming the first copy.

    With ``verify`` (the images are decoded anyway) near-duplicates are listed too: pairs whose
    64-bit dHash differs in at most ``autotl.duplicates.NEAR_DUPLICATE_BITS`` bits (warn only).

    A label file (``.csv``, ``.tsv``): ``path_column`` / ``label_column`` name its columns when
    the header does not use a name ``autotl._labels`` knows. Rows without a split column (or with
    ``train``) are training images; class names are the labels, sorted as folder names are. A row
    whose file is missing or whose label is empty is an ``AutotlError`` naming its line; files that
    cannot be read are skipped and listed, as in folders.
    """
    if duplicates not in DUPLICATE_MODES:
        raise AutotlError(f"--duplicates {duplicates}: must be one of {', '.join(DUPLICATE_MODES)}, e.g. drop")
    if not 0.0 < float(val_fraction) < 1.0:
        raise AutotlError(f"--val-fraction {val_fraction}: must be between 0 and 1 (exclusive), e.g. 0.1")
    if int(seed) < 0:
        raise AutotlError(f"--seed {seed}: must be a non-negative integer")
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    if is_label_file(root) and root.exists():
        found = _label_file_layout(root, path_column, label_column)
    else:
        if not root.exists():
            raise AutotlError(f"{root}: data folder does not exist; pass a folder with one sub-folder of images per "
                              f"class, or a label file ({', '.join(LABEL_FILE_EXTENSIONS)}) of image paths and labels")
        if not root.is_dir():
            raise AutotlError(f"{root}: is not a folder; pass a folder with one sub-folder of images per class, or a "
                              f"label file ({', '.join(LABEL_FILE_EXTENSIONS)}) of image paths and labels")
        given = [f for f, v in (("--path-column", path_column), ("--label-column", label_column)) if v is not None]
        if given:
            raise AutotlError(f"{' and '.join(given)}: {root} is a folder, where the sub-folders are the labels; drop "
                              f"{'it' if len(given) == 1 else 'them'}, or pass a label file (.csv) instead")
        found = _folder_layout(root)
    return _build_index(found, val_fraction=val_fraction, seed=seed, verify=verify, duplicates=duplicates)


@dataclass
class _Found:
    """What a layout found before any file is checked: the files of each (split, class), and what
    the shared checks need to name the folder or the rows at fault."""

    root: Path  # the data's folder: paths are shown and fingerprinted relative to it
    files: dict[str, dict[str, list[Path]]]  # split -> class -> files, sorted; "val" only when given
    skipped: list[tuple[Path, str]]
    n_listed_skips: dict[tuple[str, str], int]  # per (split, class): skipped before the check (formats...)
    class_dirs: dict[tuple[str, str], Path] = field(default_factory=dict)  # folders: (split, class) -> folder
    split_layout: bool = False  # folders: train/ val/ test/; label file: a split column
    label_file: LabelFile | None = None
    first_line: dict[tuple[str, str], int] = field(default_factory=dict)  # label file: first row per (split, class)

    def where(self, subset: str, name: str) -> str:
        """The culprit of a per-class problem, as a message starts."""
        if self.label_file is None:
            return f"{self.class_dirs[(subset, name)]}: class folder"
        rows = f"{subset} rows" if self.split_layout else "rows"
        return f"{self.label_file.path}: class {name!r} ({rows} from line {self.first_line[(subset, name)]})"


def _folder_layout(root: Path) -> _Found:
    """Class folders (``root/<class>``) or the split layout (``root/train/<class>`` ...)."""
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
    n_listed_skips: dict[tuple[str, str], int] = {}  # unsupported formats, unlistable sub-folders
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
                    n_listed_skips[(subset, e.name)] = -len(skipped)
                    found[subset][e.name] = walk_images(Path(e.path), skipped)
                    n_listed_skips[(subset, e.name)] += len(skipped)
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
                n_listed_skips[("train", e.name)] = -len(skipped)
                found["train"][e.name] = walk_images(Path(e.path), skipped)
                n_listed_skips[("train", e.name)] += len(skipped)
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

    return _Found(root, found, skipped, n_listed_skips, class_dirs, split_layout=train_dir is not None)


def _label_file_layout(file: Path, path_column: str | None, label_column: str | None) -> _Found:
    """The rows of a label file, as the folders would hold them: split -> label -> sorted files."""
    labels = read_label_file(file, path_column=path_column, label_column=label_column)
    skipped: list[tuple[Path, str]] = []
    n_listed_skips: dict[tuple[str, str], int] = {}
    found: dict[str, dict[str, list[Path]]] = {"train": {}}
    first_line: dict[tuple[str, str], int] = {}
    for row in labels.rows:
        key = (row.split or "train", row.label)
        files = found.setdefault(key[0], {}).setdefault(row.label, [])
        first_line.setdefault(key, row.line)
        if (reason := _unsupported_reason(row.path.name)) is not None:
            skipped.append((row.path, reason))
            n_listed_skips[key] = n_listed_skips.get(key, 0) + 1
        else:
            files.append(row.path)
    for per_class in found.values():
        for name in per_class:
            per_class[name].sort(key=lambda p: p.as_posix())  # the order a folder walk gives its files
    # the root is the folder holding every image (the class folders' parent when the rows mirror
    # class folders), wherever the label file sits: paths are shown and fingerprinted relative to it
    root = Path(os.path.commonpath([os.fspath(row.path.parent) for row in labels.rows]))
    out = _Found(root, found, skipped, n_listed_skips, split_layout="split" in labels.columns,
                 label_file=labels, first_line=first_line)

    def rows_of(names: list[str], subset: str) -> str:
        return ", ".join(f"{n!r} (line {first_line[(subset, n)]})" for n in names)

    classes = sorted(found["train"])
    if not classes:
        raise AutotlError(f"{file}: no train rows (every row's {labels.columns['split']!r} is val or test); mark the "
                          "training images train")
    if len(classes) < 2:
        raise AutotlError(f"{file}: every {'train ' if out.split_layout else ''}row has the label {classes[0]!r}; needs "
                          "at least two classes: add rows of another class")
    for subset in ("val", "test"):
        extra = sorted(set(found.get(subset, {})) - set(classes))
        if extra:
            raise AutotlError(f"{file}: class {rows_of(extra[:1], subset)} has {subset} rows but no train rows; add "
                              "train rows for it or remove its rows"
                              + (f" (also: {', '.join(extra[1:])})" if len(extra) > 1 else ""))
    if "val" in found:
        missing = [c for c in classes if c not in found["val"]]
        if missing:
            raise AutotlError(f"{file}: class {rows_of(missing[:1], 'train')} has no val rows although other classes "
                              "have; give it val rows, or mark no row val for an automatic validation split"
                              + (f" (also: {', '.join(missing[1:])})" if len(missing) > 1 else ""))
    return out


def _build_index(layout: _Found, *, val_fraction: float, seed: int, verify: bool, duplicates: str) -> DatasetIndex:
    """The one index construction of every layout: check and hash the files, resolve duplicates,
    require images in every class, make the validation split when none is given."""
    root, found, skipped, n_listed_skips = layout.root, layout.files, layout.skipped, layout.n_listed_skips
    classes = sorted(found["train"])

    # ---- duplicates (one file reachable twice: symlinks, hard-linked folders)
    _check_duplicates(found)

    # ---- cheap checks always, full decode when verifying
    all_files = [p for subset in found.values() for files in subset.values() for p in files]
    stats, bad, digests, phashes = _check_files(all_files, verify)
    skipped.extend(bad)
    bad_set = {p for p, _ in bad}
    n_bad: dict[tuple[str, str], int] = {}
    for subset, per_class in found.items():
        for name, files in per_class.items():
            n_bad[(subset, name)] = sum(p in bad_set for p in files) + n_listed_skips.get((subset, name), 0)
            per_class[name] = [p for p in files if p not in bad_set]

    # ---- byte-identical copies (content hash)
    groups = _exact_groups(found, digests)
    resolved = _resolve_exact(groups, drop=duplicates == "drop")
    if resolved and duplicates == "error":
        copy, orig, _ = resolved[0]
        n, leaks = len(resolved), sum(c[0] != o[0] for c, o, _ in resolved)
        raise AutotlError(
            f"{copy[2]}: is byte-identical to {orig[2]}; {n} byte-identical cop{'ies' if n != 1 else 'y'} in the data "
            f"({leaks} across train/val/test): remove the copies or pass --duplicates drop"
        )
    dropped = {c[2] for c, _, is_dropped in resolved if is_dropped}
    n_dropped: dict[tuple[str, str], int] = {}
    if dropped:
        for subset, per_class in found.items():
            for name, files in per_class.items():
                n_dropped[(subset, name)] = sum(p in dropped for p in files)
                per_class[name] = [p for p in files if p not in dropped]

    # ---- every class needs images
    subsets_needing_all = ["train"] + (["val"] if "val" in found else [])
    for subset in subsets_needing_all:
        empty = [c for c in classes if not found[subset][c]]
        if empty:
            n_dup = n_dropped.get((subset, empty[0]), 0)
            dup_note = f", {n_dup} dropped as byte-identical copies" if n_dup else ""
            fix = "add images or remove the folder" if layout.label_file is None else "fix its rows or remove them"
            raise AutotlError(
                f"{layout.where(subset, empty[0])} has no readable images ({n_bad[(subset, empty[0])]} skipped{dup_note}); "
                f"{fix}"
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
        in_val: set[Path] = set()
        for c in classes:
            files = found["train"][c]
            units = _units(files, digests)
            if len(units) < 2:  # copies of one image only: split them anyway (the leak is listed)
                units = [[p] for p in files]
            if len(units) < 2:
                n_dup = n_dropped.get(("train", c), 0)
                dup_note = f" ({n_dup} more dropped as byte-identical copies)" if n_dup else ""
                more = "add images" if layout.label_file is None else "add rows"
                if layout.split_layout:
                    more += " or provide a val/ folder" if layout.label_file is None else " or give the class val rows"
                raise AutotlError(
                    f"{layout.where('train', c)} has only {len(files)} readable image{dup_note}; "
                    f"needs at least 2 to hold out a validation image: {more}"
                )
            in_val |= _stratified(units, c, val_fraction, seed)
        train = [Sample(p, label[c]) for c in classes for p in found["train"][c] if p not in in_val]
        val = [Sample(p, label[c]) for c in classes for p in found["train"][c] if p in in_val]
        split = f"stratified {float(val_fraction) * 100:g}% val, seed {seed}"

    skipped.sort(key=lambda t: str(t[0]))
    index = DatasetIndex(
        root=root, classes=classes, train=train, val=val, test=test, skipped=skipped, split=split
    )
    index._stats = stats
    if layout.label_file is not None:
        index.label_file = layout.label_file.to_json()
    index.duplicates = _exact_records(index, resolved) + _near_records(index, digests, phashes)
    if skipped:
        _log_skipped(skipped)
    if index.duplicates:
        _log_duplicates(index, duplicates)
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


def _unsupported_reason(name: str) -> str | None:
    """``"unsupported format .heic: convert to JPEG or PNG"`` for an image-like file autotl does not read."""
    if is_image_path(name):
        return None
    ext = os.path.splitext(name)[1].lower()
    fix = UNSUPPORTED_IMAGE_EXTENSIONS.get(ext)
    return f"unsupported format {ext}: {fix}" if fix else None


def walk_images(folder: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    """Image files under ``folder`` (recursively, following symlinked folders once), sorted.

    Files in an image format autotl does not read (``UNSUPPORTED_IMAGE_EXTENSIONS``) are appended
    to ``skipped`` with the reason and the fix."""
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
            elif (reason := _unsupported_reason(e.name)) is not None:
                skipped.append((Path(e.path), reason))
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


# The verifying decode: what check_image does, at a JPEG draft scale that still leaves a thumbnail
# for the perceptual hash (1/8 for any photo of 144x128 pixels or more, as for check_image).
_VERIFY_DRAFT = (18, 16)
_CONFIRM_DRAFT = (32, 32)  # near-duplicate candidates: decoded again at 1/4 or 1/8 for a 32x32 thumbnail
_CheckResult = tuple[tuple[int, int], "str | None", "int | None"]


def _check_one(path: Path, verify: bool) -> _CheckResult:
    """(size, mtime_ns), the reason it is unreadable or None, its dHash (when verifying)."""
    try:
        st = os.stat(path)
    except OSError:
        reason = "broken symlink" if os.path.islink(path) else "file not found"
        return (-1, -1), reason, None
    stat = (st.st_size, st.st_mtime_ns)
    if not os.path.isfile(path):
        return stat, "not a file", None
    if st.st_size == 0:
        return stat, "0-byte file", None
    phash = None
    if verify:
        try:
            img = load_rgb(path, draft_size=_VERIFY_DRAFT)
        except UnreadableImageError as exc:
            return stat, exc.reason, None
        if img.width >= 9 and img.height >= 8:
            phash = dhash(img)
    return stat, None, phash


def _check_files(
    files: list[Path], verify: bool
) -> tuple[dict[Path, tuple[int, int]], list[tuple[Path, str]], dict[Path, bytes], dict[Path, int]]:
    """Stat every file (and decode it when ``verify``), then hash the contents of those whose size
    another file shares (only they can be byte-identical); Pillow and hashlib release the GIL.

    Returns stats, the unreadable files with reasons, content digests and perceptual hashes."""
    stats: dict[Path, tuple[int, int]] = {}
    bad: list[tuple[Path, str]] = []
    phashes: dict[Path, int] = {}
    workers = max(1, min(16, os.cpu_count() or 1)) if verify else 1
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autotl-scan") if workers > 1 else None

    def run(fn, items, *args):
        if pool is None or len(items) < 64:
            return map(fn, items, *args)
        return pool.map(fn, items, *args, chunksize=16)

    try:
        with progress("Checking images" if verify else "Listing images", total=len(files)) as task:
            for p, (stat, reason, phash) in zip(files, run(_check_one, files, [verify] * len(files))):
                stats[p] = stat
                if reason is not None:
                    bad.append((p, reason))
                elif phash is not None:
                    phashes[p] = phash
                task.advance()
        bad_set = {p for p, _ in bad}
        sizes = Counter(stats[p][0] for p in files if p not in bad_set)
        todo = [p for p in files if p not in bad_set and sizes[stats[p][0]] > 1]
        digests = {p: d for p, d in zip(todo, run(content_digest, todo)) if d is not None}
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return stats, bad, digests, phashes


_Member = tuple[str, str, Path]  # (split, class, path)


def _exact_groups(found: dict[str, dict[str, list[Path]]], digests: dict[Path, bytes]) -> list[list[_Member]]:
    """Byte-identical files, each group in split, class and file order."""
    by_digest: dict[bytes, list[_Member]] = {}
    for subset in SPLITS:
        for name in sorted(found.get(subset, {})):
            for p in found[subset][name]:
                if p in digests:
                    by_digest.setdefault(digests[p], []).append((subset, name, p))
    return [g for g in by_digest.values() if len(g) > 1]


def _resolve_exact(groups: list[list[_Member]], drop: bool) -> list[tuple[_Member, _Member, bool]]:
    """(copy, the copy it duplicates, dropped?) for every file but the first of each group.

    A copy is redundant when a kept file of the group is in an earlier split, or in the same split
    and class; with ``drop`` those go. A copy in the same split but another class is kept."""
    out = []
    for group in groups:
        kept = [group[0]]
        for m in group[1:]:
            same = next((k for k in kept if k[:2] == m[:2]), None)
            earlier = next((k for k in kept if SPLITS.index(k[0]) < SPLITS.index(m[0])), None)
            redundant = same or earlier
            if drop and redundant:
                out.append((m, redundant, True))
            else:
                kept.append(m)
                out.append((m, redundant or kept[0], False))
    return out


def _units(files: list[Path], digests: dict[Path, bytes]) -> list[list[Path]]:
    """``files`` grouped into byte-identical units, in order of first appearance."""
    by_digest: dict[bytes, list[Path]] = {}
    units: list[list[Path]] = []
    for p in files:
        d = digests.get(p)
        if d is None:
            units.append([p])
        elif d in by_digest:
            by_digest[d].append(p)
        else:
            by_digest[d] = [p]
            units.append(by_digest[d])
    return units


def _split_of(index: DatasetIndex) -> dict[Path, str]:
    return {s.path: split for split in SPLITS for s in getattr(index, split)}


def _exact_records(index: DatasetIndex, resolved: list[tuple[_Member, _Member, bool]]) -> list[Duplicate]:
    """The resolved copies as ``Duplicate``s, with the splits they ended up in."""
    where = _split_of(index)
    out = []
    for (split, name, path), (o_split, o_name, o_path), is_dropped in resolved:
        final_o_split = where.get(o_path, o_split)
        # a dropped copy is in no split: it would have gone with its original (a made split draws them together)
        final_split = where.get(path, final_o_split if split == o_split else split)
        out.append(Duplicate(
            "exact", path, o_path, final_split, final_o_split, name, o_name, "dropped" if is_dropped else "kept"
        ))
    return out


def _near_records(index: DatasetIndex, digests: dict[Path, bytes], phashes: dict[Path, int]) -> list[Duplicate]:
    """Pairs of (not byte-identical) images in the index whose perceptual hashes nearly agree."""
    hashed = [(split, s) for split in SPLITS for s in getattr(index, split) if s.path in phashes]
    thumbs: dict[Path, np.ndarray | None] = {}

    def thumb(path: Path) -> np.ndarray | None:  # decoded again only for candidates: few, and cheap
        if path not in thumbs:
            try:
                thumbs[path] = thumbnail(load_rgb(path, draft_size=_CONFIRM_DRAFT))
            except UnreadableImageError:
                thumbs[path] = None
        return thumbs[path]

    out = []
    for i, j, dist in near_pairs([phashes[s.path] for _, s in hashed]):
        (o_split, o), (split, s) = hashed[i], hashed[j]
        if o.path in digests and digests.get(o.path) == digests.get(s.path):
            continue  # an exact copy, listed as such
        if not similar(thumb(o.path), thumb(s.path)):
            continue
        out.append(Duplicate(
            "near", s.path, o.path, split, o_split, index.classes[s.label], index.classes[o.label], "kept", dist
        ))
    return out


def _stratified(units: list[list[Path]], class_name: str, val_fraction: float, seed: int) -> set[Path]:
    """The files drawn for validation; each unit (byte-identical files, usually one) is drawn whole."""
    n = len(units)
    k = min(n - 1, max(1, int(np.floor(val_fraction * n + 0.5))))
    rng = np.random.default_rng([int(seed), zlib.crc32(class_name.encode("utf-8", "surrogateescape"))])
    return {p for u in rng.permutation(n)[:k] for p in units[u]}


def _log_skipped(skipped: list[tuple[Path, str]], shown: int = 5) -> None:
    n = len(skipped)
    log(f"[yellow]Skipped {n} unreadable file{'s' if n != 1 else ''}:[/yellow]")
    for p, r in skipped[:shown]:
        log(f"  {escape(str(p))}: {escape(r)}", soft_wrap=True)
    if n > shown:
        log(f"  ... and {n - shown} more (see 'skipped' in the --json output)")


def _log_duplicates(index: DatasetIndex, mode: str, shown: int = 5) -> None:
    def where(path: Path, split: str, label: str) -> str:
        return escape(f"{index._rel(path)} ({split}, {label})")

    exact = [d for d in index.duplicates if d.kind == "exact"]
    near = [d for d in index.duplicates if d.kind == "near"]
    if exact:
        n, c = len(exact), index.duplicate_counts()
        what = f"{c['leaks']} across train/val/test" + (f", {c['dropped']} dropped" if c["dropped"] else "")
        log(f"[yellow]Found {n} byte-identical cop{'ies' if n != 1 else 'y'} of other images ({what}):[/yellow]",
            soft_wrap=True)
        for d in sorted(exact, key=lambda d: d.issue != "leak")[:shown]:
            log(f"  {where(d.path, d.split, d.label)} = {where(d.original, d.original_split, d.original_label)}: "
                f"{d.action}", soft_wrap=True)
        if n > shown:
            log(f"  ... and {n - shown} more (see 'duplicates' in the --json output)")
        if mode == "warn" and any(d.issue != "conflict" for d in exact):
            log("  scores on copies of training images are inflated: remove them or pass --duplicates drop",
                soft_wrap=True)
    if near:
        n = len(near)
        across = sum(d.issue == "leak" for d in near)
        log(f"[yellow]Found {n} near-duplicate pair{'s' if n != 1 else ''} ({across} across train/val/test; "
            f"the same picture re-encoded or resized? kept):[/yellow]", soft_wrap=True)
        for d in sorted(near, key=lambda d: d.issue != "leak")[:shown]:
            log(f"  {where(d.path, d.split, d.label)} ~ {where(d.original, d.original_split, d.original_label)} "
                f"({d.distance} of 64 hash bits differ)", soft_wrap=True)
        if n > shown:
            log(f"  ... and {n - shown} more (see 'duplicates' in the --json output)")
