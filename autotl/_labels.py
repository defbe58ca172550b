"""Label files: a CSV or TSV of image paths, their labels and an optional train/val/test split.

Read with the stdlib ``csv`` module (quoting, doubled quotes, delimiters inside quoted cells, line
breaks inside cells); UTF-8, with or without a byte-order mark. The delimiter is a tab for ``.tsv``
/ ``.tab``, else sniffed (``csv.Sniffer``) among ``, ; TAB |``. The first row is the header; the
columns are found by name (case-insensitive: ``path``/``file``/``filename``/``image``...,
``label``/``class``/``category``..., ``split``/``subset``) or named by the caller. Relative paths
are relative to the label file's folder. Cells are stripped of surrounding spaces; blank lines are
ignored. Every problem with a row is an ``AutotlError`` naming the file and the line the row starts
on. Torch-free (``predict`` reads path lists with it).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from autotl.errors import AutotlError

__all__ = ["LABEL_FILE_EXTENSIONS", "LabelRow", "LabelFile", "is_label_file", "read_label_file"]

LABEL_FILE_EXTENSIONS = (".csv", ".tsv", ".tab")
_TAB_EXTENSIONS = (".tsv", ".tab")
_SNIFFED = ",;\t|"
_SNIFF_BYTES = 64 * 1024

# Header names of each column, most specific first (compared case-insensitively, spaces and dashes as "_").
PATH_NAMES = ("path", "image_path", "img_path", "file_path", "filepath", "file", "filename", "file_name",
              "image", "image_file", "img", "relative_path")
LABEL_NAMES = ("label", "class", "category", "class_name", "classname", "label_name", "target")
SPLIT_NAMES = ("split", "subset")
#: Split cell -> split (the names the folder layout accepts for its sub-folders).
SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class LabelRow:
    line: int  # line of the file the row starts on (1 = the header)
    path: Path  # absolute; relative cells are joined to the label file's folder
    label: str | None  # None when the file is read for paths only
    split: str | None  # "train", "val", "test", or None without a split column


@dataclass
class LabelFile:
    path: Path  # absolute
    sha256: str
    delimiter: str
    columns: dict[str, str]  # "path", "label", "split" -> the header name used
    rows: list[LabelRow] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def to_json(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "delimiter": self.delimiter,
                "columns": dict(self.columns), "rows": len(self.rows)}


def is_label_file(path: str | os.PathLike) -> bool:
    """A file whose extension says it is a label file (``.csv``, ``.tsv``, ``.tab``)."""
    p = Path(path)
    return p.suffix.lower() in LABEL_FILE_EXTENSIONS and not p.is_dir()


def _norm(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())


def _find_column(header: list[str], given: str | None, names: tuple[str, ...], what: str, flag: str | None,
                 file: Path, required: bool) -> int | None:
    shown = ", ".join(repr(h) for h in header)
    if given is not None:
        hits = [i for i, h in enumerate(header) if h.strip() == given.strip()]
        if not hits:
            hits = [i for i, h in enumerate(header) if _norm(h) == _norm(given)]
        if len(hits) != 1:
            why = "is not in" if not hits else "appears twice in"
            raise AutotlError(f"{file}: {flag} {given!r} {why} the header ({shown}); give one of its column names")
        return hits[0]
    normed = [_norm(h) for h in header]
    for name in names:
        hits = [i for i, h in enumerate(normed) if h == name]
        if len(hits) > 1:
            raise AutotlError(f"{file}: the header has column {header[hits[0]]!r} twice; rename one"
                              + (f" or give {flag}" if flag else ""))
        if hits:
            others = [header[i] for i, h in enumerate(normed) if h in names and i != hits[0]]
            if others:
                raise AutotlError(f"{file}: both {header[hits[0]]!r} and {others[0]!r} could be the {what} column; "
                                  + (f"give {flag} NAME" if flag else "rename one of them"))
            return hits[0]
    if not required:
        return None
    example = ", ".join(names[:3])
    fix = f"name it {example} or give {flag} NAME" if flag else f"name it {example}"
    raise AutotlError(f"{file}: no {what} column in the header ({shown}); the first row must name the columns: {fix}")


def _text(path: Path) -> tuple[str, str]:
    """The file's text (UTF-8, a byte-order mark dropped) and the sha256 of its bytes."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AutotlError(f"{path}: label file does not exist; give a CSV of image paths and labels") from None
    except IsADirectoryError:
        raise AutotlError(f"{path}: is a folder, not a label file") from None
    except OSError as exc:
        raise AutotlError(f"{path}: cannot read the label file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise AutotlError(f"{path} line {line}: not UTF-8 text; save the label file as UTF-8 (CSV UTF-8 in a "
                          "spreadsheet)") from None
    if "\x00" in text:
        raise AutotlError(f"{path}: contains NUL bytes, so it is not a text CSV; export it again as CSV")
    return text, hashlib.sha256(data).hexdigest()


def _delimiter(path: Path, text: str) -> str:
    if path.suffix.lower() in _TAB_EXTENSIONS:
        return "\t"
    sample = text[:_SNIFF_BYTES]
    if len(text) > _SNIFF_BYTES and "\n" in sample:
        sample = sample[: sample.rindex("\n")]  # whole lines only
    try:
        return csv.Sniffer().sniff(sample, delimiters=_SNIFFED).delimiter
    except csv.Error:  # one column, or nothing to tell by: the extension's delimiter
        return ","


def read_label_file(path: str | os.PathLike, *, path_column: str | None = None, label_column: str | None = None,
                    labels: bool = True, check_files: bool = True) -> LabelFile:
    """Read ``path`` into rows of (line, absolute path, label, split).

    With ``labels=False`` only the path column is read (``predict``: a list of images). With
    ``check_files`` a row whose file does not exist is an error (the first such row is named, with
    the count of the others). A row without a path, without a label, with a split other than
    train/val/test (or valid/validation), with more cells than the header, or listing a path an
    earlier row lists (same file path after joining) is an error too.
    """
    file = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    text, sha = _text(file)
    delimiter = _delimiter(file, text)
    reader = csv.reader(io.StringIO(text, newline=""), dialect="excel", delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        while header is not None and not any(c.strip() for c in header):
            header = next(reader, None)
    except csv.Error as exc:
        raise AutotlError(f"{file} line {reader.line_num}: {exc}; fix the quoting of the header") from None
    if header is None:
        raise AutotlError(f"{file}: the label file is empty; its first row names the columns (path,label), one "
                          "image per row after it")
    flags = ("--path-column", "--label-column")
    p_col = _find_column(header, path_column, PATH_NAMES, "path", flags[0], file, True)
    l_col = _find_column(header, label_column, LABEL_NAMES, "label", flags[1], file, True) if labels else None
    s_col = _find_column(header, None, SPLIT_NAMES, "split", None, file, False) if labels else None
    if l_col is not None and l_col == p_col:
        raise AutotlError(f"{file}: the path and the label column are both {header[p_col]!r}; give two columns")
    columns = {"path": header[p_col]}
    if l_col is not None:
        columns["label"] = header[l_col]
    if s_col is not None:
        columns["split"] = header[s_col]

    rows: list[LabelRow] = []
    first_line: dict[Path, int] = {}
    missing: list[tuple[int, str, Path]] = []
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise AutotlError(f"{file} line {start}: {exc}; check the quotes of this row (a quote inside a "
                              f"quoted cell is written twice: \"\")") from None
        line, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(header):
            raise AutotlError(f"{file} line {line}: {len(cells)} cells but the header has {len(header)}; a cell "
                              f"holding the delimiter {delimiter!r} must be quoted (\"a{delimiter} b\")")

        def cell(i: int | None) -> str:
            return cells[i].strip() if i is not None and i < len(cells) else ""

        rel = cell(p_col)
        if not rel:
            raise AutotlError(f"{file} line {line}: empty {columns['path']!r}; give the image path (relative to "
                              f"{file.parent}) or remove the row")
        label = None
        if l_col is not None:
            label = cell(l_col)
            if not label:
                raise AutotlError(f"{file} line {line}: empty {columns['label']!r} for {rel}; give its class or "
                                  "remove the row")
        split = None
        if s_col is not None:
            value = cell(s_col)
            split = SPLIT_VALUES.get(value.lower())
            if split is None:
                raise AutotlError(f"{file} line {line}: {columns['split']!r} is {value!r}; give train, val or "
                                  "test (or leave the column out for an automatic validation split)")
        image = Path(os.path.abspath(file.parent / os.path.expanduser(rel)))
        if image in first_line:
            if not labels:
                continue  # a list of images to predict: each once
            raise AutotlError(f"{file} line {line}: {rel} is already listed on line {first_line[image]}; list each "
                              "image once (remove one of the rows)")
        first_line[image] = line
        if check_files and not os.path.lexists(image):
            missing.append((line, rel, image))
        rows.append(LabelRow(line, image, label, split))
    if missing:
        line, rel, image = missing[0]
        more = f" (and {len(missing) - 1} more rows whose files are missing)" if len(missing) > 1 else ""
        raise AutotlError(f"{file} line {line}: {rel}: file not found ({image}){more}; fix the path (relative to "
                          f"{file.parent}) or remove the row")
    if not rows:
        raise AutotlError(f"{file}: no rows after the header; list one image per row ({', '.join(columns.values())})")
    return LabelFile(file, sha, delimiter, columns, rows)
