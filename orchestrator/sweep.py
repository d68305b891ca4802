"""``run_sweep``: the Ray Tune + Optuna sweep over GMPQ searches (issue 4, items 1, 2 and 7).

Order of work: validate the config (no Ray yet) -> save the resolved config -> start or join Ray
while the MLflow callback's writer thread opens the tracking store (tables, experiment) and a thread
the Optuna storage ->
preflight (a trial no node can run fails now) -> prepare the shared artefacts (``sweep_prep``: an
FP teacher per proxy size, the FP target model, read from the model cache or trained side by side
as Ray tasks) -> ``Tuner`` with ``OptunaSearch`` (multi-objective: transfer_top1 up, bitops down;
persistent Optuna storage in the sweep folder), the per-bucket Optuna pruning scheduler, the
results/MLflow callbacks (MLflow writes, the parent run first as the Tuner starts, are queued to the
writer thread, off Tune's loop; ``mlflow_callback``), a one-line-per-event progress callback and, for a
local CPU sweep, the tail's thread sharing (``tail_threads``) -> summary (queued MLflow writes done).

``resume=True`` restores the Tune experiment (``Tuner.restore``): finished trials are not rerun,
interrupted and errored ones are rerun from scratch, and the sampler keeps its Optuna study.
``resume="auto"`` (``choose_resume``) restores it when the folder holds it, else starts the sweep, as
``tune.run(resume="AUTO")`` did: a batch job retried with the same command continues. A resume whose ``n_trials`` is
larger than the saved one grows the sweep (``sweep_grow``: the restored trial count raised, the same Optuna study).
The Tuner, new or restored, is built in ``sweep_tuner``; the summary returned in ``sweep_summary``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import optuna
import ray


from .ray_env import fit_restoring_handlers
from .sweep_searcher import SweepOptunaSearch      # here too: Tune state saved before it moved names it here
from .sweep_checks import check_sweep_config
from .sweep_config import SweepConfig, is_local_cpu_sweep, save_resolved_config
from .sweep_prep import _sweep_cores, prepare_shared
from .sweep_grow import more_trials_text
from .sweep_optuna import _close_orphan_optuna_trials, optuna_storage_now   # (tests import them here)
from .sweep_resume import _check_same_config  # noqa: F401 - (tests import it here)
from .sweep_resume import (RESUME_AUTO, _saved_cache_dir, _saved_tracking_uri, check_folder_state,
                           check_not_a_study, choose_resume, ended_count, experiment_path, grown_from as _grown_from,
                           holds_sweep_state, refuse_beside_running_sweep, resolve_resume, resume_choice_text)
from .cluster_watch import lost_after_s
from .driver_markers import driver_marker
from .tail_threads import TailThreads
from .sweep_join import (keep_recorded_address, record_joined_address, say_recorded_join, start_text,
                         warn_unshared)
from .sweep_progress import SweepProgress
from .sweep_summary import SweepSummary, _finished_summary, _summary_rows   # (tests import/patch them here)
from .sweep_tuner import OBJECTIVES, _chain, _make_tuner
from .trial_status import UNFINISHED, TrialStatusBook

__all__ = ["SweepSummary", "prepare_shared", "run_sweep", "experiment_path", "check_not_a_study",
           "SweepOptunaSearch", "SweepProgress", "OBJECTIVES", "RESUME_AUTO", "holds_sweep_state", "resolve_resume",
           "choose_resume", "resume_choice_text", "refuse_beside_running_sweep"]

log = logging.getLogger(__name__)


def _results_callbacks(cfg: SweepConfig, book: TrialStatusBook) -> list:
    """ORCH-RESULTS' Parquet and MLflow callbacks (driver-side)."""
    from .mlflow_callback import MLflowCallback
    from .results_callback import ResultsCallback

    sweep_dir = Path(cfg.out_dir)
    return [ResultsCallback(sweep_dir, book),
            MLflowCallback(cfg.tracking_uri, cfg.name, sweep_dir, cfg.to_dict(), book, background=True)]


def _open_stores(cfg: SweepConfig, callbacks: list, resume: bool) -> Any:
    """Queue the opening of the MLflow callback's tracking store and experiment on its writer thread
    (importing mlflow and creating a new SQLite store's tables take 3-4 s on 2 cores; no run yet: the
    parent run is queued when the Tuner starts, after the checks that can still fail), then open the
    sampler's Optuna storage (None on resume: the restored searcher has its own). Run in a thread while
    Ray starts. MLflow failures only warn (``MLflowSink``)."""
    for cb in _mlflow_callbacks(callbacks):
        cb.open_store()
    return None if resume else optuna.storages.RDBStorage(cfg.optuna_storage)


def _mlflow_callbacks(callbacks: list) -> list:
    from .mlflow_callback import MLflowCallback

    return [cb for cb in callbacks if isinstance(cb, MLflowCallback)]


def _tune(cfg: SweepConfig, stores: Any, callbacks: list, book: TrialStatusBook, *, resume: bool, progress: bool,
          prep_threads: int | None, say, command: str = "sweep", unshared: tuple[str, ...] = (),
          grown_from: int | None = None) -> Any:
    """Inside a Ray session, its cluster watched (``cluster_watch``: lost, the driver says so and exits 75):
    preflight, shared preparation, then the Tuner's run; returns its ResultGrid. ``unshared``: the settings left at
    their defaults inside the sweep folder (warned about when the cluster joined has a node on another host);
    ``grown_from``: the saved ``n_trials`` a resume raises (``sweep_grow``)."""
    from .cluster_watch import watching_cluster
    from .ray_env import ray_cpus, ray_session
    from .sweep_lost import sweep_lost_handler

    if not ray.is_initialized():                           # (gmpq run joined before its sweep stage)
        say_recorded_join(cfg.address)
    with ray_session(cfg.address), watching_cluster(sweep_lost_handler(cfg, callbacks, command)):
        record_joined_address(cfg)
        warn_unshared(cfg, unshared)
        fit = _preflight(cfg)                              # a request no node can run fails now, not hangs
        new = "" if Path(cfg.cache_dir).exists() else (" (a new model cache: the shared models train there; an "
                                                        "existing cache elsewhere? pass its --cache-dir)")
        say(f"preparing shared artefacts in {cfg.cache_dir}{new}")
        context = prepare_shared(cfg, say=say, threads=prep_threads, parallel=True)
        if progress:                                       # its clock starts with the trials
            callbacks.append(SweepProgress(cfg.n_trials, book, cfg.budget_buckets, cfg.out_dir))
        if is_local_cpu_sweep(cfg):
            callbacks.append(TailThreads(cfg.out_dir, cfg.n_trials, min(_sweep_cores(cfg), ray_cpus()),
                                         cfg.resources.cpu))
        tuner = _make_tuner(cfg, context, book, callbacks, stores.result(), resume=resume, say=say,
                            grown_from=grown_from)
        say(start_text(cfg, fit, grown_from))
        from .sweep_grow import RestoreFailed, restore_failed
        try:
            with optuna_storage_now(cfg.optuna_storage) if resume else contextlib.nullcontext():
                return fit_restoring_handlers(tuner)
        except Exception as e:                             # Tune's failed restore (its own wrapper around it too)
            if not any(isinstance(x, RestoreFailed) for x in _chain(e)):
                raise
            raise restore_failed(cfg, grown_from) from None


def _preflight(cfg: SweepConfig) -> int:
    """``cluster.preflight``: the Tune storage and the sweep folder must be visible from every host, and
    one trial's resources must fit a node (ConfigError naming the numbers otherwise); returns how many trials the
    nodes run at once."""
    from cluster.preflight import preflight_sweep

    pre = preflight_sweep(storage_path=cfg.storage_path, cpu=cfg.resources.cpu, gpu=cfg.resources.gpu,
                          max_concurrent_trials=min(cfg.max_concurrent_trials, cfg.n_trials),   # (never more)
                          shared_paths={"out_dir": cfg.out_dir, "cache_dir": cfg.cache_dir})
    for warning in pre.warnings:
        log.warning("%s", warning)
    return pre.resources.max_parallel_trials


def _holds_state_quietly(cfg: SweepConfig) -> bool:
    """``holds_sweep_state``, False when the storage cannot be read (a hint is not worth an error)."""
    try:
        return holds_sweep_state(cfg)
    except Exception:  # noqa: BLE001 - only whether to add a hint
        return False


@dataclass(frozen=True)
class CheckedSweep:
    """What ``check_sweep`` found: the resolved config, the resume chosen, a resume's summary when it has nothing
    left to run (then nothing after it was checked), the model/data facts, the settings left in the sweep folder, the
    saved ``n_trials`` a resume raises (``grown_from``; ``sweep_grow``)."""
    cfg: SweepConfig
    resume: bool
    done: SweepSummary | None = None
    facts: Any = None
    unshared: tuple[str, ...] = ()
    grown_from: int | None = None


def check_sweep(cfg: SweepConfig, resume: bool | str, *, say: Callable[[str], None] = lambda m: None,
                t0: float | None = None, make_folders: bool = True) -> CheckedSweep:
    """``run_sweep``'s checks before Ray starts, in its order, writing nothing (``gmpq sweep --check`` runs them
    alone; ``make_folders``: see ``check_sweep_config``): the --address syntax, the folder (a study's, a live
    sweep's), the resume chosen and its saved stores and config, the --address answering, the model, data and stores
    (``check_sweep_config``), the results tables, and what the folder holds (``check_folder_state``)."""
    t0 = time.perf_counter() if t0 is None else t0
    joined = None
    if cfg.address is not None:                # a malformed --address fails now: no warning, no file written
        from cluster.connect import resolve_address
        joined = resolve_address(cfg.address)  # checks the syntax only; joining comes later (ray_env)
    check_not_a_study(cfg.sweep_dir)
    resume = choose_resume(cfg, resume, say)   # "auto": said, then the checks of the one it chose
    if resume and cfg.cache_dir is None:
        cfg = replace(cfg, cache_dir=_saved_cache_dir(cfg))      # keep the cache the sweep started with
    if resume and cfg.tracking_uri is None:                       # and its MLflow store ($MLFLOW_TRACKING_URI may
        cfg = replace(cfg, tracking_uri=_saved_tracking_uri(cfg))    # have changed since, or been set)
    unshared = [f"{key} ({flag})" for key, flag, value in (("storage_path", "--storage", cfg.storage_path),
                                                             ("cache_dir", "--cache-dir", cfg.cache_dir))
                if value is None]                          # their defaults: inside the sweep folder
    cfg = cfg.resolved()
    sweep_dir = Path(cfg.out_dir)
    refuse_beside_running_sweep(sweep_dir, bool(resume))    # another driver's live sweep there: refused first
    grown_from = None
    if resume:
        grown_from = _grown_from(cfg)                      # first: another config's own errors would hide it
        done = _finished_summary(cfg, t0)
        if done is not None:                               # nothing for Ray to do
            from .pareto_pick import check_front_fits      # a limit the finished front cannot meet: before it is saved
            check_front_fits(cfg.out_dir, cfg.finetune.max_gbitops)
            return CheckedSweep(cfg, True, done)
    if cfg.address is not None and not ray.is_initialized():   # a dead or wrong address: refused before any file
        from .ray_env import check_join_address                 # (and before the data and model checks' work)
        check_join_address(cfg.address)
    if not resume and cfg.address is None:                # a new sweep's data_root is typed: a typo is not other data
        from .data_roots import check_sweep_data_root      # (a resume's is recorded: a moved one falls back, warned)
        check_sweep_data_root(cfg.data_root, (cfg.proxy_dataset, cfg.target_dataset))
    from .shared_study import resuming
    with resuming(bool(resume)):                           # a resume's Tune state: check_folder_state's words
        facts = check_sweep_config(cfg, make_folders=make_folders)  # everything that can fail does so before Ray
    lost_after_s()                                         # (also a bad $GMPQ_CLUSTER_LOST_AFTER_S)
    from .results import read_layers, read_trials
    read_trials(sweep_dir, missing_ok=True)                # a damaged results table is named now, not in Ray
    read_layers(sweep_dir, missing_ok=True)
    check_folder_state(cfg, bool(resume))                 # nothing to resume, or a sweep already there
    local = joined is None or joined.kind == "local"       # ('local': this machine's own Ray: no unshared warning)
    return CheckedSweep(cfg, bool(resume), None, facts, () if local else tuple(unshared), grown_from)


def run_sweep(cfg: SweepConfig, *, resume: bool | str = False, progress: bool = True,
              prep_threads: int | None = None, command: str = "sweep",
              checked: CheckedSweep | None = None) -> SweepSummary:
    """Run (or resume) a sweep; returns counts of completed / pruned / failed trials and the wall time.

    ``resume``: False starts the sweep (ConfigError if the folder holds it already), True continues it
    (ConfigError if there is nothing to resume), ``"auto"`` does whichever fits (``choose_resume``).
    ``prep_threads``: torch threads of the driver-side preparation (see ``prepare_shared``). ``command``: the gmpq
    command that runs it, as ``driver.json`` names it ("run": ``gmpq run``'s sweep stage, whose final stage
    follows: another final stage is refused meanwhile). ``checked``: what ``check_sweep(cfg, resume)`` returned just
    before (``gmpq run`` checks before it starts Ray): not checked twice.
    """
    t0, started_at = time.perf_counter(), datetime.now()
    say = (lambda msg: print(f"gmpq sweep: {msg}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    checked = checked if checked is not None else check_sweep(cfg, resume, say=say, t0=t0)
    cfg, resume, unshared, sweep_dir = checked.cfg, checked.resume, list(checked.unshared), Path(checked.cfg.out_dir)
    if checked.done is not None:                           # nothing for Ray to do: said at once, no Ray start
        what = "the sweep stage is complete" if command == "run" else "nothing to resume"
        more = f"; {more_trials_text(cfg)}" if _holds_state_quietly(cfg) else ""
        say(f"the sweep already ran all its {cfg.n_trials} trials (none failed, which --resume would run "
            f"again): {what}{more}")
        save_resolved_config(keep_recorded_address(cfg))    # a changed finetune section (gmpq run's flags)
        _close_orphan_optuna_trials(cfg, say, started_before=started_at)   # a driver killed after its last row
        return checked.done
    save_resolved_config(keep_recorded_address(cfg))     # --address auto: the cluster joined, once joined
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")   # per-epoch reports lack the objectives
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")   # experiment state saved soon after each event
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from .ray_env import ctrl_c_signals, terminated
    book = TrialStatusBook(sweep_dir / "trial_status.json")
    callbacks = _results_callbacks(cfg, book)
    notes = []
    if resume:                                            # the MLflow parent run gets a grown count (any resume:
        from .sweep_grow import GrowthNote, grown_text    # one grown by a command stopped before Tune started too)
        notes = [GrowthNote(cb, cfg.n_trials) for cb in _mlflow_callbacks(callbacks)]
        callbacks += notes
    if checked.grown_from is not None:
        print(f"gmpq sweep: {grown_text(cfg, checked.grown_from, ended_count(cfg))}", file=sys.stderr,
              flush=True)                                  # (also under --quiet: the log says what it ran)
    with ctrl_c_signals():              # SIGTERM as Ctrl-C to the end, not only while Ray runs (its marker removed)
        with driver_marker(sweep_dir, "sweep", command=command):   # to the last MLflow write (a sync waits for it)
            try:
                with ThreadPoolExecutor(1, thread_name_prefix="gmpq-stores") as pool:   # on any error: waits for it
                    stores = pool.submit(_open_stores, cfg, callbacks, resume)          # while Ray starts
                    grid = _tune(cfg, stores, callbacks, book, resume=resume, progress=progress,
                                 prep_threads=prep_threads, say=say, command=command, unshared=tuple(unshared),
                                 grown_from=checked.grown_from)
            finally:                                             # MLflow writes still queued reach the store
                for cb in _mlflow_callbacks(callbacks):
                    cb.close()
        rows = _summary_rows(grid, book, sweep_dir)
        counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "pruned", "failed", UNFINISHED)}
        if resume and sum(counts.values()) >= cfg.n_trials:        # the resumed sweep ran to its end
            _close_orphan_optuna_trials(cfg, say, started_before=started_at)
        grown = checked.grown_from if checked.grown_from is not None else \
            next((n.grown_from for n in notes if n.grown_from is not None), None)   # (what the parent run named)
        return SweepSummary(sweep_dir=sweep_dir, n_completed=counts["completed"], n_pruned=counts["pruned"],
                            n_failed=counts["failed"], wall_seconds=time.perf_counter() - t0, resumed=resume,
                            rows=rows, n_unfinished=counts[UNFINISHED], n_planned=cfg.n_trials,
                            terminated=terminated(), grown_from=grown)
