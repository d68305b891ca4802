"""A real tiny sweep (Ray, Optuna, MLflow, Fashion-MNIST) whose pruner sees every trial's only search epoch."""
from __future__ import annotations

import json
import statistics

import pytest
import yaml

from tiny_sweep import tiny_sweep_config  # same folder (pytest puts it on sys.path)

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_a_trial_below_the_median_at_its_last_search_epoch_is_kept_and_transfer_checked(tmp_path):
    import optuna
    import pandas as pd

    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import load_sweep_config

    # one search epoch per trial, the median pruner deciding from epoch 1 on, one trial at a time, every budget in
    # one bucket (the demo's edges 3.25, 4.25): the trials compete with each other
    base = tiny_sweep_config("lastepoch")
    conf = tiny_sweep_config("lastepoch", n_trials=3, max_concurrent_trials=1,
                             pruner={"name": "median", "kwargs": {"n_startup_trials": 1, "n_warmup_steps": 0}},
                             space={**base["space"], "budget_avg_bits": {"type": "float", "low": 3.5, "high": 4.0}})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(conf))
    sweep_dir = tmp_path / "sweep"
    cfg = load_sweep_config(tmp_path / "tiny.yaml", overrides={"out_dir": str(sweep_dir),
                                                               "cache_dir": str(tmp_path / "cache")})
    summary = run_sweep(cfg, progress=False, prep_threads=1)
    events = [json.loads(line) for line in (sweep_dir / "trial_events.jsonl").read_text().splitlines()]
    order = [e["trial_id"] for e in events if e["event"] == "start"]
    value = {e["trial_id"]: e["proxy_top1"] for e in events if e["event"] == "epoch"}
    # the test means something: a trial ended its search below the median of the trials before it (all complete),
    # which the pruner used to stop there, throwing its search away before the transfer check
    below = [t for k, t in enumerate(order[1:], 1) if value[t] < statistics.median(value[o] for o in order[:k])]
    assert below, value
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert summary.n_pruned == 0 and set(trials["status"]) == {"completed"} and len(trials) == 3
    assert trials["transfer_top1"].notna().all()
    assert {e["trial_id"] for e in events if e["event"] == "transfer"} == set(order)
    assert set(trials["budget_bucket"]) == {1}
    twins = optuna.load_study(study_name="lastepoch-prune-bucket1", storage=f"sqlite:///{sweep_dir}/optuna.db").trials
    assert [t.state.name for t in twins] == ["COMPLETE"] * 3                 # the pruning study's records agree
