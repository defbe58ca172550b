"""Atomic file writes: an interrupted run never leaves a half-written artefact."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and
    the previous content of ``path``, if any, is left intact. The file gets the mode a plain
    ``open(path, "w")`` would create it with (0o666 less the umask), from its creation on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temp_beside(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # make the bytes durable before the rename
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _create_temp_beside(path: Path) -> Path:
    """Create an empty, uniquely named hidden file next to ``path``, with the mode that a plain
    ``open(path, "w")`` would give it.

    ``tempfile.mkstemp`` creates files with mode 0600 and the rename keeps that mode, so every
    artefact would be unreadable by anyone else (e.g. a serving user). Creating the file with
    ``os.open(..., 0o666)`` lets the kernel apply the umask (and any default ACL) at creation: no
    chmod afterwards, and no reading of the process-wide umask, which cannot be done without
    briefly changing it under other threads.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(candidate, flags, 0o666)
        except FileExistsError:  # O_EXCL: never reuse someone else's file
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"could not create a unique temporary file next to {path}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and paths show up in results; make them plain JSON.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
