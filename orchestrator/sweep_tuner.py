"""The sweep's Ray Tune ``Tuner``: ``_make_tuner`` builds a new one (``SweepOptunaSearch`` on the sweep's Optuna
storage, multi-objective ``OBJECTIVES``; the per-bucket Optuna pruning scheduler) or restores the saved experiment
(``_swap_restored``: fresh callbacks and scheduler, the trial count raised by ``sweep_grow``); ``_chain`` walks an
exception's causes (a failed restore wrapped by Tune). ``orchestrator.sweep`` re-exports ``OBJECTIVES``."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from ray import tune

from .pruning import OptunaPruningScheduler
from .sampling import make_sampler
from .sweep_config import SweepConfig
from .sweep_optuna import optuna_storage_now
from .sweep_resume import experiment_path
from .sweep_searcher import SweepOptunaSearch
from .trainable import make_trainable
from .trial_status import TrialStatusBook

__all__ = ["OBJECTIVES"]

log = logging.getLogger("orchestrator.sweep")     # the sweep's own channel, as before these lines moved here

OBJECTIVES = (("transfer_top1", "max"), ("bitops", "min"))


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from or during (a wrapper's cause)."""
    seen: list[BaseException] = []
    while e is not None and e not in seen and len(seen) < 20:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _make_tuner(cfg: SweepConfig, context: Mapping[str, Any], book: TrialStatusBook, callbacks: list,
                optuna_storage: Any, *, resume: bool, say, grown_from: int | None = None) -> Any:
    """The sweep's ``Tuner``: a new one (Optuna sampler on ``optuna_storage``), or the restored experiment, its trial
    count raised to ``cfg.n_trials`` (``sweep_grow``; ``grown_from``: the saved count, when the resume raises it)."""
    scheduler = OptunaPruningScheduler(pruner=cfg.pruner.name, pruner_kwargs=cfg.pruner.kwargs, status_book=book,
                                       storage=cfg.optuna_storage, study_prefix=f"{cfg.name}-prune")
    trainable = tune.with_resources(make_trainable(context), cfg.resources.to_ray())
    if resume:
        exp = experiment_path(cfg)
        say(f"resuming {exp}")
        with optuna_storage_now(cfg.optuna_storage):
            tuner = tune.Tuner.restore(exp, trainable, resume_errored=True, restart_errored=False)
        _swap_restored(tuner, scheduler, callbacks, cfg, grown_from)
        return tuner
    searcher = SweepOptunaSearch(
        space=cfg.space.define_by_run(), metric=[m for m, _ in OBJECTIVES], mode=[d for _, d in OBJECTIVES],
        sampler=make_sampler(cfg.sampler.name, cfg.sampler.kwargs, seed=cfg.seed), storage=optuna_storage,
        study_name=cfg.name)
    return tune.Tuner(
        trainable, param_space={},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.n_trials,
                                    max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True),
        run_config=tune.RunConfig(name=cfg.name, storage_path=cfg.storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  callbacks=callbacks))


def _swap_restored(tuner: Any, scheduler: Any, callbacks: list, cfg: SweepConfig, grown_from: int | None) -> None:
    """Give a restored Tuner fresh callbacks and scheduler (Tune restores them by unpickling, which
    would skip their constructors, where the results callback reloads the rows already written), and its searcher
    the config's trial count (``sweep_grow.grow_restored``: also after a grown resume stopped before Tune saved it)."""
    from .sweep_grow import cannot_grow, grow_restored

    internal = getattr(tuner, "_local_tuner", None)
    if internal is None or not hasattr(internal, "_run_config") or not hasattr(internal, "_tune_config"):
        if grown_from is not None:
            raise cannot_grow(cfg, grown_from)
        log.warning("cannot reach the restored Tuner's config in this Ray version; using the callbacks "
                    "and scheduler as Tune unpickled them")
        return
    internal._run_config.callbacks = callbacks
    internal._tune_config.scheduler = scheduler
    if not grow_restored(internal._tune_config, cfg.n_trials) and grown_from is not None:
        raise cannot_grow(cfg, grown_from)
