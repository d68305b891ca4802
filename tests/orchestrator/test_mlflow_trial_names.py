"""Trial runs are named for a person scanning the MLflow UI's run list: the Tune trial id and what the sweep varies
(``mlflow_keys.trial_run_name``: the budget, the proxy size, ...), by the live sweep's Tune callback and by
``gmpq sync-mlflow`` alike; lookups go by tag and id, so a run named by an earlier version (the bare trial id) is
reused, not renamed. Real SQLite store; the callback with stand-in trials (no Ray cluster)."""
from __future__ import annotations

from types import SimpleNamespace

import mlflow
import pytest

pytest.importorskip("ray")

from final_sweep import make_sweep                    # noqa: E402  same folder (pytest puts it on sys.path)

SPACE = {"budget_avg_bits": {"type": "float", "low": 2.5, "high": 5.0, "log": False},
         "proxy_size": {"type": "categorical", "choices": [500, 1000]},
         "p_mode": {"type": "categorical", "choices": ["capacity", "fixed"]},
         "eta": {"type": "float", "low": 1.0, "high": 100.0, "log": True},
         "search_epochs": {"type": "fixed", "value": 2}}


def test_names_say_what_the_sweep_varies():
    from orchestrator.mlflow_keys import trial_run_name

    config = {"budget_avg_bits": 3.2134, "proxy_size": 1000, "p_mode": "capacity", "eta": 12.3, "search_epochs": 2}
    assert trial_run_name("3f2a9c1d", config, SPACE) == "3f2a9c1d b3.21 n1000 capacity"     # at most 3 values
    fixed_budget = {**SPACE, "budget_avg_bits": {"type": "fixed", "value": 3.0}, "proxy_size": [1000]}
    assert trial_run_name("t1", {**config, "lam": 1e-4}, fixed_budget) == "t1 capacity eta12.3"
    assert trial_run_name("t1", config) == "t1 b3.21 n1000"                    # no space known: budget and size
    assert trial_run_name("t1", {"x": 1.0}, SPACE) == "t1"


def test_odd_values_make_short_names_and_the_space_varies_as_the_sweep_reads_it():
    from orchestrator.mlflow_keys import trial_run_name

    assert trial_run_name("t1", {"budget_avg_bits": float("nan"), "proxy_size": 1000}) == "t1 n1000"   # no "bnan"
    assert trial_run_name("t1", {"proxy_size": [500, 1000]}) == "t1 n500,1000"                  # no "n[500, 1000]"
    repeats = {"proxy_size": {"type": "categorical", "choices": [3.0, 3]}}     # the sweep refuses it: one value
    assert trial_run_name("t1", {"proxy_size": 3}, repeats) == "t1"
    from orchestrator.mlflow_keys import NAME_CHARS, NAME_PART_CHARS, _part
    assert _part("", "p_mode", "x" * 300) == "x" * (NAME_PART_CHARS - 1) + "~"
    assert _part("", "p_mode", ["a b", "c"]) == "ab,c"
    assert len(trial_run_name("t" * 300, {"budget_avg_bits": 3.0})) == NAME_CHARS


def test_the_live_sweep_names_new_trial_runs_and_keeps_an_old_runs_name(tmp_path):
    from orchestrator.mlflow_callback import MLflowCallback
    from orchestrator.mlflow_sink import MLflowSink

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    cfg = {"name": "names", "model": "resnet20", "space": SPACE}
    uri = f"sqlite:///{sweep / 'mlflow.db'}"
    old = MLflowSink(uri, sweep, experiment_name="names", resolved_config=cfg)    # a run named as before: "t0"
    assert old.connect()
    t0 = old.child_run("trials", "t0", run_name="t0", params={}, tags={"trial_id": "t0", "gmpq.role": "trial"})

    cb = MLflowCallback(uri, "names", sweep, cfg, None)
    cb.setup()
    for tid, budget in (("t0", 3.0), ("t1", 4.567)):
        trial = SimpleNamespace(trial_id=tid, config={"budget_avg_bits": budget, "proxy_size": 500,
                                                      "p_mode": "fixed", "eta": 2.0}, last_result={})
        cb.on_trial_start(0, [], trial)
    client = mlflow.MlflowClient(uri)
    names = {r.data.tags["trial_id"]: (r.info.run_id, r.info.run_name) for r in client.search_runs(
        [client.get_run(cb.parent_run_id).info.experiment_id], "tags.`gmpq.role` = 'trial'")}
    assert names == {"t0": (t0, "t0"), "t1": (names["t1"][0], "t1 b4.57 n500 fixed")}


def test_the_sync_names_the_trial_runs_it_makes_as_the_sweep_does(tmp_path):
    from orchestrator.sync import sync_mlflow

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4)))                   # the demo preset's space; trials of budget 3.5, 4
    rep = sync_mlflow(sweep)
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    runs = client.search_runs([client.get_run(rep.parent_run_id).info.experiment_id], "tags.`gmpq.role` = 'trial'")
    assert sorted(r.info.run_name for r in runs) == ["t1 b3.50", "t2 b4.00"]
    assert not sync_mlflow(sweep).changed
