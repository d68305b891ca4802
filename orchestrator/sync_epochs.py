"""A trial run's per-epoch series read back from Ray Tune's ``result.json``, for ``gmpq sync-mlflow``.

Live, the sweep's callback (``mlflow_callback``) logs each per-epoch report of a trial at ``step=epoch`` (a search
epoch's supernet figures under ``mlflow_keys.SUPERNET_KEYS``, another phase's keys prefixed with it:
``mlflow_keys._phase_key``; Tune's own keys left out). A trial run can lack some of those points: one the sync makes
(MLflow was down), one whose logging stopped part way (the sink warned and went on without MLflow), or the new run a
resumed sweep made for a trial whose run was deleted or lost before ``gmpq sweep --resume`` (it holds only the
epochs after the resume). ``missing_epochs`` says which points a run lacks, per metric and step, from the trial's
reports in its Tune folder (``trial_histories``); the sync logs those, so no point is logged twice and a second sync
logs nothing. A run holding every step of one key present in all of a phase's reports costs one metric-history
lookup per phase; only a phase that lacks a step is read key by key.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Collection, Mapping

from .mlflow_keys import _RAY_KEYS, FINAL_METRICS, _numeric, _phase_key

__all__ = ["trial_histories", "epoch_reports", "missing_epochs", "FINAL_PHASES"]

FINAL_PHASES = ("transfer", "replay")     # the phases of a trial's final report (``trainable.run_trial``)


def trial_histories(cfg: Mapping[str, Any], sweep_dir: Path) -> dict[str, list[dict]]:
    """Per-epoch reports of every trial from the Tune experiment folder (``<storage_path>/<name>/*/result.json``).

    The last report of each (phase, epoch) wins (a retried trial appends its attempts to the same
    file); the final report is left out (its metrics come from Parquet; the live callback skips it, as the trainable
    reports it ``done``, while Tune's result.json says ``"done": false`` for it: known by its ``FINAL_PHASES``).
    Empty when the folder is remote or gone.
    """
    from .final_results import local_storage

    storage = local_storage(cfg.get("storage_path") or sweep_dir / "ray_results")
    exp = storage / str(cfg.get("name") or sweep_dir.name) if storage is not None else None
    if exp is None or not exp.is_dir():
        return {}
    out: dict[str, dict[tuple, dict]] = {}
    for path in exp.glob("*/result.json"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue        # a line cut by a crash: the others still count
            if not isinstance(r, dict) or r.get("done") or r.get("phase") in FINAL_PHASES or "trial_id" not in r:
                continue
            out.setdefault(str(r["trial_id"]), {})[(str(r.get("phase")), r.get("epoch"))] = r
    def order(key: tuple) -> tuple:
        return key[0] != "search", key[1] if isinstance(key[1], (int, float)) else -1
    return {tid: [by_epoch[k] for k in sorted(by_epoch, key=order)] for tid, by_epoch in out.items()}


def epoch_reports(history: list[dict], *, legacy: bool = False) -> list[tuple[str, int, dict[str, float]]]:
    """``(phase, step, {MLflow key: value})`` of each report of ``history``, as the live callback logs it: its step
    the report's ``epoch`` (else Tune's ``training_iteration``), its keys by ``_phase_key`` (``legacy``: a run an
    earlier version logged keeps its names), Tune's own keys and values that are not numbers left out."""
    out = []
    for r in history:
        step = int(r.get("epoch", r.get("training_iteration", 0)) or 0)
        keyed = {_phase_key(r, k, legacy=legacy): _numeric(v) for k, v in r.items() if k not in _RAY_KEYS}
        out.append((str(r.get("phase")), step, {k: v for k, v in keyed.items() if v is not None}))
    return out


def _steps(sink: Any, rid: str, key: str) -> set[int]:
    points = sink.call(f"reading {key} of a trial run", sink.client.get_metric_history, rid, key) or []
    return {int(m.step) for m in points}


def missing_epochs(sink: Any, rid: str, history: list[dict], *, legacy: bool = False,
                   logged: Collection[str] = ()) -> list[tuple[int, dict]]:
    """The points of ``history`` (``epoch_reports``) that trial run ``rid`` lacks, per metric and step, as
    ``[(step, {key: value})]`` in report order (empty: it has them all; a key that has a point at that step is not
    logged again, whatever its value). A run this sink just made holds none. ``logged``: the run's metric keys; a
    phase is looked at through one of them (a key an earlier version did not log does not make a complete run's
    phase look incomplete), not through a final metric's key (``p``: the final row's point at the last epoch's step
    is in it also when the run lacks that epoch, as a replayed trial's new run does)."""
    reports = [r for r in epoch_reports(history, legacy=legacy) if r[2]]
    if not reports:
        return []
    if rid in sink.made_runs:
        return [(step, dict(points)) for _, step, points in reports]
    lacking: set[str] = set()
    for phase in dict.fromkeys(p for p, _, _ in reports):     # one key every report of the phase has: its steps
        mine = [(step, points) for p, step, points in reports if p == phase]
        common = sorted(set.intersection(*(set(points) for _, points in mine)))
        common = [k for k in common if k not in FINAL_METRICS] or common   # (``p``: also the final row's point)
        common = [k for k in common if k in logged] or common
        if not common or not {step for step, _ in mine} <= _steps(sink, rid, common[0]):
            lacking.add(phase)
    have: dict[str, set[int]] = {}
    out = []
    for phase, step, points in reports:
        if phase not in lacking:
            continue
        new = {}
        for k, v in points.items():
            steps = have[k] if k in have else have.setdefault(k, _steps(sink, rid, k))
            if step not in steps:
                new[k] = v
                steps.add(step)
        if new:
            out.append((step, new))
    return out
