"""CSV cells safe to open in a spreadsheet (no formula injection), and read back unchanged.

A text cell that starts with ``=``, ``+``, ``-``, ``@`` (or a tab / carriage return, which some
spreadsheets skip before looking for those) is run as a formula by Excel, LibreOffice and Google
Sheets; class names and file names are user data, so such cells are written with a leading ``'``
(the spreadsheets' own "this is text" prefix, not shown). A cell that already starts with ``'`` gets
one more, so :func:`read_cell` can undo exactly what :func:`safe_cell` did. Numbers (``-0.25``,
``1e-3``) are left alone: they are not formulas and must stay numbers. Torch-free (``predict``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["safe_cell", "safe_row", "read_cell", "read_row"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def safe_cell(value: Any) -> Any:
    """``value`` as written to a CSV cell: text that a spreadsheet would run as a formula gets a ``'`` prefix."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith("'") or (value.startswith(_FORMULA_START) and not _is_number(value)):
        return "'" + value
    return value


def safe_row(row):
    """``safe_cell`` over a list (a ``csv.writer`` row) or the values of a dict (a ``DictWriter`` row)."""
    if isinstance(row, dict):
        return {k: safe_cell(v) for k, v in row.items()}
    return [safe_cell(v) for v in row]


def read_cell(text: str | None) -> str | None:
    """The value ``safe_cell`` was given (its ``'`` prefix removed)."""
    if isinstance(text, str) and text.startswith("'"):
        return text[1:]
    return text


def read_row(row: dict) -> dict:
    return {k: read_cell(v) for k, v in row.items()}
