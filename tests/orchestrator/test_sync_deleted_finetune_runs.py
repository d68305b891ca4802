"""``gmpq sync-mlflow`` on a store that lost a fine-tune run its parent's final.parquet table still lists (deleted in
the MLflow UI, or by ``mlflow gc`` after that): the run is made again from final.parquet's row, linked to its trial
run both ways, with its per-epoch series from the Ray Train checkpoint; a second sync changes nothing; a run still
there whose id ``mlflow_runs.json`` lost is found by its tags and not logged into again. Real SQLite stores; the
final stage without Ray (``test_sync_finetune_series``)."""
from __future__ import annotations

import json

import mlflow
import pytest

from final_sweep import make_sweep                                 # same folder (pytest puts it on sys.path)
from test_final_recipes import _stage                              # same folder
from test_sync_finetune_series import DOWN, EPOCHS, _checkpoint, _history, _points


def _synced_sweep(tmp_path, monkeypatch, n: int = 1):
    """A sweep folder with ``n`` fine-tuned policies (``t1`` ...; t1's checkpoint holds its epochs), its final stage
    run with MLflow down, then synced once: the store holds every run, the parent final.parquet."""
    from orchestrator.sync import sync_mlflow

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4))[:n], precision="fp32", workers=1)
    with pytest.warns(RuntimeWarning, match="MLflow logging disabled"):
        _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=EPOCHS, workers=1, tracking_uri=DOWN)
    _checkpoint(sweep, _history())
    assert sync_mlflow(sweep).changed
    return sweep, mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")


def _ids(sweep) -> dict:
    return json.loads((sweep / "mlflow_runs.json").read_text())


def _finetune_runs(client, sweep) -> dict[str, list]:
    """``trial_id -> [active fine-tune runs]`` of the sweep's parent run."""
    parent = json.loads((sweep / "mlflow_parent.json").read_text())["run_id"]
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent}' and tags.`gmpq.role` = 'finetune'")
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.data.tags["trial_id"], []).append(r)
    return out


def _gone(client, sweep, rid: str, how: str) -> None:
    """Fine-tune run ``rid`` deleted as the MLflow UI does (kept in the deleted stage), or also removed by gc."""
    client.delete_run(rid)
    if how == "gc":
        from click.testing import CliRunner
        from mlflow.cli import gc

        uri = f"sqlite:///{sweep / 'mlflow.db'}"
        res = CliRunner().invoke(gc, ["--backend-store-uri", uri, "--tracking-uri", uri, "--run-ids", rid])
        assert res.exit_code == 0, res.output
        with pytest.raises(mlflow.exceptions.MlflowException):
            client.get_run(rid)
    else:
        assert client.get_run(rid).info.lifecycle_stage == "deleted"


@pytest.mark.parametrize("how", ["deleted", "gc"])
def test_a_deleted_fine_tune_run_is_made_again_with_its_links_and_epochs_and_a_second_sync_changes_nothing(
        tmp_path, monkeypatch, how):
    from orchestrator.commands.sync_mlflow import format_report
    from orchestrator.sync import sync_mlflow

    sweep, client = _synced_sweep(tmp_path, monkeypatch)
    (old,) = _ids(sweep)["finetune"].values()
    before = _points(client, old)
    trial_rid = _ids(sweep)["trials"]["t1"]
    trial_points = _points(client, trial_rid)
    _gone(client, sweep, old, how)

    rep = sync_mlflow(sweep)
    (run,) = _finetune_runs(client, sweep)["t1"]          # one active run, a new one (a deleted run is not reused)
    rid = run.info.run_id
    assert rid != old and _ids(sweep)["finetune"] == {next(iter(_ids(sweep)["finetune"])): rid}
    assert rep.finetune_runs_recreated == 1 and rep.changed and rep.finetune_series_logged == 1
    assert "1 fine-tune run made again from final.parquet" in format_report(rep)
    assert run.info.run_name == "finetune-t1" and run.info.status == "FINISHED"
    assert run.data.tags["trial_run_id"] == trial_rid                        # linked both ways
    assert client.get_run(trial_rid).data.tags["finetune_run_id"] == rid
    assert _points(client, trial_rid) == trial_points    # its final_top1 re-pointed, not logged again (same value)
    got = _points(client, rid)
    assert got == before                                 # final row and per-epoch series, each point once
    assert got["final_top1"] == [(1, 40.0), (2, 45.0), (3, 50.0)]
    assert "policy.json" in {a.path for a in client.list_artifacts(rid)}

    again = sync_mlflow(sweep)
    assert not again.changed and again.finetune_runs_recreated == 0
    assert [r.info.run_id for r in _finetune_runs(client, sweep)["t1"]] == [rid] and _points(client, rid) == got


def test_a_run_the_id_file_lost_is_found_by_its_tags_and_not_logged_into_again(tmp_path, monkeypatch):
    """t1's run deleted and t2's id gone from mlflow_runs.json (its run still there): t1's is made again, t2's keeps
    its one run and every point once (log_final would reuse it by its tags and log its final row a second time)."""
    from orchestrator.sync import sync_mlflow

    sweep, client = _synced_sweep(tmp_path, monkeypatch, n=2)
    ids = _ids(sweep)
    (k1,), (k2,) = ([k for k in ids["finetune"] if k.startswith(t)] for t in ("t1", "t2"))
    kept = ids["finetune"][k2]
    before = _points(client, kept)
    client.delete_run(ids["finetune"][k1])
    del ids["finetune"][k2]
    (sweep / "mlflow_runs.json").write_text(json.dumps(ids))

    rep = sync_mlflow(sweep)
    runs = _finetune_runs(client, sweep)
    assert [r.info.run_id for r in runs["t2"]] == [kept] and _points(client, kept) == before
    assert len(runs["t1"]) == 1 and rep.finetune_runs_recreated == 1
    assert _ids(sweep)["finetune"] == {k1: runs["t1"][0].info.run_id, k2: kept}
    again = sync_mlflow(sweep)
    assert not again.changed and _points(client, kept) == before
