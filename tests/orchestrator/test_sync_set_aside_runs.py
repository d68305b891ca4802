"""A fine-tune restarted from scratch keeps its earlier run aside (tag ``gmpq.replaced_by``, ``mlflow_stages``). When
``mlflow_runs.json`` lost the runs' ids, the runs are found by their tags: the live one, not the one set aside
(the oldest with those tags), gets the links (the trial run's ``finetune_run_id``, ``backfill_trial_tags``) and any
epochs a sync fills in, and the set-aside run is left as it was. Real SQLite store; the final stage without Ray."""
from __future__ import annotations

import json

import mlflow

from final_sweep import make_sweep                                 # same folder (pytest puts it on sys.path)
from test_final_recipes import _finetune_runs, _stage              # same folder
from test_sync_finetune_series import _points                      # same folder


def test_with_the_ids_lost_the_sync_links_the_live_fine_tune_run_not_the_one_set_aside(tmp_path, monkeypatch):
    from orchestrator.mlflow_sink import RUNS_FILE
    from orchestrator.sync import sync_mlflow

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    final_stage = _stage(monkeypatch, tmp_path, [])            # the workers report resumed_from_epoch 0: afresh
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    final_stage.finetune_selected(sweep, epochs=2, workers=1)  # restarted: the first run is set aside
    old, live = _finetune_runs(sweep)["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    assert client.get_run(old).data.tags["gmpq.replaced_by"] == live
    set_aside = _points(client, old)
    (sweep / RUNS_FILE).unlink()                               # the id file lost

    rep = sync_mlflow(sweep)
    trial = json.loads((sweep / RUNS_FILE).read_text())["trials"]["t1"]
    assert client.get_run(trial).data.tags["finetune_run_id"] == live
    assert client.get_run(live).data.tags["trial_run_id"] == trial
    assert "trial_run_id" not in client.get_run(old).data.tags and _points(client, old) == set_aside
    assert live in json.loads((sweep / RUNS_FILE).read_text())["finetune"].values()
    assert rep.duplicates == 0 and rep.finetune_runs_recreated == 0
    assert not sync_mlflow(sweep).changed
