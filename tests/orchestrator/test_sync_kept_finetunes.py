"""``gmpq sync-mlflow`` and the fine-tunes kept aside (``models/kept/<tid>.<digest>.json``: a policy's earlier recipe,
``kept_finetunes``): one whose MLflow run is missing (MLflow was down when that recipe ran, or its run was deleted)
gets its run as the live stage made it (name, params, tags, final row, policy.json, link to the trial run), tagged
``gmpq.kept``, while the trial run keeps pointing to the current recipe's run; a second sync changes nothing. Real
SQLite stores; the final stage without Ray (``test_final_recipes._stage``)."""
from __future__ import annotations

import json

import mlflow
import pytest

from final_sweep import make_sweep               # same folder (pytest puts it on sys.path)
from test_final_recipes import _stage            # same folder
from test_sync_finetune_series import DOWN, _points

A, B = {}, {"lr": 0.05}                          # recipe A (the config's lr), then recipe B


def _two_recipes(tmp_path, monkeypatch, name: str, a_down: bool):
    """A sweep folder (its sweep logged) whose t1 was fine-tuned with recipe A (MLflow down when ``a_down``), then B (MLflow up): A is
    kept aside. Returns the folder, its store's client and its fine-tune runs by recipe digest."""
    sweep = tmp_path / name
    from orchestrator.sync import sync_mlflow

    make_sweep(sweep, precision="fp32", workers=1)
    sync_mlflow(sweep)                                        # the parent and trial runs, as the sweep logs them
    stage = _stage(monkeypatch, tmp_path, [])
    if a_down:
        with pytest.warns(RuntimeWarning, match="MLflow logging disabled"):
            stage.finetune_selected(sweep, epochs=1, workers=1, tracking_uri=DOWN, **A)
    else:
        stage.finetune_selected(sweep, epochs=1, workers=1, **A)
    stage.finetune_selected(sweep, epochs=1, workers=1, **B)
    assert len(list((sweep / "models" / "kept").glob("t1.*.json"))) == 1
    return sweep, mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")


def _runs(client, sweep) -> dict[str, object]:
    """``gmpq.recipe -> run`` of the active fine-tune runs of t1."""
    parent = json.loads((sweep / "mlflow_parent.json").read_text())["run_id"]
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent}' and tags.`gmpq.role` = 'finetune'")
    out = {}
    for r in runs:
        assert r.data.tags["gmpq.recipe"] not in out, "two runs of one recipe"
        out[r.data.tags["gmpq.recipe"]] = r
    return out


def _trial_link(client, sweep) -> str:
    rid = json.loads((sweep / "mlflow_runs.json").read_text())["trials"]["t1"]
    return client.get_run(rid).data.tags.get("finetune_run_id")


@pytest.mark.parametrize("how", ["MLflow down when it ran", "its run deleted"])
def test_sync_makes_a_kept_recipes_missing_run_as_the_live_stage_did_tagged_kept_and_not_current(tmp_path,
                                                                                                 monkeypatch, how):
    from orchestrator.commands.sync_mlflow import format_report
    from orchestrator.sync import sync_mlflow

    ref, ref_client = _two_recipes(tmp_path, monkeypatch, "reference", a_down=False)     # both logged live
    ref_runs = _runs(ref_client, ref)
    (digest_a,) = [d for d, r in ref_runs.items() if r.info.run_id != _trial_link(ref_client, ref)]
    sweep, client = _two_recipes(tmp_path, monkeypatch, "sweep", a_down=how == "MLflow down when it ran")
    if how == "its run deleted":
        client.delete_run(_runs(client, sweep)[digest_a].info.run_id)
    current = _trial_link(client, sweep)
    assert digest_a not in _runs(client, sweep) and current

    rep = sync_mlflow(sweep)
    assert rep.kept_runs_made == 1 and rep.changed and "1 run made" in format_report(rep)
    runs = _runs(client, sweep)
    kept, want = runs[digest_a], ref_client.get_run(ref_runs[digest_a].info.run_id)
    assert want.info.run_name == "finetune-t1"                 # live: A's run came first, B's names what differs
    assert kept.info.status == "FINISHED" and kept.info.run_name == "finetune-t1 (lr=0.01)"   # made after B's now
    assert kept.data.params == want.data.params and kept.data.tags["gmpq.kept"] == "true"
    assert {k: kept.data.tags.get(k) for k in ("status", "trial_id", "gmpq.role")} == \
        {k: want.data.tags.get(k) for k in ("status", "trial_id", "gmpq.role")}
    trial = json.loads((sweep / "mlflow_runs.json").read_text())["trials"]["t1"]
    assert kept.data.tags["trial_run_id"] == trial and "mlflow.note.content" in kept.data.tags
    got, live = _points(client, kept.info.run_id), _points(ref_client, want.info.run_id)
    assert {k: got[k] for k in ("final_top1", "epochs", "gbitops")} == {k: live[k] for k in ("final_top1", "epochs",
                                                                                            "gbitops")}
    assert {a.path for a in client.list_artifacts(kept.info.run_id)} >= {"policy.json"}
    assert _trial_link(client, sweep) == current                       # the trial's result is still recipe B's
    assert "gmpq.kept" not in client.get_run(current).data.tags
    assert json.loads((sweep / "mlflow_runs.json").read_text())["finetune"][f"t1:{digest_a}"] == kept.info.run_id

    again = sync_mlflow(sweep)
    assert not again.changed and again.kept_runs_made == again.kept_runs_tagged == 0
    assert {d: r.info.run_id for d, r in _runs(client, sweep).items()} == {d: r.info.run_id for d, r in runs.items()}
    assert _points(client, kept.info.run_id) == got


def test_a_kept_recipes_run_made_by_the_sync_gets_the_epochs_its_kept_ray_train_checkpoint_holds(tmp_path,
                                                                                                 monkeypatch):
    """The kept Ray Train run (``<storage>/finetune-t1.<digest>``, the manifest's ``checkpoint``) holds its epochs, as
    the current recipe's does (``finetune_history``): the run gets them at their steps, each point once."""
    import torch

    from gmpq_core.fileio import save_checkpoint
    from orchestrator.final_results import finetune_storage
    from orchestrator.results import load_resolved_config
    from orchestrator.sync import sync_mlflow
    from orchestrator.train_stage import STATE_FILE

    sweep, client = _two_recipes(tmp_path, monkeypatch, "sweep", a_down=True)
    (manifest,) = (sweep / "models" / "kept").glob("t1.*.json")
    data = json.loads(manifest.read_text())
    row, run = data["row"], f"finetune-{manifest.stem}"
    history = [{"epoch": 1, "train_loss": 1.25, "train_top1": 33.0, "top1": row["final_top1"], "top5": 90.0,
                "loss": 1.0, "world_size": 1, "precision": "fp32"}]
    ckpt = finetune_storage(load_resolved_config(sweep), sweep) / run / "checkpoint_2024-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    save_checkpoint(ckpt / STATE_FILE, {"trial_id": "t1", "policy_json": row["policy_json"],
                                        "recipe_json": row["recipe_json"], "epoch": 1, "history": history,
                                        "model": {"fc.weight": torch.zeros(2, 2)}})
    manifest.write_text(json.dumps({**data, "checkpoint": run}))

    assert sync_mlflow(sweep).kept_runs_made == 1
    rid = _runs(client, sweep)[manifest.stem.split(".")[1]].info.run_id
    got = _points(client, rid)
    assert got["train_loss"] == [(1, 1.25)] and got["train_top1"] == [(1, 33.0)]
    assert got["final_top1"] == [(1, row["final_top1"])]               # the epoch's and the row's: one point
    assert not sync_mlflow(sweep).changed and _points(client, rid) == got


def test_the_live_final_stage_tags_the_recipe_it_sets_aside_and_untags_the_one_it_restores(tmp_path, monkeypatch):
    """``gmpq finetune --sweep`` with recipe A, then B (A kept aside: its run tagged ``gmpq.kept``, B's not), then A
    again (restored, no retraining: A's run untagged, B's tagged): the runs say it as the stage moves the recipes, so
    the sync that follows has nothing to change. A stage that keeps nothing aside makes no call for the tag."""
    from orchestrator.sync import sync_mlflow

    sweep, client = _two_recipes(tmp_path, monkeypatch, "sweep", a_down=False)
    runs = {d: r.info.run_id for d, r in _runs(client, sweep).items()}
    b = _trial_link(client, sweep)
    ((digest_a, a),) = [(d, r) for d, r in runs.items() if r != b]
    assert client.get_run(a).data.tags.get("gmpq.kept") == "true"
    assert "gmpq.kept" not in client.get_run(b).data.tags

    _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=1, workers=1, **A)   # A comes back
    assert {d: r.info.run_id for d, r in _runs(client, sweep).items()} == runs            # no new run
    assert _trial_link(client, sweep) == a and (sweep / "models" / "kept" / f"t1.{digest_a}.json").exists() is False
    assert "gmpq.kept" not in client.get_run(a).data.tags
    assert client.get_run(b).data.tags.get("gmpq.kept") == "true"

    rep = sync_mlflow(sweep)
    assert rep.kept_runs_made == rep.kept_runs_tagged == 0 and not rep.changed

    def no_call(*_args, **_kwargs):
        raise AssertionError("gmpq.kept looked at though no recipe was kept aside or restored")
    monkeypatch.setattr("orchestrator.sync_kept.retag_kept", no_call)
    _stage(monkeypatch, tmp_path, []).finetune_selected(sweep, epochs=1, workers=1, **A)   # done: nothing moves
