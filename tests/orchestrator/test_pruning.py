"""The Optuna pruning adapter inside a real Tune run (real local Ray, real optuna pruners)."""
from __future__ import annotations

import pytest

from gmpq_core.errors import ConfigError
from orchestrator.pruning import PRUNERS, OptunaPruningScheduler, make_pruner
from orchestrator.trial_status import TrialStatusBook

N_EPOCHS = 4


def test_make_pruner_knows_every_name_and_rejects_bad_ones():
    import optuna

    expected = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
                "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
                "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}
    assert set(PRUNERS) == set(expected)
    for name in PRUNERS:
        kwargs = {"percentile": 25.0} if name == "percentile" else {}
        assert type(make_pruner(name, kwargs)) is expected[name]          # the named pruner, not any object
    assert make_pruner("percentile", {"percentile": 25.0})._percentile == 25.0     # its arguments reach it
    with pytest.raises(ConfigError, match="Unknown pruner 'medain'.*median"):
        make_pruner("medain")
    with pytest.raises(ConfigError, match="n_startup_trails"):
        make_pruner("median", {"n_startup_trails": 1})


def test_status_book_persists_and_survives_pickling(tmp_path):
    import pickle

    book = TrialStatusBook(tmp_path / "status.json")
    book.mark_pruned("t1", "weak")
    assert TrialStatusBook(tmp_path / "status.json").status_of("t1") == "pruned"
    clone = pickle.loads(pickle.dumps(book))
    assert clone.status_of("t1") == "pruned" and clone.status_of("t2") == "completed"
    assert clone.status_of("t1", errored=True) == "failed"


def _curve_trainable(config):
    """Controlled learning curves: accuracy = base + epoch (strong base 80, weak base 10)."""
    from ray import tune

    for epoch in range(N_EPOCHS):
        tune.report({"phase": "search", "epoch": epoch, "prune_value": config["case"]["base"] + epoch,
                     "budget_bucket": config["case"]["bucket"], "case": config["case"]["name"]})


@pytest.fixture(scope="module")
def ray_local():
    import sys

    from ray import cloudpickle

    from orchestrator.ray_env import ray_session

    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import test modules
    with ray_session(num_cpus=2):
        yield


@pytest.mark.ray
def test_weak_trial_is_pruned_and_strong_ones_are_kept(ray_local, tmp_path):
    from ray import tune

    book = TrialStatusBook()
    scheduler = OptunaPruningScheduler(pruner="median", pruner_kwargs={"n_startup_trials": 1, "n_warmup_steps": 1},
                                       status_book=book)
    cases = [{"name": "strong", "base": 80, "bucket": 0},
             {"name": "weak", "base": 10, "bucket": 0},          # worse than the median of bucket 0: pruned
             {"name": "weak_alone", "base": 10, "bucket": 1},    # same curve, but alone in its bucket: kept
             {"name": "strong_again", "base": 81, "bucket": 0}]  # above the median: kept
    tuner = tune.Tuner(_curve_trainable, param_space={"case": tune.grid_search(cases)},
                       tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=1, max_concurrent_trials=1,
                                                   reuse_actors=True),
                       run_config=tune.RunConfig(name="pruning", storage_path=str(tmp_path), verbose=0))
    grid = tuner.fit()
    by_case = {r.config["case"]["name"]: r for r in grid}
    epochs_run = {name: r.metrics["epoch"] for name, r in by_case.items()}
    # n_warmup_steps=1: the first chance to prune is epoch 1 (steps 0 and 1 are reported first)
    assert epochs_run == {"strong": N_EPOCHS - 1, "weak": 1, "weak_alone": N_EPOCHS - 1,
                          "strong_again": N_EPOCHS - 1}
    pruned = {by_case[n].metrics["trial_id"] for n in by_case if book.is_pruned(by_case[n].metrics["trial_id"])}
    assert pruned == {by_case["weak"].metrics["trial_id"]}
    assert "bucket 0" in book.reason(by_case["weak"].metrics["trial_id"])
    assert all(r.error is None for r in grid)
    # the bucket studies saw the trials as Optuna trials: 3 in bucket 0 (one pruned), 1 in bucket 1
    states0 = sorted(t.state.name for t in scheduler.study(0).trials)
    assert states0 == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert [t.state.name for t in scheduler.study(1).trials] == ["COMPLETE"]


def test_a_misspelt_pruner_argument_is_named_with_the_pruners_arguments():
    from orchestrator.pruning import make_pruner

    with pytest.raises(ConfigError, match=r"takes no argument\(s\) \['n_startup'\]\. Did you mean 'n_startup_trials'.*"
                                          r"Its arguments: n_startup_trials, n_warmup_steps"):
        make_pruner("median", {"n_startup": 1})


class _Trial:
    """What the scheduler reads of a Tune trial: its id (the decisions themselves are the real Optuna pruner's)."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def _epochs(scheduler, trial, base: float, epochs: int, *, last: int | None) -> list[str]:
    """Feed ``epochs`` search epochs (1-based, value base + epoch) of a trial whose search has ``last`` epochs."""
    said = []
    for epoch in range(1, epochs + 1):
        result = {"phase": "search", "epoch": epoch, "prune_value": base + epoch, "budget_bucket": 0}
        if last is not None:
            result["search_epochs"] = last
        said.append(scheduler.on_trial_result(None, trial, result))
        if said[-1] == "STOP":
            break
    return said


def test_a_trial_is_not_pruned_at_its_last_search_epoch_but_is_before_it():
    # the pruner (median, first decision at epoch 3) would stop the weak trials at epoch 3: the one whose
    # search ends there keeps its finished search; the one with a 4th epoch to run is stopped as before
    book = TrialStatusBook()
    scheduler = OptunaPruningScheduler(pruner="median", pruner_kwargs={"n_startup_trials": 1, "n_warmup_steps": 3},
                                       status_book=book)
    strong, done_weak, longer_weak, unknown_weak = (_Trial(t) for t in ("strong", "done_weak", "longer", "unknown"))
    assert _epochs(scheduler, strong, 80, 3, last=3) == ["CONTINUE"] * 3
    scheduler.on_trial_complete(None, strong, {"phase": "transfer", "epoch": 3, "prune_value": 83.0})
    assert _epochs(scheduler, done_weak, 10, 3, last=3) == ["CONTINUE"] * 3        # epoch 3 of 3: kept
    assert not book.is_pruned("done_weak")
    scheduler.on_trial_complete(None, done_weak, {"phase": "transfer", "epoch": 3, "prune_value": 13.5})
    assert _epochs(scheduler, longer_weak, 10, 3, last=4) == ["CONTINUE", "CONTINUE", "STOP"]   # epoch 3 of 4
    assert book.is_pruned("longer") and "at epoch 3" in book.reason("longer")
    assert _epochs(scheduler, unknown_weak, 10, 3, last=None)[-1] == "STOP"    # no epoch count: pruned as before
    # the pruning study's records: the kept trial COMPLETE with its final value and its last epoch's report
    by_tune_id = {t.user_attrs["tune_trial_id"]: t for t in scheduler.study(0).trials}
    assert {k: t.state.name for k, t in by_tune_id.items()} == {
        "strong": "COMPLETE", "done_weak": "COMPLETE", "longer": "PRUNED", "unknown": "PRUNED"}
    assert by_tune_id["done_weak"].value == 13.5 and by_tune_id["done_weak"].intermediate_values == {1: 11, 2: 12, 3: 13}


def _search_then_transfer_trainable(config):
    """A trial of ``epochs`` search epochs (accuracy = base + epoch) and then its transfer check (the final report)."""
    from ray import tune

    case = config["case"]
    for epoch in range(1, case["epochs"] + 1):
        tune.report({"phase": "search", "epoch": epoch, "prune_value": case["base"] + epoch, "budget_bucket": 0,
                     "search_epochs": case["epochs"]})
    tune.report({"phase": "transfer", "epoch": case["epochs"], "prune_value": case["base"] + case["epochs"],
                 "transfer_top1": 50.0, "budget_bucket": 0, "done": True})


@pytest.mark.ray
def test_a_trial_whose_search_is_done_runs_its_transfer_check_in_a_real_tune_run(ray_local, tmp_path):
    from ray import tune

    book = TrialStatusBook()
    scheduler = OptunaPruningScheduler(pruner="median", pruner_kwargs={"n_startup_trials": 1,
                                                                       "n_warmup_steps": N_EPOCHS},
                                       status_book=book)
    cases = [{"name": "strong", "base": 80, "epochs": N_EPOCHS},
             {"name": "weak_done", "base": 10, "epochs": N_EPOCHS},          # below the median at its last epoch
             {"name": "weak_longer", "base": 10, "epochs": N_EPOCHS + 1}]    # the same, with an epoch left to run
    tuner = tune.Tuner(_search_then_transfer_trainable, param_space={"case": tune.grid_search(cases)},
                       tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=1, max_concurrent_trials=1,
                                                   reuse_actors=True),
                       run_config=tune.RunConfig(name="last_epoch", storage_path=str(tmp_path), verbose=0))
    by_case = {r.config["case"]["name"]: r for r in tuner.fit()}
    assert all(r.error is None for r in by_case.values())
    assert by_case["weak_done"].metrics.get("transfer_top1") == 50.0              # its transfer check ran
    assert by_case["weak_longer"].metrics["epoch"] == N_EPOCHS and "transfer_top1" not in by_case["weak_longer"].metrics
    pruned = {name for name, r in by_case.items() if book.is_pruned(r.metrics["trial_id"])}
    assert pruned == {"weak_longer"}
    states = {t.user_attrs["tune_trial_id"]: t.state.name for t in scheduler.study(0).trials}
    assert {name: states[r.metrics["trial_id"]] for name, r in by_case.items()} == {
        "strong": "COMPLETE", "weak_done": "COMPLETE", "weak_longer": "PRUNED"}
