"""A resumed sweep given more trials than it started with (``gmpq sweep --out DIR --resume --n-trials 40``).

Ray Tune restores a sweep's trial count with its searcher's state: ``SearchGenerator.set_state`` sets
``total_samples`` from the saved state, whatever ``num_samples`` says now. ``GrowingSearch`` is that
``SearchGenerator`` around the sweep's restored searcher, whose restored count is raised to the config's
``n_trials`` (never lowered); ``grow_restored`` puts it in a restored Tuner's config (``sweep._swap_restored``), the
Optuna searcher inside it unchanged: the same study and sampler continue from the trials already told.
``check_growth`` is the resume's check (``sweep_resume._check_same_config``) of a count that changed: more is
allowed where Tune can be reached, fewer is refused. ``GrowthNote`` records the new count on the MLflow parent run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray
from ray.tune import Callback
from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher

from gmpq_core.errors import ConfigError

__all__ = ["GrowingSearch", "grow_restored", "check_growth", "grown_text", "more_trials_text", "cannot_grow",
           "reselect_text",
           "GrowthNote", "N_TRIALS_TAG", "GROWN_TAG"]

log = logging.getLogger(__name__)

N_TRIALS_TAG = "gmpq.n_trials"          # the parent run's current count (its n_trials param keeps the first one)
GROWN_TAG = "gmpq.n_trials_grown"       # how it grew: "20 -> 40 -> 60"


class GrowingSearch(SearchGenerator):
    """``SearchGenerator`` whose restored trial count (``total_samples``) is at least ``n_trials``: a resumed sweep
    runs the trials its config asks for now, not only those it was started with."""

    def __init__(self, searcher: Searcher, n_trials: int) -> None:
        super().__init__(searcher)
        self.n_trials = int(n_trials)
        self.restored_total: int | None = None       # the count Tune saved (None: not restored yet)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.restored_total = int(self.total_samples)
        if self.total_samples < self.n_trials:       # grown: the searcher continues (same Optuna study)
            self._total_samples = self.n_trials
            self._finished = False
            log.info("the sweep's trial count grows from %s to %s", self.restored_total, self.n_trials)

    def add_configurations(self, experiments: Any) -> None:
        # Tune calls this for a new experiment only: a restore that failed (Tune logs "Failed to restore the run
        # state" and starts afresh) would run the sweep again from its first trial in the same folder
        raise RuntimeError("Ray Tune could not restore the sweep's experiment state (see the error logged above) "
                           "and would start the sweep again from its first trial; nothing was run. Resume with the "
                           "sweep's own --out and --storage, or start a new sweep with another --out.")


def grow_restored(tune_config: Any, n_trials: int) -> bool:
    """Put ``GrowingSearch`` (around the restored searcher, in the ``ConcurrencyLimiter`` that ``tune.run`` would
    have put it in for ``max_concurrent_trials``) in a restored Tuner's ``TuneConfig``; False (nothing changed)
    when its ``search_alg`` is not a ``Searcher`` (a sweep gmpq did not start)."""
    searcher = tune_config.search_alg
    if isinstance(searcher, GrowingSearch):          # (a Tuner restored and grown already)
        searcher.n_trials = int(n_trials)
        return True
    if not isinstance(searcher, Searcher):
        return False
    limit = tune_config.max_concurrent_trials
    if limit:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=int(limit))
    tune_config.search_alg = GrowingSearch(searcher, n_trials)
    tune_config.max_concurrent_trials = None          # applied above (tune.run ignores it for a SearchGenerator)
    tune_config.num_samples = int(n_trials)
    return True


def check_growth(cfg: Any, saved_n: int, ended: int) -> None:
    """ConfigError when a resume's ``n_trials`` (``cfg``) cannot replace the saved ``saved_n``: fewer (``ended`` of
    them have ended: trials.parquet), or more through Ray Client (Tune restores the sweep on the cluster, out of
    reach of ``grow_restored``), or more than the space holds (``sweep_config.check_trial_count``)."""
    from .sweep_config import check_trial_count

    n, out = cfg.n_trials, cfg.out_dir
    if n < saved_n:
        raise ConfigError(f"--n-trials {n} is fewer than the {saved_n} trials the sweep in '{out}' was given "
                          f"({ended} of them have ended already): a resumed sweep can run more trials, not fewer. "
                          f"Resume with --n-trials {saved_n} or more (or without --n-trials: --out {out} --resume), "
                          "or select among the trials that ended with gmpq pareto / gmpq finetune --sweep.")
    if n > saved_n and str(cfg.address or "").startswith("ray://"):
        raise ConfigError(f"--n-trials {n} would grow the sweep in '{out}' from {saved_n} trials, but through Ray "
                          f"Client ({cfg.address}) Tune restores it on the cluster, where its trial count cannot be "
                          f"raised. Resume it from the head node (--address auto) to grow it, or resume here with "
                          f"--n-trials {saved_n}.")
    if n > saved_n:
        check_trial_count(cfg)


def more_trials_text(n: int) -> str:
    """How a finished sweep of ``n`` trials runs more (its Optuna study continues)."""
    return (f"to run more trials, resume it with a larger count (e.g. --resume --n-trials {2 * n}): its Optuna "
            "study goes on learning from the trials it ran")


def cannot_grow(cfg: Any, old: int) -> ConfigError:
    """The error of a grown resume this Ray cannot apply (its restored Tuner's config out of reach): the saved
    config gets its count back (saved as the resume was accepted), so the folder says what Tune will run."""
    from dataclasses import replace

    from .sweep_config import load_sweep_config, save_resolved_config

    saved = load_sweep_config(Path(cfg.out_dir) / "sweep_config.yaml")
    save_resolved_config(replace(saved, n_trials=old))
    return ConfigError(f"This Ray ({ray.__version__}) does not let gmpq reach a restored sweep's trial count, so "
                       f"the sweep in '{cfg.out_dir}' cannot grow from {old} to {cfg.n_trials} trials; nothing was "
                       f"run. Resume it with --n-trials {old} (or without --n-trials), or start a new sweep with "
                       "another --out.")


def grown_text(old: int, new: int, ended: int | str) -> str:
    """The line of a resume that grows the sweep."""
    return (f"the sweep grows from {old} to {new} trials ({ended} ended so far); its Optuna study continues from "
            "the trials it was told")


def reselect_text(sweep_dir: Path, old: int, new: int, *, command: str = "gmpq sweep") -> str | None:
    """What a grown sweep means for its Pareto selection, when the folder holds one (None otherwise): ``gmpq run``
    selects again from all ``new`` trials and fine-tunes the new selection; after ``gmpq sweep``, pareto.parquet is
    the front of the first ``old`` until ``gmpq pareto`` makes it again."""
    from .results import FINAL_FILE, PARETO_FILE

    if not (Path(sweep_dir) / PARETO_FILE).is_file() and not (Path(sweep_dir) / FINAL_FILE).is_file():
        return None
    if command == "gmpq run":
        return (f"the sweep grew from {old} to {new} trials: the Pareto front and its selection are made again from "
                f"all of them, and the final stage fine-tunes the new selection (a policy fine-tuned before with these "
                f"settings is not trained again; one the new selection leaves out keeps its row in {FINAL_FILE}, "
                f"which gmpq status lists as not selected now)")
    return (f"{Path(sweep_dir) / PARETO_FILE} still holds the Pareto front of the sweep's first {old} trials: select "
            f"again from all {new} with: gmpq pareto {sweep_dir} (gmpq finetune --sweep {sweep_dir} fine-tunes "
            f"{PARETO_FILE}'s selection as it is; gmpq run --out {sweep_dir} --resume does both)")


class GrowthNote(Callback):
    """After the MLflow callback connected its parent run (Tune's ``setup``, in the order of the callbacks): the
    grown count as tags on that run (``N_TRIALS_TAG``, and ``GROWN_TAG``'s history), and its ``sweep_config.yaml``
    artifact again (the saved one, with the new count). The run's ``n_trials`` param keeps the first count (MLflow
    params cannot change). Failures only warn (``MLflowSink.call``)."""

    def __init__(self, mlflow_callback: Any, old: int, new: int) -> None:
        self.mlflow, self.old, self.new = mlflow_callback, int(old), int(new)

    def setup(self, **info: Any) -> None:
        from .results import CONFIG_FILE

        self.mlflow.flush()                          # its queued connect (and parent run) first
        sink = self.mlflow.sink
        rid = sink.parent_run_id
        if rid is None or not sink.enabled:
            return
        run = sink.call("reading the sweep's parent run", sink.client.get_run, rid)
        history = (run.data.tags.get(GROWN_TAG) if run is not None else None) or str(self.old)   # "20 -> 40"
        if history.rsplit(" -> ", 1)[-1] != str(self.old):
            history += f" -> {self.old}"
        sink.call("tagging the sweep's parent run", sink.client.set_tag, rid, N_TRIALS_TAG, str(self.new))
        sink.call("tagging the sweep's parent run", sink.client.set_tag, rid, GROWN_TAG, f"{history} -> {self.new}")
        path = sink.sweep_dir / CONFIG_FILE
        if path.is_file():
            sink.call("logging the sweep's config", sink.client.log_artifact, rid, str(path))
