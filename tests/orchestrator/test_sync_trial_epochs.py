"""``gmpq sync-mlflow`` fills the per-epoch points a trial run lacks from Ray Tune's result.json, per metric and step,
as the live callback logs them: the new run a resumed sweep made for a trial whose run was deleted before ``gmpq sweep
--resume`` (it holds only the epochs after the resume), and a run whose logging stopped part way. A second sync logs
nothing. Real SQLite stores, the real ``MLflowCallback`` (driven through its Tune hooks, as other MLflow tests do), a
result.json as Tune writes it (the lines of ``runs/demo27``'s trials: Tune's own keys beside the trainable's)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

pytest.importorskip("ray")

CONFIG = {"budget_avg_bits": 3.5, "proxy_size": 500, "eta": 13.68, "lam": 0.0007, "p_mode": "fixed", "lr_arch": 0.32,
          "p_fixed": 3.0, "search_epochs": 3}
EPOCHS = 3


def _reports(tid: str = "t1") -> list[dict]:
    """A trial's lines in result.json as Tune writes them: one per search epoch, then the transfer check's."""
    out = []
    for e in range(1, EPOCHS + 1):
        out.append({"phase": "search", "epoch": e, "proxy_top1": 20.0 + e, "ce": 1.5 - 0.1 * e, "l_gen": 0.006 + e / 1e4,
                    "expected_gbitops": 0.43 + e / 100, "p": 3.0, "ard": 0.2 + e / 100, "expected_avg_bits": 3.7,
                    "budget_bucket": 1, "prune_value": 20.0 + e, "search_epochs": EPOCHS})
    out.append({**out[-1], "phase": "transfer", "proxy_top1": 54.1, "ard": 0.43, "prune_value": 54.1,
                "transfer_top1": 78.15, "teacher_top1": 76.1, "transfer_top5": 99.45, "bitops": 356450304,
                "bitops_total": 472711168, "budget_bitops": 369724625, "budget_avg_bits": 3.5, "gbitops": 0.356450304,
                "search_seconds": 11.7, "transfer_seconds": 16.6, "epochs_run": EPOCHS, "node_id": "f7072e60",
                "policy_json": json.dumps({"version": 1, "layers": {}}), "layers_json": "[]"})
    for i, r in enumerate(out, start=1):      # Tune's own keys (left out of MLflow)
        r.update({"timestamp": 1795964004 + i, "checkpoint_dir_name": None, "done": False, "training_iteration": i,
                  "trial_id": tid, "date": f"2026-11-29_14-53-2{i}", "time_this_iter_s": 3.6, "time_total_s": 3.6 * i,
                  "pid": 1582, "hostname": "vm", "node_ip": "192.0.2.2", "config": CONFIG, "time_since_restore": 3.6 * i,
                  "iterations_since_restore": i})
    return out


def _sweep(d: Path) -> dict:
    """A sweep folder whose one trial ``t1`` completed: its config, trials.parquet row and Tune trial folder."""
    from orchestrator.results import load_resolved_config, trial_row, write_results
    from orchestrator.sweep_config import load_sweep_config, save_resolved_config

    save_resolved_config(load_sweep_config(None, preset="demo", overrides={"out_dir": str(d), "name": "ep",
                                                                            "n_trials": 1}))
    trial = d / "ray_results" / "ep" / "gmpq_trial_t1_1_budget_avg_bits=3.5000,proxy_size=500_2026-11-29_14-53-15"
    trial.mkdir(parents=True)
    reports = _reports()
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in reports))
    write_results(d, [trial_row(trial_id="t1", config=CONFIG, status="completed", last_result=reports[-1])], [])
    return load_resolved_config(d)


def _live(d: Path, cfg: dict, reports: list[dict], *, end: bool = True):
    """The sweep's callback logging ``reports`` of t1 (``end``: then the trial completes and the sweep ends)."""
    from orchestrator.mlflow_callback import MLflowCallback

    cb = MLflowCallback(None, "ep", d, cfg, None)
    cb.setup()
    trial = SimpleNamespace(trial_id="t1", config=dict(CONFIG), last_result={})
    cb.on_trial_start(0, [], trial)
    for r in reports:
        r = dict(r, done=r["phase"] in ("transfer", "replay"))    # the final row: done (result.json: not)
        cb.on_trial_result(0, [], trial, r)
        trial.last_result = r
    if end:
        cb.on_trial_complete(0, [], trial)
        cb.on_experiment_end([])
    return cb.sink


def _points(client, rid: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(rid).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(rid, k)) for k in keys}


@pytest.mark.parametrize("how", ["deleted before the resume", "logging stopped", "never logged"])
def test_sync_fills_the_epochs_a_trial_run_lacks_as_the_live_sweep_logs_them_once(tmp_path, how):
    """A run with no point (MLflow down throughout) is made with every epoch, also as the live sweep logs them (an
    earlier sync logged the final report's figures again under ``transfer.*``)."""
    from orchestrator.sync import sync_mlflow

    reference = tmp_path / "reference"                 # the same trial logged whole by the live sweep
    ref_sink = _live(reference, _sweep(reference), _reports())
    want = _points(mlflow.MlflowClient(ref_sink.tracking_uri), ref_sink.runs["trials"]["t1"])

    sweep = tmp_path / "sweep"
    cfg = _sweep(sweep)
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    first = _live(sweep, cfg, _reports()[:1], end=False) if how != "never logged" else None   # epoch 1, stopped
    if how == "deleted before the resume":
        client.delete_run(first.runs["trials"]["t1"])
        rid = _live(sweep, cfg, _reports()[1:]).runs["trials"]["t1"]     # gmpq sweep --resume: a new run
        assert rid != first.runs["trials"]["t1"]
        assert [s for s, _ in _points(client, rid)["ce"]] == [2, 3]
    elif first is not None:
        rid = first.runs["trials"]["t1"]

    rep = sync_mlflow(sweep)
    if first is None:
        rid = json.loads((sweep / "mlflow_runs.json").read_text())["trials"]["t1"]
    assert (rep.runs_updated, rep.runs_created) == ((0, 1) if first is None else (1, 0)) and rep.duplicates == 0
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    got = _points(client, rid)
    assert got == want, {k: (got.get(k), want.get(k)) for k in {*got, *want} if got.get(k) != want.get(k)}
    assert got["supernet_proxy_top1"] == [(1, 21.0), (2, 22.0), (3, 23.0)] and got["ard"] == [(3, 0.43)]
    assert not [k for k in got if k.startswith("transfer.")]     # the final report: its row's metrics only

    again = sync_mlflow(sweep)
    assert again.runs_unchanged == 1 and not again.changed and _points(client, rid) == got


def test_a_replayed_trials_new_run_gets_its_one_epoch_though_the_final_row_logged_p_at_that_step(tmp_path):
    """A one-epoch trial whose run was removed before ``gmpq sweep --resume``, which replays its finished row (Tune
    reran it): the new run holds the final metrics at step 1, ``p`` among them (a per-epoch key too). The sync
    still fills epoch 1's ce, supernet_* ..., as the live sweep logs them, and logs no point twice."""
    from orchestrator.sync import sync_mlflow

    global EPOCHS
    EPOCHS, before = 1, EPOCHS
    try:
        reference = tmp_path / "reference"
        ref_sink = _live(reference, _sweep(reference), _reports())
        want = _points(mlflow.MlflowClient(ref_sink.tracking_uri), ref_sink.runs["trials"]["t1"])
        sweep = tmp_path / "sweep"
        cfg = _sweep(sweep)
        client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
        first = _live(sweep, cfg, _reports())
        client.delete_run(first.runs["trials"]["t1"])
        replay = dict(_reports()[-1], phase="replay", replayed=True)       # (trainable.finished_result)
        rid = _live(sweep, cfg, [replay]).runs["trials"]["t1"]
        assert rid != first.runs["trials"]["t1"]
        assert _points(client, rid)["p"] == [(1, 3.0)] and "ce" not in _points(client, rid)

        rep = sync_mlflow(sweep)
        got = _points(client, rid)
        assert rep.runs_updated == 1 and got == want, \
            {k: (got.get(k), want.get(k)) for k in {*got, *want} if got.get(k) != want.get(k)}
        assert not sync_mlflow(sweep).changed and _points(client, rid) == got
    finally:
        EPOCHS = before
