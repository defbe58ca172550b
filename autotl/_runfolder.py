"""A run folder: which of its files are autotl's, and which process owns it.

Torch-free (``report`` and ``export`` use it too). ``autotl.run`` builds the fit's folder lifecycle
on it (set the earlier run aside, put it back on failure); ``autotl.options`` uses the names to
refuse writing over a run's files.

Ownership: ``hold_run_folder`` takes an advisory lock (``fcntl.flock`` on ``.autotl.lock``, which
names the holder's pid, host and command) for as long as a command writes the folder. A second
command on the same folder is refused at once, naming the holder. The kernel drops a flock when
its process dies, so the file a killed process leaves behind is only a record: the next command
takes the folder over and says whose lock it was. Where ``flock`` is not available (some network
file systems) the record decides: a live holder on this host, or any holder on another, is refused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import _console
from .errors import AutotlError

__all__ = ["RUN_MARKER", "LOCK_NAME", "SET_ASIDE", "DISCARDED", "PUBLISHED", "RUN_FILES", "is_run_folder",
           "is_finished", "autotl_entries", "foreign_entries", "hold_run_folder", "lock_holder"]

RUN_MARKER = "autotl-run.json"  # written into every run folder: what makes a folder autotl's to replace
LOCK_NAME = ".autotl.lock"
SET_ASIDE = ".autotl-replaced"  # the earlier run while a fit replaces it (autotl.run)
DISCARDED = ".autotl-discarded"  # the earlier run once replaced, while it is deleted
PUBLISHED = ("model.json", "model.onnx")  # a folder holding these holds a finished run
# Every top-level name autotl writes into a run folder. Anything else there is the user's: never
# moved with a run, never deleted.
RUN_FILES = frozenset({
    RUN_MARKER, LOCK_NAME, SET_ASIDE, DISCARDED, *PUBLISHED, "model.int8.onnx", "model.json.previous",
    "model.failed-parity.onnx",
    "config.json", "history.json", "data.json", "result.json", "report.html", "scoring.json", "datl",
    "study.db", "study.db-journal", "study.db-wal", "study.db-shm", "leaderboard.json", "plots", "artifacts",
    "dropped.csv", "influence.csv", "dropped.jpg", "retrieval.csv", "retrieval.jpg",
})
_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # autotl._io's temporary files


def is_run_folder(path: str | os.PathLike) -> bool:
    """autotl made this folder (its marker, or the files of a run from autotl 0.1)."""
    path = Path(path)
    return (path / RUN_MARKER).is_file() or any((path / f).exists() for f in (*PUBLISHED, "study.db", "result.json"))


def is_finished(path: str | os.PathLike) -> bool:
    """The folder holds a published model (or its card)."""
    return any((Path(path) / f).exists() for f in PUBLISHED)


def _is_autotl_name(name: str) -> bool:
    return name in RUN_FILES or bool(_TEMP.match(name))


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def autotl_entries(folder: str | os.PathLike) -> list[Path]:
    """The files and folders of a run that autotl wrote (not the lock, not a set-aside run)."""
    internal = (LOCK_NAME, SET_ASIDE, DISCARDED)
    return [p for p in _entries(Path(folder)) if _is_autotl_name(p.name) and p.name not in internal]


def foreign_entries(folder: str | os.PathLike) -> list[Path]:
    """What the user put into a run folder: autotl never moves or deletes it."""
    return [p for p in _entries(Path(folder)) if not _is_autotl_name(p.name)]


# ------------------------------------------------------------------------------------------ lock
@dataclass
class _Held:
    fd: int
    count: int
    path: Path


_HELD: dict[str, _Held] = {}  # folders this process holds (nested holds: fit writing its report)


def _me(command: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: assume it lives (refuse rather than share)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def _describe(holder: dict) -> str:
    since = f", since {holder['since']}" if holder.get("since") else ""
    return (f"autotl {holder.get('command') or '?'} (pid {holder.get('pid', '?')} on {holder.get('host') or '?'}"
            f"{since})")


def lock_holder(folder: str | os.PathLike) -> dict | None:
    """The record of the process that holds (or last held) ``folder``'s lock, or None."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text(encoding="utf-8")
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _read_fd(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _write_fd(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    os.fsync(fd)


def _flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    try:
        import fcntl
    except ImportError:  # Windows: the record decides
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, ...
    return True


def _refuse(flag: str, folder: Path, holder: dict | None) -> AutotlError:
    who = _describe(holder) if holder else "another autotl process"
    return AutotlError(f"{flag} {folder}: in use by {who}; wait until it finishes, or give another folder")


def _acquire(folder: Path, flag: str, command: str) -> int:
    lock = folder / LOCK_NAME
    for _ in range(20):  # the file may be unlinked by its holder between our open and our flock
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise AutotlError(f"{flag} {folder}: cannot write in it ({exc.strerror or exc}); give a folder you can "
                              "write to") from None
        try:
            locked = _flock(fd)
            holder = _read_fd(fd)
            if locked is False:
                raise _refuse(flag, folder, holder)
            try:
                same_file = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same_file = False
            if not same_file:  # its holder released it (and removed the file) meanwhile: take the new one
                os.close(fd)
                continue
            mine = _me(command)
            if holder and holder.get("pid") is not None:
                same_host = holder.get("host") == mine["host"]
                if locked is None and (not same_host or _alive(int(holder["pid"]))):
                    raise _refuse(flag, folder, holder)
                if not (same_host and int(holder["pid"]) == mine["pid"]):
                    gone = "is no longer running" if same_host else "holds no lock on it any more"
                    _console.log(_console.clean_text(f"{folder}: taking over from {_describe(holder)}, which {gone}"),
                                 markup=False)
            _write_fd(fd, mine)
            return fd
        except BaseException:
            os.close(fd)
            raise
    raise AutotlError(f"{flag} {folder}: its lock file keeps changing; another autotl is starting there, try again")


@contextlib.contextmanager
def hold_run_folder(folder: str | os.PathLike, *, flag: str = "--out", command: str = "fit") -> Iterator[None]:
    """Own ``folder`` (which must exist) while the block runs: ``AutotlError`` naming the holder
    when another process owns it; a second hold in the same process nests."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    held = _HELD.get(key)
    if held is not None:
        held.count += 1
    else:
        held = _HELD[key] = _Held(_acquire(folder, flag, command), 1, folder / LOCK_NAME)
    try:
        yield
    finally:
        held.count -= 1
        if held.count == 0:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.unlink(held.path)  # while still locked: nobody can take a file that is being removed
            os.close(held.fd)
