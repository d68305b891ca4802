"""bench_optimizer.py runs end to end: the default and the fused SGD inside training steps, side by side."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_optimizer  # noqa: E402


def test_both_optimizers_train_side_by_side_and_the_rows_say_so(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_optimizer.CASES, "cpu", (("resnet20", 8, 1, 4),))
    out = tmp_path / "rows.json"
    assert bench_optimizer.main(["--steps", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["model"] == "resnet20" and row["default_opt_ms"] > 0 and row["fused_opt_ms"] > 0
    assert row["step_speedup"] > 0 and row["n_params"] > 0
