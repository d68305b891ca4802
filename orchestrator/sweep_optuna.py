"""The sweep's Optuna study across resumes: a moved folder's storage reopened while Tune unpickles the searcher
(``optuna_storage_now``), and the trials a killed driver left RUNNING closed once a resumed sweep has run to its end
(``_close_orphan_optuna_trials``). A resume, grown or not (``sweep_grow``), continues the same study and sampler."""
from __future__ import annotations

import contextlib
import logging
from datetime import datetime
from typing import Iterator

import optuna

from .sweep_config import SweepConfig

__all__ = ["optuna_storage_now"]

log = logging.getLogger("orchestrator.sweep")     # the sweep's own channel, as before these moved here


@contextlib.contextmanager
def optuna_storage_now(url: str) -> Iterator[None]:
    """While a resumed sweep's Tune state is unpickled (``Tuner.restore``, then the searcher's state in
    ``fit``), a pickled Optuna SQLite storage other than the sweep's own ``url`` (the folder moved or was
    copied: ``moved_sweep``) opens ``url``. Optuna reconnects while unpickling, to the old file, which may be
    gone (the resume failed) or the original's (the copy's trials went into it). Only SQLite URLs: a resume
    must keep the sweep's storage (``_check_same_config``), so a SQLite file elsewhere is the same study moved."""
    from optuna.storages import RDBStorage

    original = RDBStorage.__setstate__

    def setstate(self, state: dict) -> None:
        old = str(state.get("url", ""))
        same_file = old.startswith("sqlite:") and url.startswith("sqlite:") and \
            old.rsplit("/", 1)[-1] == url.rsplit("/", 1)[-1]       # optuna.db moved, not another store
        if old != url and same_file:
            log.info("the sweep's Optuna study continues in %s (its Tune state was saved with %s)", url, old)
            state = {**state, "url": url}
        original(self, state)

    RDBStorage.__setstate__ = setstate
    try:
        yield
    finally:
        RDBStorage.__setstate__ = original


def _close_orphan_optuna_trials(cfg: SweepConfig, say, *, started_before: datetime) -> None:
    """After a resumed sweep has run to its end, an Optuna trial still RUNNING that started before this
    driver did belongs to the driver that died while it ran, and Tune replaced it: mark it FAIL
    (optuna-dashboard would show it running for ever). Covers the sweep's study and its per-bucket
    pruning studies; the count said is the sweep's study's (one per interrupted trial: its pruning-study
    record is the same trial again). Never fatal: a storage error only logs a warning."""
    try:
        storage = optuna.storages.RDBStorage(cfg.optuna_storage)
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
                 if s.study_name == cfg.name or s.study_name.startswith(f"{cfg.name}-prune-")]
        closed = {True: 0, False: 0}                     # the sweep's own study: True; pruning studies: False
        for name in names:
            study = optuna.load_study(study_name=name, storage=storage)
            for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if trial.datetime_start is not None and trial.datetime_start < started_before:
                    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                    closed[name == cfg.name] += 1
    except Exception as e:  # noqa: BLE001 - bookkeeping only: the sweep's results are already saved
        log.warning("could not close Optuna trials left RUNNING by an interrupted driver (%s)", e)
        return
    trials, pruning = closed[True], closed[False]
    if trials:
        also = f" (with {'its' if trials == 1 else 'their'} records in the per-bucket pruning studies)" if pruning else ""
        say(f"{trials} Optuna trial(s) left RUNNING by an interrupted driver marked FAIL{also}")
    elif pruning:
        say(f"{pruning} record(s) of the per-bucket pruning studies left RUNNING by an interrupted driver marked FAIL")
