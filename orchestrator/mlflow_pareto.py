"""MLflow logging of the Pareto front onto the sweep's parent run (``log_pareto``; moved here from ``mlflow_stages``,
which imports it): the Pareto table (replaced, not appended to, on a rerun), the plots and Parquet tables as
artifacts, and each completed trial's run tagged ``pareto`` (``selected``, ``front`` or ``dominated``) with a
selected one's ``selection_reason``; ``_trial_run`` finds a trial's run. Its warnings go to ``mlflow_stages``'s
logger, as before they moved.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd

from gmpq_core.errors import CheckpointError

from .mlflow_links import note_sweep, tag_trial
from .mlflow_sink import MLflowSink
from .pareto import POLICIES_PNG
from .results import LAYERS_FILE, TRIALS_FILE

__all__ = ["log_pareto", "PARETO_TABLE"]

log = logging.getLogger("orchestrator.mlflow_stages")     # the stages' messages, under the name they always had

PARETO_TABLE = "pareto/pareto_table.json"   # the parent run's Pareto table (mlflow.load_table), the front as it is now


def log_pareto(tracking_uri: str | None, sweep_dir: str | Path, pareto_df: pd.DataFrame,
               png_path: str | Path | None) -> bool:
    """Add the Pareto table (JSON table + Parquet), the plots (``png_path``, and ``policies.png`` when the sweep
    folder has it) and trials/layers Parquet to the parent run.

    Every completed trial's child run gets tag ``pareto`` (``_pareto_tags``): ``selected``, ``front`` or
    ``dominated``. Returns False when MLflow could not be written (after one warning).
    """
    sink = MLflowSink(tracking_uri, sweep_dir)
    if not sink.connect():
        return False
    c, pid, d = sink.client, sink.parent_run_id, Path(sweep_dir)
    table = pareto_df.drop(columns=[x for x in ("policy_json", "layers_json") if x in pareto_df])
    _replace_table(sink, pid, table, PARETO_TABLE)
    for f in [d / "pareto.parquet", png_path, d / POLICIES_PNG, d / TRIALS_FILE, d / LAYERS_FILE]:
        if f is not None and Path(f).is_file():
            sink.call(f"logging {Path(f).name}", c.log_artifact, pid, str(f), "results")
    sizes = {"pareto_size": len(pareto_df),
             "n_selected": int(pareto_df["selected"].sum()) if "selected" in pareto_df else 0}
    held = sink.call("reading the parent run", lambda: sink.client.get_run(pid).data.metrics) or {}
    sink.log_metrics(pid, {k: v for k, v in sizes.items() if held.get(k) != v})     # (a rerun: no point again)
    reasons = _reasons(pareto_df)
    for tid, tag in _pareto_tags(d, pareto_df).items():
        tag_trial(sink, _trial_run(sink, tid), tid, tag, reasons.get(tid))
    note_sweep(sink, d)
    return sink.enabled


def _reasons(pareto_df: pd.DataFrame) -> dict[str, str]:
    """``trial_id -> selection_reason`` of the selected rows of ``pareto_df``."""
    rows = pareto_df.to_dict("records")
    return {str(r["trial_id"]): str(r.get("selection_reason") or "") for r in rows if r.get("selected")}


def _replace_table(sink: MLflowSink, rid: str, table: pd.DataFrame, artifact_file: str) -> None:
    """``table`` as run ``rid``'s table ``artifact_file``, replacing the one there: ``MlflowClient.log_table`` appends
    to an existing table (each rerun of ``gmpq pareto`` added the front again), so only a first one goes through it
    (which also marks the file as a table for the UI); later ones overwrite the file, in the format it writes."""
    folder, name = artifact_file.rsplit("/", 1)
    have = sink.call("listing the parent run's artifacts",
                     lambda: {a.path for a in sink.client.list_artifacts(rid, folder)})
    if have is None or artifact_file not in have:
        sink.call("logging the Pareto table", sink.client.log_table, rid, table, artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        table.to_json(path, orient="split", index=False, date_format="iso")
        sink.call("logging the Pareto table", sink.client.log_artifact, rid, str(path), folder)


def _pareto_tags(sweep_dir: Path, pareto_df: pd.DataFrame) -> dict[str, str]:
    """``trial_id -> pareto tag``: ``selected`` / ``front`` for the rows of ``pareto_df``, ``dominated`` for the other
    completed trials of trials.parquet a front row dominates (``pareto``'s rule; a trial that ended after the front
    was computed, which none dominates, gets none); pruned and failed trials none."""
    from .pareto import ACC, COST, completed_trials
    from .results import read_trials

    tags = {str(t): "selected" if s else "front"
            for t, s in zip(pareto_df.get("trial_id", []), pareto_df.get("selected", [False] * len(pareto_df)))}
    try:
        done = completed_trials(read_trials(sweep_dir, missing_ok=True))
    except CheckpointError as e:         # the front's tags still go on
        log.warning("no MLflow tag for the dominated trials: %s", e)
        return tags
    if done.empty:
        return tags
    front = [(float(a), float(b)) for a, b in zip(pareto_df.get(ACC, []), pareto_df.get(COST, []))]
    for tid, acc, cost in zip(done["trial_id"].astype(str), done[ACC].astype(float), done[COST].astype(float)):
        if tid not in tags and any(a >= acc and b <= cost and (a > acc or b < cost) for a, b in front):
            tags[tid] = "dominated"
    return tags


def _trial_run(sink: MLflowSink, tid: str) -> str | None:
    """The id of trial ``tid``'s run (persisted, else found by its tags; None: it has none)."""
    rid = sink.runs["trials"].get(tid)
    if rid:
        return rid
    return sink.call("finding a trial's run", sink.find_run,
                     {"mlflow.parentRunId": sink.parent_run_id, "trial_id": tid, "gmpq.role": "trial"})
