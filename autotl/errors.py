"""The one error type a user can fix: the CLI prints its message on one line and exits 2."""

from __future__ import annotations


class AutotlError(Exception):
    """A problem with the user's input (a file, a folder, a flag) and how to fix it.

    The message is one line naming the file or flag and the fix.
    """

    exit_code = 2

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)
