"""Rows as a terminal table, for people: times as local dates, costs in fixed point.

Only the table changes; JSON and CSV output keep the raw values (unix seconds, USD floats), so
scripts read what the API sent.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

# Columns holding unix seconds (0 means "never" / "not set").
TIME_COLUMNS = frozenset({"time", "created", "expires", "revoked", "first", "last", "since", "until", "day_start"})
COST_COLUMNS = frozenset({"cost", "usd", "input_price", "output_price"})


def cell(column: str, value: Any) -> str:
    """One value as shown in a table."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":")) if value else ""
    if column in TIME_COLUMNS and isinstance(value, (int, float)):
        return human_time(float(value))
    if (column in COST_COLUMNS or column.startswith("usd_")) and isinstance(value, (int, float)):
        return f"{value:.6f}"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    return str(value)


def human_time(seconds: float) -> str:
    """A unix time as a local date and time to the second ("" for 0: never)."""
    if not seconds:
        return ""
    return dt.datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    cols = list(rows[0])
    cells = [[cell(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)
