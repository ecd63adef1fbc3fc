"""json_safe and render_table: strict JSON and plain monospace tables."""

from __future__ import annotations

import math

from bnfix.tables import fmt_float, fmt_percent, json_safe, render_table


def test_json_safe_and_render_table() -> None:
    assert json_safe({"a": (1.0, math.nan), 2: {"b": math.inf}}) == {
        "a": [1.0, None],
        "2": {"b": None},
    }
    table = render_table(["name", "x"], [["long-name", "1"], ["n", "22"]])
    assert table.splitlines() == [
        "name        x",
        "---------  --",
        "long-name   1",
        "n          22",
    ]


def test_cells_spell_out_missing_and_non_finite_values() -> None:
    assert [fmt_float(v) for v in (None, math.nan, -math.inf, 0.12345)] == [
        "-",
        "nan",
        "-inf",
        "0.123",
    ]
    assert fmt_float(2.0, digits=1) == "2.0"
    assert [fmt_percent(v) for v in (None, 0.5, 1.0, 0.12345)] == [
        "-",
        "50.00%",
        "100.00%",
        "12.35%",
    ]
