"""A sweep's parent run removed by ``mlflow gc`` WHILE a command logs to it (``mlflow_parent.replace_removed_parent``):
the first write the store refuses for the missing parent makes a new parent, as a command starting now would, with
the runs under the removed one moved under it, says it in one line and goes on logging (MLflow stays on); a write that
still names the removed id lands on the new parent. The sweep's Tune callback driven with stand-in trials on a real
SQLite store (``test_mlflow_lost_parent``)."""
from __future__ import annotations

import json
import logging
import warnings

import pytest

pytest.importorskip("ray")

from test_mlflow_lost_parent import _live_sweep, _trial           # noqa: E402  same folder (pytest puts it on sys.path)
from test_sync_deleted_parent_run import _gc, _parent             # noqa: E402
from test_sync_finetune_series import _points                     # noqa: E402


def test_a_parent_removed_by_gc_midway_is_replaced_and_the_sweep_goes_on_logging(tmp_path, caplog):
    sweep, client, cb = _live_sweep(tmp_path)
    for tid in ("a", "b"):
        cb.on_trial_start(0, [], _trial(tid))
        cb.on_trial_result(0, [], _trial(tid), {"epoch": 1, "ce": 1.0, "proxy_top1": 10.0})
    old = _parent(sweep)
    exp_id = client.get_run(old).info.experiment_id
    client.delete_run(old)                          # deleted in the UI, then removed by mlflow gc, as the sweep runs
    _gc(sweep, old)

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        cb.on_trial_complete(0, [], _trial("a", done=True, epoch=1, transfer_top1=50.0, proxy_top1=12.0))
        cb.on_trial_result(0, [], _trial("b"), {"epoch": 2, "ce": 0.5, "proxy_top1": 20.0})
        cb.on_trial_complete(0, [], _trial("b", done=True, epoch=2, transfer_top1=60.0, proxy_top1=22.0))
        cb.on_experiment_end([])                    # ends the parent run: the first write the store refuses
        cb.sink.call("tagging the parent run", cb.sink.client.set_tag, old, "gmpq.test", "late")   # the old id
    assert not [str(w.message) for w in caught if "MLflow logging disabled" in str(w.message)]
    assert cb.sink.enabled
    new = _parent(sweep)
    assert new != old and cb.sink.parent_run_id == new
    parent = client.get_run(new)
    assert parent.info.status == "FINISHED" and parent.data.tags["gmpq.test"] == "late"
    parents = client.search_runs([exp_id], "tags.`gmpq.role` = 'sweep'")
    assert [p.info.run_id for p in parents] == [new]
    ids = json.loads((sweep / "mlflow_runs.json").read_text())["trials"]
    for tid, top1 in (("a", 50.0), ("b", 60.0)):
        run = client.get_run(ids[tid])
        assert run.data.tags["mlflow.parentRunId"] == new and run.info.status == "FINISHED"
        assert run.data.metrics["transfer_top1"] == top1
    assert _points(client, ids["b"])["ce"] == [(1, 1.0), (2, 0.5)]      # each point once
    lines = [r.getMessage() for r in caplog.records if "parent run" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(
        f"MLflow: the sweep's parent run {old} was removed from the store (mlflow gc): made a new parent run {new}, "
        "moved the 2 runs"), lines
    assert lines[0].endswith("and noted the sweep on it"), lines   # no Pareto or final table yet: none is claimed


def test_a_stage_that_took_the_parent_id_before_gc_removed_it_goes_on_logging_onto_the_new_one(tmp_path, monkeypatch):
    """``gmpq pareto``'s logging (``log_pareto``) takes the client and the parent id once, right after its sink
    connects, and reads and writes the parent through closures naming them; mlflow gc removes the parent just then.
    The stage's writes land on the new parent, each once, and the sink stays on (no 'MLflow logging disabled')."""
    import pandas as pd

    from orchestrator import mlflow_sink
    from orchestrator.mlflow_stages import log_pareto

    sweep, client, cb = _live_sweep(tmp_path)
    cb.on_trial_start(0, [], _trial("a"))
    cb.on_trial_complete(0, [], _trial("a", done=True, epoch=1, transfer_top1=50.0, proxy_top1=12.0))
    cb.on_experiment_end([])
    old = _parent(sweep)
    exp_id = client.get_run(old).info.experiment_id
    connect, removed = mlflow_sink.MLflowSink.connect, []

    def connect_then_gc(self, **kw):               # the stage's sink connected: gc removes the parent now
        ok = connect(self, **kw)
        if not removed and self.parent_run_id == old:
            removed.append(old)
            client.delete_run(old)
            _gc(sweep, old)
        return ok
    monkeypatch.setattr(mlflow_sink.MLflowSink, "connect", connect_then_gc)
    front = pd.DataFrame({"trial_id": ["a"], "selected": [True], "transfer_top1": [50.0], "bitops": [1.0]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = log_pareto(f"sqlite:///{sweep / 'mlflow.db'}", sweep, front, None)
    assert removed and ok, [str(w.message) for w in caught]
    assert not [str(w.message) for w in caught if "MLflow logging disabled" in str(w.message)]
    new = _parent(sweep)
    assert [p.info.run_id for p in client.search_runs([exp_id], "tags.`gmpq.role` = 'sweep'")] == [new] != [old]
    assert _points(client, new)["pareto_size"] == [(0, 1.0)]
    assert "pareto/pareto_table.json" in {a.path for a in client.list_artifacts(new, "pareto")}
    trial = json.loads((sweep / "mlflow_runs.json").read_text())["trials"]["a"]
    assert client.get_run(trial).data.tags["pareto"] == "selected"


def test_a_parent_removed_again_and_again_in_one_command_still_takes_writes_naming_the_first(tmp_path):
    """gc removes the parent, then the ones made for it, three times: a write naming the first id lands on the newest
    parent (the ids replaced before name it too, not the one replacing them first)."""
    sweep, client, cb = _live_sweep(tmp_path)
    sink, first = cb.sink, _parent(sweep)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (1, 2, 3):
            rid = _parent(sweep)
            client.delete_run(rid)
            _gc(sweep, rid)
            sink.call("tagging the parent run", sink.client.set_tag, first, f"gmpq.test{n}", "x")
        sink.call("tagging the parent run", sink.client.set_tag, first, "gmpq.test4", "x")   # (replaced 3 times)
    assert not [str(w.message) for w in caught if "MLflow logging disabled" in str(w.message)] and sink.enabled
    newest = _parent(sweep)
    assert sink.parent_run_id == newest and newest != first
    assert {"gmpq.test3", "gmpq.test4"} <= set(client.get_run(newest).data.tags)
