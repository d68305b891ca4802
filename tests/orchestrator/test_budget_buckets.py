"""Budget buckets (orchestrator/budget_buckets.py), through check_sweep_config, `gmpq sweep --check` and `gmpq run
--check`: `budget_buckets: []` refused for a new sweep, edges that put every sampled budget in one bucket by accident
warned about, one bucket on purpose (a single edge above the highest bit candidate) and a fixed budget neither, and
the edges both messages suggest followed without a warning."""
from __future__ import annotations

import logging
import re

import pytest
import yaml

from gmpq_core.errors import ConfigError
from orchestrator.cli import main
from orchestrator.sweep_checks import check_sweep_config
from orchestrator.sweep_config import load_sweep_config

FIXES = ("Give edges inside your budget range 2.5..5, such as budget_buckets: [3.25, 4.25], so that trials are pruned "
         "and selected within their part of it; or, for one bucket on purpose, a single edge above the highest bit "
         "candidate (6), which no budget reaches: budget_buckets: [7].")     # the demo's range and candidates


def _cfg(tmp_path, buckets, budget=None):
    overrides = {"out_dir": str(tmp_path / "s"), "budget_buckets": buckets}
    if budget is not None:
        overrides["space.budget_avg_bits"] = budget
    return load_sweep_config(preset="demo", overrides=overrides)


def _bucket_warnings(caplog, check) -> str:
    """The budget-bucket warnings logged while ``check()`` runs, as one line."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orchestrator.sweep_checks"):
        check()
    return " ".join(" ".join(r.getMessage().split()) for r in caplog.records if "budget_buckets" in r.getMessage())


def _gmpq_check(command, tmp_path, data, capsys, caplog):
    """`gmpq COMMAND --config FILE --out DIR --check` for ``preset: demo`` plus ``data``: (exit code, its error
    output as one line, the budget-bucket warnings)."""
    path = tmp_path / f"{command}.yaml"
    path.write_text(yaml.safe_dump({"preset": "demo", "cache_dir": str(tmp_path / "cache"), **data}))
    codes = []
    warned = _bucket_warnings(caplog, lambda: codes.append(
        main([command, "--config", str(path), "--out", str(tmp_path / f"out_{command}"), "--check"])))
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    return codes[0], err, warned


def test_edges_that_put_every_sampled_budget_in_one_bucket_by_accident_are_warned_about(tmp_path, caplog):
    assert _bucket_warnings(caplog, lambda: check_sweep_config(_cfg(tmp_path, [3.25, 4.25]))) == ""   # the demo's
    for edges, why in (([10, 20], "several edges above every budget (GBitOPs written as bits?)"),
                       ([1, 2], "all below the range"), ([5.5], "above this range only, under the top candidate"),
                       ([6], "at the top candidate, not above it")):
        warned = _bucket_warnings(caplog, lambda: check_sweep_config(_cfg(tmp_path, edges)))
        assert warned.startswith(f"budget_buckets {[float(e) for e in edges]} put every sampled budget (2.5..5 "
                                 "average bits) in one bucket, so the pruner compares all trials"), why
        assert warned.endswith(FIXES), why                  # the refusal's fixes, in the refusal's words
    # no false alarm: budget values lying on edges are in buckets 1 and 2
    assert _bucket_warnings(caplog, lambda: check_sweep_config(_cfg(tmp_path, [3.0, 4.0, 5.0], [3.0, 4.0]))) == ""


def test_one_edge_above_the_highest_bit_candidate_is_one_bucket_on_purpose_and_not_warned_about(tmp_path, capsys,
                                                                                                caplog):
    # the fix the refusal of [] names ([7]) used to be warned about with "Give edges between 2.5 and 5.0"
    for edges in ([7], [6.5], [100]):
        assert _bucket_warnings(caplog, lambda: check_sweep_config(_cfg(tmp_path, edges))) == "", edges
    for command in ("sweep", "run"):
        code, err, warned = _gmpq_check(command, tmp_path, {"budget_buckets": [7]}, capsys, caplog)
        assert code == 0 and warned == "", (command, err, warned)
        code, err, warned = _gmpq_check(command, tmp_path, {"budget_buckets": [10, 20]}, capsys, caplog)
        assert code == 0 and warned.endswith(FIXES), (command, err, warned)


def test_empty_budget_buckets_are_refused_when_a_sweep_starts_naming_what_to_write(tmp_path, capsys, caplog):
    # [] used to mean one bucket silently: trials of every budget pruned against each other
    cfg = _cfg(tmp_path, [])
    assert cfg.budget_buckets == ()        # it still loads: a sweep begun with it resumes and its trials run
    with pytest.raises(ConfigError) as e:
        check_sweep_config(cfg)
    assert " ".join(str(e.value).split()) == (
        "budget_buckets is empty ([]), which puts every trial in one budget bucket: the pruner would compare trials "
        "of every budget with each other (a low budget's lower accuracy gets it pruned) and the Pareto selection "
        f"would pick from one bucket. {FIXES} Nothing has been trained yet.")
    for command in ("sweep", "run"):
        code, err, _ = _gmpq_check(command, tmp_path, {"budget_buckets": []}, capsys, caplog)
        assert code == 2 and err == f"gmpq: error: {' '.join(str(e.value).split())}", (command, err)
        assert not (tmp_path / f"out_{command}").exists()


def test_a_fixed_budget_is_one_bucket_whatever_the_edges(tmp_path, capsys, caplog):
    for budget in (3.0, [3.0], {"type": "float", "low": 3.0, "high": 3.0}):
        for edges in ([], [7], [10, 20], [1, 2], [3.0, 4.0, 5.0]):
            assert _bucket_warnings(caplog, lambda: check_sweep_config(_cfg(tmp_path, edges, budget))) == "", \
                (budget, edges)
    for command in ("sweep", "run"):
        for edges in ([], [10, 20]):
            code, err, warned = _gmpq_check(command, tmp_path, {"budget_buckets": edges,
                                                                 "space": {"budget_avg_bits": 3.0}}, capsys, caplog)
            assert code == 0 and warned == "", (command, edges, err, warned)


@pytest.mark.parametrize("budget, inside", [
    ({"type": "float", "low": 3.0, "high": 3.2}, "3..3.2, such as budget_buckets: [3.1]"),   # was [3.25], above 3.2
    ({"type": "float", "low": 3.0, "high": 3.01}, "3..3.01, such as budget_buckets: [3.005]"),
    ([3.0, 3.2], "3..3.2, such as budget_buckets: [3.1]"),
    ({"type": "float", "low": 2.0, "high": 6.0}, "2..6, such as budget_buckets: [3.25, 4.75]"),
    ({"type": "float", "low": 3.0, "high": 3.5}, "3..3.5, such as budget_buckets: [3.25]"),
])
def test_following_the_refusal_of_empty_buckets_never_gives_a_warning(tmp_path, caplog, budget, inside):
    with pytest.raises(ConfigError) as e:
        check_sweep_config(_cfg(tmp_path, [], budget))
    said = " ".join(str(e.value).split())
    assert f"Give edges inside your budget range {inside}" in said
    suggested = [[float(x) for x in found.split(",")] for found in re.findall(r"\[(\d[\d., ]*)\]", said)]
    assert suggested and [7.0] in suggested, said
    for edges in suggested:                   # every list of edges the message names, followed: no warning
        assert _bucket_warnings(caplog, lambda: check_sweep_config(_cfg(tmp_path, edges, budget))) == "", edges


def test_suggested_edges_lie_strictly_inside_the_budget_range():
    from orchestrator.budget_buckets import suggested_edges

    assert suggested_edges(2.5, 5.0) == [3.25, 4.25]            # the demo preset's own edges
    assert suggested_edges(3.0, 3.2) == [3.1]                   # a quarter bit is too coarse: a tenth
    assert suggested_edges(3.0, 3.0001) == [3.00005]            # too narrow for a hundredth: the midpoint
    for low in (2.0, 2.1, 2.5, 2.99, 3.0, 3.7, 4.0):
        for width in (1e-6, 0.001, 0.01, 0.03, 0.1, 0.2, 0.26, 0.5, 1.0, 2.0):
            edges = suggested_edges(low, low + width)
            assert edges and edges == sorted(set(edges)), (low, width, edges)
            assert all(low < e < low + width for e in edges), (low, width, edges)
