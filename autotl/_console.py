"""Human output goes to stderr through rich; stdout is reserved for --json documents."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_state = {"quiet": False}
console = Console(stderr=True, highlight=False)


def set_quiet(quiet: bool) -> None:
    """Silence progress bars and chatter (``--json`` mode)."""
    _state["quiet"] = bool(quiet)


def is_quiet() -> bool:
    return _state["quiet"]


def log(*objects, **kwargs) -> None:
    if not _state["quiet"]:
        console.print(*objects, **kwargs)


def _bars_enabled() -> bool:
    return not _state["quiet"] and console.is_terminal and sys.stderr.isatty()


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **fields) -> None:
        pass


class _Task:
    def __init__(self, progress: Progress, task_id):
        self._progress, self._id = progress, task_id

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._id, n)

    def update(self, **fields) -> None:
        self._progress.update(self._id, **fields)


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[_Task | _NullTask]:
    """A rich progress bar on stderr; a no-op when quiet or when stderr is not a TTY."""
    if not _bars_enabled():
        yield _NullTask()
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
    )
    with bar:
        yield _Task(bar, bar.add_task(description, total=total, info=""))
