"""Plain-text tables for what a job prints at its end (and saves beside its outputs)."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """Columns as wide as their widest cell, two spaces apart; ``align`` holds ``l`` or ``r`` per column
    (default: the first column left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or any(len(r) != len(header) for r in rows):
        raise ValueError(f"text_table: {len(header)} columns, align {align!r}, row lengths {[len(r) for r in rows]}")
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align, strict=True)
        ).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])
