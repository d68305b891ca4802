"""bench_qat_step.py runs end to end on a tiny case: its variants, precisions and JSON rows."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_qat_step  # noqa: E402

TINY = ["--models", "resnet20:8:1", "--batch-size", "8", "--rounds", "1", "--chunk", "1", "--threads", "1"]


def test_the_precisions_mode_times_float32_and_bf16_twins(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_qat_step.main([*TINY, "--precisions", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["variant"]: r["precision"] for r in rows} == {"fp": "fp32", "fp_bf16": "bf16", "fused": "fp32",
                                                            "fused_bf16": "bf16"}
    assert rows[0]["ratio"] == 1.0 and all(r["img_s"] > 0 for r in rows)
    assert "bf16 / float32: FP" in capsys.readouterr().out


def test_the_default_mode_compares_the_quantizer_implementations(tmp_path):
    out = tmp_path / "rows.json"
    assert bench_qat_step.main([*TINY, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["reference", "fused"]
    assert all(r["precision"] == "fp32" and r["ratio"] > 0 for r in rows)        # auto on the CPU


def test_precisions_with_a_precision_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench_qat_step.main([*TINY, "--precisions", "--precision", "bf16"])
    assert e.value.code == 2 and "--precisions runs both float32 and bf16; leave --precision out." in capsys.readouterr().err
