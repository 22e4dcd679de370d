"""The CLI's tables, fitted to the terminal: names, keys and ids in full, the less useful columns left out.

Each table is described by its columns (:class:`Col`): a header, a priority and whether its cells may wrap.
:func:`fit_table` measures the cells, and when the table is wider than the terminal (``console.width``, which
``COLUMNS`` sets) it first wraps the columns that may wrap, down to their minimum width, then leaves out whole
columns, least useful first, until the rest fit; a dim footnote under the table names what it left out and how
to see it. A cell of a column that may not wrap (a name, a key, an id) is never cut short: it stays on one line,
and only when the most useful columns alone are too wide for the terminal does it fold onto more lines.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.markup import escape
from rich.table import Table
from rich.text import Text

#: What a column costs besides its cells: one space of padding on each side and a border (plus one border).
_COLUMN_EXTRA = 3
_TABLE_EXTRA = 1
#: The narrowest a wrapping column is made before the columns that may not wrap fold, when nothing fits.
_WRAP_FLOOR = 6


@dataclass(frozen=True)
class Col:
    """One column of a CLI table.

    ``priority``: 1 for a column always shown; when the columns do not fit the terminal, the column with the
    largest number is left out first (of equal numbers, the rightmost first).
    ``wrap``: whether its cells may wrap onto more lines (text, lists, timestamps); the cells of a column that
    may not (names, keys, ids, states, numbers) stay on one line, in full.
    ``min_width``: the narrowest a wrapping column is made (wider where one of its words is longer, so that
    words are not split), before columns are left out.
    """

    header: str
    priority: int = 1
    wrap: bool = False
    min_width: int = 10


def fit_table(
    columns: Sequence[Col],
    rows: Iterable[Sequence[str]],
    *,
    width: int,
    command: str,
    **table_options: Any,
) -> Table:
    """A table of ``rows`` (cells as console markup, one per column) that fits ``width`` terminal columns.

    ``command`` is the command that prints it (``warmboot snapshot list``): the footnote shows how to run it
    wider. ``table_options`` go to :class:`rich.table.Table` (a title, say).
    """
    rows = [list(row) for row in rows]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row of {len(row)} cells for {len(columns)} columns: {row!r}")
    texts = [[Text.from_markup(col.header) for col in columns], *[[Text.from_markup(c) for c in r] for r in rows]]
    natural = [max(_longest_line(row[i]) for row in texts) for i in range(len(columns))]
    if rows:
        wrap = [col.wrap for col in columns]
        smallest = [
            min(natural[i], max(col.min_width, max(_longest_word(row[i]) for row in texts))) if col.wrap else natural[i]
            for i, col in enumerate(columns)
        ]
    else:  # headers alone: every one may wrap between its words, and no column is left out for them
        wrap = [True] * len(columns)
        smallest = [_longest_word(texts[0][i]) or 1 for i in range(len(columns))]
    kept = _choose(columns, smallest, width)
    left_out = [col.header for i, col in enumerate(columns) if i not in kept]
    widths = _widths([natural[i] for i in kept], [smallest[i] for i in kept], [wrap[i] for i in kept], width)

    if left_out:
        full = sum(smallest) + _COLUMN_EXTRA * len(columns) + _TABLE_EXTRA
        table_options.setdefault(
            "caption",
            escape(
                f"Not shown at this width ({width} columns): {', '.join(left_out)}. "
                f"A wider terminal shows them, e.g. COLUMNS={full} {command}"
            ),
        )
        table_options.setdefault("caption_style", "dim")
        table_options.setdefault("caption_justify", "left")
    table = Table(**table_options)
    for i, w in zip(kept, widths, strict=True):
        col = columns[i]
        shrunk = w < natural[i]
        # overflow="fold": a cell too long for its column goes on the next line, never behind a "…". A column that
        # may not wrap keeps its natural width and no_wrap (one line per cell); it is narrowed only where the most
        # useful columns alone are too wide, and then it must wrap too: rich cuts a no_wrap cell short, fold or not.
        table.add_column(col.header, no_wrap=not (wrap[i] or shrunk), overflow="fold", width=w if shrunk else None)
    for row in rows:
        table.add_row(*(row[i] for i in kept))
    return table


def _longest_line(text: Text) -> int:
    return max((cell_len(line) for line in text.plain.split("\n")), default=0)


def _longest_word(text: Text) -> int:
    return max((cell_len(word) for word in text.plain.split()), default=0)


def _needed(smallest: Iterable[int]) -> int:
    widths = list(smallest)
    return sum(widths) + _COLUMN_EXTRA * len(widths) + _TABLE_EXTRA


def _choose(columns: Sequence[Col], smallest: Sequence[int], width: int) -> list[int]:
    """The indexes of the columns to show: the least useful left out until the rest fit at their narrowest."""
    kept = list(range(len(columns)))
    # Least useful first: the largest priority number, and of equal ones the rightmost.
    order = sorted((i for i, c in enumerate(columns) if c.priority > 1), key=lambda i: (-columns[i].priority, -i))
    dropped: list[int] = []
    for i in order:
        if _needed(smallest[k] for k in kept) <= width:
            break
        kept.remove(i)
        dropped.append(i)
    # Leaving out a wide column can make room for a narrow one left out before it: take those back, most useful first.
    for i in reversed(dropped):
        if _needed([*(smallest[k] for k in kept), smallest[i]]) <= width:
            kept = sorted([*kept, i])
    return kept


def _widths(natural: list[int], smallest: list[int], wrap: list[bool], width: int) -> list[int]:
    """The width of each column's cells: its natural width, narrowed (the widest first) until the table fits."""
    widths = list(natural)
    excess = _needed(widths) - width
    n = len(widths)
    # The columns that may wrap, down to their minimum; then, only where even that is too wide, further down,
    # then the others too (they fold rather than run past the terminal's edge).
    for floors in (
        [smallest[i] if wrap[i] else natural[i] for i in range(n)],
        [min(natural[i], _WRAP_FLOOR) if wrap[i] else natural[i] for i in range(n)],
        [1] * n,
    ):
        excess = _shrink(widths, floors, excess)
    return widths


def _shrink(widths: list[int], floors: list[int], excess: int) -> int:
    """Narrow ``widths`` in place by up to ``excess`` cells, the widest column first, none below its floor."""
    while excess > 0:
        candidates = [i for i, w in enumerate(widths) if w > floors[i]]
        if not candidates:
            break
        widest = max(candidates, key=lambda i: (widths[i], i))
        widths[widest] -= 1
        excess -= 1
    return excess
