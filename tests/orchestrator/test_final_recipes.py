"""The final stage's recipes (the settings a fine-tune's result depends on, but its epochs): MLflow run names and
params per recipe, and the training precision as part of the recipe (a checkpoint is not continued in another
one). The stage without Ray (``final_sweep._stage_without_ray``), with a real SQLite MLflow store; the
last test runs Ray Train."""
from __future__ import annotations

import hashlib
import json

import mlflow
import pytest
import yaml

from gmpq_core.errors import ConfigError

from final_sweep import METRICS, _stage_without_ray, make_sweep   # same folder (pytest puts it on sys.path)


def _stage(monkeypatch, tmp_path, runs: list, precision_on_workers=None, **metrics):
    """The stage with a fake Ray Train run that sees the job: it ran ``job.epochs`` epochs in the precision the
    job's resolves to on a CPU (or ``precision_on_workers``), with ``metrics`` added; ``runs`` gets each job."""
    from gmpq_core.precision import resolve_precision
    from orchestrator.train_stage import FinalRun

    final_stage = _stage_without_ray(monkeypatch, tmp_path, lambda tid: METRICS, slots=1)

    def run_final_job(job, *, storage_path, workers, use_gpu=False):
        runs.append(job)
        m = {**METRICS, "epoch": job.epochs, "resumed_from_epoch": 0,
             "precision": precision_on_workers or resolve_precision(job.precision, "cpu"), **metrics}
        return FinalRun(trial_id=job.trial_id, metrics=m, history=[m], seconds=0.1, workers=workers)
    monkeypatch.setattr(final_stage, "run_final_job", run_final_job)
    return final_stage


def _finetune_runs(sweep):
    mlflow.set_tracking_uri(f"sqlite:///{sweep / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ft"])
    return runs[runs["tags.gmpq.role"] == "finetune"].sort_values("start_time").reset_index(drop=True)


def _edit_config(sweep, **changes):
    cfg = yaml.safe_load((sweep / "sweep_config.yaml").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    (sweep / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _row_from_before_precision(final_stage, sweep, model_file_precision: str | None = None) -> None:
    """t1's final.parquet row as the version before the precision joined the recipe left it: its recipe without
    the precision; with ``model_file_precision``, beside it a real model file whose results record it (what that
    version's ``model_results`` wrote), else none."""
    import torch

    from gmpq_core.export import save_quantized_model
    from gmpq_core.finetune import prepare_quantized
    from gmpq_core.models import build_model
    from gmpq_core.policy import BitPolicy
    from orchestrator.final_results import final_model_path, write_final

    row = final_stage.read_final(sweep).to_dict("records")[0]
    row["recipe_json"] = json.dumps({k: v for k, v in json.loads(row["recipe_json"]).items() if k != "precision"},
                                    sort_keys=True)
    if model_file_precision is not None:
        torch.manual_seed(0)
        fp = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
        policy = BitPolicy.from_json(row["policy_json"])
        q = prepare_quantized(fp, policy, torch.randn(4, 1, 28, 28)).eval()
        save_quantized_model(final_model_path(sweep, "t1"), q, policy,
                             arch={"model": "resnet20", "num_classes": 10, "in_channels": 1, "small_input": True},
                             results={"trial_id": "t1", "top1": row["final_top1"], "epochs": row["epochs"],
                                      "precision": model_file_precision})
        row["model_path"] = "models/t1.pt"
    write_final(sweep, {"t1": row})


def test_a_later_recipes_run_is_named_by_what_differs_from_the_policys_first(tmp_path, monkeypatch):
    """Every recipe of a policy was 'finetune-t1' in the MLflow UI. The first keeps that name (searches for it
    still find the usual fine-tune); the others name their differing settings, or their recipe hash."""
    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    final_stage = _stage(monkeypatch, tmp_path, [])
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05)
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05, batch_size=64)
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05, batch_size=64, train_size=100, test_size=50)
    ft = _finetune_runs(sweep)
    assert ft["tags.mlflow.runName"].tolist()[:3] == ["finetune-t1", "finetune-t1 (lr=0.05)",
                                                      "finetune-t1 (batch_size=64, lr=0.05)"]
    digest = ft["tags.gmpq.recipe"].iloc[3]                 # four settings differ: the recipe hash names it
    assert ft["tags.mlflow.runName"].iloc[3] == f"finetune-t1 (recipe {digest})"
    assert digest == _digest(final_stage.read_final(sweep).loc[0, "recipe_json"])
    client = mlflow.MlflowClient()
    found = client.search_runs([ft["experiment_id"].iloc[0]], "tags.`mlflow.runName` = 'finetune-t1'")
    assert [r.info.run_id for r in found] == [ft["run_id"].iloc[0]] and found[0].data.params["recipe.lr"] == "0.01"


def test_a_later_recipe_of_a_run_from_before_recipes_is_named_by_its_hash(tmp_path, monkeypatch):
    from orchestrator.mlflow_sink import MLflowSink
    from orchestrator.pareto import write_pareto

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    write_pareto(sweep)
    sink = MLflowSink(None, sweep)                          # the run an older version made: no recipe params
    assert sink.connect()
    sink.child_run("finetune", "t1", run_name="finetune-t1", params={"trial_id": "t1"},
                   tags={"trial_id": "t1", "gmpq.role": "finetune"})
    _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=1, workers=1, lr=0.05)
    ft = _finetune_runs(sweep)
    assert ft["tags.mlflow.runName"].tolist() == ["finetune-t1", f"finetune-t1 (recipe {ft['tags.gmpq.recipe'][1]})"]


def test_a_changed_finetune_section_gets_a_run_whose_params_are_its_rows_recipe(tmp_path, monkeypatch):
    """Already right before the precision joined the recipe (this test passes on that code too): a rerun after
    the sweep config's finetune section changed is a new recipe, so a new run with its own params, and the
    first run keeps its own."""
    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32")
    final_stage = _stage(monkeypatch, tmp_path, [])
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    first = final_stage.read_final(sweep).loc[0, "recipe_json"]
    _edit_config(sweep, finetune={"lr": 0.02, "batch_size": 64, "nesterov": True})
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    second = final_stage.read_final(sweep).loc[0, "recipe_json"]
    ft = _finetune_runs(sweep)
    assert len(ft) == 2 and json.loads(second)["lr"] == 0.02
    for run, recipe in zip(ft.to_dict("records"), (first, second)):
        assert run["tags.gmpq.recipe"] == _digest(recipe)
        logged = {k.removeprefix("params.recipe."): v for k, v in run.items() if k.startswith("params.recipe.")}
        assert logged == {k: v if isinstance(v, str) else json.dumps(v) for k, v in json.loads(recipe).items()}


def test_a_precision_change_is_other_settings_with_its_own_run_not_a_continuation(tmp_path, monkeypatch):
    """precision fp32 -> bf16 in the sweep config: the policy was 'already fine-tuned' (same epochs) or continued
    in bf16 from its fp32 checkpoint (more epochs), logged into the fp32 run. Now it is another recipe."""
    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32")
    runs, said = [], []
    final_stage = _stage(monkeypatch, tmp_path, runs)
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    _edit_config(sweep, precision="bf16")
    final_stage.finetune_selected(sweep, epochs=1, workers=1, say=said.append)
    assert len(runs) == 2 and runs[1].precision == "bf16"
    assert any("fine-tuned before with other settings (precision fp32 -> bf16); starting afresh" in m
               for m in said), said
    assert json.loads(final_stage.read_final(sweep).loc[0, "recipe_json"])["precision"] == "bf16"
    ft = _finetune_runs(sweep)
    assert ft["params.recipe.precision"].tolist() == ["fp32", "bf16"]
    assert ft["tags.mlflow.runName"].tolist() == ["finetune-t1", "finetune-t1 (precision=bf16)"]
    # 'auto' is whatever the workers resolve it to: not another recipe for the driver (same epochs: done)
    _edit_config(sweep, precision="auto")
    said.clear()
    final_stage.finetune_selected(sweep, epochs=1, workers=1, say=said.append)
    assert len(runs) == 2 and any("already fine-tuned for 1 epoch(s)" in m for m in said), said


def test_auto_resolving_to_another_precision_on_the_workers_restarts_with_a_notice_and_a_run_of_its_own(
        tmp_path, monkeypatch):
    """A sweep fine-tuned with precision auto on bf16 GPUs, continued where auto means float32: its workers start
    afresh (they do not continue a bf16 checkpoint in float32) and the stage says so."""
    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="auto")
    runs, said = [], []
    _stage(monkeypatch, tmp_path, runs, precision_on_workers="bf16").finetune_selected(sweep, epochs=1, workers=1)
    why = "its checkpoint was made with other settings (precision bf16 -> fp32)"    # what the workers report
    final_stage = _stage(monkeypatch, tmp_path, runs, precision_on_workers="fp32", restarted_because=why)
    final_stage.finetune_selected(sweep, epochs=2, workers=1, say=said.append)
    assert any("continuing its 1-epoch fine-tune to 2 epochs" in m for m in said), said
    assert f"[1/1] t1: fine-tuned afresh from epoch 1, not continued: {why}" in said
    ft = _finetune_runs(sweep)
    assert ft["params.recipe.precision"].tolist() == ["bf16", "fp32"]
    assert ft["tags.mlflow.runName"].tolist() == ["finetune-t1", "finetune-t1 (precision=fp32)"]


def test_a_fine_tune_from_before_the_precision_was_in_its_recipe_is_neither_redone_nor_given_a_twin_run(
        tmp_path, monkeypatch):
    """Rows and runs recorded before: the same epochs are done; more epochs continue the fine-tune and its MLflow
    run (which gets the recipe's new key, tag and its precision param)."""
    from orchestrator.mlflow_sink import RUNS_FILE
    from orchestrator.mlflow_stages import log_final

    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32")
    runs, said = [], []
    final_stage = _stage(monkeypatch, tmp_path, runs)
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    (rid,) = _finetune_runs(sweep)["run_id"]                                # as the older version left them:
    mlflow.MlflowClient().delete_run(rid)
    ids = json.loads((sweep / RUNS_FILE).read_text())
    (sweep / RUNS_FILE).write_text(json.dumps({**ids, "finetune": {}}))
    _row_from_before_precision(final_stage, sweep)
    log_final(None, sweep, final_stage.read_final(sweep))                   # a run keyed by the recipe without it
    (old,) = _finetune_runs(sweep)["run_id"]
    final_stage.finetune_selected(sweep, epochs=1, workers=1, say=said.append)
    assert len(runs) == 1 and any("already fine-tuned for 1 epoch(s)" in m for m in said), said
    final_stage = _stage(monkeypatch, tmp_path, runs, resumed_from_epoch=1)
    final_stage.finetune_selected(sweep, epochs=2, workers=1, say=said.append)
    assert any("continuing its 1-epoch fine-tune to 2 epochs" in m for m in said), said
    ft = _finetune_runs(sweep)
    assert ft["run_id"].tolist() == [old] and ft["tags.mlflow.runName"].tolist() == ["finetune-t1"]
    assert ft["params.recipe.precision"].tolist() == ["fp32"]
    assert ft["tags.gmpq.recipe"].item() == _digest(final_stage.read_final(sweep).loc[0, "recipe_json"])


def test_a_checkpoint_is_continued_only_in_its_recipe_and_precision():
    """The workers' decision (train_stage._not_resumable) on a saved state."""
    from orchestrator.train_stage import FinalJob, _not_resumable, with_precision

    job = FinalJob(trial_id="t1", policy_json="{}", fp_checkpoint="x", dataset="mnist5k", epochs=3, precision="auto")
    fp32, bf16 = with_precision(job.recipe_json(), "fp32"), with_precision(job.recipe_json(), "bf16")
    before = json.dumps({k: v for k, v in json.loads(fp32).items() if k != "precision"}, sort_keys=True)
    assert _not_resumable({"recipe_json": bf16, "epoch": 1}, bf16, 3) is None
    assert _not_resumable({"recipe_json": bf16, "epoch": 1}, fp32, 3) == \
        "its checkpoint was made with other settings (precision bf16 -> fp32)"
    lr = with_precision(FinalJob(**{**job.__dict__, "lr": 0.05}).recipe_json(), "fp32")
    assert _not_resumable({"recipe_json": lr, "epoch": 1}, fp32, 3) == \
        "its checkpoint was made with other settings (lr 0.05 -> 0.01)"
    assert _not_resumable({"recipe_json": fp32, "epoch": 4}, fp32, 3) == "its checkpoint has 4 epochs, more than 3"
    # older checkpoints: no recipe (continued), a recipe without the precision (its last epoch's, if it says)
    assert _not_resumable({"epoch": 1}, fp32, 3) is None
    assert _not_resumable({"recipe_json": before, "epoch": 1, "history": [{"precision": "fp32"}]}, fp32, 3) is None
    assert "precision bf16 -> fp32" in _not_resumable({"recipe_json": before, "epoch": 1,
                                                       "history": [{"precision": "bf16"}]}, fp32, 3)
    assert _not_resumable({"recipe_json": before, "epoch": 1, "history": [{}]}, fp32, 3) is None


def test_a_row_from_before_the_precision_was_in_its_recipe_ran_in_the_precision_its_model_file_records(
        tmp_path, monkeypatch):
    """Such a row counted as the same recipe in any precision: fp32 -> bf16 in the config said 'already fine-tuned
    ... with these settings' (same epochs) or refused fewer --epochs. Its model file says it ran in fp32."""
    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32")
    runs, said = [], []
    final_stage = _stage(monkeypatch, tmp_path, runs)
    final_stage.finetune_selected(sweep, epochs=2, workers=1)
    _row_from_before_precision(final_stage, sweep, model_file_precision="fp32")
    final_stage.finetune_selected(sweep, epochs=2, workers=1, say=said.append)      # the same precision: done
    assert len(runs) == 1 and "[1/1] t1: already fine-tuned for 2 epoch(s) with these settings: top1 50.00%" in said
    _edit_config(sweep, precision="bf16")
    said.clear()
    final_stage.finetune_selected(sweep, epochs=2, workers=1, say=said.append)
    assert len(runs) == 2 and runs[1].precision == "bf16"
    assert any("fine-tuned before with other settings (precision fp32 -> bf16); starting afresh" in m
               for m in said), said
    assert json.loads(final_stage.read_final(sweep).loc[0, "recipe_json"])["precision"] == "bf16"
    _row_from_before_precision(final_stage, sweep, model_file_precision="bf16")
    _edit_config(sweep, precision="fp32")
    said.clear()
    with pytest.raises(ConfigError, match=r"t1 \(2 epochs, kept aside"):     # fp32's 2-epoch fine-tune was kept
        final_stage.finetune_selected(sweep, epochs=1, workers=1)
    final_stage.finetune_selected(sweep, epochs=3, workers=1, say=said.append)      # other settings than bf16's
    assert len(runs) == 3 and runs[2].precision == "fp32"
    assert any("(precision bf16 -> fp32); going back to its fine-tune with these settings" in m for m in said), said
    assert any("continuing its 2-epoch fine-tune to 3 epochs" in m for m in said), said


def test_a_row_whose_precision_nothing_records_counts_as_done_and_says_its_precision_is_unknown(tmp_path, monkeypatch):
    """No model file says (none was written): the row is not fine-tuned again after an upgrade, but the stage
    does not claim it had these settings."""
    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32")
    runs, said = [], []
    final_stage = _stage(monkeypatch, tmp_path, runs)
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    _row_from_before_precision(final_stage, sweep)
    _edit_config(sweep, precision="bf16")
    final_stage.finetune_selected(sweep, epochs=1, workers=1, say=said.append)
    assert len(runs) == 1
    (done,) = [m for m in said if "already fine-tuned" in m]
    assert done.startswith("[1/1] t1: already fine-tuned for 1 epoch(s), precision unknown (")
    assert "with these settings" not in done and done.endswith("top1 50.00%")


def test_a_model_file_written_from_a_ray_train_checkpoint_records_the_precision_its_workers_ran_in(tmp_path):
    """A row fine-tuned before models were exported gets its file from the checkpoint; the file keeps the
    precision of the checkpoint's last epoch, and ``recorded_recipe`` reads it back for a row without one."""
    from types import SimpleNamespace

    from gmpq_core.export import load_quantized_model
    from gmpq_core.fileio import save_checkpoint
    from orchestrator.final_results import export_saved_final, final_model_path, recorded_recipe
    from test_final_results import _fine_tuned

    fp_path, policy, q = _fine_tuned(tmp_path)
    recipe = json.dumps({"lr": 0.01, "seed": 0}, sort_keys=True)          # from before the precision was in it
    (tmp_path / "ray_results" / "finetune-t1" / "checkpoint_0").mkdir(parents=True)
    save_checkpoint(tmp_path / "ray_results" / "finetune-t1" / "checkpoint_0" / "state.pt", {
        "policy_json": policy.to_json(), "model": q.state_dict(), "recipe_json": recipe, "epoch": 1,
        "history": [{"epoch": 1, "top1": 81.5, "precision": "bf16"}]})
    prev = {"trial_id": "t1", "final_top1": 81.5, "final_top5": 99.0, "epochs": 1, "bitops": 400_000_000,
            "transfer_top1": 79.0, "recipe_json": recipe}
    assert recorded_recipe(tmp_path, prev) == recipe                         # no model file: unknown
    job = SimpleNamespace(trial_id="t1", policy_json=policy.to_json(), fp_checkpoint=str(fp_path),
                          dataset="fashion_mnist", data_root=None, image_size=None)
    row = export_saved_final(tmp_path, tmp_path / "ray_results", prev, job, "state.pt", lambda msg: None)
    assert load_quantized_model(final_model_path(tmp_path, "t1")).results["precision"] == "bf16"
    assert json.loads(recorded_recipe(tmp_path, row)) == {"lr": 0.01, "seed": 0, "precision": "bf16"}
    assert row["recipe_json"] == recipe                   # the row itself is kept as it was (its MLflow run's key)


def test_a_later_recipes_name_does_not_blame_a_setting_the_policys_first_run_did_not_log(tmp_path, monkeypatch):
    """A first run from before the precision was in recipes has no recipe.precision param: every later recipe's
    name said 'precision=fp32' too. Only the settings the first logged are compared; the precision is named when
    it is all that can differ."""
    from orchestrator.mlflow_sink import RUNS_FILE
    from orchestrator.mlflow_stages import log_final

    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32")
    final_stage = _stage(monkeypatch, tmp_path, [])
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    (rid,) = _finetune_runs(sweep)["run_id"]                                # as the older version left them:
    mlflow.MlflowClient().delete_run(rid)
    ids = json.loads((sweep / RUNS_FILE).read_text())
    (sweep / RUNS_FILE).write_text(json.dumps({**ids, "finetune": {}}))
    _row_from_before_precision(final_stage, sweep, model_file_precision="fp32")
    log_final(None, sweep, final_stage.read_final(sweep))
    assert "params.recipe.precision" not in _finetune_runs(sweep) or _finetune_runs(sweep)[
        "params.recipe.precision"].isna().all()
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05)
    _edit_config(sweep, precision="bf16")
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    assert _finetune_runs(sweep)["tags.mlflow.runName"].tolist() == [
        "finetune-t1", "finetune-t1 (lr=0.05)", "finetune-t1 (precision=bf16)"]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_does_not_continue_a_checkpoint_in_another_precision(tmp_path):
    """Real workers: fp32 -> bf16 in the config starts afresh; 'auto' (float32 on these CPU workers) after the
    bf16 run is continued by the driver's reckoning, but the workers restart it and the stage says why."""
    import ray

    from gmpq_core.fileio import load_checkpoint
    from orchestrator.final_stage import finetune_selected
    from orchestrator.pareto import write_pareto
    from orchestrator.ray_env import init_ray
    from orchestrator.train_stage import STATE_FILE

    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32")
    write_pareto(sweep)
    knobs = dict(workers=1, max_steps_per_epoch=2, test_size=50, batch_size=32)
    said: list[str] = []

    def history():
        (ckpt,) = sorted((sweep / "ray_results" / "finetune-t1").glob("checkpoint_20*"))
        state = load_checkpoint(ckpt / STATE_FILE)
        return [(h["epoch"], h["precision"], h["resumed_from_epoch"]) for h in state["history"]], state
    started = init_ray(num_cpus=2)
    try:
        finetune_selected(sweep, epochs=1, **knobs)
        _edit_config(sweep, precision="bf16")
        second = finetune_selected(sweep, epochs=2, say=said.append, **knobs)
        assert second["resumed_from_epoch"].tolist() == [0]
        assert history()[0] == [(1, "bf16", 0), (2, "bf16", 0)]
        assert any("(precision fp32 -> bf16); starting afresh" in m for m in said), said
        _edit_config(sweep, precision="auto")
        said.clear()
        third = finetune_selected(sweep, epochs=3, say=said.append, **knobs)
    finally:
        if started:
            ray.shutdown()
    assert any("continuing its 2-epoch fine-tune to 3 epochs" in m for m in said), said
    assert ("[1/1] t1: fine-tuned afresh from epoch 1, not continued: its checkpoint was made with other settings "
            "(precision bf16 -> fp32)") in said
    steps, state = history()
    assert third["resumed_from_epoch"].tolist() == [0] and steps == [(1, "fp32", 0), (2, "fp32", 0), (3, "fp32", 0)]
    assert json.loads(state["recipe_json"])["precision"] == "fp32"
    ft = _finetune_runs(sweep)                # fp32, bf16, and fp32 again from scratch (the first fp32 run kept)
    assert ft["params.recipe.precision"].tolist() == ["fp32", "bf16", "fp32"]
    assert ft["tags.mlflow.runName"].tolist() == ["finetune-t1", "finetune-t1 (precision=bf16)",
                                                  "finetune-t1 (restart 1)"]
    assert ft["metrics.epochs"].tolist() == [1.0, 2.0, 3.0]
