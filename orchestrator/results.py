"""Sweep results as Parquet: one row per trial (``trials.parquet``) and per trial x layer (``layers.parquet``).

Parquet is the source of truth of a sweep (MLflow is a view of it). Both files are rewritten whole
and atomically (temp file + ``os.replace``) after every finished trial, so a crash leaves the last
complete table, never half of one. On construction the callback loads what a previous run of the
same sweep wrote and merges by ``trial_id`` (resume: no duplicate rows).

Column types are explicit (``pyarrow`` schema below); the per-trial config is flattened into
``param_*`` columns whose type is inferred per column (bool, int64, float64 or string; lists and
dicts are stored as JSON strings). Files are readable with pandas, duckdb or pyarrow. The Tune callback
that writes them during a sweep is ``results_callback.ResultsCallback``; this module imports no Ray, so
readers (``gmpq status``, ``gmpq pareto``) start fast.
"""
from __future__ import annotations

import json
import logging
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from gmpq_core.errors import CheckpointError
from gmpq_core.fileio import atomic_write

__all__ = ["TRIALS_FILE", "LAYERS_FILE", "PARETO_FILE", "FINAL_FILE", "MODELS_DIR", "CONFIG_FILE", "TRIAL_STATUSES",
           "METRIC_FIELDS", "LAYER_SCHEMA", "trial_schema", "flatten_params", "trial_row", "layer_rows",
           "rows_to_table", "write_table", "read_table", "read_trials", "read_trials_table", "read_layers",
           "write_results", "load_resolved_config", "utc_now_iso", "resolve_status", "has_ended", "error_text",
           "NODE_DIED"]

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.parquet"
LAYERS_FILE = "layers.parquet"
PARETO_FILE = "pareto.parquet"
FINAL_FILE = "final.parquet"
NODE_DIED = "its node died"        # error_text's words for a trial whose Ray node died under it
MODELS_DIR = "models"                 # the final stage's model files: models/<trial_id>.pt
CONFIG_FILE = "sweep_config.yaml"
TRIAL_EVENTS = "trial_events.jsonl"   # written by the trials: one line per start, search epoch, transfer check, end
TRIAL_STATUSES = ("completed", "pruned", "failed")

_HEAD_FIELDS = [pa.field("trial_id", pa.string(), nullable=False), pa.field("status", pa.string()),
                pa.field("error", pa.string())]
# Final metrics of a trial (trainable's final report; null when the trial never got there).
# "last_epoch" holds the last reported "epoch" and "expected_gbitops" its expected GBitOPs, so
# pruned trials still say how far they went and at which cost they were aiming.
METRIC_FIELDS = [
    pa.field("proxy_top1", pa.float64()), pa.field("transfer_top1", pa.float64()), pa.field("transfer_top5", pa.float64()),
    pa.field("bitops", pa.int64()), pa.field("bitops_total", pa.int64()), pa.field("budget_bitops", pa.int64()),
    pa.field("budget_avg_bits", pa.float64()), pa.field("budget_bucket", pa.int64()),
    pa.field("gbitops", pa.float64()), pa.field("expected_gbitops", pa.float64()),
    pa.field("ard", pa.float64()), pa.field("p", pa.float64()), pa.field("teacher_top1", pa.float64()),
    pa.field("search_seconds", pa.float64()), pa.field("transfer_seconds", pa.float64()),
    pa.field("epochs_run", pa.int64()), pa.field("last_epoch", pa.int64()),
    pa.field("policy_json", pa.string()), pa.field("layers_json", pa.string()),
]
_TAIL_FIELDS = [pa.field("started_at", pa.string()), pa.field("finished_at", pa.string()),
                pa.field("wall_seconds", pa.float64()), pa.field("node_id", pa.string()),
                pa.field("hostname", pa.string()), pa.field("attempt", pa.int64())]
LAYER_SCHEMA = pa.schema([pa.field("trial_id", pa.string(), nullable=False), pa.field("layer", pa.string()),
                          pa.field("macs", pa.int64()), pa.field("w_bits", pa.int64()),
                          pa.field("a_bits", pa.int64()), pa.field("bitops", pa.int64())])
_RESULT_KEY = {"last_epoch": "epoch"}   # row column -> key in the trainable's report


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def trial_schema(param_types: Mapping[str, pa.DataType] | None = None) -> pa.Schema:
    """The trials table schema: head, ``param_*`` columns (sorted), final metrics, timings/node."""
    params = [pa.field(n, t) for n, t in sorted((param_types or {}).items())]
    return pa.schema(_HEAD_FIELDS + params + METRIC_FIELDS + _TAIL_FIELDS)


def flatten_params(config: Mapping[str, Any], prefix: str = "param_") -> dict[str, Any]:
    """Flatten a (nested) trial config to ``{prefix + "a.b": scalar}``; lists/dicts of scalars -> JSON."""
    out: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], path: str) -> None:
        for k, v in d.items():
            key = f"{path}{k}"
            if isinstance(v, Mapping) and v:
                walk(v, f"{key}.")
            elif v is None or isinstance(v, (bool, int, float, str)):
                out[prefix + key] = v
            else:
                out[prefix + key] = json.dumps(v, sort_keys=True, default=str)
    walk(config, "")
    return out


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def trial_row(*, trial_id: str, config: Mapping[str, Any], last_result: Mapping[str, Any] | None, status: str,
              error: str | None = None, started_at: str | None = None, finished_at: str | None = None,
              wall_seconds: float | None = None, attempt: int = 1) -> dict[str, Any]:
    """One trials.parquet row from a trial's config and its last report (pure; no Ray needed)."""
    if status not in TRIAL_STATUSES:
        raise ValueError(f"status must be one of {TRIAL_STATUSES}, but got status={status!r}.")
    res = dict(last_result or {})
    row: dict[str, Any] = {"trial_id": str(trial_id), "status": status, "error": error}
    row.update(flatten_params(config))
    for f in METRIC_FIELDS:
        row[f.name] = _finite_or_none(res.get(_RESULT_KEY.get(f.name, f.name)))
    if wall_seconds is None and res.get("time_total_s") is not None:
        wall_seconds = float(res["time_total_s"])
    row.update(started_at=started_at, finished_at=finished_at or utc_now_iso(), wall_seconds=wall_seconds,
               node_id=res.get("node_id") or res.get("node_ip"), hostname=res.get("hostname"),
               attempt=int(attempt))
    return row


def layer_rows(trial_id: str, layers_json: str | None) -> list[dict[str, Any]]:
    """layers.parquet rows of one trial from its ``layers_json`` ([{name, macs, w_bits, a_bits}, ...])."""
    if not layers_json:
        return []
    try:
        layers = json.loads(layers_json)
    except json.JSONDecodeError as e:
        log.warning("trial %s: layers_json is not valid JSON (%s); no layer rows written", trial_id, e)
        return []
    return [{"trial_id": str(trial_id), "layer": d["name"], "macs": int(d["macs"]), "w_bits": int(d["w_bits"]),
             "a_bits": int(d["a_bits"]), "bitops": int(d["macs"]) * int(d["w_bits"]) * int(d["a_bits"])}
            for d in layers]


def _infer_type(values: Iterable[Any]) -> pa.DataType:
    vals = [v for v in values if v is not None]
    if vals and all(isinstance(v, bool) for v in vals):
        return pa.bool_()
    if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return pa.int64()
    if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return pa.float64()
    return pa.string()


def _coerce(v: Any, t: pa.DataType) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v) and not pa.types.is_floating(t)):
        return None
    if pa.types.is_string(t):
        return v if isinstance(v, str) else json.dumps(v, default=str)
    if pa.types.is_integer(t):
        return int(v)
    if pa.types.is_floating(t):
        return float(v)
    if pa.types.is_boolean(t):
        return bool(v)
    return v


def rows_to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """Rows -> Arrow table with the explicit schema (trials schema with inferred param types by default)."""
    rows = list(rows)
    if schema is None:
        names = sorted({k for r in rows for k in r if k.startswith("param_")})
        schema = trial_schema({n: _infer_type(r.get(n) for r in rows) for n in names})
    cols = {f.name: [_coerce(r.get(f.name), f.type) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def write_table(path: str | Path, table: pa.Table) -> Path:
    """Write ``table`` as Parquet atomically (a reader sees the old file or the new one, never half)."""
    return atomic_write(path, lambda f: pq.write_table(table, f))


_REWRITE_HINTS = {
    TRIALS_FILE: "'gmpq sweep --resume' rewrites trials.parquet from the finished trials",
    LAYERS_FILE: "layers.parquet repeats the layers_json column of trials.parquet, which 'gmpq sweep --resume' "
                 "rewrites from the finished trials",
    PARETO_FILE: "'gmpq pareto --sweep DIR' writes pareto.parquet again from trials.parquet",
    FINAL_FILE: "'gmpq finetune --sweep DIR' (or 'gmpq run --resume') writes final.parquet again",
}


def _rewrite_hint(path: Path) -> str:
    """How to get ``path`` back, for the messages below (by its file name)."""
    hint = _REWRITE_HINTS.get(path.name)
    return f" ({hint})" if hint else ""


def read_table(path: str | Path, *, columns: Iterable[str] = (), numbers: Iterable[str] = ()) -> pa.Table:
    """Read a Parquet file; a missing, truncated or corrupted file raises CheckpointError naming it, and so does
    one that lacks any of ``columns`` or holds text in any of ``numbers`` it has (another program's table)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Results file not found: '{path}'. Run the stage that writes it first "
                              "(gmpq sweep writes trials.parquet, gmpq pareto pareto.parquet).")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise CheckpointError(f"Parquet file '{path}' cannot be read ({type(e).__name__}: {e}); it is truncated "
                              "or corrupted: delete it and rerun the stage that writes it"
                              f"{_rewrite_hint(path)}.") from None
    return _require(table, path, columns, numbers)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_null(t)


# numeric columns the readers compute with or format as numbers: the trials table's metrics and timings, and
# the params ``gmpq status`` prints
TRIAL_NUMBER_COLUMNS = tuple(f.name for f in METRIC_FIELDS + _TAIL_FIELDS if _is_number(f.type)) + (
    "param_budget_avg_bits", "param_proxy_size")


def _require(table: pa.Table, path: Path, columns: Iterable[str], numbers: Iterable[str] = ()) -> pa.Table:
    """``table`` if it has ``columns`` and every one of ``numbers`` it has is numeric (or all null), else a
    CheckpointError naming ``path``: a table another program wrote, not a crash (``read_table`` names those)."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise CheckpointError(f"'{path}' lacks the columns {missing}; it was not written by gmpq or is from an "
                              "incompatible version. Move it away and rerun the stage that writes it"
                              f"{_rewrite_hint(path)}.")
    wrong = [f"{c} ({table.schema.field(c).type})" for c in numbers if c in table.column_names
             and not _is_number(table.schema.field(c).type) and table.column(c).null_count < len(table)]
    if wrong:
        raise CheckpointError(f"'{path}' has non-numeric values in the numeric column(s) {', '.join(wrong)}; it was "
                              "not written by gmpq or was edited since. Move it away and rerun the stage that writes "
                              f"it{_rewrite_hint(path)}.")
    return table


def read_trials_table(sweep_dir: str | Path) -> pa.Table:
    """``<sweep_dir>/trials.parquet`` as an Arrow table, checked: CheckpointError naming the file if it is missing,
    damaged, lacks ``trial_id``/``status`` or holds text in a numeric column. Missing from a sweep folder (no trial
    has ended yet), the error says so and how to continue the sweep (``sweep_status.no_trial_ended_text``)."""
    path = Path(sweep_dir) / TRIALS_FILE
    if not path.exists():
        from .sweep_status import no_trial_ended_text

        text = no_trial_ended_text(sweep_dir)
        if text is not None:
            raise CheckpointError(text)
    return read_table(path, columns=("trial_id", "status"), numbers=TRIAL_NUMBER_COLUMNS)


def read_trials(sweep_dir: str | Path, *, missing_ok: bool = False):
    """``<sweep_dir>/trials.parquet`` as a pandas DataFrame (empty with the base schema if missing_ok)."""
    path = Path(sweep_dir) / TRIALS_FILE
    if missing_ok and not path.exists():
        return trial_schema().empty_table().to_pandas()
    return read_trials_table(sweep_dir).to_pandas()


def read_layers(sweep_dir: str | Path, *, missing_ok: bool = False):
    path = Path(sweep_dir) / LAYERS_FILE
    if missing_ok and not path.exists():
        return LAYER_SCHEMA.empty_table().to_pandas()
    return read_table(path, columns=("trial_id", "layer")).to_pandas()


def write_results(sweep_dir: str | Path, rows: Iterable[Mapping[str, Any]],
                  layers: Iterable[Mapping[str, Any]]) -> tuple[Path, Path]:
    """Rewrite trials.parquet and layers.parquet atomically (rows sorted by trial_id, layers kept in order)."""
    d = Path(sweep_dir)
    rows = sorted(rows, key=lambda r: str(r["trial_id"]))
    layers = sorted(layers, key=lambda r: str(r["trial_id"]))   # stable: layer order within a trial kept
    l_ = write_table(d / LAYERS_FILE, rows_to_table(layers, LAYER_SCHEMA))   # first: trials.parquet commits them
    t = write_table(d / TRIALS_FILE, rows_to_table(rows))                  # (a driver ended between keeps both whole)
    return t, l_


def load_resolved_config(sweep_dir: str | Path, *, missing_ok: bool = True, follow_moves: bool = True) -> dict[str, Any]:
    """The resolved sweep config saved by the sweep (``sweep_config.yaml``) as a plain dict. A folder moved or
    copied since reads the paths that lay inside it as inside ``sweep_dir`` (``moved_sweep.follow_folder``;
    ``follow_moves=False``: as recorded)."""
    import yaml
    if Path(sweep_dir).is_file():
        raise CheckpointError(f"'{sweep_dir}' is a file, not a sweep folder: give the folder a sweep wrote (the --out "
                              "of gmpq sweep or gmpq run).")
    path = Path(sweep_dir) / CONFIG_FILE
    if not path.is_file():
        if missing_ok:
            return {}
        raise CheckpointError(f"'{path}' not found: this folder is not a sweep made by 'gmpq sweep' "
                              "(give the sweep's --out folder).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        from search_spaces.presets import yaml_problem

        raise CheckpointError(f"'{path}' is not valid YAML{yaml_problem(e)}; restore it or rerun the "
                              "sweep.") from None
    if not isinstance(data, dict):
        return {}
    if not follow_moves:
        return data
    from .moved_sweep import follow_folder
    return follow_folder(data, sweep_dir, tell=True)


def error_text(trial: Any) -> str:
    """Short 'Type: message' of a trial's last error.

    Read from the driver-side copies Ray writes in ``handle_error`` just before ``on_trial_error``
    (the storage copies are synced later): the pickled exception, else the text trace.
    """
    err = None
    pickled = getattr(trial, "pickled_error_file", None)
    if pickled and Path(pickled).is_file():
        try:
            import ray.cloudpickle as cloudpickle
            err = cloudpickle.loads(Path(pickled).read_bytes())
        except Exception as e:  # unpicklable error objects: fall back to the text trace
            log.debug("cannot read the pickled error of %s: %s", trial.trial_id, e)
    if err is not None:
        cause = getattr(err, "cause", None)
        base = cause if isinstance(cause, BaseException) else err
        lines = [ln.strip() for ln in str(base).strip().splitlines() if ln.strip()]
        return f"{type(base).__name__}: {_node_died(lines) or (lines[-1] if lines else '')}"[:2000]
    text_file = getattr(trial, "error_file", None)
    text = Path(text_file).read_text(errors="replace") if text_file and Path(text_file).is_file() else ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    died = _node_died(lines)
    if died:
        kind = next((m.group(1) for ln in lines if (m := re.match(r"([\w.]+(?:Error|Exception)):", ln))), "Error")
        return f"{kind}: {died}"[:2000]
    return (lines[-1] if lines else "the trial raised an error (see its Ray trial folder)")[:2000]


def _node_died(lines: list[str]) -> str | None:
    """For Ray's error of a trial whose node died under it (``ActorDiedError``: "... because its node has died"),
    "its node died (<Ray's reason>)": the trial's own code did not fail, and it runs again on --resume."""
    if not any("node has died" in ln or "node was terminated" in ln for ln in lines):
        return None
    reason = next((ln for ln in reversed(lines) if "node" in ln), "")
    return f"{NODE_DIED} ({reason})" if reason else NODE_DIED


def resolve_status(status_book: Any, trial_id: str, errored: bool, last_result: Mapping[str, Any]) -> str:
    """"completed" / "pruned" / "failed" from the sweep's TrialStatusBook (``status_of(trial_id, errored)``).

    Without a book: "failed" if errored, "completed" if the trial reported ``transfer_top1``, else "pruned".
    """
    if status_book is not None:
        return status_book.status_of(trial_id, errored)
    if errored:
        return "failed"
    return "completed" if last_result.get("transfer_top1") is not None else "pruned"


def has_ended(trial_id: str, last_result: Mapping[str, Any] | None, status_book: Any = None) -> bool:
    """Whether a trial that did not error ran to its end: its final report came (``done``), or the pruner
    stopped it. A trial the driver stopped on its way out (Ctrl-C) has neither: it is unfinished, and a
    resumed sweep runs it again."""
    if (last_result or {}).get("done"):
        return True
    return status_book is not None and bool(status_book.is_pruned(trial_id))


def __getattr__(name: str) -> Any:
    """``orchestrator.results.ResultsCallback`` still resolves (imported on demand, with Ray): Tune pickles the
    callbacks of a sweep under their import path in ``tuner.pkl``, and sweeps from before the class moved
    to ``results_callback`` name it here when resumed."""
    if name == "ResultsCallback":
        from .results_callback import ResultsCallback

        return ResultsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
