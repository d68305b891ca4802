"""The final stage with Ray Train: real TorchTrainer, CPU workers (gloo), checkpoint per epoch, resume,
policies side by side."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def make_sweep(d: Path, bits: tuple = ((3, 4),), broken: str | None = None, precision: str = "auto") -> None:
    """A sweep folder as the sweep leaves it: resolved config + trials.parquet with one completed trial per
    (w_bits, a_bits) in ``bits`` (``t1``, ``t2``, ...; more bits, higher transfer top-1, so all are on the front).
    ``broken``: that trial's policy names a layer the model does not have (its fine-tune fails)."""
    from gmpq_core.bitops import count_bitops
    from gmpq_core.models import build_model
    from gmpq_core.policy import BitPolicy
    from orchestrator.results import trial_row, write_results
    from orchestrator.sweep_config import load_sweep_config, save_resolved_config

    cfg = load_sweep_config(None, preset="demo", overrides={
        "out_dir": str(d), "name": "ft", "target_dataset": "mnist5k", "proxy_dataset": "mnist5k",
        "transfer": {"train_size": 200, "test_size": 100, "fp_epochs": 1, "fp_train_size": 200,
                     "fp_max_steps_per_epoch": 2, "fp_batch_size": 32, "batch_size": 32},
        "finetune": {"top_k": len(bits), "workers": 2, "epochs": 1, "batch_size": 32}, "precision": precision})
    save_resolved_config(cfg)
    model = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    rows = []
    for i, (w, a) in enumerate(bits, start=1):
        policy = BitPolicy.uniform(model, w, a)
        cost = count_bitops(model, policy, 28, 1)
        policy_json = policy.to_json()
        if broken == f"t{i}":
            policy_json = policy_json.replace('"layer1.0.conv1"', '"layer9.0.conv1"')
        rows.append(trial_row(trial_id=f"t{i}", config={"budget_avg_bits": (w + a) / 2}, status="completed",
                              last_result={"transfer_top1": 55.0 + 5 * i, "bitops": cost.bitops_quantized,
                                           "bitops_total": cost.bitops_total, "budget_avg_bits": (w + a) / 2,
                                           "policy_json": policy_json, "layers_json": "[]"}))
    write_results(d, rows, [])


def _stage_without_ray(monkeypatch, tmp_path, job, slots: int):
    """finetune_selected's bookkeeping with ``job(trial_id)`` in place of the Ray Train run (which returns
    the metrics dict of a finished one-epoch run): no Ray, no FP model; MLflow and the files are real."""
    import contextlib

    from orchestrator import final_stage
    from orchestrator.train_stage import FinalRun

    def run_final_job(final_job, *, storage_path, workers, use_gpu=False):
        m = job(final_job.trial_id)
        return FinalRun(trial_id=final_job.trial_id, metrics=m, history=[m], seconds=0.1, workers=workers)
    monkeypatch.setattr(final_stage, "run_final_job", run_final_job)
    monkeypatch.setattr(final_stage, "target_fp_checkpoint", lambda *a, **k: tmp_path / "fp.pt")
    monkeypatch.setattr(final_stage, "ray_session", lambda address=None: contextlib.nullcontext())
    monkeypatch.setattr(final_stage, "_ray_devices", lambda workers, use_gpu, say: (workers, False))
    monkeypatch.setattr(final_stage, "final_slots", lambda n, workers, use_gpu, cap: slots)
    return final_stage


METRICS = {"epoch": 1, "top1": 50.0, "top5": 90.0, "loss": 1.0, "train_images": 100, "test_images": 10}


def test_a_failing_policy_first_in_line_does_not_stop_the_others_and_says_what_is_kept(tmp_path, monkeypatch):
    """The stage's bookkeeping around the jobs (Ray Train itself: the slow tests below): the first policy
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


def test_a_workers_gmpq_error_comes_back_as_one_paragraph_naming_the_policy():
    from ray.train import WorkerGroupError

    from gmpq_core.errors import ConfigError
    from orchestrator.train_stage import _our_error

    err = _our_error(WorkerGroupError("rank 0 failed", {0: ConfigError("bad value")}), "t7")
    assert isinstance(err, ConfigError) and str(err) == "The fine-tune of policy t7 failed: bad value"
    assert _our_error(WorkerGroupError("rank 0 failed", {0: RuntimeError("bug")}), "t7") is None   # keeps its traceback


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_finetune_checkpoints_each_epoch_and_resumes_without_redoing(tmp_path):
    import mlflow
    import ray

    from orchestrator.ray_env import init_ray
    from orchestrator.final_stage import FINAL_PNG, finetune_selected, read_final
    from orchestrator.train_stage import STATE_FILE
    from gmpq_core.fileio import load_checkpoint

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    started = init_ray(num_cpus=2)
    try:
        knobs = dict(max_steps_per_epoch=2, test_size=100, batch_size=32)
        first = finetune_selected(sweep, epochs=1, workers=2, **knobs)
        assert first["epochs"].tolist() == [1] and first["resumed_from_epoch"].tolist() == [0]
        assert first["workers"].tolist() == [2] and first["train_images"].tolist() == [4000]
        assert first["images_per_epoch"].tolist() == [2 * 16 * 2]     # max_steps_per_epoch x per-worker batch x workers
        assert json.loads(first.loc[0, "recipe_json"])["nesterov"] is False      # METHOD.md 6: plain momentum
        ckpts = sorted((sweep / "ray_results" / "finetune-t1").glob("checkpoint_20*"))
        assert len(ckpts) == 1
        e1 = load_checkpoint(ckpts[0] / STATE_FILE)["history"]
        # the fine-tuned model, one file: rebuilt alone, it scores what the stage measured on the same test slice
        from gmpq_core.data import load_dataset, make_loader, proxy
        from gmpq_core.export import load_quantized_model
        from gmpq_core.train import evaluate
        assert first.loc[0, "model_path"] == "models/t1.pt"                   # relative: the folder may move
        model_file = sweep / "models" / "t1.pt"
        loaded = load_quantized_model(model_file)
        bundle = load_dataset("mnist5k")
        test = make_loader(proxy(bundle.test, 100, seed=0), bundle.info, batch_size=256, train=False)
        assert evaluate(loaded.model, test)["top1"] == pytest.approx(first.loc[0, "final_top1"])
        assert loaded.preprocess["mean"] == list(bundle.info.mean) and loaded.preprocess["image_size"] == bundle.info.image_size
        assert loaded.results["top1"] == pytest.approx(first.loc[0, "final_top1"]) and loaded.arch["model"] == "resnet20"
        # Rerun with more epochs: resumes after epoch 1 (no retraining of epoch 1)
        second = finetune_selected(sweep, epochs=2, workers=2, **knobs)
        assert second["epochs"].tolist() == [2] and second["resumed_from_epoch"].tolist() == [1]
        (ckpt,) = sorted((sweep / "ray_results" / "finetune-t1").glob("checkpoint_20*"))
        hist = load_checkpoint(ckpt / STATE_FILE)["history"]
        assert [h["epoch"] for h in hist] == [1, 2]
        assert hist[0] == e1[0] and hist[1]["resumed_from_epoch"] == 1
        assert hist[1]["lr"] == pytest.approx(0.0, abs=1e-12)      # the cosine ends at 0 after the last step
        # A third call with the same epochs finds the policy done and runs nothing; a missing model file (a
        # policy fine-tuned before models were exported) is written from the Ray Train checkpoint
        model_file.unlink()
        third = finetune_selected(sweep, epochs=2, workers=2, **knobs)
        assert third["seconds"].tolist() == second["seconds"].tolist() and model_file.is_file()
        assert read_final(sweep).loc[0, "model_path"] == "models/t1.pt"
        saved = load_checkpoint(ckpt / STATE_FILE)["model"]
        assert all(torch.equal(v, saved[k]) for k, v in load_quantized_model(model_file).model.state_dict().items())
        # Other settings (lr) are not "already fine-tuned" and do not resume the old run: a fresh 2-epoch run
        fourth = finetune_selected(sweep, epochs=2, workers=2, lr=0.05, **knobs)
        assert fourth["resumed_from_epoch"].tolist() == [0] and fourth["seconds"].tolist() != second["seconds"].tolist()
        assert json.loads(fourth.loc[0, "recipe_json"])["lr"] == 0.05
        (ckpt,) = sorted((sweep / "ray_results" / "finetune-t1").glob("checkpoint_20*"))
        assert [h["resumed_from_epoch"] for h in load_checkpoint(ckpt / STATE_FILE)["history"]] == [0, 0]
        # fewer epochs than that run: refused before anything runs (it used to train nothing and report 2)
        from gmpq_core.errors import ConfigError
        with pytest.raises(ConfigError, match="--epochs 1 is fewer"):
            finetune_selected(sweep, epochs=1, workers=2, lr=0.05, **knobs)
    finally:
        if started:
            ray.shutdown()
    final = read_final(sweep)
    assert len(final) == 1 and 0.0 <= final.loc[0, "final_top1"] <= 100.0
    assert final.loc[0, "bitops"] > 0 and json.loads(final.loc[0, "policy_json"])["layers"]
    assert (sweep / FINAL_PNG).stat().st_size > 5000
    mlflow.set_tracking_uri(f"sqlite:///{sweep / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ft"])
    ft = runs[runs["tags.gmpq.role"] == "finetune"]                          # one run per recipe: lr 0.01, 0.05
    assert sorted(ft["params.recipe.lr"]) == ["0.01", "0.05"]
    assert sorted(ft["tags.mlflow.runName"]) == ["finetune-t1", "finetune-t1 (lr=0.05)"]
    ft = ft[ft["params.recipe.lr"] == "0.05"]
    assert ft["metrics.final_top1"].item() == pytest.approx(final.loc[0, "final_top1"])
    artifacts = mlflow.MlflowClient().list_artifacts(ft["run_id"].item(), "model")
    assert [a.path for a in artifacts] == ["model/t1.pt"]                      # the fine-tuned model, loadable
    parent = runs[runs["tags.gmpq.role"] == "sweep"]["run_id"].item()
    assert ft["tags.mlflow.parentRunId"].item() == parent


@pytest.mark.ray
@pytest.mark.slow
def test_a_bf16_sweep_fine_tunes_in_bf16_on_two_ddp_workers_and_says_so(tmp_path):
    """precision: bf16 reaches the Ray Train workers (CPU autocast, channels_last, DDP over gloo) and the model
    file."""
    import ray

    from gmpq_core.export import load_quantized_model
    from orchestrator.final_stage import finetune_selected, read_final
    from orchestrator.pareto import write_pareto
    from orchestrator.ray_env import init_ray

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((4, 4),), precision="bf16")
    write_pareto(sweep)
    started = init_ray(num_cpus=2)
    try:
        finetune_selected(sweep, epochs=1, workers=2, max_steps_per_epoch=3, test_size=200, batch_size=32)
    finally:
        if started:
            ray.shutdown()
    final = read_final(sweep).set_index("trial_id")
    assert list(final.index) == ["t1"] and int(final.loc["t1", "workers"]) == 2
    assert 0.0 <= float(final.loc["t1", "final_top1"]) <= 100.0       # (a 2-step FP model: near chance)
    q = load_quantized_model(sweep / "models" / "t1.pt")
    assert q.results["precision"] == "bf16" and q.results["top1"] == pytest.approx(float(final.loc["t1", "final_top1"]))


@pytest.mark.ray
@pytest.mark.slow
def test_policies_fine_tune_side_by_side_and_a_failing_one_keeps_the_others_results(tmp_path):
    import mlflow
    import pandas as pd
    import ray

    from gmpq_core.errors import PolicyMismatchError
    from orchestrator.pareto import read_pareto, write_pareto
    from orchestrator.ray_env import init_ray
    from orchestrator.final_stage import finetune_selected, read_final

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4), (6, 6)), broken="t1")
    write_pareto(sweep)
    assert read_pareto(sweep)["selected"].sum() == 3
    said: list[str] = []
    started = init_ray(num_cpus=2)
    try:
        # t1's policy does not fit the model: the worker's error comes back as one paragraph naming it
        with pytest.raises(PolicyMismatchError, match="policy t1 failed: .*layer9.0.conv1"):
            finetune_selected(sweep, epochs=1, workers=1, max_steps_per_epoch=2, test_size=100, batch_size=32,
                              say=said.append)
    finally:
        if started:
            ray.shutdown()
    assert any("3 policies 2 at a time, 1 worker(s) each" in m for m in said)
    final = read_final(sweep).set_index("trial_id")
    assert sorted(final.index) == ["t2", "t3"] and (final["workers"] == 1).all()      # t3 ran after t1 failed
    assert (sweep / "models" / "t2.pt").is_file() and (sweep / "models" / "t3.pt").is_file()
    # side by side: each run's window (its end minus its seconds) overlaps the other's
    end = pd.to_datetime(final["finished_at"]).map(lambda t: t.timestamp())
    start = end - final["seconds"]
    assert start["t3"] < end["t2"] and start["t2"] < end["t3"]
    mlflow.set_tracking_uri(f"sqlite:///{sweep / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ft"])
    assert sorted(runs[runs["tags.gmpq.role"] == "finetune"]["tags.mlflow.runName"]) == ["finetune-t2", "finetune-t3"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_storage_uri_gets_the_fine_tunes_ray_train_runs_and_the_sweep_folder_their_progress(tmp_path, monkeypatch):
    """The sweep's storage_path as a URI (here file://; s3:// or gs:// on a cluster) stays a URI for Ray Train
    (it became a local folder named 'file:' in the working directory)."""
    import ray
    import yaml

    from orchestrator.final_stage import finetune_selected
    from orchestrator.ray_env import init_ray

    sweep, remote, cwd = tmp_path / "sweep", tmp_path / "remote", tmp_path / "cwd"
    make_sweep(sweep)
    cfg = yaml.safe_load((sweep / "sweep_config.yaml").read_text())
    cfg["storage_path"] = remote.as_uri()
    (sweep / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    started = init_ray(num_cpus=2)
    try:
        final = finetune_selected(sweep, epochs=1, workers=1, max_steps_per_epoch=2, test_size=100, batch_size=32)
    finally:
        if started:
            ray.shutdown()
    assert final["epochs"].tolist() == [1] and (sweep / "models" / "t1.pt").is_file()
    assert list((remote / "finetune-t1").glob("checkpoint_*"))                 # Ray Train's run, under the URI
    assert json.loads((sweep / "ray_results" / "finetune-t1.progress.json").read_text())["step"] == 2
    assert not list(cwd.iterdir())                                              # nothing made where we stood


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
