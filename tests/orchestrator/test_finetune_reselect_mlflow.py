"""A selection ``gmpq finetune --sweep`` makes again (a stale one of the config's settings, or its --top-k) is logged
to MLflow as ``gmpq pareto`` logs it: the parent run's Pareto sizes and every completed trial run's ``pareto`` tag
follow it. The final stage without Ray (``final_sweep._stage_without_ray``) on a real SQLite MLflow store."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from final_sweep import make_sweep   # same folder (pytest puts it on sys.path)
from test_final_recipes import _stage   # same folder

pytest.importorskip("ray")


def test_a_selection_made_again_by_finetune_is_logged_to_the_parent_and_the_trial_runs(tmp_path, monkeypatch):
    from orchestrator.commands.pareto import pareto_stage
    from orchestrator.mlflow_sink import PARENT_FILE
    from orchestrator.mlflow_stages import PARETO_TABLE
    from orchestrator.results import TRIALS_FILE, read_trials
    from orchestrator.sync import sync_mlflow

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4), (6, 6)), precision="fp32")   # t1..t3 all on the front; top_k 3
    every = read_trials(sweep)
    every[every["trial_id"] != "t3"].to_parquet(sweep / TRIALS_FILE)     # t3 not ended yet
    sync_mlflow(sweep)
    pareto_stage(sweep, None, None)                                      # gmpq pareto: t1, t2 selected
    every.to_parquet(sweep / TRIALS_FILE)                                # t3 completes: the selection is stale
    sync_mlflow(sweep)                                                   # (t3's run)
    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    pid = json.loads((sweep / PARENT_FILE).read_text())["run_id"]

    def logged() -> tuple[dict, dict]:
        runs = json.loads((sweep / "mlflow_runs.json").read_text())["trials"]
        metrics = client.get_run(pid).data.metrics
        table = json.loads(Path(client.download_artifacts(pid, PARETO_TABLE, str(tmp_path))).read_text())
        rows = [dict(zip(table["columns"], r)) for r in table["data"]]
        return ({k: metrics.get(k) for k in ("pareto_size", "n_selected")} | {"table_selected": sorted(
                    r["trial_id"] for r in rows if r["selected"])},
                {tid: client.get_run(rid).data.tags.get("pareto") for tid, rid in runs.items()})

    assert logged()[0] == {"pareto_size": 2, "n_selected": 2, "table_selected": ["t1", "t2"]}
    final_stage = _stage(monkeypatch, tmp_path, [])
    final_stage.finetune_selected(sweep, epochs=1, workers=1)           # selects again, with t3
    assert logged() == ({"pareto_size": 3, "n_selected": 3, "table_selected": ["t1", "t2", "t3"]},
                        {"t1": "selected", "t2": "selected", "t3": "selected"})

    final_stage.finetune_selected(sweep, epochs=1, workers=1, top_k=1)  # gmpq finetune --top-k 1
    sizes, tags = logged()
    assert sizes["pareto_size"] == 3 and sizes["n_selected"] == 1 and len(sizes["table_selected"]) == 1
    assert sorted(tags.values()) == ["front", "front", "selected"]


def test_a_selection_made_again_with_mlflow_down_warns_once(tmp_path, monkeypatch, capsys, recwarn):
    """gmpq finetune --sweep of a stale selection: the selection's logging and the fine-tunes' each found the store
    down, and each warned (the same paragraph twice); one warning now, and both still try the store."""
    from orchestrator.cli import main
    from orchestrator.commands.pareto import pareto_stage
    from orchestrator.results import TRIALS_FILE, read_trials

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4), (6, 6)), precision="fp32")
    every = read_trials(sweep)
    every[every["trial_id"] != "t3"].to_parquet(sweep / TRIALS_FILE)     # t3 not ended yet
    pareto_stage(sweep, None, None, mlflow=False)                         # gmpq pareto: t1, t2 selected
    every.to_parquet(sweep / TRIALS_FILE)                                 # t3 completes: the selection is stale
    _stage(monkeypatch, tmp_path, [])                                     # (the stage without Ray)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main(["finetune", "--sweep", str(sweep), "--tracking-uri", "http://127.0.0.1:9", "--epochs", "1"]) == 0
    assert "selected again from all of them" in capsys.readouterr().err
    shown = [str(w.message) for w in recwarn if str(w.message).startswith("MLflow logging disabled")]
    assert len(shown) == 1 and "connecting failed on tracking URI 'http://127.0.0.1:9'" in shown[0], shown
