"""orchestrator.text: missing values print as '-', tables align."""
from __future__ import annotations

import math

import numpy as np

from orchestrator.text import fmt, text_table


def test_fmt_prints_a_dash_for_missing_values():
    assert [fmt(v, ".2f") for v in (None, math.nan, np.float64("nan"), math.inf, 1.234)] == ["-", "-", "-", "-", "1.23"]
    assert fmt(3, "d") == "3"


def test_text_table_aligns_columns_and_right_aligns_the_chosen_ones():
    out = text_table(["id", "top1"], [["a", "9.50"], ["bbb", "10.25"]], right={1})
    assert out.splitlines() == ["id    top1", "---  -----", "a     9.50", "bbb  10.25"]
    assert text_table(["id", "x"], []).splitlines() == ["id  x", "--  -"]
