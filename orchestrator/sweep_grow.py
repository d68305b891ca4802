"""A resumed sweep given more trials than it started with (``gmpq sweep --out DIR --resume --n-trials 40``).

Ray Tune restores a sweep's trial count with its searcher's state: ``SearchGenerator.set_state`` sets
``total_samples`` from the saved state, whatever ``num_samples`` says now. ``GrowingSearch`` is that
``SearchGenerator`` around the sweep's restored searcher, whose restored count is raised to the config's
``n_trials`` (never lowered); ``grow_restored`` puts it in a restored Tuner's config (``sweep_tuner._swap_restored``), the
Optuna searcher inside it unchanged: the same study and sampler go on with the trials that ended.
``check_growth`` is the resume's check (``sweep_resume._check_same_config``) of a count that changed: more is
allowed where Tune can be reached, fewer is refused. ``tune_saved_count`` reads the count Tune saved, so a resume
after a grown one that stopped before its trials ran still knows the sweep grows. ``GrowthNote`` records the new
count on the MLflow parent run on every resume whose parent still names a smaller one. A restore that failed
(``RestoreFailed``) ends with one paragraph (``restore_failed``) naming the experiment state to move aside.
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
           "reselect_text", "tune_saved_count", "RestoreFailed", "restore_failed",
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
        raise RestoreFailed("Ray Tune could not restore the sweep's experiment state and would start the sweep "
                            "again from its first trial; nothing was run.")


class RestoreFailed(ConfigError):
    """Ray Tune could not restore a resumed sweep's experiment state (``GrowingSearch.add_configurations``);
    ``restore_failed`` words it for the sweep."""


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


def check_growth(cfg: Any, saved_n: int, ended: int, *, tune_saved: bool = False) -> None:
    """ConfigError when a resume's ``n_trials`` (``cfg``) cannot replace the saved ``saved_n``: fewer (``ended`` of
    them have ended: trials.parquet), or more through Ray Client (Tune restores the sweep on the cluster, out of
    reach of ``grow_restored``), or more than the space holds (``sweep_config.check_trial_count``). ``tune_saved``:
    ``saved_n`` is the count Ray Tune saved (``tune_saved_count``), the saved config raised already by a grown
    resume that stopped before Tune ran it (``sweep_resume.grown_from``). Ray Client: a ``ray://`` address, or
    ``auto`` that follows ``$RAY_ADDRESS=ray://...`` (``ray_env.ray_client_text``). (The two Ray Client refusals
    name different fixes: with a raised saved config, --n-trials of the old count is refused as fewer.)"""
    from .ray_env import head_node_text, ray_client_text
    from .sweep_config import check_trial_count

    n, out = cfg.n_trials, cfg.out_dir
    client = ray_client_text(cfg.address) if n > saved_n else None     # ray://, or auto following $RAY_ADDRESS
    head = head_node_text(cfg.address)
    if client and tune_saved:
        raise ConfigError(f"The sweep in '{out}' grows from {saved_n} to {n} trials (n_trials {n} in its "
                          f"sweep_config.yaml, saved by a grown resume that stopped before Ray Tune ran it; Tune's "
                          f"saved state holds {saved_n}), but through Ray Client ({client}) Tune restores it on "
                          f"the cluster, where its trial count cannot be raised. Resume it from the head node "
                          f"{head} to grow it; to run only its {saved_n} trials through Ray Client, set "
                          f"n_trials back to {saved_n} in {Path(out) / 'sweep_config.yaml'} first. Nothing was run.")
    if n < saved_n:
        if isinstance(ended, int) and ended >= saved_n:        # all ended: only a larger count runs any more
            how = (f"(all {saved_n} have ended): a resumed sweep can run more trials, not fewer. Resume with "
                   f"--n-trials {ended + 1} or more to run more")
        else:
            how = (f"({ended} of them have ended already): a resumed sweep can run more trials, not fewer. Resume "
                   f"with --n-trials {saved_n} or more (or without --n-trials: --out {out} --resume)")
        raise ConfigError(f"--n-trials {n} is fewer than the {saved_n} trials the sweep in '{out}' was given {how}, "
                          "or select among the trials that ended with gmpq pareto / gmpq finetune --sweep.")
    if client:
        raise ConfigError(f"--n-trials {n} would grow the sweep in '{out}' from {saved_n} trials, but through Ray "
                          f"Client ({client}) Tune restores it on the cluster, where its trial count cannot be "
                          f"raised. Resume it from the head node {head} to grow it, or resume here with "
                          f"--n-trials {saved_n}.")
    if n > saved_n:
        check_trial_count(cfg)


def tune_saved_count(cfg: Any) -> int | None:
    """The trial count Ray Tune saved with the sweep's searcher (``total_samples`` of its newest
    ``search_gen_state-*.json``, the file Tune restores), or None when it cannot be read here (a URI storage, no
    such file, a damaged one). Lower than the saved config's ``n_trials`` after a grown resume stopped before Tune
    saved its state again: the next resume still grows the sweep."""
    from .sweep_resume import experiment_path

    exp = experiment_path(cfg)
    if "://" in exp:
        return None
    files = sorted(Path(exp).glob(SearchGenerator.CKPT_FILE_TMPL.format("*")))
    if not files:
        return None
    try:
        import ray.cloudpickle as cloudpickle

        with open(files[-1], "rb") as f:                # Tune restores the newest by name (its session's time)
            total = cloudpickle.load(f).get("total_samples")
        return int(total) if total is not None else None
    except Exception as e:  # noqa: BLE001 - only a count: Tune's own restore names a damaged state
        log.debug("could not read the trial count Tune saved in %s: %s", files[-1], e)
        return None


def experiment_states(cfg: Any) -> list[str]:
    """The ``experiment_state-*.json`` files of the sweep's Tune experiment, oldest first (Tune restores the last);
    [] when none is found here (or a URI storage)."""
    from .sweep_resume import experiment_path

    exp = experiment_path(cfg)
    return [] if "://" in exp else [str(p) for p in sorted(Path(exp).glob("experiment_state-*.json"))]


def restore_failed(cfg: Any, old: int | None) -> ConfigError:
    """The paragraph of a resume whose Tune experiment state could not be restored (``RestoreFailed``): the newest
    state file to move aside (Tune then restores the one before it; the only one: the sweep cannot be resumed),
    nothing run; a grown resume's saved count put back (``old``: as ``cannot_grow`` does), so the folder says what
    Tune holds."""
    from .sweep_resume import experiment_path

    if old is not None:
        _put_back_count(cfg, old)
    states, exp = experiment_states(cfg), experiment_path(cfg)
    if len(states) > 1:
        fix = (f"its newest experiment state {states[-1]} is likely damaged (a driver killed while writing it, a full "
               f"disk): move it aside (mv {states[-1]} {states[-1]}.bad) and resume again, so Tune restores the one "
               f"before it ({Path(states[-2]).name})")
    elif states:
        fix = (f"its only experiment state {states[0]} is likely damaged (a driver killed while writing it, a full "
               "disk), and with it moved aside there is nothing to resume: run the sweep again with another --out")
    else:
        fix = (f"check its experiment folder {exp}: if its newest experiment_state-*.json is damaged, move it aside "
               "and resume again, so Tune restores the one before it")
    kept = f" {Path(cfg.out_dir) / 'sweep_config.yaml'} keeps n_trials {old}." if old is not None else ""
    return RestoreFailed(f"Ray Tune could not restore the sweep in '{cfg.out_dir}' (its log above says why) and "
                         f"would start it again from its first trial; nothing was run.{kept} The trials that ended "
                         f"are kept (trials.parquet, the Optuna study); {fix}.")


def more_trials_text(cfg: Any) -> str:
    """How a finished sweep (``cfg``: its config) runs more trials in the same Optuna study."""
    n = cfg.n_trials
    return (f"to run more trials, resume it with a larger count (e.g. --resume --n-trials {2 * n}) in the same "
            f"Optuna study{_guided_text(cfg, 2 * n)}")


def _guided_text(cfg: Any, n: int) -> str:
    """Whether the sampler of ``cfg`` is guided by the ended trials in a sweep of ``n``: not while all ``n`` are among
    its random first ones (``sampling.warmup``'s fact where it has one); nothing said for a sampler without such a
    count (random, qmc)."""
    from .sampling import random_first_trials, warmup

    first = random_first_trials(cfg.sampler.name, cfg.sampler.kwargs)
    if first is None:
        return ""
    said = warmup(cfg.sampler.name, cfg.sampler.kwargs, n)
    if said is not None:
        return f", but {said.fact}"
    key, count = first
    if n <= count:
        return (f", but its sampler draws all {n} at random (its first {count} trials are random: {key}={count}), "
                "none guided by earlier ones")
    return ": its sampler is guided by the trials that ended"


def cannot_grow(cfg: Any, old: int) -> ConfigError:
    """The error of a grown resume this Ray cannot apply (its restored Tuner's config out of reach): the saved
    config gets its count back (saved as the resume was accepted), so the folder says what Tune will run."""
    _put_back_count(cfg, old)
    return ConfigError(f"This Ray ({ray.__version__}) does not let gmpq reach a restored sweep's trial count, so "
                       f"the sweep in '{cfg.out_dir}' cannot grow from {old} to {cfg.n_trials} trials; nothing was "
                       f"run. Resume it with --n-trials {old} (or without --n-trials), or start a new sweep with "
                       "another --out.")


def _put_back_count(cfg: Any, old: int) -> None:
    """The saved config's ``n_trials`` set back to ``old`` (written as the grown resume was accepted)."""
    from dataclasses import replace

    from .sweep_config import load_sweep_config, save_resolved_config

    path = Path(cfg.out_dir) / "sweep_config.yaml"
    if path.is_file():
        save_resolved_config(replace(load_sweep_config(path), n_trials=old))


def grown_text(cfg: Any, old: int, ended: int | str) -> str:
    """The line of a resume that grows the sweep (``cfg``: its config, with the new count) from ``old`` trials: how
    many are new, and whether its sampler is guided by the ended ones (``_guided_text``)."""
    new = cfg.n_trials
    return (f"the sweep grows from {old} to {new} trials ({new - old} new; {ended} ended so far) in the same Optuna "
            f"study{_guided_text(cfg, new)}")


def reselect_text(sweep_dir: Path, old: int, new: int) -> str | None:
    """What a sweep grown from ``old`` to ``new`` trials means for ``gmpq run``'s Pareto selection, when the folder
    holds one (None otherwise): selected again from all of them, the new selection fine-tuned. (``gmpq sweep`` says
    ``pareto_stale.stale_text`` instead: pareto.parquet is stale until ``gmpq pareto`` makes it again.)"""
    from .results import FINAL_FILE, PARETO_FILE

    if not (Path(sweep_dir) / PARETO_FILE).is_file() and not (Path(sweep_dir) / FINAL_FILE).is_file():
        return None
    return (f"the sweep grew from {old} to {new} trials: the Pareto front and its selection are made again from "
            f"all of them, and the final stage fine-tunes the new selection (a policy fine-tuned before with these "
            f"settings is not trained again; one the new selection leaves out keeps its row in {FINAL_FILE}, "
            f"which gmpq status lists as not selected now)")


class GrowthNote(Callback):
    """After the MLflow callback connected its parent run (Tune's ``setup``, in the order of the callbacks), on every
    resume: when the parent run names fewer trials than ``new`` (its ``N_TRIALS_TAG``, else its ``n_trials`` param,
    which keeps the first count: MLflow params cannot change), the new count as tags on that run (``N_TRIALS_TAG``,
    and ``GROWN_TAG``'s history) and its ``sweep_config.yaml`` artifact again (the saved one, with the new count).
    So a sweep grown by a command that stopped before Tune started is recorded by the next resume. ``grown_from``:
    the count the parent named, once it was found smaller. Failures only warn (``MLflowSink.call``)."""

    def __init__(self, mlflow_callback: Any, new: int) -> None:
        self.mlflow, self.new = mlflow_callback, int(new)
        self.grown_from: int | None = None

    def setup(self, **info: Any) -> None:
        from .results import CONFIG_FILE

        self.mlflow.flush()                          # its queued connect (and parent run) first
        sink = self.mlflow.sink
        rid = sink.parent_run_id
        if rid is None or not sink.enabled:
            return
        run = sink.call("reading the sweep's parent run", sink.client.get_run, rid)
        if run is None:
            return
        tags, params = run.data.tags, run.data.params
        try:
            recorded = int(tags.get(N_TRIALS_TAG) or params.get("n_trials"))
        except (TypeError, ValueError):              # (a parent run without the count: nothing to compare)
            return
        if recorded >= self.new:
            return
        self.grown_from = recorded
        history = tags.get(GROWN_TAG) or str(recorded)                     # "20 -> 40"
        if history.rsplit(" -> ", 1)[-1] != str(recorded):
            history += f" -> {recorded}"
        sink.call("tagging the sweep's parent run", sink.client.set_tag, rid, N_TRIALS_TAG, str(self.new))
        sink.call("tagging the sweep's parent run", sink.client.set_tag, rid, GROWN_TAG, f"{history} -> {self.new}")
        path = sink.sweep_dir / CONFIG_FILE
        if path.is_file():
            sink.call("logging the sweep's config", sink.client.log_artifact, rid, str(path))
