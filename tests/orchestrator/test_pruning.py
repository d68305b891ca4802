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
