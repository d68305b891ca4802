"""bench_final_stage.py refuses what it cannot time as the other benchmarks do (bench_cli): exit 2, one paragraph
naming the value and the fix, no traceback, before Ray starts or a temporary folder is made."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.benchmarks.refusals import refused

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_final_stage  # noqa: E402


def _refused(argv, capsys) -> str:
    """``bench_final_stage.main(argv)`` refused (``refusals.refused``): its stderr on one line."""
    return refused(bench_final_stage.main, argv, capsys)


@pytest.fixture
def no_work(tmp_path, monkeypatch):
    """Temporary folders go to a folder of the test's own (checked empty after), and starting Ray fails the test."""
    import ray

    def boom(*a, **k):
        raise AssertionError("the benchmark started Ray before refusing its input")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(ray, "init", boom)
    yield tmp
    assert list(tmp.iterdir()) == []


def _sweep(d: Path, selected: list[bool]) -> Path:
    """A sweep folder whose pareto.parquet holds ``selected`` (all False: a sweep that selected nothing)."""
    d.mkdir()
    (d / "sweep_config.yaml").write_text("name: nothing_selected\nmodel: resnet20\n")
    pq.write_table(pa.table({"trial_id": pa.array([f"t{i}" for i in range(len(selected))], pa.string()),
                             "selected": pa.array(selected, pa.bool_())}), d / "pareto.parquet")
    return d


@pytest.mark.parametrize("selected", [[False, False], []], ids=["none_selected", "empty_front"])
def test_a_sweep_that_selects_no_policy_is_refused_naming_the_folder_and_the_fix(tmp_path, no_work, capsys,
                                                                                   selected):
    # it ended in sys.exit(text): exit status 1, unlike every other refusal of the benchmarks
    sweep = _sweep(tmp_path / "sweep", selected)
    err = _refused(["--sweep", str(sweep), "--steps", "1", "--rounds", "1"], capsys)
    assert err.startswith("bench_final_stage.py: --sweep ")
    assert str(sweep) in err and "selects no policy" in err
    assert f"gmpq sweep --out {sweep} --resume" in err and "make demo" in err


def test_a_folder_that_is_not_a_sweep_is_refused_naming_the_missing_config(tmp_path, no_work, capsys):
    (tmp_path / "plain").mkdir()
    err = _refused(["--sweep", str(tmp_path / "plain")], capsys)
    assert "sweep_config.yaml" in err and "not a sweep" in err


def test_a_sweep_without_its_pareto_table_is_refused_naming_the_file(tmp_path, no_work, capsys):
    sweep = _sweep(tmp_path / "sweep", [])
    (sweep / "pareto.parquet").unlink()
    assert "pareto.parquet" in _refused(["--sweep", str(sweep)], capsys)


def test_a_file_given_as_the_sweep_folder_is_refused_as_a_file(tmp_path, no_work, capsys):
    (tmp_path / "f.txt").write_text("")
    assert "that is a file" in _refused(["--sweep", str(tmp_path / "f.txt")], capsys)


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--rounds", "-1"), ("--test-size", "many"),
                                        ("--workers", "0")])
def test_bad_numbers_are_refused_naming_the_flag_and_value(tmp_path, no_work, capsys, flag, value):
    err = _refused(["--sweep", str(tmp_path), flag, value], capsys)
    assert f"{flag}: must be a positive integer" in err and value in err
