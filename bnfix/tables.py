"""Plain-text and JSON rendering shared by every result: table cells, tables, strict JSON.

Collecting (calibration, evaluation), formatting (here and in the result dataclasses) and printing
(cli) are kept apart, as in ``torch.utils.collect_env``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

__all__ = ["fmt_float", "fmt_percent", "json_safe", "render_table"]


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists and NaN/inf as None, so ``json.dumps`` emits valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain monospace table: left-aligned first column, right-aligned others."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def fmt_float(value: Optional[float], digits: int = 3) -> str:
    """A table cell: fixed-point, "-" for missing, "nan"/"inf" spelled out."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def fmt_percent(value: Optional[float]) -> str:
    """A table cell for a fraction in [0, 1], as a percentage."""
    return "-" if value is None else f"{100 * value:.2f}%"
