"""The generalization study on Ray: one Ray Tune run over a grid of cells, results in Parquet, MLflow.

    summary = run_study(cfg, study_dir)

1. The resolved config goes to ``<study_dir>/study_config.yaml``; the grid is expanded and every cell
   already ``completed`` in ``<study_dir>/study.parquet`` is skipped (rerunning resumes).
2. The driver prepares the shared models once (FP target model, one FP teacher per proxy; cached).
3. ``tune.Tuner`` runs the remaining cells as a grid (``tune.grid_search``), with ``reuse_actors``,
   the config's resources per trial and ``max_concurrent_trials``. Each trial calls ``run_cell`` and
   reports its row once.
4. A driver-side callback appends each finished row to ``study.parquet`` (atomic rewrite, merged by
   ``cell_id``) and logs it to MLflow (one parent run per study, one child run per cell, ids kept in
   the study folder; default ``sqlite:///<study_dir>/mlflow.db``; MLflow failures only warn).

``check_study_dir`` and ``check_tracking_uri`` run first (also from ``gmpq study`` before anything else), then
``check_same_study_config`` and ``check_study_data`` (dataset names and sizes): a bad ``--out``, tracking URI or
dataset is a ConfigError in seconds, before the study folder is written or Ray starts, not a traceback after
the shared models.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import torch
import yaml

from gmpq_core.errors import ConfigError, GMPQError
from gmpq_core.fileio import atomic_write, atomic_write_text, check_writable_dir, read_json
from orchestrator.mlflow_sink import MLflowSink

from .generalization import StudyConfig, check_same_study_config, check_study_data, expand_grid
from .generalization_cells import ROW_KEYS, cached_model_path, model_jobs, prepare_models, run_cell

__all__ = ["STUDY_FILE", "CONFIG_FILE", "StudySummary", "StudySink", "read_study", "write_rows", "check_study_dir",
           "check_tracking_uri", "recorded_tracking_uri", "study_tracking_uri", "run_study", "StudyCallback"]

log = logging.getLogger(__name__)

STUDY_FILE = "study.parquet"
CONFIG_FILE = "study_config.yaml"
EXTRA_KEYS = ("status", "error", "finished_at", "node_id", "hostname")


@dataclass(frozen=True)
class StudySummary:
    study_dir: Path
    n_cells: int
    n_skipped: int
    n_completed: int
    n_failed: int
    prepare_seconds: float
    wall_seconds: float
    device: str = ""           # where the cells ran (``study_device``); "" when none ran


def study_device(cfg: StudyConfig, local: bool) -> str:
    """Where this run's cells compute, for the results page (which may be written on another machine): this machine's
    GPU or CPU for a local Ray, else the joined cluster's nodes, GPUs and their accelerator types (Ray must run)."""
    from .generalization_local import device_name

    if local:
        return device_name(cfg)
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = sum(float(n.get("Resources", {}).get("GPU", 0)) for n in nodes)
    kinds = sorted({k.split(":", 1)[1] for n in nodes for k in n.get("Resources", {}) if k.startswith("accelerator_type:")})
    on = "GPU" if cfg.resources["gpu"] > 0 and gpus else "CPU"
    return (f"a Ray cluster of {len(nodes)} node(s), {int(gpus)} GPU(s){' (' + ', '.join(kinds) + ')' if kinds else ''}; "
            f"cells on {on}")


def read_study(study_dir: str | Path) -> pd.DataFrame:
    """The rows written so far (empty frame with the row columns when there are none)."""
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        return pd.DataFrame(columns=[*ROW_KEYS, *EXTRA_KEYS])
    return pd.read_parquet(path)


def write_rows(study_dir: str | Path, rows: list[Mapping[str, Any]]) -> pd.DataFrame:
    """Merge ``rows`` into study.parquet by ``cell_id`` (new rows win) and rewrite it atomically."""
    old = read_study(study_dir)
    new = pd.DataFrame([{k: r.get(k) for k in (*ROW_KEYS, *EXTRA_KEYS)} for r in rows])
    df = new if old.empty else pd.concat([old[~old["cell_id"].isin(new["cell_id"])], new], ignore_index=True)
    df = df.sort_values(["method", "proxy", "budget", "seed"], kind="stable").reset_index(drop=True)
    atomic_write(Path(study_dir) / STUDY_FILE, lambda f: df.to_parquet(f, index=False))
    return df


def check_study_dir(study_dir: str | Path) -> Path:
    """``study_dir`` as an absolute path if it can hold a study: a folder this process can write (or create)
    that does not hold a sweep's results; else ConfigError naming it."""
    from orchestrator.results import CONFIG_FILE as SWEEP_CONFIG_FILE, TRIALS_FILE, load_resolved_config

    path = check_writable_dir(study_dir, what="study folder", hint="pass --out a folder you can write")
    sweep_files = [f for f in (SWEEP_CONFIG_FILE, TRIALS_FILE) if (path / f).exists()]
    if sweep_files:
        try:
            name = load_resolved_config(path, follow_moves=False).get("name")
        except (GMPQError, OSError):   # damaged or unreadable sweep_config.yaml: still a sweep's folder
            name = None
        raise ConfigError(f"The folder '{path}' holds the results of {f'sweep {name!r}' if name else 'a sweep'} "
                          f"({', '.join(sweep_files)}); a study there would take over its MLflow ids "
                          "(mlflow_parent.json, mlflow_runs.json) and mix its cells into them. Give --out a new "
                          "folder, or an earlier study's folder to resume that study.")
    return path


def check_tracking_uri(uri: str | None, study_dir: str | Path | None = None) -> None:
    """ConfigError unless MLflow knows the scheme of ``uri`` (None: the store the study in ``study_dir`` recorded,
    else ``$MLFLOW_TRACKING_URI``, else the study folder's SQLite store). A store that is down is no error: the sink
    warns and the study goes on."""
    from orchestrator.sweep_checks import check_tracking_scheme
    from orchestrator.sweep_config import ENV_TRACKING_URI, env_tracking_uri

    if not uri and study_dir is not None and recorded_tracking_uri(study_dir):
        return                         # the store the study's run logged to (a sink connected to it)
    name = "tracking_uri (--tracking-uri, or the study config's)" if uri or not env_tracking_uri() else \
        f"${ENV_TRACKING_URI}"
    check_tracking_scheme(uri or env_tracking_uri(), name, "the study folder's mlflow.db")


def recorded_tracking_uri(study_dir: str | Path) -> str | None:
    """The MLflow store the study's parent run is in, as ``mlflow_parent.json`` records it (the folder moved or
    copied since: its own mlflow.db moved along, as the sink follows it); None without a readable record."""
    from orchestrator.mlflow_keys import PARENT_FILE
    from orchestrator.moved_sweep import moved_path, same_folder

    here = Path(study_dir).expanduser().resolve()
    try:
        data = read_json(here / PARENT_FILE)
    except (GMPQError, OSError):       # none (a study that never logged), or damaged: no record
        return None
    uri = data.get("tracking_uri") if isinstance(data, dict) else None
    if not isinstance(uri, str) or not uri:
        return None
    old = data.get("sweep_dir")
    if isinstance(old, str) and old and not same_folder(Path(os.path.abspath(old)), here):
        uri = moved_path(uri, Path(os.path.abspath(old)), here)
    return uri


def study_tracking_uri(cfg: StudyConfig, study_dir: Path) -> str:
    """The study's MLflow store: the config's / ``--tracking-uri``, else the store its run recorded
    (``recorded_tracking_uri``: a resume and ``--analyze-only`` log where the study is, as a sweep's recorded
    ``tracking_uri`` wins over the variable), else ``$MLFLOW_TRACKING_URI``, else the folder's."""
    from orchestrator.sweep_config import env_tracking_uri

    return (cfg.tracking_uri or recorded_tracking_uri(study_dir) or env_tracking_uri()
            or f"sqlite:///{Path(study_dir) / 'mlflow.db'}")


class StudySink(MLflowSink):
    """``MLflowSink`` warning as a study's: the rows are in study.parquet, and 'gmpq sync-mlflow' uploads
    sweeps, not studies (a cell's run is logged only as the cell finishes). Its parent run is tagged
    ``gmpq.role: study`` (its cells' runs: ``study-cell``); the id file keeps the sweep's key names."""

    PARENT_ROLE = "study"

    def goes_on(self) -> str:
        return (f"The study goes on without it; every row is kept in {self.sweep_dir / STUDY_FILE}. The cells "
                f"finished meanwhile get no MLflow run; once the server is back, 'gmpq study --out {self.sweep_dir} "
                "--analyze-only' attaches the results page and study.parquet to the study's run.")


def _trainable(context: Mapping[str, Any]) -> Callable[[dict], None]:
    context = dict(context)

    def study_cell(config: dict) -> None:
        import socket

        import ray
        from ray import tune

        cfg = StudyConfig.from_dict(context["config"])
        torch.set_num_threads(max(1, int(cfg.resources["cpu"])))
        row = run_cell(config["cell"], cfg, context["paths"])
        tune.report({**row, "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
                     "done": True})

    return study_cell


def _callback_class():
    from ray.tune import Callback

    class _StudyCallback(Callback):
        """Driver side: each finished cell -> study.parquet row + MLflow child run."""

        def __init__(self, study_dir: Path, cfg: StudyConfig, tracking_uri: str | None,
                     say: Callable[[str], None] | None = None, total: int = 0) -> None:
            self.study_dir = study_dir
            self.sink = StudySink(tracking_uri, study_dir, experiment_name=cfg.name, resolved_config=cfg.to_dict())
            self.completed = self.failed = 0
            self.say, self.total, self.t0 = say or (lambda msg: None), total, time.perf_counter()

        def setup(self, **info: Any) -> None:
            self.sink.connect(reopen=True)

        def _finish(self, trial: Any, error: str | None) -> None:
            cell = dict(trial.config["cell"])
            last = dict(trial.last_result or {})
            row = {**cell, **{k: last.get(k) for k in (*ROW_KEYS, "node_id", "hostname") if k in last},
                   "status": "failed" if error else "completed", "error": error,
                   "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_rows(self.study_dir, [row])
            self.failed += bool(error)
            self.completed += not error
            self.say(cell_line(row, self.completed + self.failed, self.total, time.perf_counter() - self.t0))
            rid = self.sink.child_run("trials", cell["cell_id"], run_name=cell["cell_id"], params=cell,
                                      tags={"cell_id": cell["cell_id"], "method": cell["method"],
                                            "gmpq.role": "study-cell"})
            self.sink.log_metrics(rid, {k: row.get(k) for k in ROW_KEYS if k not in ("cell_id", "policy_json")})
            if rid and row.get("policy_json"):      # no run (MLflow down): the client may be None
                self.sink.call("logging policy.json", self.sink.client.log_text, rid, row["policy_json"],
                               "policy.json")
            self.sink.finish(rid, "FAILED" if error else "FINISHED", {"status": row["status"]})

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finish(trial, None)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            err = getattr(trial, "error_file", None)
            text = "trial failed"
            if err and os.path.isfile(err):
                text = Path(err).read_text()[-2000:]
            self._finish(trial, text)

    return _StudyCallback


def StudyCallback(study_dir: Path, cfg: StudyConfig, tracking_uri: str | None,  # noqa: N802 (factory)
                  say: Callable[[str], None] | None = None, total: int = 0):
    """The Tune callback (built lazily so importing this module does not import Ray); ``say`` gets a line per
    finished cell (``cell_line``)."""
    return _callback_class()(study_dir, cfg, tracking_uri, say, total)


def cell_line(row: Mapping[str, Any], done: int, total: int, elapsed_s: float) -> str:
    """A finished cell as the study's progress says it: ``[3/18] gmpq proxy 500 budget 3.0 seed 0: target top-1
    81.2 %, 0.41 GBitOPs (12 s); 1.5 min so far``."""
    what = " ".join(f"{k} {row.get(k)}" for k in ("proxy", "budget", "seed") if row.get(k) is not None)
    if row.get("status") == "failed":
        tail = str(row.get("error") or "").strip().splitlines()
        outcome = f"FAILED ({tail[-1][:160] if tail else 'no error text'})"
    else:
        top1, gb, sec = row.get("target_top1"), row.get("gbitops_quantized"), row.get("cell_seconds")
        outcome = (f"target top-1 {top1:.2f} %" if isinstance(top1, (int, float)) else "target top-1 -") \
            + (f", {gb:.3f} GBitOPs" if isinstance(gb, (int, float)) else "") \
            + (f" ({sec:.0f} s)" if isinstance(sec, (int, float)) else "")
    return f"[{done}/{total or '?'}] {row.get('method')} {what}: {outcome}; {elapsed_s / 60:.1f} min so far"


def _export_repo_path() -> None:
    """Ray workers inherit the environment: put the folder holding ``experiments/`` on PYTHONPATH."""
    root = str(Path(__file__).resolve().parents[1])
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


def _ray_map(cfg: StudyConfig) -> Callable:
    """``map_fn`` for ``prepare_models``: the FP trainings as parallel Ray tasks (the trial resources each)."""
    from orchestrator.ray_env import ray_map

    return lambda fn, jobs: ray_map(fn, jobs, num_cpus=cfg.resources["cpu"], num_gpus=cfg.resources["gpu"])


def run_study(cfg: StudyConfig, study_dir: str | Path, *, address: str | None = None,
              progress: Callable[[str], None] | None = None) -> StudySummary:
    """Run (or resume) the study in ``study_dir``; returns counts and timings (see module doc)."""
    t0 = time.perf_counter()
    say = progress or (lambda msg: log.info("%s", msg))
    check_tracking_uri(cfg.tracking_uri, Path(study_dir).expanduser())
    study_dir = check_study_dir(Path(study_dir).expanduser()).resolve()
    check_same_study_config(cfg, study_dir, STUDY_FILE)
    check_study_data(cfg)                  # dataset names and sizes: before anything is written or Ray starts
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(study_dir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    cells = expand_grid(cfg)
    done = read_study(study_dir)
    finished = set(done.loc[done["status"] == "completed", "cell_id"]) if not done.empty else set()
    todo = [c for c in cells if c["cell_id"] not in finished]
    say(f"study '{cfg.name}': {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run")
    from ray import tune

    from orchestrator.ray_env import fit_restoring_handlers, ray_session

    _export_repo_path()
    cb = None
    if not todo and all(cached_model_path(cfg, job, study_dir).is_file() for job in model_jobs(cfg)):
        paths = prepare_models(cfg, study_dir)        # all cached: no Ray needed
        return StudySummary(study_dir=study_dir, n_cells=len(cells), n_skipped=len(cells), n_completed=0,
                            n_failed=0, prepare_seconds=time.perf_counter() - t0,
                            wall_seconds=time.perf_counter() - t0)
    if isinstance(address, str) and address.strip() in ("", "local"):
        address = None                                  # "local": this machine, as without --address
    from orchestrator.cluster_watch import lost_after_s, watching_cluster

    lost_after_s()                                      # a bad $GMPQ_CLUSTER_LOST_AFTER_S: before Ray
    made: list = []                        # the study's MLflow callback, once made (a lost cluster ends it)
    with ray_session(address, **({} if address else {"num_gpus": 1 if cfg.resources["gpu"] > 0 else 0})), \
            watching_cluster(_lost_handler(study_dir, local=address is None, callbacks=made)):
        paths = prepare_models(cfg, study_dir, map_fn=_ray_map(cfg))
        t_prep = time.perf_counter() - t0
        device = study_device(cfg, local=address is None) if todo else ""
        say(f"shared FP models ready after {t_prep:.0f} s ({_paths_text(paths)})")
        if todo:
            uri = study_tracking_uri(cfg, study_dir)
            cb = StudyCallback(study_dir, cfg, uri, say=say, total=len(todo))
            made.append(cb)
            say(f"running {len(todo)} cell(s), {cfg.max_concurrent_trials} at a time: a line as each ends")
            context = {"config": cfg.to_dict(), "paths": paths}
            trainable = tune.with_resources(_trainable(context), {"cpu": cfg.resources["cpu"],
                                                                 "gpu": cfg.resources["gpu"]})
            tuner = tune.Tuner(
                trainable, param_space={"cell": tune.grid_search(todo)},
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=cfg.max_concurrent_trials,
                                            reuse_actors=True),
                run_config=tune.RunConfig(name=f"study-{int(time.time())}", storage_path=str(study_dir / "ray_results"),
                                          callbacks=[cb], verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=0)))
            fit_restoring_handlers(tuner)
            stopped = cb.completed + cb.failed < len(todo)     # Ctrl-C or SIGTERM: Tune stopped the rest gracefully
            cb.sink.finish(cb.sink.parent_run_id, "KILLED" if stopped else "FINISHED")
    return StudySummary(study_dir=study_dir, n_cells=len(cells), n_skipped=len(cells) - len(todo),
                        n_completed=cb.completed if cb else 0, n_failed=cb.failed if cb else 0,
                        prepare_seconds=t_prep, wall_seconds=time.perf_counter() - t0, device=device)


def _lost_handler(study_dir: Path, *, local: bool, callbacks: list) -> Callable[[str, float], None]:
    """``cluster_watch``'s ``on_lost`` for a study: its cluster lost, the cells that ended are kept (their rows are
    written as each ends), the study's MLflow parent run (of the ``callbacks`` made so far) ends KILLED, and the same
    command runs the rest."""
    from orchestrator.cluster_watch import bounded, exit_lost, join_hint, lost_text

    def lost(address: str, seconds: float) -> None:
        n = bounded(lambda: int((read_study(study_dir)["status"] == "completed").sum()), 0)
        kept = f"{n} completed cell(s) are kept in {study_dir / STUDY_FILE}" if n else "No cell had completed"
        join = f", and{join_hint(local)}" if join_hint(local) else ""
        exit_lost(lost_text("study", address, seconds, local=local, work="the study",
                            rest=f"{kept}. Run the same command again (the same --out {study_dir}{join}): completed "
                                 "cells are skipped, failed ones run again."),
                  cleanup=lambda: [cb.sink.finish(cb.sink.parent_run_id, "KILLED") for cb in callbacks])

    return lost


def _paths_text(paths: Mapping[str, Any]) -> str:
    """The shared models' paths, one ``name: path`` each (nested mappings flattened as ``name.key``)."""
    parts = []
    for name, value in paths.items():
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        parts += [f"{name}{'.' + str(k) if k is not None else ''}: {v}" for k, v in items]
    return "; ".join(parts)

