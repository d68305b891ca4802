"""Names, keys and small pure helpers of a sweep's MLflow layout, shared by the sink (``orchestrator.mlflow_sink``),
its Tune callback, ``mlflow_notes`` and ``gmpq sync-mlflow``: the id-file names, run statuses and roles, the final
and Ray-added metric keys, the default tracking URI, the HTTP retry defaults and the config -> params
flattening. No MLflow import. ``orchestrator.mlflow_sink`` re-exports them (its importers import them from there).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Collection, Mapping

__all__ = ["DISABLED", "PARENT_FILE", "RUNS_FILE", "SET_ASIDE_TAG", "RUN_STATUS", "FINAL_METRICS", "MAX_PARAMS",
           "MAX_PARAM_CHARS",
           "ROLE_OF_KIND", "HTTP_RETRY_DEFAULTS", "SUPERNET_KEYS", "LEGACY_POLICY_KEYS", "default_tracking_uri",
           "FINETUNE_EPOCH_KEYS", "CONFIG_METRIC_PREFIX", "flatten_config", "legacy_layout", "finetune_epoch_metrics",
           "config_metrics", "trial_run_name"]

DISABLED = "MLflow logging disabled"     # how the sink's warning starts (sync and study pick it out by it)
PARENT_FILE = "mlflow_parent.json"
RUNS_FILE = "mlflow_runs.json"
SET_ASIDE_TAG = "gmpq.replaced_by"       # a fine-tune run set aside by a restart of its recipe: the run replacing it
RUN_STATUS = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}
FINAL_METRICS = ("proxy_top1", "transfer_top1", "transfer_top5", "bitops", "bitops_total", "budget_bitops",
                 "budget_avg_bits", "gbitops", "ard", "p", "teacher_top1", "search_seconds", "transfer_seconds", "epochs_run")
# One name, one quantity (in MLflow as in trials.parquet): ``proxy_top1`` / ``ard`` are a completed trial's derived
# policy's (BatchNorm recalibrated, measured once the search ended: trials.parquet's columns); each search epoch
# reports the supernet's under the same names, logged per epoch under these keys.
SUPERNET_KEYS = {"proxy_top1": "supernet_proxy_top1", "ard": "supernet_ard"}
# Runs logged by earlier versions (``legacy_layout``) hold the supernet's per-epoch figures under the plain names and
# the policy's under these: a resumed sweep and ``gmpq sync-mlflow`` go on logging such a run in its own names.
LEGACY_POLICY_KEYS = {"proxy_top1": "policy_proxy_top1", "ard": "policy_ard"}
# A fine-tune's per-epoch report (``train_stage``) by final.parquet's names: each epoch's test-set figures are the
# quantities final.parquet keeps of the last one, the Ray Train world size its ``workers``. Fine-tune runs of earlier
# versions hold the series under the report's names (``top1`` ...): a fine-tune continued in such a run keeps them.
FINETUNE_EPOCH_KEYS = {"top1": "final_top1", "top5": "final_top5", "loss": "final_loss", "world_size": "workers"}
# A trial's numeric sampled config, also as metrics named as trials.parquet's columns (``param_lam``): MLflow params
# are strings, which sort and filter as text ('1000' < '500', '7e-05' > '0.0004'); metrics sort and filter as numbers.
CONFIG_METRIC_PREFIX = "param_"
# Keys Ray adds to every result (not worth a metric series each) or that are not per-epoch metrics.
_RAY_KEYS = {"time_this_iter_s", "time_total_s", "training_iteration", "timestamp", "pid", "done",
             "iterations_since_restore", "time_since_restore", "epoch", "budget_bucket", "node_id", "date",
             "hostname", "node_ip", "trial_id", "experiment_id", "checkpoint_dir_name", "should_checkpoint",
             "config", "epochs_run", "prune_value",    # (prune_value: the supernet's proxy_top1 again, for Tune)
             "search_epochs"}                          # (the trial's epoch count, for the pruning scheduler)
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


def _phase_key(result: Mapping[str, Any], key: str, *, legacy: bool = False) -> str:
    """The MLflow key of a per-epoch report's ``key``: a search epoch's supernet figures under ``SUPERNET_KEYS``
    (their plain names in a ``legacy`` run), another phase's keys prefixed with it."""
    phase = result.get("phase")
    if phase in (None, "search"):
        return key if legacy else SUPERNET_KEYS.get(key, key)
    return key if key.startswith(str(phase)) else f"{phase}.{key}"


def legacy_layout(metrics: Collection[str]) -> bool:
    """Whether a trial run with these metric keys was logged by an earlier version: the policy's figures under
    ``LEGACY_POLICY_KEYS``, or the per-epoch series (``ce``) beside a plain ``proxy_top1`` / ``ard`` and no
    ``SUPERNET_KEYS`` (the supernet's per epoch, as every version before them logged it)."""
    keys = set(metrics)
    if keys & set(LEGACY_POLICY_KEYS.values()):
        return True
    return "ce" in keys and bool(keys & set(SUPERNET_KEYS)) and not keys & set(SUPERNET_KEYS.values())


def finetune_epoch_metrics(report: Mapping[str, Any], logged: Collection[str] = ()) -> dict[str, Any]:
    """A fine-tune's per-epoch report by its MLflow keys (``FINETUNE_EPOCH_KEYS``; ``epoch`` is the step), unless the
    run's ``logged`` metrics show an earlier version's names (a ``top1`` series): then as reported."""
    legacy = "top1" in logged
    return {(k if legacy else FINETUNE_EPOCH_KEYS.get(k, k)): v for k, v in report.items() if k != "epoch"}


def config_metrics(config: Mapping[str, Any]) -> dict[str, float]:
    """A trial's sampled config's numbers as metrics (``CONFIG_METRIC_PREFIX``), but those the trial reports under
    their own name (``budget_avg_bits``, in ``FINAL_METRICS``): booleans, strings and nested values stay params only."""
    return {f"{CONFIG_METRIC_PREFIX}{k}": f for k, v in config.items()
            if k not in FINAL_METRICS and (f := _numeric(v)) is not None}


# A trial run's name: its Tune trial id and what the sweep varies, e.g. ``3f2a9c1d b3.21 n1000 capacity`` (the
# MLflow UI's run list shows names; lookups go by the ``trial_id`` tag and the persisted ids, never by name).
NAME_ORDER = ("budget_avg_bits", "proxy_size", "p_mode", "eta", "lam", "kappa", "p_fixed", "lr_arch", "lr",
              "search_epochs")
NAME_LABELS = {"budget_avg_bits": "b", "proxy_size": "n", "p_mode": "", "kappa": "k", "p_fixed": "p",
               "lr_arch": "lra", "search_epochs": "ep"}
NAME_PARTS = 3


NAME_PART_CHARS, NAME_CHARS = 20, 120     # a part, the whole name (a server's run name column: VARCHAR(250))


def _varies(name: str, dim: Any) -> bool:
    """Whether the saved config's ``space:`` entry ``dim`` takes more than one value (``SearchSpace.varying``, as the
    sweep reads it; an entry it refuses, never a sweep's, does not)."""
    from gmpq_core.errors import ConfigError
    from search_spaces.space import SearchSpace

    try:
        return bool(SearchSpace.from_dict({name: dim}).varying())
    except (ConfigError, TypeError, ValueError):
        return False


def _part(label: str, k: str, v: Any) -> str | None:
    """One value of a trial run's name, at most ``NAME_PART_CHARS`` long (None: a missing number, NaN)."""
    if isinstance(v, (list, tuple)):
        text = ",".join(map(str, v))
    elif isinstance(v, float) and _numeric(v) is None:
        return None
    elif _numeric(v) is None:
        text = str(v)
    elif k == "budget_avg_bits":
        text = f"{float(v):.2f}"
    else:
        text = f"{float(v):.3g}" if isinstance(v, float) and not float(v).is_integer() else str(int(v))
    text = "".join(text.split()) if isinstance(v, (list, tuple)) else " ".join(text.split())
    part = f"{label}{text}"
    return part if len(part) <= NAME_PART_CHARS else part[:NAME_PART_CHARS - 1] + "~"


def trial_run_name(tid: str, params: Mapping[str, Any], space: Mapping[str, Any] | None = None) -> str:
    """The name of a new trial run: ``tid`` and at most ``NAME_PARTS`` of the trial's values that the sweep varies
    (``space``: the saved config's; the budget first, then the proxy size, ...), e.g. ``3f2a9c1d b3.21 n1000
    capacity``; without a ``space``, the budget and proxy size the trial has. Just ``tid`` when it has none. Each value
    at most ``NAME_PART_CHARS`` characters (cut with ``~``; a list as ``a,b``; NaN left out), the name at most
    ``NAME_CHARS``."""
    keys = [k for k in NAME_ORDER if k in params and (_varies(k, space.get(k)) if isinstance(space, Mapping)
                                                        else k in ("budget_avg_bits", "proxy_size"))]
    parts = [p for k in keys if (p := _part(NAME_LABELS.get(k, k), k, params[k])) is not None][:NAME_PARTS]
    return " ".join([str(tid), *parts])[:NAME_CHARS]
