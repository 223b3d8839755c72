"""Plain-text tables, for the CLIs and the report objects (parity, predictions, benchmarks)."""
from __future__ import annotations

from typing import Any, Sequence


def printable(value: Any, lines: bool = False) -> str:
    """``str(value)`` with what a terminal would act on (escape sequences, carriage returns,
    bidirectional overrides: every character that is not printable) shown as its escape, so a
    label or file name from someone else's file can never rewrite or hide what is printed.
    ``lines``: keep the text's own line breaks (a message or a title of several lines)."""
    text = str(value)
    if lines:
        return "\n".join(printable(line) for line in text.split("\n"))
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    """Left-aligned text, right-aligned numbers, a rule under the header."""
    header = [printable(h) for h in header]
    rows = [[printable(v) for v in r] for r in rows]
    title = None if title is None else printable(title, lines=True)
    cols = [list(map(str, c)) for c in zip(header, *rows)] if rows else [[h] for h in header]
    widths = [max(len(x) for x in c) for c in cols]

    def numeric(s: str) -> bool:
        return s.replace(".", "", 1).replace("%", "").replace("x", "").replace("-", "", 1).replace("e", "", 1).strip().isdigit()

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(v).rjust(w) if numeric(str(v)) else str(v).ljust(w) for v, w in zip(row, widths)).rstrip()

    lines = ([title] if title else []) + [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)
