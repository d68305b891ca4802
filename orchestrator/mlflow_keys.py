"""Names, keys and small pure helpers of a sweep's MLflow layout, shared by the sink (``orchestrator.mlflow_sink``),
its Tune callback, ``mlflow_notes`` and ``gmpq sync-mlflow``: the id-file names, run statuses and roles, the final
and Ray-added metric keys, the default tracking URI, the HTTP retry defaults and the config -> params
flattening. No MLflow import. ``orchestrator.mlflow_sink`` re-exports them (its importers import them from there).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

__all__ = ["DISABLED", "PARENT_FILE", "RUNS_FILE", "RUN_STATUS", "FINAL_METRICS", "MAX_PARAMS", "MAX_PARAM_CHARS",
           "ROLE_OF_KIND", "HTTP_RETRY_DEFAULTS", "default_tracking_uri", "flatten_config"]

DISABLED = "MLflow logging disabled"     # how the sink's warning starts (sync and study pick it out by it)
PARENT_FILE = "mlflow_parent.json"
RUNS_FILE = "mlflow_runs.json"
RUN_STATUS = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}
FINAL_METRICS = ("proxy_top1", "transfer_top1", "transfer_top5", "bitops", "bitops_total", "budget_bitops",
                 "budget_avg_bits", "gbitops", "ard", "p", "teacher_top1", "search_seconds", "transfer_seconds", "epochs_run")
# Keys Ray adds to every result (not worth a metric series each) or that are not per-epoch metrics.
_RAY_KEYS = {"time_this_iter_s", "time_total_s", "training_iteration", "timestamp", "pid", "done",
             "iterations_since_restore", "time_since_restore", "epoch", "budget_bucket", "node_id", "date",
             "hostname", "node_ip", "trial_id", "experiment_id", "checkpoint_dir_name", "should_checkpoint",
             "config", "epochs_run"}
MAX_PARAMS, MAX_PARAM_CHARS = 100, 500
ROLE_OF_KIND = {"trials": "trial", "finetune": "finetune"}
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def default_tracking_uri(sweep_dir: str | Path) -> str:
    return f"sqlite:///{Path(sweep_dir).resolve() / 'mlflow.db'}"


def flatten_config(d: Mapping[str, Any], *, max_params: int = MAX_PARAMS, max_depth: int = 2) -> dict[str, str]:
    """Nested config -> at most ``max_params`` ``{"a.b": str}`` params.

    Nesting below ``max_depth`` levels, lists and dicts become one JSON value (e.g. a search-space
    dimension ``space.eta = {"type": "float", ...}``); values are cut at 500 characters.
    """
    out: dict[str, str] = {}

    def walk(x: Mapping[str, Any], path: str) -> None:
        for k, v in x.items():
            key = f"{path}{k}"
            if isinstance(v, Mapping) and v and key.count(".") + 1 < max_depth:
                walk(v, key + ".")
            else:
                s = v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True)
                out[key] = s if len(s) <= MAX_PARAM_CHARS else s[:MAX_PARAM_CHARS - 3] + "..."
    walk(d, "")
    return dict(list(out.items())[:max_params])


def _numeric(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if f == f and abs(f) != float("inf") else None


def _phase_key(result: Mapping[str, Any], key: str) -> str:
    phase = result.get("phase")
    return key if phase in (None, "search") or key.startswith(str(phase)) else f"{phase}.{key}"
