"""Fixed-width text tables: the one renderer behind every table the package and its benchmarks
print.

Pure string work, no torch: the CLI renders results with it before anything heavy is imported.
Cells are strings already formatted by the caller (the caller knows the units and precision);
this module only lines them up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["render_table"]


def render_table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    align: str | None = None,
    rule: bool = True,
    pad_last: bool = False,
    gap: str = "  ",
    indent: str = "",
) -> list[str]:
    """Line up ``rows`` under ``header``, one string per line, trailing blanks removed.

    The last column is left ragged by default, since it usually holds free text (a reason, a
    remark) that would otherwise stretch every line to the longest one.

    Args:
        header: Column titles.
        rows: The cells, one sequence of strings per row, as many as ``header``.
        align: One letter per column, ``"l"`` (left, the default) or ``"r"`` (right, for
            numbers).
        rule: Put a line of dashes under the header (as wide as each column; as wide as its
            title for a ragged last column).
        pad_last: Pad the last column like the others instead of leaving it ragged.
        gap: What separates two columns.
        indent: What every line starts with.

    Returns:
        The lines of the table.

    Raises:
        ValueError: A row, or ``align``, does not have one entry per column.
    """
    table = [tuple(header), *(tuple(row) for row in rows)]
    columns = len(header)
    align = align or "l" * columns
    for index, row in enumerate(table):
        if len(row) != columns:
            raise ValueError(f"render_table: row {index} has {len(row)} cells {row!r}, expected "
                             f"{columns} (one per header entry {tuple(header)!r}).\n"
                             "Hint: pass one string per column in every row.")
    if len(align) != columns or set(align) - {"l", "r"}:
        raise ValueError(f"render_table: align={align!r} is not one 'l' or 'r' per column "
                         f"({columns} columns).\nHint: for example align={'l' * columns!r}.")
    padded = columns if pad_last else columns - 1
    widths = [max(len(row[i]) for row in table) for i in range(columns)]
    if rule:
        dashes = tuple("-" * (widths[i] if i < padded else len(header[i]))
                       for i in range(columns))
        table.insert(1, dashes)
    lines = []
    for row in table:
        cells = [(cell.rjust(widths[i]) if align[i] == "r" else cell.ljust(widths[i]))
                 if i < padded else (cell.rjust(widths[i]) if align[i] == "r" else cell)
                 for i, cell in enumerate(row)]
        lines.append((indent + gap.join(cells)).rstrip())
    return lines
