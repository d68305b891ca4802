"""A new sweep refused an Optuna storage whose studies of its name hold trials (orchestrator.shared_study), also
when they are the folder's own earlier sweep's whose Tune state was deleted (real Optuna storage, real Tune state)."""
from __future__ import annotations

import shutil

import optuna
import pytest

from gmpq_core.errors import ConfigError
from orchestrator.sweep_checks import check_sweep_config
from orchestrator.sweep_config import load_sweep_config, save_resolved_config


def _noop_trainable(config):
    return None


def test_a_new_sweep_after_ray_results_was_deleted_is_refused_its_earlier_study(tmp_path):
    from ray import tune

    url = f"sqlite:///{tmp_path}/team.db"
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "sweep"), "name": "mine",
                                                      "cache_dir": str(tmp_path / "cache"), "optuna_storage": url})
    save_resolved_config(cfg)                       # the folder's earlier sweep: its config, its finished trial,
    study = optuna.create_study(storage=url, study_name="mine", directions=["maximize", "minimize"])
    study.tell(study.ask(), [50.0, 0.3])
    tune.Tuner(_noop_trainable, run_config=tune.RunConfig(name="mine", storage_path=str(tmp_path / "sweep" /
                                                                                       "ray_results")))
    check_sweep_config(cfg)                         # and its Tune state (tuner.pkl): a resume, not this check's case
    shutil.rmtree(tmp_path / "sweep" / "ray_results")
    with pytest.raises(ConfigError) as e:           # the saved config alone used to exempt it: joined silently
        check_sweep_config(cfg)
    said = " ".join(str(e.value).split())
    assert (f"optuna_storage '{url}' holds the Optuna study 'mine' (1 trial) of this folder's earlier sweep 'mine' "
            f"(its sweep_config.yaml), but that sweep's Tune state at '{tmp_path}/sweep/ray_results/mine' is gone") in said
    assert f"delete its studies first (optuna delete-study --study-name mine --storage {url}" in said
    assert said.endswith("Nothing has been trained yet.")
    assert len(optuna.load_study(study_name="mine", storage=url).trials) == 1          # nothing touched
    check_sweep_config(load_sweep_config(preset="demo", overrides={               # another name: no clash
        "out_dir": str(tmp_path / "other"), "name": "mine2", "cache_dir": str(tmp_path / "cache"),
        "optuna_storage": url}))
