"""Sweep start-up: cores per shared training, and the stores opened while Ray starts (no Ray here)."""
from __future__ import annotations

import optuna
import pytest

from orchestrator.sweep_config import load_sweep_config


def _cfg(tmp_path, **overrides):
    return load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), **overrides}).resolved()


def test_the_fp_target_of_a_local_cpu_sweep_takes_the_sweeps_cores_and_teachers_one_trial_share(tmp_path):
    from orchestrator.ray_env import local_cpu_count
    from orchestrator.sweep_prep import _job_cpus

    cfg = _cfg(tmp_path)
    assert _job_cpus(cfg, ("teacher", 500)) == cfg.resources.cpu == 1
    assert _job_cpus(cfg, ("target", None)) == min(local_cpu_count(), 2)     # the sweep's 2 slots x 1 CPU
    wide = _cfg(tmp_path, max_concurrent_trials=64)
    assert _job_cpus(wide, ("target", None)) == local_cpu_count()            # never more than the machine


@pytest.mark.parametrize("overrides", [{"address": "ray://head:10001"}, {"resources": {"cpu": 2, "gpu": 1}}])
def test_on_a_cluster_or_a_gpu_the_fp_target_keeps_one_trial_share(tmp_path, overrides):
    from orchestrator.sweep_prep import _job_cpus

    cfg = _cfg(tmp_path, **overrides)
    assert _job_cpus(cfg, ("target", None)) == cfg.resources.cpu


def test_open_stores_connects_mlflow_and_opens_the_optuna_storage_of_a_new_sweep(tmp_path):
    from orchestrator.mlflow_callback import MLflowCallback
    from orchestrator.sweep import _open_stores, _results_callbacks
    from orchestrator.sweep_config import save_resolved_config
    from orchestrator.trial_status import TrialStatusBook

    cfg = _cfg(tmp_path)
    save_resolved_config(cfg)
    callbacks = _results_callbacks(cfg, TrialStatusBook(tmp_path / "trial_status.json"))
    storage = _open_stores(cfg, callbacks, resume=False)
    assert isinstance(storage, optuna.storages.RDBStorage) and (tmp_path / "optuna.db").is_file()
    cb = next(cb for cb in callbacks if isinstance(cb, MLflowCallback))
    assert cb.background                              # a sweep's MLflow writes run on the writer thread
    assert cb.flush(timeout=120)
    sink = cb.sink
    assert sink.client is not None and sink.client.get_experiment_by_name("demo") is not None
    assert sink.parent_run_id is None and not (tmp_path / "mlflow_parent.json").exists()   # no run before setup
    cb.setup()
    cb.flush()
    assert sink.client.get_run(sink.parent_run_id).info.status == "RUNNING"
    cb.close()
    assert _open_stores(cfg, callbacks, resume=True) is None      # the restored searcher brings its own


@pytest.mark.parametrize("top1,weak", [(54.0, True), (55.0, False)])
def test_a_weak_fp_target_model_is_warned_about_naming_the_settings_that_train_it(tmp_path, top1, weak):
    from types import SimpleNamespace

    from orchestrator.sweep_prep import _weak_target_message

    target = SimpleNamespace(top1=top1, meta={"num_classes": 10})
    msg = _weak_target_message(_cfg(tmp_path), target)
    assert (msg is not None) == weak
    if weak:
        assert f"{top1:.1f}%" in msg and "below 55%" in msg and "transfer.fp_epochs (now 2)" in msg
        assert "transfer.fp_train_size (now 10000)" in msg and "\n" not in msg


def test_shared_json_keeps_the_teachers_training_seconds_when_they_come_from_the_cache(tmp_path):
    """A resumed sweep (or a second one) loads the teachers from the cache: shared.json said the load time."""
    import json

    from orchestrator.sweep_prep import prepare_shared

    cfg = _cfg(tmp_path, cache_dir=str(tmp_path / "cache"), teacher_epochs=1, proxy_eval_size=100,
               space={"proxy_size": [100], "search_epochs": 1, "budget_avg_bits": {"type": "float", "low": 3, "high": 4}},
               search={"batch_size": 32, "max_steps_per_epoch": 2},
               transfer={"fp_epochs": 1, "fp_train_size": 200, "fp_batch_size": 32, "fp_max_steps_per_epoch": 2,
                         "test_size": 100})
    prepare_shared(cfg, threads=1)
    first = json.loads((tmp_path / "shared.json").read_text())
    prepare_shared(cfg, threads=1)
    again = json.loads((tmp_path / "shared.json").read_text())
    assert again["teacher_seconds"] == first["teacher_seconds"] and again["target_seconds"] == first["target_seconds"]
