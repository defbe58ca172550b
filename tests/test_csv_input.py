"""Label files (CSV / TSV of image paths and labels) as data: the same index as class folders, and
every row problem named by its line."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

from autotl._labels import read_label_file
from autotl.data import scan_dataset
from autotl.errors import AutotlError
from autotl.predict import expand_image_paths
from autotl.search._folds import plan_selection

from conftest import write_image_folder

# class names a folder can hold that a CSV cell must quote or escape: a comma, quotes, non-ASCII
ODD = {"bird, \"song\"": 9, "café ☕": 7, "dog": 8}


def write_labels(path: Path, rows, header=("path", "label"), delimiter=",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def mirror_rows(root: Path, base: Path, seed: int = 0) -> list[list[str]]:
    """(path relative to ``base``, class) of every image under ``root``'s class folders, shuffled."""
    rows = []
    for p in sorted(root.rglob("*.png")):
        rel = p.relative_to(root)
        label = rel.parts[1] if rel.parts[0] in ("train", "val", "test") else rel.parts[0]
        rows.append([p.relative_to(base).as_posix(), label] + ([rel.parts[0]] if rel.parts[0] in ("train", "val", "test") else []))
    random.Random(seed).shuffle(rows)
    return rows


@pytest.fixture
def odd_folder(tmp_path):
    return write_image_folder(tmp_path / "data" / "photos", ODD, size=(24, 20))


# --------------------------------------------------------------------------- same index as folders
def test_label_file_gives_the_index_of_the_class_folders(odd_folder, tmp_path):
    base = tmp_path / "data"
    labels = write_labels(base / "labels.csv", mirror_rows(odd_folder, base))
    folders, table = scan_dataset(odd_folder, seed=3), scan_dataset(labels, seed=3)
    assert table == folders  # classes, samples (paths, labels, order), made val split, skipped
    assert table.classes == sorted(ODD) == folders.classes
    assert table.root == folders.root and table.fingerprint() == folders.fingerprint()
    assert [s.path for s in table.val] == [s.path for s in folders.val] and table.val
    assert plan_selection(table, seed=3) == plan_selection(folders, seed=3)  # the search's folds
    assert table.label_file["sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()
    assert table.label_file["columns"] == {"path": "path", "label": "label"}
    assert table.to_json()["label_file"]["path"] == str(labels) and "label_file" not in folders.to_json()
    # another seed, another split: the seed is what decides it, for both
    assert [s.path for s in scan_dataset(labels, seed=4).val] == [s.path for s in scan_dataset(odd_folder, seed=4).val]


def test_split_column_gives_the_index_of_the_split_layout(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": [6, 2, 2], "b": [5, 3, 1]}, size=(24, 20), splits=["train", "val", "test"])
    rows = mirror_rows(root, tmp_path)
    rows = [[p, label, {"val": "Validation"}.get(split, split)] for p, label, split in rows]  # folder-name spellings
    labels = write_labels(tmp_path / "labels.tsv", rows, header=("file", "class", "split"), delimiter="\t")
    folders, table = scan_dataset(root), scan_dataset(labels)
    assert table == folders and table.split == "folders"  # the given val split is trusted, as val/ is
    assert (len(table.train), len(table.val), len(table.test)) == (11, 5, 3)
    assert table.label_file["delimiter"] == "\t" and table.label_file["columns"]["split"] == "split"


def test_split_column_without_val_rows_makes_the_validation_split(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 8, "b": 8}, size=(24, 20))
    rows = [[p, label, "test" if p.endswith("_007.png") else "train"] for p, label in mirror_rows(root, tmp_path)]
    index = scan_dataset(write_labels(tmp_path / "l.csv", rows, header=("path", "label", "split")))
    assert index.split.startswith("stratified") and len(index.test) == 2 and len(index.val) == 2


# --------------------------------------------------------------------------- rows at fault
def test_missing_file_names_its_line(odd_folder, tmp_path):
    rows = mirror_rows(odd_folder, tmp_path / "data")
    rows.insert(2, ["photos/dog/nope.png", "dog"])
    rows.insert(5, ["photos/dog/gone.png", "dog"])
    with pytest.raises(AutotlError, match=r"labels\.csv line 4: photos/dog/nope\.png: file not found .*\(and 1 more"):
        scan_dataset(write_labels(tmp_path / "data" / "labels.csv", rows))


def test_empty_label_and_empty_path_name_their_line(odd_folder, tmp_path):
    rows = mirror_rows(odd_folder, tmp_path / "data")
    rows[3][1] = "  "
    with pytest.raises(AutotlError, match=r"line 5: empty 'label' for photos/"):
        scan_dataset(write_labels(tmp_path / "data" / "a.csv", rows))
    rows = mirror_rows(odd_folder, tmp_path / "data")
    rows[0][0] = ""
    with pytest.raises(AutotlError, match=r"line 2: empty 'path'"):
        scan_dataset(write_labels(tmp_path / "data" / "b.csv", rows))


def test_duplicate_row_is_refused_naming_both_lines(odd_folder, tmp_path):
    rows = mirror_rows(odd_folder, tmp_path / "data")
    rows.append(["./" + rows[1][0], rows[1][1]])  # the same file, spelled differently
    with pytest.raises(AutotlError, match=rf"line {len(rows) + 1}: \./photos/.* is already listed on line 3"):
        scan_dataset(write_labels(tmp_path / "data" / "labels.csv", rows))


def test_unquoted_delimiter_in_a_label_is_named(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 3, "b": 3}, size=(24, 20))
    text = "path,label\n" + "".join(f"{p},{label}\n" for p, label in mirror_rows(root, tmp_path))
    (tmp_path / "bad.csv").write_text(text.replace(",a\n", ",a, b\n", 1), encoding="utf-8")
    with pytest.raises(AutotlError, match=r"bad\.csv line \d+: 3 cells but the header has 2; a cell holding the delimiter"):
        scan_dataset(tmp_path / "bad.csv")


def test_one_class_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 3, "b": 3}, size=(24, 20))
    rows = [[p, "same"] for p, _ in mirror_rows(root, tmp_path)]
    with pytest.raises(AutotlError, match=r"every row has the label 'same'; needs at least two classes"):
        scan_dataset(write_labels(tmp_path / "labels.csv", rows))


def test_class_with_val_rows_only_and_bad_split_value(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 3, "b": 3, "c": 2}, size=(24, 20))
    rows = [[p, label, "val" if label == "c" or p.endswith("_000.png") else "train"] for p, label in mirror_rows(root, tmp_path)]
    with pytest.raises(AutotlError, match=r"class 'c' \(line \d+\) has val rows but no train rows"):
        scan_dataset(write_labels(tmp_path / "l.csv", rows, header=("path", "label", "split")))
    rows[0][2] = "dev"
    with pytest.raises(AutotlError, match=r"line 2: 'split' is 'dev'; give train, val or test"):
        scan_dataset(write_labels(tmp_path / "l.csv", rows, header=("path", "label", "split")))


def test_unreadable_and_unsupported_files_are_skipped_and_listed(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 4, "b": 4}, size=(24, 20))
    good = mirror_rows(root, tmp_path)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "b" / "anim.gif").write_bytes(b"GIF89a")
    index = scan_dataset(write_labels(tmp_path / "labels.csv", good + [["imgs/a/broken.png", "a"], ["imgs/b/anim.gif", "b"]]))
    skipped = {p.name: reason for p, reason in index.skipped}
    assert set(skipped) == {"broken.png", "anim.gif"} and skipped["anim.gif"].startswith("unsupported format .gif")
    assert len(index.train) + len(index.val) == 8
    # a class whose every row is unreadable: named with the line of its first row
    rows = good + [["imgs/a/broken.png", "z"]]
    with pytest.raises(AutotlError, match=r"class 'z' \(rows from line \d+\) has no readable images \(1 skipped\); fix its rows"):
        scan_dataset(write_labels(tmp_path / "z.csv", rows))


def test_byte_identical_rows_go_through_the_duplicate_checks(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 5, "b": 5}, size=(24, 20))
    shutil.copy(root / "a" / "a_000.png", root / "a" / "copy.png")
    labels = write_labels(tmp_path / "labels.csv", mirror_rows(root, tmp_path))
    assert scan_dataset(labels).duplicate_counts()["exact"] == 1
    with pytest.raises(AutotlError, match="byte-identical"):
        scan_dataset(labels, duplicates="error")


# --------------------------------------------------------------------------- columns and formats
def test_columns_detected_or_named(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 3, "b": 3}, size=(24, 20))
    rows = mirror_rows(root, tmp_path)
    odd = write_labels(tmp_path / "odd.csv", rows, header=("img_url", "species"))
    with pytest.raises(AutotlError, match=r"no path column in the header \('img_url', 'species'\).*--path-column NAME"):
        scan_dataset(odd)
    with pytest.raises(AutotlError, match=r"--label-column 'kind' is not in the header"):
        scan_dataset(odd, path_column="img_url", label_column="kind")
    assert scan_dataset(odd, path_column="img_url", label_column="species").classes == ["a", "b"]
    with pytest.raises(AutotlError, match="both 'path' and 'file' could be the path column"):
        scan_dataset(write_labels(tmp_path / "two.csv", [r + r[:1] for r in rows], header=("file", "label", "path")))
    with pytest.raises(AutotlError, match=r"--path-column: .* is a folder"):
        scan_dataset(root, path_column="path")


def test_semicolons_bom_absolute_paths_and_quotes(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"x, y": 3, 'say "hi"': 3}, size=(24, 20))
    rows = [[str(tmp_path / p), label] for p, label in mirror_rows(root, tmp_path)]  # absolute paths
    labels = write_labels(tmp_path / "semi.csv", rows, header=("Image", "Category"), delimiter=";")
    labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())  # Excel's UTF-8 byte-order mark
    index = scan_dataset(labels)
    assert index == scan_dataset(root) and index.classes == ['say "hi"', "x, y"]
    assert index.label_file["delimiter"] == ";" and read_label_file(labels).columns == {"path": "Image", "label": "Category"}


def test_not_utf8_is_refused(tmp_path):
    (tmp_path / "latin.csv").write_bytes("path,label\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(AutotlError, match=r"latin\.csv line 2: not UTF-8 text"):
        scan_dataset(tmp_path / "latin.csv")


# --------------------------------------------------------------------------- predict
def test_predict_reads_the_path_column_of_a_label_file(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 2, "b": 2}, size=(24, 20))
    rows = [[p] for p, _ in mirror_rows(root, tmp_path)]
    listed = write_labels(tmp_path / "todo.csv", rows + rows[:1], header=("filename",))
    assert expand_image_paths([listed]) == [tmp_path / r[0] for r in rows]  # row order, each once
    (tmp_path / "gone.csv").write_text("image\nimgs/a/a_000.png\nimgs/zz.png\n", encoding="utf-8")
    with pytest.raises(AutotlError, match=r"gone\.csv line 3: imgs/zz\.png: file not found"):
        expand_image_paths([tmp_path / "gone.csv"])


# --------------------------------------------------------------------------- through fit: the card
def test_fit_on_a_label_file_records_it_on_the_card(odd_folder, tmp_path, single_thread):
    from autotl.card import ModelCard
    from autotl.fit import fit

    base = tmp_path / "data"
    labels = write_labels(base / "labels.csv", mirror_rows(odd_folder, base), header=("picture", "kind"))
    result = fit(labels, tmp_path / "run", models=["test_efficientnet=random"], search=False, epochs=2, device="cpu",
                 path_column="picture", label_column="kind")
    card = ModelCard.load(result.card_path)
    assert card.classes == sorted(ODD)
    assert card.data["label_file"]["sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()
    assert card.data["label_file"]["path"] == str(labels)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data_dir"] == str(labels)  # what a later `autotl export --quantize` scans again
    report = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "label file" in report and card.data["label_file"]["sha256"][:16] in report
    from autotl.quantize import quantize_run

    # the rescan reads the label file with the fit's columns and finds the fit's images
    assert quantize_run(tmp_path / "run").n_calibration > 0
