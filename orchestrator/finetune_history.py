"""A final fine-tune's per-epoch series read back from its Ray Train checkpoint, for ``gmpq sync-mlflow``.

Live, the final stage logs each fine-tune run's epochs (``mlflow_stages._log_final_metrics``: ``step=epoch``, the
names of ``mlflow_keys.finetune_epoch_metrics``: ``final_top1``, ``final_top5``, ``final_loss``, ``workers``, ...)
and then its final.parquet row at the last epoch. A run that sync creates (the stage ran while MLflow was down)
gets only that row from final.parquet; its epochs are in the workers' checkpoint (``train_stage``: ``state.pt`` in
``<storage>/finetune-<trial_id>/checkpoint_*/``, its ``"history"`` one report per epoch, carried over on resume).
``fill_finetune_series`` logs the epochs a run lacks from there, by the same names and steps as a live run, and
no point twice (a second sync logs nothing). A checkpoint that is gone, remote, or holds another fine-tune (other
policy or settings, another result: a later run under the same name) leaves the run with its final row only.
A run a stopped final stage left unfinished (RUNNING) gets the final row it lacks (``complete_final_row``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .final_results import finetune_storage, row_recipe, saved_final_state
from .kept_finetunes import STATE_FILE
from .mlflow_keys import _numeric, finetune_epoch_metrics
from .mlflow_sink import MLflowSink
from .recipes import same_recipe

__all__ = ["SERIES_KEY", "SeriesFill", "checkpoint_history", "fill_finetune_series", "finetune_run"]

log = logging.getLogger(__name__)

# In every epoch's report (train_stage), never in final.parquet's row: the steps a run holds it at are its epochs.
SERIES_KEY = "train_loss"


@dataclass(frozen=True)
class SeriesFill:
    """What ``fill_finetune_series`` did: ``runs_filled`` fine-tune runs got epochs; ``without_history``: the trial
    ids whose runs lack their epochs and no checkpoint under ``storage`` holds them (they keep the final row)."""
    runs_filled: int
    without_history: tuple[str, ...]
    storage: str


def _whole(v: Any) -> int | None:
    f = _numeric(v)
    return int(f) if f is not None and f == int(f) else None


def checkpoint_history(storage: str | Path, row: Mapping[str, Any], *, run: str | None = None) -> list[dict] | None:
    """The per-epoch reports of the fine-tune that final.parquet's ``row`` reports, epochs 1 to ``row["epochs"]``,
    from the newest Ray Train checkpoint of ``finetune-<trial_id>`` (``run``: that Ray Train run folder, a kept
    recipe's ``finetune-<trial_id>.<digest>``) under ``storage`` (loaded with its tensors left on disk); None when
    there is none (deleted, remote storage) or it holds another fine-tune: another policy, another recipe, or no
    epoch ``row["epochs"]`` with the row's ``final_top1`` (a later run with more epochs that continued this one
    still holds its epochs)."""
    tid, epochs = str(row["trial_id"]), _whole(row.get("epochs"))
    folder = run.removeprefix("finetune-") if run else tid        # (saved_final_state reads finetune-<this>)
    state = saved_final_state(storage, folder, STATE_FILE, mmap=True) if epochs is not None else None
    if not isinstance(state, dict) or state.get("trial_id", tid) != tid or \
            (row.get("policy_json") is not None and state.get("policy_json") != row.get("policy_json")):
        return None
    recipe = row_recipe(row)
    if recipe is not None and not (isinstance(state.get("recipe_json"), str)
                                   and same_recipe(recipe, state["recipe_json"])):
        return None
    history = sorted((dict(h) for h in state.get("history") or [] if isinstance(h, dict)
                      and _whole(h.get("epoch")) is not None and 1 <= int(h["epoch"]) <= epochs),
                     key=lambda h: int(h["epoch"]))
    last = next((h for h in history if int(h["epoch"]) == epochs), None)
    top1, want = _numeric((last or {}).get("top1")), _numeric(row.get("final_top1"))
    if last is None or (top1 is not None and want is not None and abs(top1 - want) > 1e-6):
        return None
    return history


def finetune_run(sink: MLflowSink, row: Mapping[str, Any]) -> str | None:
    """The id of the active fine-tune run of final.parquet's ``row``: persisted, else found by its tags among the runs
    no other key holds (as ``MLflowSink.child_run`` would reuse it; then kept under its key in ``sink.runs``, which
    the caller saves); None: the store has none (never made, or deleted: ``search_runs`` leaves out runs in the
    deleted stage, which ``mlflow gc`` has not removed yet, and ``has_child_run`` counts them as gone)."""
    from .mlflow_stages import _recipe_key

    key, recipe_tag, _ = _recipe_key(row)
    runs = sink.runs["finetune"]
    if sink.has_child_run("finetune", key):
        return runs[key]
    rid = sink.call("finding a fine-tune run", sink.find_run,
                    {"mlflow.parentRunId": sink.parent_run_id, "trial_id": str(row["trial_id"]),
                     "gmpq.role": "finetune", **recipe_tag}, exclude=set(runs.values()))
    if rid is not None:
        runs[key] = rid
    return rid


def _steps(sink: MLflowSink, rid: str, key: str) -> dict[int, float]:
    """``step -> value`` of run ``rid``'s metric ``key`` (empty: none)."""
    points = sink.call(f"reading {key} of a fine-tune run", sink.client.get_metric_history, rid, key) or []
    return {int(m.step): m.value for m in points}


def _log_series(sink: MLflowSink, rid: str, history: list[dict]) -> int:
    """Log ``history`` into run ``rid`` as the live stage does (``finetune_epoch_metrics``, ``step=epoch``), less
    the points the run has at that step (its final row's at the last epoch, epochs logged before); how many."""
    data = sink.call("reading a fine-tune run", lambda: sink.client.get_run(rid).data)
    logged = set(data.metrics) if data is not None else set()
    reports = [(int(h["epoch"]), finetune_epoch_metrics(h, logged)) for h in history]
    keys = sorted({k for _, report in reports for k, v in report.items() if _numeric(v) is not None})
    have = {k: _steps(sink, rid, k) for k in keys}
    n = 0
    for step, report in reports:
        new = {k: v for k, v in report.items() if k in have and step not in have[k]}
        sink.log_metrics(rid, new, step=step)
        n += len(new)
    return n


def fill_finetune_series(sink: MLflowSink, cfg: Mapping[str, Any], sweep_dir: Path,
                         final_df: pd.DataFrame) -> SeriesFill:
    """Give each fine-tune run of ``final_df``'s rows that lacks epochs of its series (``SERIES_KEY`` not at every
    step 1 to its ``epochs``) those epochs from its Ray Train checkpoint (``checkpoint_history``). A row without a
    run is left to ``log_final``; a run that holds every epoch costs one metric-history lookup."""
    storage = finetune_storage(cfg, sweep_dir)
    filled, without = 0, []
    for row in final_df.to_dict("records"):
        epochs = _whole(row.get("epochs"))
        rid = finetune_run(sink, row) if epochs else None
        if rid is None or set(range(1, epochs + 1)) <= _steps(sink, rid, SERIES_KEY).keys():
            continue
        history = checkpoint_history(storage, row)
        if history is None:
            without.append(str(row["trial_id"]))
        elif _log_series(sink, rid, history):
            filled += 1
    return SeriesFill(runs_filled=filled, without_history=tuple(without), storage=str(storage))


def complete_final_row(sink: MLflowSink, rid: str, row: Mapping[str, Any]) -> bool:
    """A fine-tune run a stopped final stage left unfinished (made, then stopped before its final row or its end:
    still RUNNING; the sync refuses while a stage runs) gets what its final.parquet ``row`` has and it lacks (never a
    value it holds, ``mlflow_stages._log_final_metrics`` without a history) and ends FINISHED; whether it was one."""
    from .mlflow_stages import _log_final_metrics

    run = sink.call("reading a fine-tune run", sink.client.get_run, rid)
    if run is None or run.info.status != "RUNNING":
        return False
    _log_final_metrics(sink, rid, row, [])
    have = sink.call("listing a fine-tune run's artifacts", lambda: {a.path for a in sink.client.list_artifacts(rid)})
    if row.get("policy_json") and have is not None and "policy.json" not in have:
        sink.call("logging policy.json", sink.client.log_text, rid, str(row["policy_json"]), "policy.json")
    sink.finish(rid, "FINISHED", {"status": "completed"})
    return True
