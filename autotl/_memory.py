"""Give freed memory back to the operating system between the steps of a run.

glibc's allocator keeps much of the memory a process frees in its heap for reuse, where it still
counts as the process's resident memory: the activations of an eager forward, the arena of a closed
onnxruntime session. A run that does many such steps one after the other would otherwise peak at
the sum of their leftovers. ``trim_heap`` asks glibc to return its free heap pages
(``malloc_trim``, about a millisecond); without glibc it does nothing.
"""

from __future__ import annotations

import ctypes

__all__ = ["trim_heap"]


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the running process's libc
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return None


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Return glibc's free heap pages to the system."""
    if _TRIM is not None:
        _TRIM(0)
