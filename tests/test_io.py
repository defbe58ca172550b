"""Atomic writes (autotl._io): all-or-nothing replacement, and the mode a plain open() would give."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from autotl._io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes and umask")


@pytest.fixture
def umask():
    """Set the process umask for the test; the previous one is restored afterwards."""
    before = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(before)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _writers():
    def with_atomic_path(path):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:  # how export/features/score write through atomic_path
                fh.write(b"\x00\x01")

    return {
        "bytes": lambda p: atomic_write_bytes(p, b"onnx"),
        "text": lambda p: atomic_write_text(p, "hello\n"),
        "json": lambda p: atomic_write_json(p, {"classes": ["cat", "dog"]}),
        "atomic_path": with_atomic_path,
    }


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027], ids=lambda m: f"umask{m:04o}")
@pytest.mark.parametrize("writer", list(_writers()))
def test_written_file_mode_follows_umask_like_open(tmp_path, umask, mask, writer):
    umask(mask)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as fh:
        fh.write("x")
    target = tmp_path / "run" / f"model.{writer}"
    _writers()[writer](target)
    assert _mode(target) == 0o666 & ~mask == _mode(plain)


def test_serving_user_can_read_artefacts_under_default_umask(tmp_path, umask):
    umask(0o022)
    card = atomic_write_json(tmp_path / "model.json", {"classes": ["a"]})
    mode = _mode(card)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH and not mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert json.loads(card.read_text()) == {"classes": ["a"]}


def test_replacing_keeps_old_content_until_success_and_final_mode_is_set_from_creation(tmp_path, umask):
    umask(0o027)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        # the temp file already has its final mode: nothing is chmod-ed after the rename
        assert _mode(tmp) == 0o640 and tmp.parent == target.parent and tmp.name.startswith(".model.onnx.")
        tmp.write_bytes(b"new, half written")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new, half written" and _mode(target) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_failed_write_leaves_previous_content_and_no_temp_file(tmp_path, umask):
    target = tmp_path / "model.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]


def test_concurrent_writers_to_one_path_get_distinct_temp_files(tmp_path):
    target = tmp_path / "leaderboard.json"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.exists() and second.exists()
        first.write_text("1")
        second.write_text("2")
    assert target.read_text() == "1"  # the outer context renames last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaderboard.json"]
