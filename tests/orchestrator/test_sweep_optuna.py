"""Optuna bookkeeping of a sweep (real SQLite storage, no Ray)."""
from __future__ import annotations

import time
from datetime import datetime

import optuna

from orchestrator.sweep import _close_orphan_optuna_trials
from orchestrator.sweep_config import load_sweep_config


def test_trials_left_running_by_a_dead_driver_are_marked_failed_after_the_sweep(tmp_path):
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "name": "s"}).resolved()
    storage = optuna.storages.RDBStorage(cfg.optuna_storage)
    main = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    done = main.ask()
    main.tell(done, [80.0, 0.4])
    main.ask()                                                       # the orphan: RUNNING for ever
    bucket = optuna.create_study(study_name="s-prune-bucket0", storage=storage)
    bucket.ask()
    other = optuna.create_study(study_name="someone-else", storage=storage)
    other.ask()                                                      # another sweep's study: untouched
    resumed_at = datetime.now()
    time.sleep(0.05)
    main.ask()                                      # started after this driver did: another driver's, kept
    said: list[str] = []
    _close_orphan_optuna_trials(cfg, said.append, started_before=resumed_at)
    states = {name: [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]
              for name in ("s", "s-prune-bucket0", "someone-else")}
    assert states == {"s": ["COMPLETE", "FAIL", "RUNNING"], "s-prune-bucket0": ["FAIL"], "someone-else": ["RUNNING"]}
    assert said == ["1 Optuna trial(s) left RUNNING by an interrupted driver marked FAIL (with its records in the "
                    "per-bucket pruning studies)"]


def test_each_interrupted_trial_is_counted_once_though_its_pruning_study_holds_it_too(tmp_path):
    """Two trials interrupted: each has a RUNNING record in the sweep's study and one in its bucket's pruning
    study. The message counted 4."""
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "name": "s"}).resolved()
    storage = optuna.storages.RDBStorage(cfg.optuna_storage)
    main = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    buckets = [optuna.create_study(study_name=f"s-prune-bucket{i}", storage=storage) for i in (0, 1)]
    for bucket in buckets:                                           # one interrupted trial per bucket
        main.ask()
        bucket.ask()
    said: list[str] = []
    time.sleep(0.05)
    _close_orphan_optuna_trials(cfg, said.append, started_before=datetime.now())
    assert said == ["2 Optuna trial(s) left RUNNING by an interrupted driver marked FAIL (with their records in "
                    "the per-bucket pruning studies)"]
    assert [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials] == ["FAIL", "FAIL"]
    assert all(t.state.name == "FAIL" for b in buckets for t in b.trials)


def test_pruning_records_left_running_alone_are_reported_as_such(tmp_path):
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "name": "s"}).resolved()
    storage = optuna.storages.RDBStorage(cfg.optuna_storage)
    optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    optuna.create_study(study_name="s-prune-bucket0", storage=storage).ask()
    said: list[str] = []
    time.sleep(0.05)
    _close_orphan_optuna_trials(cfg, said.append, started_before=datetime.now())
    assert said == ["1 record(s) of the per-bucket pruning studies left RUNNING by an interrupted driver marked FAIL"]


def test_a_storage_error_while_closing_orphans_only_warns(tmp_path, caplog):
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "name": "s",
                                                      "optuna_storage": f"sqlite:///{tmp_path}/no/such/dir/o.db"})
    _close_orphan_optuna_trials(cfg.resolved(), lambda m: None, started_before=datetime.now())
    assert "could not close Optuna trials" in caplog.text
