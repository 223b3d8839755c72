"""Plain-text tables, for the CLIs and the report objects (parity, predictions, benchmarks)."""
from __future__ import annotations

from typing import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    """Left-aligned text, right-aligned numbers, a rule under the header."""
    cols = [list(map(str, c)) for c in zip(header, *rows)] if rows else [[h] for h in header]
    widths = [max(len(x) for x in c) for c in cols]

    def numeric(s: str) -> bool:
        return s.replace(".", "", 1).replace("%", "").replace("x", "").replace("-", "", 1).replace("e", "", 1).strip().isdigit()

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(v).rjust(w) if numeric(str(v)) else str(v).ljust(w) for v, w in zip(row, widths)).rstrip()

    lines = ([title] if title else []) + [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)
