"""The final stage's bookkeeping with a fake job in place of Ray Train (``final_sweep._stage_without_ray``): a
failing policy, Ctrl-C, one MLflow run per recipe; and its worker counts, messages, progress and FP target model
(Ray Train itself: test_final_stage_ray.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from final_sweep import METRICS, _stage_without_ray, make_sweep   # same folder (pytest puts it on sys.path)


def test_a_failing_policy_first_in_line_does_not_stop_the_others_and_says_what_is_kept(tmp_path, monkeypatch):
    """The stage's bookkeeping around the jobs (Ray Train itself: test_final_stage_ray.py): the first policy
    fails, the two others still run side by side and keep their rows, then the first error is raised."""
    import threading
    import time

    from gmpq_core.errors import PolicyMismatchError
    from orchestrator.pareto import write_pareto

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4), (6, 6)))
    write_pareto(sweep)
    running, peak, lock = [0], [0], threading.Lock()

    def job(trial_id: str) -> dict:
        if trial_id == "t1":
            raise PolicyMismatchError("The fine-tune of policy t1 failed: bad policy")
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return METRICS
    final_stage = _stage_without_ray(monkeypatch, tmp_path, job, slots=2)
    said: list[str] = []
    with pytest.raises(PolicyMismatchError, match="policy t1 failed"):
        final_stage.finetune_selected(sweep, epochs=1, workers=1, say=said.append)
    final = final_stage.read_final(sweep)
    assert sorted(final["trial_id"]) == ["t2", "t3"] and peak[0] == 2        # t2 and t3 side by side
    assert any("1 of 3 fine-tune(s) failed; the finished ones (t2, t3) are kept" in m for m in said), said
    assert (sweep / final_stage.FINAL_PNG).is_file()


def test_after_ctrl_c_the_policies_that_had_finished_are_plotted_and_logged_and_the_rerun_adds_none(
        tmp_path, monkeypatch):
    """Ctrl-C after one policy finished used to leave it in final.parquet without an MLflow run, for good: the
    rerun skipped it as done and logged only what it trained. It is now plotted and logged as the stage stops
    (the rerun still fills a run that is missing)."""
    import mlflow

    from orchestrator.pareto import write_pareto

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4)))
    write_pareto(sweep)
    interrupt = {"t2"}

    def job(trial_id: str) -> dict:
        if trial_id in interrupt:
            raise KeyboardInterrupt
        return METRICS
    final_stage = _stage_without_ray(monkeypatch, tmp_path, job, slots=1)
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        final_stage.finetune_selected(sweep, epochs=1, workers=1, top_k=5, say=said.append)
    assert "2 selected of the 5 asked for (--top-k): only 2 on the Pareto front" in said[0], said
    assert final_stage.read_final(sweep)["trial_id"].tolist() == ["t1"]          # t1 finished
    assert (sweep / final_stage.FINAL_PNG).is_file() and not any("failed" in m for m in said), said
    mlflow.set_tracking_uri(f"sqlite:///{sweep / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ft"])
    assert runs[runs["tags.gmpq.role"] == "finetune"]["tags.mlflow.runName"].tolist() == ["finetune-t1"]
    interrupt.clear()
    final_stage.finetune_selected(sweep, epochs=1, workers=1)                    # t1 done: skipped; t2 trained
    runs = mlflow.search_runs(experiment_names=["ft"])
    names = sorted(runs[runs["tags.gmpq.role"] == "finetune"]["tags.mlflow.runName"])
    assert names == ["finetune-t1", "finetune-t2"]
    final_stage.finetune_selected(sweep, epochs=1, workers=1)                    # nothing new: no duplicate runs
    runs = mlflow.search_runs(experiment_names=["ft"])
    assert len(runs[runs["tags.gmpq.role"] == "finetune"]) == 2


def test_each_fine_tune_recipe_of_a_policy_gets_its_own_mlflow_run_and_more_epochs_continue_it(tmp_path, monkeypatch):
    """A rerun with another lr logged into the first run (metrics mixed, params stale): now a run per recipe,
    named by what differs from the first; going back to a recipe restores its fine-tune (kept aside) and its
    run, untrained; one trained afresh gets a new run (the old one keeps its history; the new one's name says it
    restarted)."""
    import shutil

    import mlflow

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    final_stage = _stage_without_ray(monkeypatch, tmp_path,
                                     lambda tid: dict(METRICS, epoch=epochs[0], resumed_from_epoch=epochs[0] - 1),
                                     slots=1)
    epochs = [1]
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05)
    epochs[0] = 2
    final_stage.finetune_selected(sweep, epochs=2, workers=1, lr=0.05)           # continues the lr=0.05 run
    mlflow.set_tracking_uri(f"sqlite:///{sweep / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ft"])
    ft = runs[runs["tags.gmpq.role"] == "finetune"].sort_values("params.recipe.lr")
    assert ft["tags.mlflow.runName"].tolist() == ["finetune-t1", "finetune-t1 (lr=0.05)"]
    assert ft["params.recipe.lr"].tolist() == ["0.01", "0.05"] and ft["tags.gmpq.recipe"].nunique() == 2
    assert ft["metrics.epochs"].tolist() == [1.0, 2.0]
    client = mlflow.MlflowClient()
    assert [m.value for m in client.get_metric_history(ft["run_id"].iloc[1], "epochs")] == [1.0, 2.0]
    epochs[0] = 1
    final_stage.finetune_selected(sweep, epochs=1, workers=1)                    # lr 0.01 again: restored
    runs = mlflow.search_runs(experiment_names=["ft"])
    assert set(runs[runs["tags.gmpq.role"] == "finetune"]["run_id"]) == set(ft["run_id"])      # no new run
    shutil.rmtree(sweep / "models" / "kept")                                    # lr 0.05's kept fine-tune deleted
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05)          # so lr 0.05 trains from scratch
    runs = mlflow.search_runs(experiment_names=["ft"])
    again = runs[(runs["tags.gmpq.role"] == "finetune") & (runs["params.recipe.lr"] == "0.05")]
    assert len(again) == 2 and set(ft["run_id"]) < set(runs["run_id"])        # a new run; the first one kept
    assert sorted(again["tags.mlflow.runName"]) == ["finetune-t1 (lr=0.05)", "finetune-t1 (lr=0.05, restart 1)"]


def test_a_fine_tune_run_from_before_recipes_becomes_its_recipes_run_not_a_twin(tmp_path, monkeypatch):
    import mlflow

    from orchestrator.mlflow_sink import RUNS_FILE

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    final_stage = _stage_without_ray(monkeypatch, tmp_path, lambda tid: METRICS, slots=1)
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    ids = json.loads((sweep / RUNS_FILE).read_text())
    (key, rid), = ids["finetune"].items()
    ids["finetune"] = {"t1": rid}                                 # as a sweep fine-tuned before recipes left it
    (sweep / RUNS_FILE).write_text(json.dumps(ids))
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    client.delete_tag(rid, "gmpq.recipe")
    final_stage.finetune_selected(sweep, epochs=1, workers=1)    # nothing to train; MLflow checked
    runs = client.search_runs([client.get_run(rid).info.experiment_id], "tags.`gmpq.role` = 'finetune'")
    assert [r.info.run_id for r in runs] == [rid] and runs[0].data.tags["gmpq.recipe"] == key.split(":")[1]
    assert json.loads((sweep / RUNS_FILE).read_text())["finetune"] == {key: rid}


def test_auto_workers_share_the_clusters_devices_among_the_policies_at_once(monkeypatch):
    import ray

    from orchestrator.final_stage import auto_workers

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 4.0})
    assert auto_workers(2, use_gpu=False, cap=None, batch_size=128) == 4      # 2 policies side by side, 4 CPUs each
    assert auto_workers(3, use_gpu=True, cap=None, batch_size=128) == 1       # 4 GPUs // 3
    assert auto_workers(3, use_gpu=False, cap=1, batch_size=128) == 8         # one at a time: every CPU
    assert auto_workers(16, use_gpu=False, cap=None, batch_size=128) == 1     # never below 1 (the rest wait)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 192.0})
    assert auto_workers(2, use_gpu=False, cap=None, batch_size=128) == 8      # >= 16 images per worker and step


def test_workers_auto_is_accepted_on_the_command_line_and_in_the_config():
    from orchestrator.cli import build_parser
    from orchestrator.sweep_config import load_sweep_config

    args = build_parser("finetune").parse_args(["finetune", "--sweep", "x", "--workers", "auto"])
    assert args.workers == "auto"
    assert build_parser("run").parse_args(["run", "--workers", "auto"]).workers == "auto"
    assert load_sweep_config(preset="demo").finetune.workers == "auto"
    from gmpq_core.errors import ConfigError
    with pytest.raises(ConfigError, match="--workers must be a whole number >= 1 or 'auto', but got --workers many"):
        build_parser("run").parse_args(["run", "--workers", "many"])


def test_the_stage_says_how_many_run_at_once_and_what_limits_it():
    from orchestrator.final_stage import _at_once_text

    assert _at_once_text(2, 2, 1, False, None, False) == "fine-tuning 2 policies 2 at a time, 1 worker(s) each"
    assert _at_once_text(2, 1, 2, False, None, False).endswith(
        "one after the other, 2 worker(s) each; the cluster's CPUs hold 1 at a time with 2 worker(s) each")
    assert _at_once_text(3, 1, 4, True, 1, True) == (
        "fine-tuning 3 policies one after the other, 4 worker(s) each (finetune.workers: auto: the cluster's GPUs "
        "shared by the policies at once); max_concurrent 1 caps it")


def test_the_stage_words_a_single_policy_as_one_not_as_a_queue():
    # "fine-tuning 1 policy one after the other": there is no other
    from orchestrator.final_stage import _at_once_text

    assert _at_once_text(1, 1, 4, True, None, True) == (
        "fine-tuning 1 policy on 4 worker(s) (finetune.workers: auto: the cluster's GPUs)")
    assert _at_once_text(1, 1, 2, False, 1, False) == "fine-tuning 1 policy on 2 worker(s)"


def test_a_workers_gmpq_error_comes_back_as_one_paragraph_naming_the_policy():
    from ray.train import WorkerGroupError

    from gmpq_core.errors import ConfigError
    from orchestrator.train_stage import _our_error

    err = _our_error(WorkerGroupError("rank 0 failed", {0: ConfigError("bad value")}), "t7")
    assert isinstance(err, ConfigError) and str(err) == "The fine-tune of policy t7 failed: bad value"
    assert _our_error(WorkerGroupError("rank 0 failed", {0: RuntimeError("bug")}), "t7") is None   # keeps its traceback


def test_progress_left_by_an_earlier_run_is_not_shown_as_this_runs(tmp_path):
    """A rerun (other settings, a copied folder) printed the old run's last position first ('step 468/468')."""
    import time

    from gmpq_core.fileio import atomic_write_json
    from orchestrator.final_stage import _ProgressWatcher

    path, said = tmp_path / "finetune-t1.progress.json", []
    atomic_write_json(path, {"epoch": 1, "step": 468, "steps": 468, "time": time.time() - 3600})
    with _ProgressWatcher(path, said.append, "[1/1] t1:", 1, every_s=0.05):
        assert not path.exists()                 # gmpq status does not show it either
        time.sleep(0.3)
        assert said == []
        atomic_write_json(path, {"epoch": 1, "step": 1, "steps": 3, "time": time.time()})
        time.sleep(0.3)
    assert said == ["[1/1] t1: epoch 1/1: step 1/3"]


def test_the_fp_target_model_of_a_sweep_copied_from_another_machine_goes_to_this_machines_cache(tmp_path,
                                                                                              monkeypatch):
    import yaml

    from orchestrator.final_stage import target_fp_checkpoint

    sweep, mine = tmp_path / "sweep", tmp_path / "mine"
    make_sweep(sweep)
    cfg = yaml.safe_load((sweep / "sweep_config.yaml").read_text())
    cfg["cache_dir"] = "/nonexistent/other-user/.cache/gmpq"         # where the sweep ran
    (sweep / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("GMPQ_CACHE_DIR", str(mine))
    said = []
    path = target_fp_checkpoint(sweep, say=said.append)
    assert path.is_file() and path.parent == mine.resolve() and not Path("/nonexistent").exists()
    assert any("not on this machine" in s for s in said)
