"""Human output goes to stderr through rich; stdout is reserved for --json documents."""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Iterator

from rich.console import Console
from rich.segment import Segment
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_state = {"quiet": False}

# C0 controls but newline and tab, DEL, C1 controls (CSI, OSC, ...) and the bidirectional overrides
# that reorder what a terminal shows: never sent to the terminal from user data (a class or file named
# "\x1b]0;...\x07" would retitle the window, "\x1b[2J" clear it).
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x0A, 0x09)}
_CONTROL.update({c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})
_CONTROL_RE = re.compile("[" + "".join(re.escape(chr(c)) for c in _CONTROL) + "]")


def clean_text(text: str) -> str:
    """``text`` with every control character (ESC, BEL, CR, C1, bidi overrides) shown as ``\\xNN``: safe on a terminal."""
    return str(text).translate(_CONTROL)


class _SafeConsole(Console):
    """A rich console that never passes control characters from the text it prints to the terminal
    (rich's own styling still reaches it). Every string printed, logged or put in a table goes through
    ``render_str``; markup in user data (class names, paths) is escaped where it is printed."""

    def render_str(self, text: str, **kwargs):
        return super().render_str(clean_text(text), **kwargs)

    def render(self, renderable, options=None):
        # the safety net for rich ``Text`` objects made elsewhere (they skip ``render_str``): any
        # control character left in a text segment becomes "?" (rich's own control segments pass)
        for segment in super().render(renderable, options):
            if segment.control is None and _CONTROL_RE.search(segment.text):
                segment = Segment(_CONTROL_RE.sub("?", segment.text), segment.style)
            yield segment


console = _SafeConsole(stderr=True, highlight=False)


def set_quiet(quiet: bool) -> None:
    """Silence progress bars and chatter (``--json`` mode)."""
    _state["quiet"] = bool(quiet)


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
