"""The benchmarks that record the machine's load average read it before each measurement as well as after it
(``loadavg_1m_start``, ``loadavg_1m_end``) and print both, so a reader can tell whether the machine was busy."""
from __future__ import annotations

import itertools
import json
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_host_overhead  # noqa: E402
import bench_qat_step  # noqa: E402
import bench_search_step  # noqa: E402

TINY = {"search_step": (bench_search_step, ["--models", "resnet20:8:1", "--batch-size", "2", "--steps", "1",
                                            "--threads", "1", "--variants", "fused", "--no-memory"]),
        "host_overhead": (bench_host_overhead, ["--models", "resnet20:8:1", "--steps", "1", "--warmup", "0",
                                                "--variants", "fused"]),
        "qat_step": (bench_qat_step, ["--models", "resnet20:8:1", "--batch-size", "8", "--rounds", "1", "--chunk", "1",
                                      "--threads", "1"])}


@pytest.fixture
def rising_load(monkeypatch):
    """``os.getloadavg`` that rises by 1 at each read (1.0, 2.0, ...): a read at the start is below one at the end."""
    if not hasattr(os, "getloadavg"):
        pytest.skip("this OS keeps no load average")
    reads = itertools.count(1)
    monkeypatch.setattr(os, "getloadavg", lambda: (float(next(reads)), 0.0, 0.0))


@pytest.mark.parametrize("bench", list(TINY))
def test_the_load_average_is_recorded_before_and_after_the_measurement_and_printed(bench, tmp_path, rising_load,
                                                                                   capsys):
    # only the end was read (loadavg_1m): a machine that got busy during the run looked quiet, and one that got
    # quiet looked busy
    module, argv = TINY[bench]
    out = tmp_path / "rows.json"
    assert module.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    loads = [(r.get("machine") or r)[k] for r in rows for k in ("loadavg_1m_start", "loadavg_1m_end")]
    assert all(isinstance(x, float) for x in loads)
    assert all(r_start < r_end for r_start, r_end in zip(loads[::2], loads[1::2]))
    printed = re.search(r"load 1m: start ([\d.]+), end ([\d.]+) \(\d+ cores\)", capsys.readouterr().out)
    assert printed, "the load average is not printed"
    start, end = float(printed[1]), float(printed[2])
    assert start <= loads[0] and end >= loads[-1]            # the whole run's: before its first row, after its last
