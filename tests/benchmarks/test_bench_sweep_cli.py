"""bench_sweep.py as a user runs it: refused inputs are one line (exit 2) and leave no temporary sweep behind; a sweep
stopped midway (Ctrl-C) gives no figures, no JSON and exit 130; fewer trials than slots is said."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_sweep  # noqa: E402


@pytest.fixture
def tmpdir_root(tmp_path, monkeypatch):
    """Where bench_sweep's temporary sweep folders go (tempfile.mkdtemp), to count what is left behind."""
    import tempfile

    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _boom(*a, **k):
    raise AssertionError("the benchmark ran a sweep before refusing its input")


def test_an_unknown_preset_is_one_line_and_leaves_no_temporary_folder(tmpdir_root, capsys):
    rc = bench_sweep.main(["--preset", "nope", "--n-trials", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Unknown preset 'nope'" in err and "Traceback" not in err
    assert list(tmpdir_root.iterdir()) == []


def test_an_out_folder_with_files_is_refused_before_the_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_sweep, "run_once", _boom)
    out = tmp_path / "old"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        bench_sweep.main(["--out", str(out), "--n-trials", "1"])
    assert e.value.code == 2 and "already holds files" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_bad_counts_and_json_targets_are_refused_before_the_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_sweep, "run_once", _boom)
    for argv, says in ((["--n-trials", "-1"], "--n-trials: must be a positive integer"),
                       (["--max-concurrent", "0"], "--max-concurrent: must be a positive integer"),
                       (["--json", str(tmp_path / "no" / "s.json")], "does not exist")):
        with pytest.raises(SystemExit) as e:
            bench_sweep.main(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_a_sweep_stopped_midway_gives_no_figures_no_json_and_exit_130(tmp_path, tmpdir_root, monkeypatch, capsys):
    import orchestrator.sweep as sweep_mod

    def stopped(cfg, **kw):      # what run_sweep returns after Ctrl-C: trials unfinished, no trials.parquet
        return sweep_mod.SweepSummary(sweep_dir=Path(cfg.out_dir), n_completed=0, n_pruned=0, n_failed=0,
                                      wall_seconds=3.0, n_unfinished=2, n_planned=2)
    monkeypatch.setattr(sweep_mod, "run_sweep", stopped)
    out = tmp_path / "s.json"
    rc = bench_sweep.main(["--n-trials", "2", "--epochs", "1", "--cache-dir", str(tmp_path / "cache"),
                           "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 130 and "stopped after 0 of its 2 trials" in err and "Traceback" not in err
    assert not out.exists() and list(tmpdir_root.iterdir()) == []


def test_fewer_trials_than_slots_and_a_shortened_sweep_are_said_next_to_the_fraction(capsys):
    res = {"preset": "demo", "prep": "parallel", "n_trials": 1, "n_completed": 1, "n_pruned": 0, "n_failed": 0,
           "slots": 2, "wall_s": 40.0, "import_s": 2.0, "trial_compute_s": 27.0, "compute_fraction": 0.34,
           "tail_idle_slot_s": 27.0, "tail_idle_fraction": 0.34, "lent_slot_s": 24.0, "core_compute_fraction": 0.64,
           "prepare_s": 0.1, "ray_start_s": 5.0, "ray_stop_s": 1.0, "tune_phase_s": 32.0,
           "compute_fraction_of_tune_phase": 0.42, "in_trial_non_compute_s": 0.2, "trials_without_timings": []}
    bench_sweep._print(res)
    out = capsys.readouterr().out
    assert "1 trial(s) on 2 slots" in out and "--n-trials 2 or more" in out and "MISSED" in out
    bench_sweep._print({**res, "shortened": True})      # --n-trials / --epochs given: the goal is not judged
    out = capsys.readouterr().out
    assert "MISSED" not in out and "shortened: not judged" in out and "load 1m" not in out   # a file without it
    bench_sweep._print({**res, "loadavg_1m_start": 0.4, "loadavg_1m_end": 2.9, "cpus": 2})
    assert "load 1m: start 0.4, end 2.9 (2 cores" in capsys.readouterr().out
