"""Optuna pruners inside Ray Tune: a Tune ``TrialScheduler`` that asks a real ``optuna.pruners`` pruner.

Ray's ``OptunaSearch`` fixes its study's pruner to ``NopPruner`` and a Tune *searcher* cannot stop a
trial; only a *scheduler* can (``on_trial_result`` returning ``STOP``). Optuna pruners are
single-objective, while the sweep searches on (transfer_top1, bitops). So this adapter keeps, per
budget bucket, a separate single-objective study (direction maximize) whose only job is pruning:

- each Tune trial gets one Optuna trial in its bucket's study (``study.ask()``, tagged with the
  Tune trial id);
- every search-phase result feeds ``result["prune_value"]`` at step ``result["epoch"]``
  (``trial.report(value, step)``); ``trial.should_prune()`` -> ``STOP`` and the trial is recorded
  as pruned in the ``TrialStatusBook``;
- except at the trial's last search epoch (``result["search_epochs"]``, the trial's own epoch count, which the
  trainable reports with every epoch): its search is finished and only the short transfer check is left, so
  stopping it would save nothing and lose the search. Its value there is still reported (it counts for the
  trials after it); the trial goes on and is told COMPLETE (or FAIL) as it ends;
- a completed Tune trial is told to its study as COMPLETE (its last value), an errored one as FAIL.

Trials therefore compete only with trials of a similar budget (accuracy at 2 bits and at 6 bits are
not comparable). With ``storage`` (an Optuna storage URL, e.g. the sweep's sqlite file) the bucket
studies persist, so a resumed sweep prunes against the trials that ran before the interruption.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from gmpq_core.errors import ConfigError, did_you_mean

from .trial_status import TrialStatusBook

__all__ = ["PRUNERS", "make_pruner", "OptunaPruningScheduler"]

log = logging.getLogger(__name__)

PRUNERS: dict[str, type] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}
TUNE_TRIAL_ATTR = "tune_trial_id"


def make_pruner(name: str, kwargs: Mapping[str, Any] | None = None) -> optuna.pruners.BasePruner:
    """Build ``optuna.pruners.<Name>Pruner(**kwargs)``; a bad name or argument raises ConfigError."""
    if name not in PRUNERS:
        raise ConfigError(f"Unknown pruner '{name}'. Available pruners: {', '.join(PRUNERS)}.")
    import inspect

    accepted = [p for p in inspect.signature(PRUNERS[name]).parameters if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(kwargs or {}) - set(accepted))
    if unknown:
        raise ConfigError(f"The '{name}' pruner ({PRUNERS[name].__name__}) takes no argument(s) {unknown}."
                          f"{did_you_mean(unknown, accepted)} Its arguments: {', '.join(accepted) or 'none'}.")
    try:
        return PRUNERS[name](**dict(kwargs or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Bad arguments for the '{name}' pruner ({PRUNERS[name].__name__}) "
                          f"{dict(kwargs or {})}: {e}. Its arguments: {', '.join(accepted)}.") from None


def _at_last_step(step: Any, last: Any) -> bool:
    """Whether ``step`` is the trial's last one (``last``: its step count, None or not a number: unknown)."""
    try:
        return last is not None and int(step) >= int(last)
    except (TypeError, ValueError):
        return False


class OptunaPruningScheduler(FIFOScheduler):
    """FIFO scheduling plus Optuna pruning per budget bucket (see the module docstring).

    ``metric``: the result key pruned on (maximized); ``step_key``: its step; ``bucket_key``: the
    budget bucket (int); only results whose ``phase_key`` equals ``phase`` (or lack it) are fed.
    ``last_step_key``: the result key holding the trial's last step (its search epochs): a result at that step is
    reported to the pruning study but never pruned (a result without the key can be pruned at any step).
    ``storage``: Optuna storage URL for the bucket studies (None = in memory); ``study_prefix``
    names them ``<prefix>-bucket<k>``.
    """

    _supports_buffered_results = False   # one decision per epoch result
    last_step_key = "search_epochs"      # (also for a scheduler unpickled from a state saved before it existed)

    def __init__(self, *, pruner: str = "median", pruner_kwargs: Mapping[str, Any] | None = None,
                 status_book: TrialStatusBook | None = None, storage: str | None = None,
                 study_prefix: str = "prune", metric: str = "prune_value", step_key: str = "epoch",
                 bucket_key: str = "budget_bucket", phase_key: str = "phase", phase: str = "search",
                 last_step_key: str = "search_epochs") -> None:
        super().__init__()
        make_pruner(pruner, pruner_kwargs)   # validate now, fail before any trial runs
        self.pruner_name, self.pruner_kwargs = pruner, dict(pruner_kwargs or {})
        self.status_book = status_book if status_book is not None else TrialStatusBook()
        self.storage, self.study_prefix = storage, study_prefix
        self.metric_key, self.step_key, self.bucket_key = metric, step_key, bucket_key
        self.phase_key, self.phase = phase_key, phase
        self.last_step_key = last_step_key
        self._studies: dict[int, optuna.Study] = {}
        self._trials: dict[str, tuple[int, optuna.Trial]] = {}
        self._last: dict[str, float] = {}
        self._finished: set[str] = set()

    # -- pickling (Tune pickles the scheduler with the Tuner; Optuna objects are rebuilt lazily) --
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_studies={}, _trials={}, _last={}, _finished=set())
        return state

    # -- bucket studies ----------------------------------------------------------------------------
    def study(self, bucket: int) -> optuna.Study:
        if bucket not in self._studies:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._studies[bucket] = optuna.create_study(
                storage=self.storage, study_name=f"{self.study_prefix}-bucket{bucket}", direction="maximize",
                pruner=make_pruner(self.pruner_name, self.pruner_kwargs),
                sampler=optuna.samplers.RandomSampler(seed=0), load_if_exists=True)
        return self._studies[bucket]

    def _ot_trial(self, trial_id: str, bucket: int) -> optuna.Trial:
        if trial_id in self._trials:
            return self._trials[trial_id][1]
        study = self.study(bucket)
        # A trial restarted after a driver crash: its old Optuna twin never finished; close it first.
        for old in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if old.user_attrs.get(TUNE_TRIAL_ATTR) == trial_id:
                study.tell(old.number, state=TrialState.FAIL)
        ot = study.ask()
        ot.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        self._trials[trial_id] = (bucket, ot)
        return ot

    def _tell(self, trial_id: str, state: TrialState) -> None:
        if trial_id in self._finished or trial_id not in self._trials:
            return
        bucket, ot = self._trials[trial_id]
        value = self._last.get(trial_id)
        try:
            if state == TrialState.COMPLETE and value is not None:
                self.study(bucket).tell(ot, value)
            elif state == TrialState.PRUNED:
                self.study(bucket).tell(ot, state=TrialState.PRUNED)
            else:
                self.study(bucket).tell(ot, state=TrialState.FAIL)
        except (ValueError, RuntimeError) as e:   # e.g. already finished in storage
            log.warning("could not close the pruning twin of trial %s: %s", trial_id, e)
        self._finished.add(trial_id)

    # -- Tune hooks --------------------------------------------------------------------------------
    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if result.get(self.phase_key, self.phase) != self.phase or self.metric_key not in result:
            return decision
        trial_id = trial.trial_id
        if trial_id in self._finished:
            return decision
        value, step = result[self.metric_key], result.get(self.step_key)
        if value is None or step is None or not math.isfinite(float(value)):
            return decision
        bucket = int(result.get(self.bucket_key, 0))
        ot = self._ot_trial(trial_id, bucket)
        self._last[trial_id] = float(value)
        ot.report(float(value), int(step))
        if _at_last_step(step, result.get(self.last_step_key)):
            log.debug("trial %s: %s %d is its last search epoch: not pruned (its search is done)",
                      trial_id, self.step_key, int(step))
            return decision
        if ot.should_prune():
            reason = (f"pruned by {self.pruner_name} at {self.step_key} {int(step)}: {self.metric_key}="
                      f"{float(value):.4g} in budget bucket {bucket}")
            self.status_book.mark_pruned(trial_id, reason)
            self._tell(trial_id, TrialState.PRUNED)
            log.info("trial %s %s", trial_id, reason)
            return TrialScheduler.STOP
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        if self.status_book.is_pruned(trial.trial_id):
            return
        if result and result.get(self.metric_key) is not None and trial.trial_id in self._trials:
            value = float(result[self.metric_key])
            if math.isfinite(value):
                self._last[trial.trial_id] = value
        self._tell(trial.trial_id, TrialState.COMPLETE)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        tid = trial.trial_id
        if tid in self._finished and not self.status_book.is_pruned(tid):
            # a retry after a failed attempt (FailureConfig.max_failures): prune it with a fresh twin
            self._finished.discard(tid)
            self._trials.pop(tid, None)
            self._last.pop(tid, None)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_error(tune_controller, trial)
        self._tell(trial.trial_id, TrialState.FAIL)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_remove(tune_controller, trial)
        if not self.status_book.is_pruned(trial.trial_id):
            self._tell(trial.trial_id, TrialState.FAIL)

    def debug_string(self) -> str:
        return f"Using Optuna {self.pruner_name} pruning per budget bucket ({len(self._studies)} buckets seen)."
