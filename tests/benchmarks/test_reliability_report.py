"""reliability_report.py's scenarios come from one registry (``SCENARIOS``): a scenario added there is listed in
--help, accepted by --only and run; none is in one list but not the other."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import reliability_report  # noqa: E402
from scenarios import Outcome  # noqa: E402  (tests/reliability, put on the path by reliability_report)


def _added(monkeypatch, ran: list[str]):
    """Register a scenario "extra_fault" after the real ones; it records that it ran and holds."""
    def run(work, procs, cache):
        ran.append("extra_fault")
        return Outcome("extra_fault", faults_injected=1)
    extra = reliability_report.Scenario("extra_fault", "a fault added by the test", run)
    monkeypatch.setattr(reliability_report, "SCENARIOS", (*reliability_report.SCENARIOS, extra))


def test_a_scenario_added_to_the_registry_is_accepted_by_only_and_run(tmp_path, monkeypatch, capsys):
    # the plan and the --only names were two lists: a name in one only was refused, or accepted and never run
    ran: list[str] = []
    _added(monkeypatch, ran)
    assert reliability_report.main(["--only", "extra_fault", "--work", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert ran == ["extra_fault"] and list(rep["scenarios"]) == ["extra_fault"] and rep["faults_injected"] == 1


def test_a_scenario_added_to_the_registry_is_listed_in_help_and_in_the_only_error(monkeypatch, capsys):
    _added(monkeypatch, [])
    with pytest.raises(SystemExit) as e:
        reliability_report.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "extra_fault a fault added by the test" in out
    assert all(f"{sc.name} {' '.join(sc.about.split())}" in out for sc in reliability_report.SCENARIOS)


def test_the_only_error_lists_every_registered_scenario(monkeypatch, capsys):
    _added(monkeypatch, [])
    try:
        rc = reliability_report.main(["--only", "nope"])
    except SystemExit as e:
        rc = e.code
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "unknown scenario(s) nope" in err
    assert "give a comma list of " + ", ".join(sc.name for sc in reliability_report.SCENARIOS) + "." in err


def test_scenario_names_are_unique_and_each_has_a_help_line():
    names = [sc.name for sc in reliability_report.SCENARIOS]
    assert len(names) == len(set(names)) and all(sc.about.strip() for sc in reliability_report.SCENARIOS)
    assert names[:2] == ["bad_inputs", "damaged_files"]        # the quick ones first (RESULTS.md: --only of them)
