"""A new user's own sweep config: the mistakes of a first sweep YAML (a sampler choice, a quoted seed, a key of the
wrong place, a misspelt space parameter, an empty list) and an Optuna storage that cannot be opened or that another
sweep of the same name already uses. Each is one ``gmpq: error:`` paragraph (exit 2) before any training; the
checks run in process on the demo preset (no Ray start)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import optuna
import pytest
import yaml

from gmpq_core.errors import ConfigError
from orchestrator.cli import main
from orchestrator.sweep_checks import check_sweep_config
from orchestrator.sweep_config import SweepConfig, load_sweep_config, save_resolved_config
from search_spaces.presets import load_preset

from demo_config import config_error, demo_cfg   # same folder (pytest puts it on sys.path)


_cfg, _error = demo_cfg, config_error


def test_an_optuna_sampler_key_names_the_sampler_section():
    said = _error(optuna_sampler={"name": "random"})
    assert "'optuna_sampler' is not a sweep config key" in said and "'seed'" in said
    assert "sampler: {name: tpe|random|nsga2|qmc|gp, kwargs: {...}}" in said and "Rename this key to 'sampler'" in said


@pytest.mark.parametrize("key", ["seed", "n_trials"])
def test_a_number_written_in_quotes_is_named_with_the_fix(key):
    assert f"but got {key}='7' (a string: write 7 without quotes)." in _error(**{key: "7"})


def test_a_top_level_max_concurrent_also_offers_max_concurrent_trials():
    # it is a finetune key too, but the user of --max-concurrent means the trials running at once
    said = _error(max_concurrent=2)
    assert "Or did you mean 'max_concurrent_trials' at the top level (gmpq sweep --max-concurrent sets it)?" in said


def test_a_misspelt_space_parameter_gets_the_look_alike():
    space = {"budget_avg_bit": {"type": "float", "low": 2.5, "high": 5.0}, "eta": [1, 10]}
    with pytest.raises(ConfigError, match=r"Did you mean 'budget_avg_bits' \(not 'budget_avg_bit'\)\?"):
        SweepConfig.from_dict({**load_preset("demo"), "space": space})


def test_an_empty_list_is_shown_as_written():
    space = {**load_preset("demo")["space"], "proxy_size": []}
    with pytest.raises(ConfigError, match=r"non-empty list of choices \(e.g. \[500, 1000\]\), but got \[\]\.$"):
        SweepConfig.from_dict({**load_preset("demo"), "space": space})


def _checked(tmp_path: Path, **changes) -> SweepConfig:
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "sweep"), "name": "mine",
                                                      "cache_dir": str(tmp_path / "cache"), **changes})
    check_sweep_config(cfg)
    return cfg


def test_an_optuna_storage_file_that_is_no_database_is_refused_before_work(tmp_path):
    (tmp_path / "notes.db").write_text("not a database\n")
    with pytest.raises(ConfigError, match=r"optuna_storage 'sqlite:///.*notes.db' cannot be opened \(DatabaseError: "
                                          r"file is not a database\)\. Nothing has been trained yet"):
        _checked(tmp_path, optuna_storage=f"sqlite:///{tmp_path}/notes.db")


def test_an_optuna_storage_in_a_missing_folder_is_made_openable(tmp_path):
    url = f"sqlite:///{tmp_path}/new/dir/optuna.db"
    _checked(tmp_path, optuna_storage=url)
    optuna.create_study(storage=url, study_name="x")       # Optuna's own open failed there before


@pytest.mark.skipif(importlib.util.find_spec("MySQLdb") is not None, reason="the MySQL driver is installed here")
def test_an_optuna_storage_without_its_driver_names_the_driver(tmp_path, capsys):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"preset": "demo", "optuna_storage": "mysql://u@localhost/db",
                                    "cache_dir": str(tmp_path / "cache")}))
    rc = main(["sweep", "--config", str(path), "--out", str(tmp_path / "s"), "--address", "local"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "Traceback" not in err
    assert "optuna_storage 'mysql://u@localhost/db' needs the database driver 'MySQLdb', which is not installed: pip install mysqlclient," in err
    assert not (tmp_path / "s" / "shared.json").exists()             # refused before the shared models


def test_a_new_sweep_is_refused_a_shared_storage_where_its_name_holds_another_sweeps_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/shared.db"
    study = optuna.create_study(storage=url, study_name="mine", directions=["maximize", "minimize"])
    study.tell(study.ask(), [50.0, 0.3])
    with pytest.raises(ConfigError) as e:
        _checked(tmp_path, optuna_storage=url)
    said = " ".join(str(e.value).split())
    assert f"optuna_storage '{url}' already holds Optuna study 'mine' (1 trial) of another sweep named 'mine'" in said
    assert "Give this sweep another --name" in said and "optuna delete-study --study-name mine" in said
    _checked(tmp_path, optuna_storage=url, name="mine2")                       # another name: no clash


def test_the_folders_own_sweep_restarting_keeps_its_study(tmp_path):
    # stopped while Tune began its state (its experiment folder there, nothing to restore), the sweep starts again
    # on its own study (--resume auto)
    url = f"sqlite:///{tmp_path}/shared.db"
    optuna.create_study(storage=url, study_name="mine-prune-bucket0").ask()
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "sweep"), "name": "mine",
                                                      "cache_dir": str(tmp_path / "cache"), "optuna_storage": url})
    with pytest.raises(ConfigError, match="already holds Optuna study 'mine-prune-bucket0' \\(1 trial\\)"):
        check_sweep_config(cfg)                     # without the folder's saved config: another sweep's study
    save_resolved_config(cfg)
    (tmp_path / "sweep" / "ray_results" / "mine").mkdir(parents=True)
    check_sweep_config(cfg)                         # the folder's own: accepted
    assert len(optuna.load_study(study_name="mine-prune-bucket0", storage=url).trials) == 1   # and kept


def test_check_validates_a_config_and_says_what_would_run_without_running_it(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"preset": "demo", "name": "mine", "n_trials": 3, "seed": 7,
                                    "cache_dir": str(tmp_path / "cache"),
                                    "pruner": {"name": "percentile", "kwargs": {"percentile": 25.0}}}))
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(path), "--out", str(out), "--check"]) == 0
    said = capsys.readouterr().out
    assert said.startswith("config OK: sweep 'mine' of resnet20 at 28 px") and "3 trials, 2 at a time" in said
    assert "budget_avg_bits float 2.5..5; proxy_size one of [500, 1000]" in said
    assert "2..6 average bits" in said
    assert "TPESampler (seed 7, n_startup_trials=10); pruner percentile (percentile=25.0)" in said
    assert not out.exists()                                            # nothing written, nothing trained
    path.write_text(yaml.safe_dump({"preset": "demo", "space": {"budget_avg_bits": {"type": "float", "low": 1.0,
                                                                                    "high": 3.0}}}))
    assert main(["sweep", "--config", str(path), "--out", str(out), "--check"]) == 2
    assert "low 1.0 is below 2" in " ".join(capsys.readouterr().err.split())


def test_check_says_when_this_machine_runs_fewer_trials_at_once_than_asked(tmp_path, capsys):
    import os

    more = (os.cpu_count() or 1) + 1
    assert main(["sweep", "--preset", "demo", "--out", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "cache"),
                 "--n-trials", str(more), "--max-concurrent", str(more), "--check"]) == 0
    assert (f"note: this machine has {more - 1} CPUs, so at most {more - 1} trial" in capsys.readouterr().out)


def test_more_trials_than_a_list_only_space_holds_are_refused_when_a_sweep_starts(tmp_path):
    # each extra trial repeated a configuration exactly: same seed, same result, compute for nothing
    from orchestrator.sweep_checks import check_sweep_config
    from orchestrator.sweep_config import check_trial_count
    space = {"budget_avg_bits": [2.5, 3.5], "proxy_size": [500], "p_mode": ["capacity", "fixed"]}
    old = SweepConfig.from_dict({"n_trials": 6, "space": space, "out_dir": str(tmp_path)})   # loads: a saved config
    with pytest.raises(ConfigError, match=r"at most 4 distinct configurations \(budget_avg_bits \[2.5, 3.5\], p_mode "
                                          r"\['capacity', 'fixed'\]\), but n_trials is 6"):
        check_sweep_config(old)                    # a new sweep: refused before any work
    check_trial_count(SweepConfig.from_dict({"n_trials": 4, "space": space}))
