"""A resumed sweep given more trials (``orchestrator.sweep_grow``): Ray Tune's restored trial count raised by
``GrowingSearch`` (real Ray search-generator state, no cluster), what a resume may change in ``n_trials``
(``sweep_resume._check_same_config``: grow yes, shrink and Ray Client no) and the lines that name the count. The real
sweep that grows: test_sweep_grow_ray.py."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
from ray import tune
from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher

from gmpq_core.errors import ConfigError
from orchestrator.results import trial_row, write_results
from orchestrator.sweep_config import load_sweep_config, save_resolved_config
from orchestrator.sweep_grow import GrowingSearch, RestoreFailed, grow_restored, reselect_text
from orchestrator.sweep_resume import _check_same_config


class _Fixed(Searcher):
    """A searcher of one point that Tune can save and restore (as OptunaSearch is, with its study)."""

    def __init__(self) -> None:
        super().__init__(metric="x", mode="max")
        self.told = 0

    def suggest(self, trial_id: str) -> dict:
        return {"x": 1}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.told += 1

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"told": self.told}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.told = pickle.load(f)["told"]


def _saved_sweep_state(folder, n: int) -> None:
    """The searcher state Tune saves for a sweep of ``n`` trials that created all of them (tune.run's wrapping:
    SearchGenerator(ConcurrencyLimiter(searcher)))."""
    searcher = _Fixed()
    searcher.told = n
    gen = SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=2))
    gen.set_state({"counter": n, "total_samples": n, "finished": False, "experiment": None})
    gen.save_to_dir(str(folder), session_str="s1")


def test_a_restored_trial_count_is_raised_to_the_configs_never_lowered(tmp_path):
    """Tune restores total_samples from the saved state whatever num_samples says: Ray's own generator finds the
    sweep finished; GrowingSearch restores it (counter, searcher state) and raises the count."""
    _saved_sweep_state(tmp_path, 2)
    plain = SearchGenerator(ConcurrencyLimiter(_Fixed(), max_concurrent=2))
    plain.restore_from_dir(str(tmp_path))
    assert plain.total_samples == 2 and plain.is_finished()            # what a resume did before

    grown = GrowingSearch(ConcurrencyLimiter(_Fixed(), max_concurrent=2), 3)
    grown.restore_from_dir(str(tmp_path))
    assert (grown.total_samples, grown.restored_total, grown.is_finished()) == (3, 2, False)
    assert grown.searcher.searcher.told == 2                            # the searcher's own state restored too
    for n in (2, 1):                                                   # as many or fewer: Tune's count stays
        same = GrowingSearch(ConcurrencyLimiter(_Fixed(), max_concurrent=2), n)
        same.restore_from_dir(str(tmp_path))
        assert same.total_samples == 2 and same.is_finished()


def test_a_growing_search_refuses_to_start_a_sweep_afresh():
    """Tune starts an experiment afresh (add_configurations) only when its restore failed: that would run the sweep
    again from its first trial in the same folder."""
    with pytest.raises(RestoreFailed, match="could not restore the sweep's experiment state"):
        GrowingSearch(_Fixed(), 3).add_configurations({})          # a ConfigError: run_sweep words it, exit 2


def test_grow_restored_wraps_the_restored_searcher_as_tune_run_would():
    searcher = _Fixed()
    tc = tune.TuneConfig(search_alg=searcher, num_samples=2, max_concurrent_trials=2)
    assert grow_restored(tc, 3)
    alg = tc.search_alg
    assert isinstance(alg, GrowingSearch) and alg.n_trials == 3 and tc.num_samples == 3
    assert isinstance(alg.searcher, ConcurrencyLimiter) and alg.searcher.max_concurrent == 2
    assert alg.searcher.searcher is searcher and tc.max_concurrent_trials is None
    assert grow_restored(tc, 4) and tc.search_alg is alg and alg.n_trials == 4          # once wrapped: the count
    plain = tune.TuneConfig(search_alg=searcher, num_samples=2)
    assert grow_restored(plain, 3) and plain.search_alg.searcher is searcher            # no limit: no limiter
    assert not grow_restored(tune.TuneConfig(), 3)                                      # no searcher of gmpq's


def _demo(tmp_path, **overrides):
    return load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), **overrides})


def _ended(tmp_path, n: int) -> None:
    write_results(tmp_path, [trial_row(trial_id=f"t{i}", config={"budget_avg_bits": 3.0}, status="completed",
                                       last_result={"transfer_top1": 70.0}) for i in range(n)], [])


def test_a_resume_may_grow_the_sweep_and_writes_nothing_while_checking(tmp_path):
    path = save_resolved_config(_demo(tmp_path))
    before = path.read_text()
    assert _check_same_config(_demo(tmp_path, n_trials=12).resolved()) == 6           # the saved count
    assert _check_same_config(_demo(tmp_path).resolved()) is None                     # the same count
    assert path.read_text() == before


def test_a_resume_with_fewer_trials_is_refused_naming_how_many_ended(tmp_path):
    save_resolved_config(_demo(tmp_path))
    _ended(tmp_path, 4)
    with pytest.raises(ConfigError) as e:
        _check_same_config(_demo(tmp_path, n_trials=3).resolved())
    said = " ".join(str(e.value).split())
    assert "--n-trials 3 is fewer than the 6 trials the sweep" in said and "(4 of them have ended already)" in said
    assert "Resume with --n-trials 6 or more" in said


def test_a_resume_with_fewer_trials_after_all_ended_names_a_count_that_runs_more(tmp_path):
    """All 6 ended: --n-trials 6 would run nothing, so the refusal names 7."""
    save_resolved_config(_demo(tmp_path))
    _ended(tmp_path, 6)
    with pytest.raises(ConfigError) as e:
        _check_same_config(_demo(tmp_path, n_trials=3).resolved())
    said = " ".join(str(e.value).split())
    assert "(all 6 have ended)" in said and "Resume with --n-trials 7 or more to run more" in said
    assert "--n-trials 6 or more" not in said


def test_a_resume_changing_other_settings_is_refused_whatever_the_count(tmp_path):
    save_resolved_config(_demo(tmp_path))
    with pytest.raises(ConfigError) as e:
        _check_same_config(_demo(tmp_path, n_trials=12, seed=3).resolved())
    said = " ".join(str(e.value).split())
    assert "seed (saved 0, now 3)" in said and "n_trials" not in said and "--n-trials may grow" in said
    with pytest.raises(ConfigError) as e:
        _check_same_config(_demo(tmp_path, n_trials=3, seed=3).resolved())
    said = " ".join(str(e.value).split())
    assert "seed (saved 0, now 3) (and --n-trials 3: a resumed sweep may run more trials than its 6, not fewer)" in said


def test_growing_through_ray_client_is_refused(tmp_path):
    save_resolved_config(_demo(tmp_path, address="ray://head:10001"))
    with pytest.raises(ConfigError) as e:
        _check_same_config(_demo(tmp_path, n_trials=12, address="ray://head:10001").resolved())
    said = " ".join(str(e.value).split())
    assert "--n-trials 12 would grow the sweep" in said and "from 6 trials" in said
    assert "through Ray Client (ray://head:10001)" in said and "--address auto" in said
    assert _check_same_config(_demo(tmp_path, address="ray://head:10001").resolved()) is None   # same count: resumes


def test_growing_through_ray_client_named_by_ray_address_is_refused_up_front_too(tmp_path, monkeypatch):
    """--address auto follows $RAY_ADDRESS: a ray:// one is Ray Client, refused here as --address ray:// is (it used
    to pass this check and fail only once Ray started); the fix says to unset the variable."""
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    save_resolved_config(_demo(tmp_path, address="auto"))
    with pytest.raises(ConfigError) as e:
        _check_same_config(_demo(tmp_path, n_trials=12, address="auto").resolved())
    said = " ".join(str(e.value).split())
    assert "--n-trials 12 would grow the sweep" in said and "or resume here with --n-trials 6" in said
    assert "through Ray Client (--address auto, from $RAY_ADDRESS=ray://head:10001)" in said
    assert "from the head node (--address auto there, with $RAY_ADDRESS unset" in said
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")                  # a GCS address: a driver there, it grows
    assert _check_same_config(_demo(tmp_path, n_trials=12, address="auto").resolved()) == 6


def test_growing_past_the_spaces_distinct_configurations_is_refused(tmp_path):
    space = {"proxy_size": [100], "search_epochs": 1, "budget_avg_bits": [3.0, 4.0], "eta": 10.0, "lam": 1e-4,
             "p_mode": "fixed", "kappa": 16.0, "lr_arch": 1.0}
    save_resolved_config(_demo(tmp_path, n_trials=2, space=space))
    with pytest.raises(ConfigError, match="at most 2 distinct configurations"):
        _check_same_config(_demo(tmp_path, n_trials=3, space=space).resolved())


def test_the_summary_of_a_grown_sweep_run_says_it_selects_again(tmp_path):
    from orchestrator.commands.sweep import format_summary

    summary = SimpleNamespace(rows=[], n_completed=3, n_pruned=0, n_failed=0, wall_seconds=60, sweep_dir=tmp_path,
                              interrupted=False, n_planned=3, grown_from=2)
    assert "Pareto" not in format_summary(summary, command="gmpq run")               # no selection yet
    (tmp_path / "pareto.parquet").write_bytes(b"")
    said = " ".join(format_summary(summary, command="gmpq run").split())
    assert "The sweep grew from 2 to 3 trials: the Pareto front and its selection are made again" in said
    assert reselect_text(tmp_path / "none", 2, 3) is None


def test_a_finished_sweep_says_how_to_run_more_trials_only_when_it_can_grow(tmp_path, capsys):
    """gmpq sweep --check and --resume on a finished sweep: it ran all its trials, and --n-trials grows it, which
    needs its Tune state (ray_results/ deleted: no hint)."""
    import ray

    from orchestrator.commands.sweep import check_only
    from orchestrator.sweep import experiment_path, run_sweep

    if ray.is_initialized():
        pytest.skip("Ray already runs in this test process")
    save_resolved_config(_demo(tmp_path, n_trials=2))
    _ended(tmp_path, 2)
    cfg = load_sweep_config(tmp_path / "sweep_config.yaml")
    said = " ".join(check_only(cfg, True).split())
    assert "already ran all its 2 trials" in said and "larger count" not in said         # no Tune state: no growing
    run_sweep(cfg, resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert "nothing to resume" in err and "larger count" not in err

    tune.Tuner(_noop, run_config=tune.RunConfig(name=cfg.name, storage_path=str(tmp_path / "ray_results")))
    assert tune.Tuner.can_restore(experiment_path(cfg.resolved()))                     # (its Tune state: tuner.pkl)
    said = " ".join(check_only(cfg, True).split())
    assert "resume it with a larger count (e.g. --resume --n-trials 4) in the same Optuna study, but its sampler draws " \
           "all 4 at random (its first 10 trials are random: n_startup_trials=10)" in said     # demo: 10 random first
    run_sweep(cfg, resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert "nothing to resume; to run more trials, resume it with a larger count (e.g. --resume --n-trials 4)" in err
    assert "learning" not in err and not ray.is_initialized()


def _noop(config):
    return None
