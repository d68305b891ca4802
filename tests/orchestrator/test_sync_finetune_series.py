"""``gmpq sync-mlflow`` on a sweep whose final stage ran while MLflow was down: the fine-tune run it creates from
final.parquet gets its per-epoch series from the fine-tune's Ray Train checkpoint (the ``state.pt`` train_stage
writes, its ``history``), the same points as the live stage logs; a second sync logs nothing; no checkpoint left:
the final row only, said in one line. Real SQLite stores; the final stage without Ray
(``test_final_recipes._stage``)."""
from __future__ import annotations

import json
import shutil

import mlflow
import pytest

from final_sweep import make_sweep          # same folder (pytest puts it on sys.path)
from test_final_recipes import _stage       # same folder

DOWN = "http://127.0.0.1:9"                 # nothing listens there: the stage's MLflow logging is off
EPOCHS = 3


def _offline_finetune(tmp_path, monkeypatch):
    """A sweep folder whose 3-epoch fine-tune of t1 (top1 50.0, as final_sweep.METRICS) ran with MLflow down."""
    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32", workers=1)
    with pytest.warns(RuntimeWarning, match="MLflow logging disabled"):
        _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=EPOCHS, workers=1, tracking_uri=DOWN)
    assert not (sweep / "mlflow.db").exists()
    return sweep


def _history(lr: float = 0.01) -> list[dict]:
    """train_stage's per-epoch reports (rank 0's, as its checkpoint keeps them); the last one is final.parquet's."""
    return [{"epoch": e, "train_loss": 2.0 - 0.5 * e, "train_top1": 30.0 + 5 * e, "lr": lr * (EPOCHS - e) / EPOCHS,
             "resumed_from_epoch": 0, "world_size": 1, "train_images": 100, "images_per_epoch": 96,
             "test_images": 10, "precision": "fp32", "top1": 50.0 - 5 * (EPOCHS - e),
             "top5": 90.0 - (EPOCHS - e), "loss": 1.0 + 0.25 * (EPOCHS - e), "epoch_seconds": 0.5}
            for e in range(1, EPOCHS + 1)]


def _checkpoint(sweep, history: list[dict], recipe_changes: dict | None = None):
    """The newest Ray Train checkpoint of finetune-t1 as train_stage's workers save it; returns its run folder."""
    import torch

    from gmpq_core.fileio import save_checkpoint
    from orchestrator.final_results import finetune_storage, read_final
    from orchestrator.results import load_resolved_config
    from orchestrator.train_stage import STATE_FILE

    row = read_final(sweep).to_dict("records")[0]
    recipe = json.dumps({**json.loads(row["recipe_json"]), **(recipe_changes or {})}, sort_keys=True)
    run = finetune_storage(load_resolved_config(sweep), sweep) / "finetune-t1"
    ckpt = run / "checkpoint_2024-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    save_checkpoint(ckpt / STATE_FILE, {
        "trial_id": "t1", "policy_json": row["policy_json"], "recipe_json": recipe, "epoch": EPOCHS,
        "history": history, "model": {"fc.weight": torch.zeros(2, 2)},
        "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "total_steps": 2 * EPOCHS})
    return run


def _finetune_run(sweep) -> str:
    (rid,) = json.loads((sweep / "mlflow_runs.json").read_text())["finetune"].values()
    return rid


def _points(client, rid: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric point of run ``rid``: ``key -> [(step, value)]`` (timestamps left out)."""
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(rid, k))
            for k in client.get_run(rid).data.metrics}


def test_sync_gives_a_fine_tune_run_made_from_final_parquet_the_epochs_its_checkpoint_holds_once(tmp_path,
                                                                                                monkeypatch):
    from orchestrator.commands.sync_mlflow import format_report
    from orchestrator.final_results import read_final
    from orchestrator.mlflow_stages import log_final
    from orchestrator.sync import sync_mlflow

    sweep = _offline_finetune(tmp_path, monkeypatch)
    _checkpoint(sweep, _history())
    live = tmp_path / "live"                    # the reference: the same folder logged live, in its own store
    shutil.copytree(sweep, live)
    assert log_final(None, live, read_final(live), histories={"t1": _history()}, fresh={"t1"})
    rep = sync_mlflow(sweep)
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    rid = _finetune_run(sweep)
    got = _points(client, rid)
    assert got["final_top1"] == [(1, 40.0), (2, 45.0), (3, 50.0)]       # each epoch once, step = epoch
    assert got["final_loss"] == [(1, 1.5), (2, 1.25), (3, 1.0)] and got["workers"] == [(1, 1), (2, 1), (3, 1)]
    assert got == _points(mlflow.MlflowClient(f"sqlite:///{live / 'mlflow.db'}"), _finetune_run(live))
    assert rep.tables_logged == ("pareto.parquet", "final.parquet") and rep.finetune_series_logged == 1
    assert "1 fine-tune run given its per-epoch series" in format_report(rep)
    again = sync_mlflow(sweep)                  # nothing new: not one more point
    assert again.finetune_series_logged == 0 and not again.changed and again.finetunes_without_history == ()
    assert _points(client, rid) == got


@pytest.mark.parametrize("checkpoint", ["deleted", "other_recipe"])
def test_a_fine_tune_without_its_checkpoint_keeps_the_final_row_and_the_sync_says_so_in_one_line(tmp_path,
                                                                                                monkeypatch, capsys,
                                                                                                checkpoint):
    """No checkpoint left (or one of a later fine-tune with other settings): the run has final.parquet's row at its
    last epoch only, and one line names it; the checkpoint back, the next sync completes that run."""
    from orchestrator.cli import main

    sweep = _offline_finetune(tmp_path, monkeypatch)
    run = _checkpoint(sweep, _history(lr=0.05), {"lr": 0.05}) if checkpoint == "other_recipe" else None
    assert main(["sync-mlflow", "--sweep", str(sweep)]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "t1" in line]
    assert said == [f"fine-tune run of t1 keeps the final row only: no Ray Train checkpoint under "
                    f"{sweep.resolve() / 'ray_results'} holds its per-epoch series (deleted, or replaced by a later "
                    "fine-tune)"]
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    rid = _finetune_run(sweep)
    assert _points(client, rid)["final_top1"] == [(EPOCHS, 50.0)] and "train_loss" not in _points(client, rid)
    assert main(["sync-mlflow", "--sweep", str(sweep)]) == 0          # again: the line, and no "nothing was missing"
    again = capsys.readouterr().out.splitlines()
    assert again[-1] == "nothing else to upload" and sum("keeps the final row only" in x for x in again) == 1
    if run is not None:
        shutil.rmtree(run)
    _checkpoint(sweep, _history())              # its own checkpoint (back from a backup)
    assert main(["sync-mlflow", "--sweep", str(sweep), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["finetune_series_logged"] == 1 and rep["finetunes_without_history"] == []
    assert _points(client, rid)["final_top1"] == [(1, 40.0), (2, 45.0), (3, 50.0)]
