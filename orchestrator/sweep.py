"""``run_sweep``: the Ray Tune + Optuna sweep over GMPQ searches (issue 4, items 1, 2 and 7).

Order of work: validate the config (no Ray yet) -> save the resolved config -> start or join Ray
while a thread opens the MLflow tracking store (experiment, parent run) and the Optuna storage ->
preflight (a trial no node can run fails now) -> prepare the shared artefacts (an FP teacher per
proxy size, the FP target model: read from the model cache, the missing ones trained side by side
as Ray tasks) -> ``Tuner`` with ``OptunaSearch`` (multi-objective: transfer_top1 up, bitops down;
persistent Optuna storage in the sweep folder), the per-bucket Optuna pruning scheduler, the
results/MLflow callbacks and a one-line-per-event progress callback -> summary.

``resume=True`` restores the Tune experiment (``Tuner.restore``): finished trials are not rerun,
interrupted and errored ones are rerun from scratch, and the sampler keeps its Optuna study.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Mapping

import optuna
from ray import tune
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from gmpq_core.errors import ConfigError
from gmpq_core.fileio import atomic_write_json
from search_spaces.space import bucket_label

from .pruning import OptunaPruningScheduler
from .sweep_config import SweepConfig, check_sweep_config, is_local_cpu_sweep, save_resolved_config
from .tail_threads import TailThreads
from .trainable import build_search_job, make_trainable, trial_device
from .trial_status import TrialStatusBook

__all__ = ["SweepSummary", "prepare_shared", "run_sweep", "experiment_path", "SweepOptunaSearch",
           "SweepProgress", "OBJECTIVES"]

log = logging.getLogger(__name__)

OBJECTIVES = (("transfer_top1", "max"), ("bitops", "min"))
SHARED_JSON = "shared.json"


@dataclass(frozen=True)
class SweepSummary:
    sweep_dir: Path
    n_completed: int
    n_pruned: int
    n_failed: int
    wall_seconds: float
    resumed: bool = False
    rows: list[dict] = field(default_factory=list)   # one per trial: id, status, key metrics

    @property
    def n_trials(self) -> int:
        return self.n_completed + self.n_pruned + self.n_failed


def experiment_path(cfg: SweepConfig) -> Path:
    """The Tune experiment folder (<storage_path>/<name>)."""
    r = cfg.resolved()
    return Path(r.storage_path) / r.name


def prepare_shared(cfg: SweepConfig, *, say=None, threads: int | None = None,
                   parallel: bool = False) -> dict[str, Any]:
    """Train (or load from the cache) what every trial shares; returns the trials' context.

    Teachers: one per proxy size in the space (``gmpq_core.jobs.get_teacher``, cached by its hash
    in ``cache_dir``). FP target model: ``gmpq_core.transfer.prepare_target_model``. Writes
    ``<sweep_dir>/shared.json`` (paths, FP accuracies, training seconds) for later stages.
    ``parallel`` (Ray running): the models not in the cache yet are trained side by side as Ray
    tasks (``ray_map``; cores per job: ``_job_cpus``), then everything is read from the cache here.
    ``threads``: torch threads for the work done in this process (default: ``_job_cpus``, one trial's
    CPU share, or every local core for the FP target model of a local CPU sweep: on a busy small
    machine more threads than free cores slow PyTorch training down several times); the caller's
    setting is restored afterwards.
    """
    cfg = cfg.resolved()
    say = say or (lambda msg: None)
    trained = _train_missing_in_parallel(cfg, say) if parallel else {}
    return _prepare_shared(cfg, say, trained, threads)


@contextlib.contextmanager
def _torch_threads(n: float) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _shared_jobs(cfg: SweepConfig) -> list[tuple[str, int | None]]:
    """("teacher", proxy size) per proxy size in the space, then ("target", None)."""
    return [("teacher", size) for size in cfg.proxy_sizes()] + [("target", None)]


def _job_label(job: tuple[str, int | None]) -> str:
    return f"teacher for proxy size {job[1]}" if job[0] == "teacher" else "FP target model"


def _teacher_job(cfg: SweepConfig, proxy_size: int | None, device: str = "cpu") -> Any:
    """The SearchJob whose teacher serves every trial of this proxy size."""
    return build_search_job(cfg, {**cfg.space.first_point(), "proxy_size": proxy_size}, device=device)


def _target_args(cfg: SweepConfig) -> dict[str, Any]:
    """What names the FP target model (``prepare_target_model`` / ``target_model_cached`` keywords)."""
    return dict(model=cfg.model, dataset=cfg.target_dataset, check=cfg.transfer, cache_dir=cfg.cache_dir,
                data_root=cfg.data_root, image_size=cfg.image_size, small_input=cfg.small_input)


def _shared_job(cfg: SweepConfig, job: tuple[str, int | None], device: str) -> Any:
    """Run one shared job (train, or read the cache): the teacher module or the ``TargetModel``."""
    from gmpq_core.jobs import get_teacher
    from gmpq_core.transfer import prepare_target_model

    if job[0] == "teacher":
        return get_teacher(_teacher_job(cfg, job[1], device))
    return prepare_target_model(**_target_args(cfg), device=device)


def _shared_job_cached(cfg: SweepConfig, job: tuple[str, int | None]) -> bool:
    from gmpq_core.jobs import teacher_cached
    from gmpq_core.transfer import target_model_cached

    return teacher_cached(_teacher_job(cfg, job[1])) if job[0] == "teacher" else target_model_cached(**_target_args(cfg))


def _train_shared_task(sweep: dict, job: tuple[str, int | None]) -> float:
    """Ray task body: train one shared model into the cache; returns its seconds."""
    cfg = SweepConfig.from_dict(sweep)
    t0 = time.perf_counter()
    _shared_job(cfg, job, trial_device(cfg))
    return time.perf_counter() - t0


def _sweep_cores(cfg: SweepConfig) -> int:
    """The cores a local sweep may use: its trial slots' (``max_concurrent_trials`` x ``resources.cpu``),
    at most the machine's."""
    from .ray_env import local_cpu_count

    return max(1, min(local_cpu_count(), int(cfg.max_concurrent_trials * cfg.resources.cpu)))


def _job_cpus(cfg: SweepConfig, job: tuple[str, int | None]) -> float:
    """Cores (and torch threads) of one shared training: a trial's share, except the FP target model of a
    local CPU sweep, which takes all the sweep's cores (``_sweep_cores``) once the teachers are done. It
    is most of a cold start (62 s of 70 s in the demo on one core), and nothing else runs yet."""
    if job[0] == "target" and is_local_cpu_sweep(cfg):
        return max(_sweep_cores(cfg), cfg.resources.cpu)
    return cfg.resources.cpu


def _train_missing_in_parallel(cfg: SweepConfig, say) -> dict[tuple, float]:
    """Train the shared models missing from the cache as parallel Ray tasks; {job: seconds}."""
    from .ray_env import ray_cpus, ray_map

    missing = [job for job in _shared_jobs(cfg) if not _shared_job_cached(cfg, job)]
    if not missing or (len(missing) == 1 and cfg.address is None):   # nothing to overlap: the driver does it
        return {}
    say(f"training {len(missing)} shared models side by side: {', '.join(_job_label(j) for j in missing)}")
    sweep = cfg.to_dict()
    cpus = ray_cpus()
    seconds = ray_map(functools.partial(_train_shared_task, sweep), missing,
                      num_cpus=lambda job: min(_job_cpus(cfg, job), cpus), num_gpus=cfg.resources.gpu,
                      on_done=lambda job, s: say(f"{_job_label(job)}: trained ({s:.1f}s)"))
    unseen = [_job_label(job) for job in missing if not _shared_job_cached(cfg, job)]
    if unseen:   # trained on another node whose cache folder this one cannot see
        log.warning("%s trained on another node but not visible in %s from the driver: the cache folder is not on "
                    "shared storage, so the driver trains its own copy (set cache_dir to a shared path)",
                    ", ".join(unseen), cfg.cache_dir)
    return dict(zip(missing, seconds))


def _prepare_shared(cfg: SweepConfig, say, trained: Mapping[tuple, float], threads: int | None) -> dict[str, Any]:
    device = trial_device(cfg)
    teachers = {}
    for job in _shared_jobs(cfg)[:-1]:
        t0 = time.perf_counter()
        with _torch_threads(threads or _job_cpus(cfg, job)):
            _shared_job(cfg, job, device)
        teachers[str(job[1])] = round(trained.get(job, time.perf_counter() - t0), 2)
        if job not in trained:
            say(f"{_job_label(job)}: ready ({teachers[str(job[1])]:.1f}s)")
    with _torch_threads(threads or _job_cpus(cfg, ("target", None))):
        target = _shared_job(cfg, ("target", None), device)
    seconds = trained.get(("target", None), target.seconds)
    say(f"FP target model: top1 {target.top1:.2f}% on the {cfg.transfer.test_size or 'full'}-image test slice "
        f"({'cached' if target.cached and ('target', None) not in trained else f'{seconds:.1f}s'})")
    shared = {"target_model_path": str(target.path), "target_fp_top1": target.top1, "teacher_seconds": teachers,
              "target_seconds": round(seconds, 2), "cache_dir": cfg.cache_dir}
    atomic_write_json(Path(cfg.out_dir) / SHARED_JSON, shared)
    return {"sweep": cfg.to_dict(), "target_model_path": str(target.path)}


class SweepOptunaSearch(OptunaSearch):
    """OptunaSearch that tells a pruned trial (final metrics missing) as PRUNED, not as a bad tell."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if result is not None and any(result.get(m) is None for m in metrics):
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)


class SweepProgress(Callback):
    """One short stderr line per trial event (start, search epoch, done, pruned, failed)."""

    def __init__(self, n_trials: int, status_book: TrialStatusBook, edges: tuple) -> None:
        self.n_trials, self.book, self.edges = n_trials, status_book, tuple(edges)
        self.t0 = time.time()
        self.index: dict[str, int] = {}

    def _say(self, trial: Any, text: str) -> None:
        el = int(time.time() - self.t0)
        i = self.index.setdefault(trial.trial_id, len(self.index) + 1)
        print(f"[{el // 60:3d}m{el % 60:02d}s] trial {i}/{self.n_trials} {trial.trial_id}: {text}",
              file=sys.stderr, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        c = trial.config
        extra = f", proxy {c['proxy_size']}" if "proxy_size" in c else ""
        self._say(trial, f"start (budget {c.get('budget_avg_bits', float('nan')):.2f} bits{extra})")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("phase") == "search":
            self._say(trial, f"search epoch {result.get('epoch')}: proxy_top1 {result.get('proxy_top1', 0):.1f}%, "
                             f"{result.get('expected_gbitops', 0):.3f} expected GBitOPs, bucket "
                             f"{bucket_label(result.get('budget_bucket', 0), self.edges)}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        r = trial.last_result or {}
        if self.book.is_pruned(trial.trial_id):
            self._say(trial, self.book.reason(trial.trial_id) or "pruned")
        else:
            self._say(trial, f"done: transfer_top1 {r.get('transfer_top1', float('nan')):.2f}%, "
                             f"{r.get('gbitops', float('nan')):.4f} GBitOPs (search {r.get('search_seconds', 0):.0f}s, "
                             f"transfer {r.get('transfer_seconds', 0):.0f}s)")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(trial, f"FAILED ({trial.error_file or 'see the trial folder'})")


def _results_callbacks(cfg: SweepConfig, book: TrialStatusBook) -> list:
    """ORCH-RESULTS' Parquet and MLflow callbacks (driver-side)."""
    from .mlflow_sink import MLflowCallback
    from .results import ResultsCallback

    sweep_dir = Path(cfg.out_dir)
    return [ResultsCallback(sweep_dir, book),
            MLflowCallback(cfg.tracking_uri, cfg.name, sweep_dir, cfg.to_dict(), book)]


def _open_stores(cfg: SweepConfig, callbacks: list, resume: bool) -> Any:
    """Open the MLflow callback's tracking store and experiment (no run yet: the parent run is made when
    the Tuner starts, after the checks that can still fail) and the sampler's Optuna storage (None on
    resume: the restored searcher has its own). Run in a thread while Ray starts: a new SQLite tracking
    store spends ~2 s creating its tables. MLflow failures only warn (``MLflowSink``)."""
    from .mlflow_sink import MLflowCallback

    for cb in callbacks:
        if isinstance(cb, MLflowCallback):
            cb.sink.open_store()
    return None if resume else optuna.storages.RDBStorage(cfg.optuna_storage)


def _tune(cfg: SweepConfig, stores: Any, callbacks: list, book: TrialStatusBook, *, resume: bool, progress: bool,
          prep_threads: int | None, say) -> Any:
    """Inside a Ray session: preflight, shared preparation, then the Tuner's run; returns its ResultGrid."""
    from .ray_env import ray_cpus, ray_session

    with ray_session(cfg.address):
        _preflight(cfg)                                    # a request no node can run fails now, not hangs
        say(f"preparing shared artefacts in {cfg.cache_dir}")
        context = prepare_shared(cfg, say=say, threads=prep_threads, parallel=True)
        if progress:                                       # its clock starts with the trials
            callbacks.append(SweepProgress(cfg.n_trials, book, cfg.budget_buckets))
        if is_local_cpu_sweep(cfg):
            callbacks.append(TailThreads(cfg.out_dir, cfg.n_trials, min(_sweep_cores(cfg), ray_cpus()),
                                         cfg.resources.cpu))
        tuner = _make_tuner(cfg, context, book, callbacks, stores.result(), resume=resume, say=say)
        say(f"{cfg.n_trials} trials, {cfg.max_concurrent_trials} at a time, {cfg.resources.cpu:g} CPU"
            f"{f' + {cfg.resources.gpu:g} GPU' if cfg.resources.gpu else ''} each")
        return tuner.fit()


def _make_tuner(cfg: SweepConfig, context: Mapping[str, Any], book: TrialStatusBook, callbacks: list,
                optuna_storage: Any, *, resume: bool, say) -> Any:
    """The sweep's ``Tuner``: a new one (Optuna sampler on ``optuna_storage``), or the restored experiment."""
    scheduler = OptunaPruningScheduler(pruner=cfg.pruner.name, pruner_kwargs=cfg.pruner.kwargs, status_book=book,
                                       storage=cfg.optuna_storage, study_prefix=f"{cfg.name}-prune")
    trainable = tune.with_resources(make_trainable(context), cfg.resources.to_ray())
    if resume:
        exp = experiment_path(cfg)
        say(f"resuming {exp}")
        tuner = tune.Tuner.restore(str(exp), trainable, resume_errored=True, restart_errored=False)
        _swap_restored(tuner, scheduler, callbacks)
        return tuner
    searcher = SweepOptunaSearch(
        space=cfg.space.define_by_run(), metric=[m for m, _ in OBJECTIVES], mode=[d for _, d in OBJECTIVES],
        sampler=optuna.samplers.TPESampler(seed=cfg.seed), storage=optuna_storage, study_name=cfg.name)
    return tune.Tuner(
        trainable, param_space={},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.n_trials,
                                    max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True),
        run_config=tune.RunConfig(name=cfg.name, storage_path=cfg.storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  callbacks=callbacks))


def _swap_restored(tuner: Any, scheduler: Any, callbacks: list) -> None:
    """Give a restored Tuner fresh callbacks and scheduler (Tune restores them by unpickling, which
    would skip their constructors, where the results callback reloads the rows already written)."""
    internal = getattr(tuner, "_local_tuner", None)
    if internal is None or not hasattr(internal, "_run_config") or not hasattr(internal, "_tune_config"):
        log.warning("cannot reach the restored Tuner's config in this Ray version; using the callbacks "
                    "and scheduler as Tune unpickled them")
        return
    internal._run_config.callbacks = callbacks
    internal._tune_config.scheduler = scheduler


def _close_orphan_optuna_trials(cfg: SweepConfig, say, *, started_before: datetime) -> None:
    """After a resumed sweep has run to its end, an Optuna trial still RUNNING that started before this
    driver did belongs to the driver that died while it ran, and Tune replaced it: mark it FAIL
    (optuna-dashboard would show it running for ever). Covers the sweep's study and its per-bucket
    pruning studies. Never fatal: a storage error only logs a warning."""
    try:
        storage = optuna.storages.RDBStorage(cfg.optuna_storage)
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
                 if s.study_name == cfg.name or s.study_name.startswith(f"{cfg.name}-prune-")]
        closed = 0
        for name in names:
            study = optuna.load_study(study_name=name, storage=storage)
            for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if trial.datetime_start is not None and trial.datetime_start < started_before:
                    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                    closed += 1
    except Exception as e:  # noqa: BLE001 - bookkeeping only: the sweep's results are already saved
        log.warning("could not close Optuna trials left RUNNING by an interrupted driver (%s)", e)
        return
    if closed:
        say(f"{closed} Optuna trial(s) left RUNNING by an interrupted driver marked FAIL")


def _preflight(cfg: SweepConfig) -> None:
    """``cluster.preflight``: the Tune storage and the sweep folder must be visible from every host, and
    one trial's resources must fit a node (ConfigError naming the numbers otherwise)."""
    from cluster.preflight import preflight_sweep

    pre = preflight_sweep(storage_path=cfg.storage_path, cpu=cfg.resources.cpu, gpu=cfg.resources.gpu,
                          max_concurrent_trials=cfg.max_concurrent_trials,
                          shared_paths={"out_dir": cfg.out_dir, "cache_dir": cfg.cache_dir})
    for warning in pre.warnings:
        log.warning("%s", warning)


def _saved_cache_dir(cfg: SweepConfig) -> str | None:
    """The cache folder saved with the sweep in ``cfg``'s folder (None when there is none)."""
    from .sweep_config import load_sweep_config

    saved_path = cfg.sweep_dir / "sweep_config.yaml"
    return load_sweep_config(saved_path).cache_dir if saved_path.exists() else None


def _check_same_config(cfg: SweepConfig) -> None:
    """A resumed sweep must keep its config (Tune restores the old searcher and space anyway). The cache
    folder may move: its files are named by what their weights depend on."""
    from .sweep_config import load_sweep_config

    saved_path = Path(cfg.out_dir) / "sweep_config.yaml"
    if not saved_path.exists():
        return
    old, new = load_sweep_config(saved_path).resolved().to_dict(), cfg.to_dict()
    diff = sorted(k for k in new if k not in ("address", "cache_dir") and old.get(k) != new.get(k))
    if diff:
        raise ConfigError(f"--resume must use the sweep's saved config, but {', '.join(diff)} differ from "
                          f"'{saved_path}'. Resume with 'gmpq sweep --out {cfg.out_dir} --resume' (no other "
                          "config flags), or start a new sweep with another --out.")


def _summary_rows(grid: Any, book: TrialStatusBook) -> list[dict]:
    rows = []
    for r in grid:
        m = r.metrics or {}
        tid = m.get("trial_id") or (r.path and Path(r.path).name)
        status = book.status_of(tid, errored=r.error is not None)
        rows.append({"trial_id": tid, "status": status, "budget_avg_bits": (r.config or {}).get("budget_avg_bits"),
                     "proxy_top1": m.get("proxy_top1"), "transfer_top1": m.get("transfer_top1"),
                     "gbitops": m.get("gbitops"), "epoch": m.get("epoch")})
    return rows


def run_sweep(cfg: SweepConfig, *, resume: bool = False, progress: bool = True,
              prep_threads: int | None = None) -> SweepSummary:
    """Run (or resume) a sweep; returns counts of completed / pruned / failed trials and the wall time.

    ``prep_threads``: torch threads of the driver-side preparation (see ``prepare_shared``).
    """
    t0, started_at = time.perf_counter(), datetime.now()
    if resume and cfg.cache_dir is None:
        cfg = replace(cfg, cache_dir=_saved_cache_dir(cfg))      # keep the cache the sweep started with
    if cfg.address is not None and (cfg.storage_path is None or cfg.cache_dir is None):
        log.warning("joining the Ray cluster at %s: trials on other nodes need storage_path and cache_dir on "
                    "storage every node shares (NFS, S3); the defaults are inside %s", cfg.address, cfg.sweep_dir)
    cfg = cfg.resolved()
    sweep_dir = Path(cfg.out_dir)
    check_sweep_config(cfg)                                # everything that can fail does so before Ray
    from .results import read_layers, read_trials
    read_trials(sweep_dir, missing_ok=True)                # a damaged results table is named now, not in Ray
    read_layers(sweep_dir, missing_ok=True)
    exp = experiment_path(cfg)
    say = (lambda msg: print(f"gmpq sweep: {msg}", file=sys.stderr, flush=True)) if progress else (lambda m: None)

    if resume:
        _check_same_config(cfg)
    if resume and not tune.Tuner.can_restore(str(exp)):
        raise ConfigError(f"Nothing to resume: no Tune experiment state in '{exp}'. Run the sweep without "
                          "--resume first (same --out and --name).")
    if not resume and exp.exists() and tune.Tuner.can_restore(str(exp)):
        raise ConfigError(f"The sweep folder already holds a sweep at '{exp}'. Continue it with --resume, or pick "
                          "another --out or --name.")
    save_resolved_config(cfg)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")   # per-epoch reports lack the objectives
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")   # experiment state saved soon after each event
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    book = TrialStatusBook(sweep_dir / "trial_status.json")
    callbacks = _results_callbacks(cfg, book)
    with ThreadPoolExecutor(1, thread_name_prefix="gmpq-stores") as pool:   # on any error: waits for it
        stores = pool.submit(_open_stores, cfg, callbacks, resume)              # while Ray starts (~2-3 s)
        grid = _tune(cfg, stores, callbacks, book, resume=resume, progress=progress, prep_threads=prep_threads,
                     say=say)
    rows = _summary_rows(grid, book)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "pruned", "failed")}
    if resume and sum(counts.values()) >= cfg.n_trials:        # the resumed sweep ran to its end
        _close_orphan_optuna_trials(cfg, say, started_before=started_at)
    return SweepSummary(sweep_dir=sweep_dir, n_completed=counts["completed"], n_pruned=counts["pruned"],
                        n_failed=counts["failed"], wall_seconds=time.perf_counter() - t0, resumed=resume, rows=rows)
