"""The Ray Tune trainable: a thin shim around the core (config dict -> typed config -> core -> report).

One trial = one GMPQ search on the proxy (``gmpq_core.jobs.run_search_job``, teacher loaded from
the sweep's cache) + the fixed transfer check on the target slices (``gmpq_core.transfer``).
``run_trial`` does the work and takes the report function as an argument, so it runs without Ray
in tests; ``make_trainable(context)`` wraps it for Tune with ``ray.tune.report`` (not
``ray.train.report``, which raises inside Tune trainables in Ray 2.60).

Per-epoch reports: phase, epoch, proxy_top1, ce, l_gen, expected_gbitops, p, ard, budget_bucket,
prune_value (= proxy_top1, what the pruner sees), search_epochs (the trial's epoch count: the pruning scheduler
never stops a trial at its last search epoch, whose search is done). The final report adds ``done: True`` and the
trial-row metrics listed in ``FINAL_KEYS``.

Reliability: a trial whose row in ``trials.parquet`` is already finished (Tune reruns it when the
driver died after the row was written but before Tune saved its state) replays that row instead of
computing again (``replayed: True``). The sweep config's ``testing`` switches inject faults into
chosen trials (an exception, a NaN loss) for the reliability tests.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from gmpq_core.transfer import load_target_model, prepare_target_model, run_transfer_check, target_slices
from search_spaces.space import bucket_of

from .results import TRIAL_EVENTS
from .sweep_config import SweepConfig, is_local_cpu_sweep, trial_search_config
from .tail_threads import ThreadsFollower

__all__ = ["EPOCH_KEYS", "FINAL_KEYS", "TuneReporter", "build_search_job", "run_trial", "make_trainable",
           "TRIAL_EVENTS", "InjectedFault", "trial_number", "finished_result"]

log = logging.getLogger(__name__)

EPOCH_KEYS = ("proxy_top1", "ce", "l_gen", "expected_gbitops", "p", "ard")
FINAL_KEYS = ("proxy_top1", "teacher_top1", "transfer_top1", "bitops", "bitops_total", "budget_bitops", "budget_avg_bits",
              "gbitops", "ard", "p", "search_seconds", "transfer_seconds", "epochs_run", "node_id", "hostname",
              "policy_json", "layers_json")

ReportFn = Callable[[dict], None]


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


class TuneReporter:
    """``gmpq_core.reporting.Reporter`` that forwards each search epoch to ``report_fn`` (ray.tune.report).

    Stopping is Tune's job (the pruning scheduler stops the actor), so ``should_stop`` is False.
    ``search_epochs``: the search's epoch count, reported with every epoch (the scheduler keeps a trial at its last).
    """

    def __init__(self, report_fn: ReportFn, *, budget_bucket: int, search_epochs: int | None = None) -> None:
        self.report_fn = report_fn
        self.budget_bucket = int(budget_bucket)
        self.search_epochs = None if search_epochs is None else int(search_epochs)
        self.last: dict[str, Any] = {}

    def report(self, step: int, metrics: Mapping[str, Any]) -> None:
        row: dict[str, Any] = {"phase": "search", "epoch": int(step)}
        row.update({k: _float(metrics.get(k)) for k in EPOCH_KEYS})
        if "expected_avg_bits" in metrics:
            row["expected_avg_bits"] = _float(metrics["expected_avg_bits"])
        row["budget_bucket"] = self.budget_bucket
        row["prune_value"] = row["proxy_top1"]
        if self.search_epochs is not None:
            row["search_epochs"] = self.search_epochs
        self.last = row
        self.report_fn(row)

    def should_stop(self) -> bool:
        return False


def build_search_job(cfg: SweepConfig, params: Mapping[str, Any], *, device: str = "cpu") -> Any:
    """The ``SearchJob`` of one trial (the same one the driver used to prepare the teachers)."""
    from gmpq_core.jobs import SearchJob

    kw: dict[str, Any] = dict(model=cfg.model, dataset=cfg.proxy_dataset, data_root=cfg.data_root,
                              proxy_size=params.get("proxy_size"), proxy_seed=cfg.seed, small_input=cfg.small_input,
                              teacher_epochs=cfg.teacher_epochs, cache_dir=cfg.resolved().cache_dir, device=device,
                              precision=cfg.precision,
                              search=trial_search_config(cfg, params), eval_size=cfg.proxy_eval_size)
    if cfg.image_size is not None and "image_size" in {f.name for f in fields(SearchJob)}:
        kw["image_size"] = cfg.image_size
    return SearchJob(**kw)


def trial_device(cfg: SweepConfig) -> str:
    return "cuda" if cfg.resources.gpu > 0 and torch.cuda.is_available() else "cpu"


_TARGET_CACHE: dict[tuple, Any] = {}   # per worker process (reused actors keep it): FP model, slices


def _target(cfg: SweepConfig, target_model_path: str, device: str) -> tuple:
    from gmpq_core.data import load_dataset

    key = (target_model_path, device, cfg.target_dataset, cfg.data_root, cfg.image_size, cfg.transfer)
    if key not in _TARGET_CACHE:
        _TARGET_CACHE.clear()
        if not Path(target_model_path).is_file():   # a node that does not share the sweep's cache folder
            log.warning("FP target model '%s' is not visible on this node; training it here (put cache_dir on "
                        "shared storage to avoid this)", target_model_path)
            target_model_path = str(prepare_target_model(
                model=cfg.model, dataset=cfg.target_dataset, check=cfg.transfer, cache_dir=cfg.resolved().cache_dir,
                data_root=cfg.data_root, image_size=cfg.image_size, small_input=cfg.small_input, device=device,
                precision=cfg.precision).path)
        model, _ = load_target_model(target_model_path, device)
        bundle = load_dataset(cfg.target_dataset, root=cfg.data_root, image_size=cfg.image_size)
        train, test = target_slices(bundle, cfg.transfer)
        _TARGET_CACHE[key] = (model, train, test, bundle.info)
    return _TARGET_CACHE[key]


def _log_event(sweep_dir: str | None, event: dict) -> None:
    if not sweep_dir:
        return
    line = json.dumps({**event, "time": time.time(), "pid": os.getpid()}) + "\n"
    try:
        with open(Path(sweep_dir) / TRIAL_EVENTS, "a") as f:   # O_APPEND: short lines stay whole
            f.write(line)
    except OSError as e:   # best effort: a node without the sweep folder keeps going
        log.debug("cannot append to the trial event log in %s: %s", sweep_dir, e)


class InjectedFault(RuntimeError):
    """The exception a ``testing.raise_trials`` trial raises on purpose."""


def trial_number(trial_dir: str | None, trial_id: str) -> int | None:
    """Tune's 1-based creation number of a trial, from its folder name (``<trainable>_<id>_<n>_<params>...``)."""
    m = re.search(rf"_{re.escape(trial_id)}_(\d+)(?:_|$)", Path(trial_dir).name) if trial_dir else None
    return int(m.group(1)) if m else None


def finished_result(sweep_dir: str | None, trial_id: str) -> dict[str, Any] | None:
    """The final report of ``trial_id`` rebuilt from its completed or pruned row in trials.parquet (else None)."""
    from gmpq_core.errors import CheckpointError

    from .results import TRIALS_FILE, read_table

    path = Path(sweep_dir or ".") / TRIALS_FILE
    if not sweep_dir or not path.is_file():
        return None
    try:
        row = next((r for r in read_table(path).to_pylist() if r["trial_id"] == trial_id), None)
    except CheckpointError:
        return None            # the driver reports a damaged table itself; compute as usual
    if row is None or row.get("status") not in ("completed", "pruned"):
        return None
    final = {k: row[k] for k in (*FINAL_KEYS, "budget_bucket", "expected_gbitops") if row.get(k) is not None}
    final.update(phase="replay", replayed=True, done=True,      # phase: not fed to the pruner again
                 epoch=int(row.get("last_epoch") or row.get("epochs_run") or 0),
                 prune_value=final.get("proxy_top1"))
    return final


def _inject_faults(cfg: SweepConfig, job: Any, trial_id: str, number: int | None) -> Any:
    """Apply the sweep's ``testing`` switches to trial ``number`` (raise now, or a NaN-injecting job)."""
    t = cfg.testing
    if number in t.raise_trials:
        marks = Path(cfg.out_dir) / "faults"
        done = len(list(marks.glob(f"{trial_id}.raised*"))) if marks.is_dir() else 0
        if done < t.raise_attempts:
            marks.mkdir(parents=True, exist_ok=True)
            (marks / f"{trial_id}.raised{done + 1}").touch()
            raise InjectedFault(f"injected fault (testing.raise_trials) in trial {number}, attempt {done + 1}")
    if number in t.nan_trials:
        job = replace(job, search=replace(job.search, inject_nan_at_epoch=t.nan_epoch))
    return job


def run_trial(params: Mapping[str, Any], context: Mapping[str, Any], report: ReportFn, *,
              trial_id: str = "local", node_id: str = "local", number: int | None = None) -> dict[str, Any]:
    """One trial: search on the proxy, transfer check on the target; returns the final report.

    ``context``: {"sweep": resolved SweepConfig dict, "target_model_path": str}. ``number``: the
    trial's creation number (what the ``testing`` switches name).
    """
    cfg = SweepConfig.from_dict(context["sweep"])
    done = finished_result(cfg.out_dir, trial_id)
    if done is not None:                   # finished before a driver crash: report it again, compute nothing
        _log_event(cfg.out_dir, {"event": "replay", "trial_id": trial_id, "trial_number": number})
        report(done)
        return done
    torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    device = trial_device(cfg)
    params = dict(params)
    bucket = bucket_of(params["budget_avg_bits"], cfg.budget_buckets)
    _log_event(cfg.out_dir, {"event": "start", "trial_id": trial_id, "trial_number": number, "params": params})
    from gmpq_core.jobs import run_search_job

    job = _inject_faults(cfg, build_search_job(cfg, params, device=device), trial_id, number)

    def report_epoch(row: dict[str, Any]) -> None:      # the event first: a pruned trial stops inside report
        _log_event(cfg.out_dir, {"event": "epoch", "trial_id": trial_id, "epoch": row["epoch"],
                                 "of": job.search.epochs, "proxy_top1": row.get("proxy_top1")})
        report(row)
    reporter = TuneReporter(report_epoch, budget_bucket=bucket, search_epochs=job.search.epochs)
    follow = None
    if is_local_cpu_sweep(cfg):         # the cores idle at the sweep's tail (orchestrator.tail_threads)
        follow = ThreadsFollower(cfg.out_dir, on_change=lambda k: _log_event(
            cfg.out_dir, {"event": "threads", "trial_id": trial_id, "threads": k}))
    result = run_search_job(job, reporter=reporter, progress=follow)
    _log_event(cfg.out_dir, {"event": "transfer", "trial_id": trial_id})
    model, train, test, info = _target(cfg, context["target_model_path"], device)
    check = run_transfer_check(model, result.policy, train, test, info, check=cfg.transfer, device=device,
                               progress=follow, precision=cfg.precision)
    target_cost = check["bitops_report"]
    quantized = [c for c in target_cost.layers if c.quantized]
    b = float(params["budget_avg_bits"])
    layers = [{"name": c.name, "macs": int(c.macs), "w_bits": int(c.w_bits), "a_bits": int(c.a_bits)} for c in quantized]
    final = {**(reporter.last or {"phase": "search", "epoch": result.epochs_run, "budget_bucket": bucket}),
             "phase": "transfer", "epoch": int(result.epochs_run), "budget_bucket": bucket,
             "prune_value": float(result.proxy_top1),
             "proxy_top1": float(result.proxy_top1), "transfer_top1": check["transfer_top1"],
             "teacher_top1": _float(result.policy.meta.get("teacher_top1")),
             "transfer_top5": check["transfer_top5"],
             "bitops": int(target_cost.bitops_quantized), "bitops_total": int(target_cost.bitops_total),
             "budget_bitops": int(round(sum(c.macs for c in quantized if c.name in result.policy.layers) * b * b)),
             "budget_avg_bits": b,   # the budget covers the searched layers (not a fixed-bit stem / classifier)
             "gbitops": target_cost.bitops_quantized / 1e9, "ard": _float(result.ard), "p": _float(result.p),
             "search_seconds": float(result.search_seconds), "transfer_seconds": check["transfer_seconds"],
             "epochs_run": int(result.epochs_run), "node_id": node_id, "hostname": socket.gethostname(),
             "policy_json": result.policy.to_json(), "layers_json": json.dumps(layers), "done": True}
    if not all(math.isfinite(final[k]) for k in ("transfer_top1", "proxy_top1")):
        log.warning("trial %s finished with a non-finite accuracy: %s", trial_id,
                    {k: final[k] for k in ("transfer_top1", "proxy_top1")})
    _log_event(cfg.out_dir, {"event": "end", "trial_id": trial_id, "transfer_top1": final["transfer_top1"],
                             "bitops": final["bitops"]})
    report(final)
    return final


def make_trainable(context: Mapping[str, Any]) -> Callable[[dict], None]:
    """The Tune function trainable for a sweep (``context`` is small and plain: it travels pickled)."""
    context = dict(context)

    def gmpq_trial(config: dict) -> None:
        import ray
        from ray import tune

        ctx = tune.get_context()
        trial_id = ctx.get_trial_id() or "unknown"
        node_id = ray.get_runtime_context().get_node_id()
        run_trial(config, context, tune.report, trial_id=trial_id, node_id=node_id,
                  number=trial_number(ctx.get_trial_dir(), trial_id))

    return gmpq_trial
