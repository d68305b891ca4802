"""``gmpq sweep --check`` refuses what the sweep itself refuses before Ray starts: a --resume with nothing to resume,
a new sweep in a folder holding another sweep's results, an --address where nothing answers. It said "config OK ...
Run the same command without --check" (exit 0) for each, and the run then failed. In process, demo preset, no Ray."""
from __future__ import annotations

from pathlib import Path

from orchestrator.cli import main
from orchestrator.sweep_config import load_sweep_config, save_resolved_config


def _check(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--preset", "demo", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *extra, "--check"]


def test_check_refuses_a_resume_with_nothing_to_resume(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(_check(tmp_path, out, "--resume")) == 2
    assert "Nothing to resume: no Tune experiment state" in " ".join(capsys.readouterr().err.split())
    assert main(_check(tmp_path, out, "--resume", "auto")) == 0            # auto: starts one, as the run would
    assert "Run the same command without --check to start the sweep." in capsys.readouterr().out
    assert not out.exists()


def test_check_refuses_a_new_sweep_in_a_folder_with_another_sweeps_results(tmp_path, capsys):
    out = tmp_path / "s"
    save_resolved_config(load_sweep_config(preset="demo", overrides={"out_dir": str(out), "name": "first",
                                                                     "cache_dir": str(tmp_path / "cache")}))
    import pyarrow.parquet as pq

    from orchestrator.results import trial_schema
    pq.write_table(trial_schema().empty_table(), out / "trials.parquet")   # the first sweep's results table
    assert main(_check(tmp_path, out, "--name", "second")) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert f"The folder '{out}' holds the results of sweep 'first'" in said and "Traceback" not in said


def test_check_refuses_an_address_where_nothing_answers(tmp_path, capsys):
    assert main(_check(tmp_path, tmp_path / "s", "--address", "127.0.0.1:1")) == 2
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err and "Traceback" not in err and "config OK" not in err


def test_check_makes_no_folder_for_an_optuna_storage_under_a_missing_out(tmp_path, capsys):
    out = tmp_path / "new"
    storage = f"sqlite:///{out / 'db' / 'optuna.db'}"
    assert main(_check(tmp_path, out, "--optuna-storage", storage)) == 0, capsys.readouterr().err
    assert "Nothing was trained" in capsys.readouterr().out and not out.exists()


def test_run_check_validates_as_sweep_check_does_and_names_the_final_fine_tune(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--preset", "demo", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--check"]
    assert main([*argv, "--finetune-train-size", "500", "--workers", "1"]) == 0
    said = capsys.readouterr().out
    assert said.startswith("config OK: sweep 'demo'") and "Nothing was trained" in said and not out.exists()
    assert "final fine-tune (gmpq run, gmpq finetune --sweep): the top 2 policies, 1 epoch on 500 target " \
           "training images, 1 worker each" in said
    assert main([*argv, "--resume"]) == 2                   # the sweep's refusals too: nothing to resume
    assert "Nothing to resume" in " ".join(capsys.readouterr().err.split())


def test_check_of_a_finished_sweeps_resume_says_there_is_nothing_left(tmp_path, capsys, monkeypatch):
    import orchestrator.sweep as sweep

    out = tmp_path / "s"
    save_resolved_config(load_sweep_config(preset="demo", overrides={"out_dir": str(out), "n_trials": 1,
                                                                     "cache_dir": str(tmp_path / "cache")}))
    monkeypatch.setattr(sweep, "_finished_summary", lambda cfg, t0: object())    # (a finished sweep's summary)
    assert main(["sweep", "--out", str(out), "--resume", "--check"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert said == (f"config OK: the sweep 'demo' in {out} already ran all its 1 trials: without --check, gmpq sweep "
                    "has nothing to resume (gmpq run goes on to its Pareto and fine-tune stages).")   # (no Tune state to
    # grow: test_sweep_grow.py's finished sweep says how to run more once there is)
