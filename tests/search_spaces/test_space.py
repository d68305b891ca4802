"""Search spaces as data: dimensions, YAML shorthands, conditions, Optuna define-by-run, buckets."""
from __future__ import annotations

import optuna
import pytest

from gmpq_core.errors import ConfigError
from search_spaces.space import (PARAMS, Categorical, Fixed, FloatDim, IntDim, SearchSpace, bucket_label, bucket_of,
                                 dim_from_any)

SPACE = {"budget_avg_bits": {"type": "float", "low": 2.5, "high": 5.0},
         "proxy_size": [500, 1000],
         "eta": {"type": "float", "low": 1, "high": 100, "log": True},
         "p_mode": ["capacity", "fixed"],
         "kappa": {"type": "float", "low": 8, "high": 48},
         "p_fixed": 3.0,
         "search_epochs": 2}


def test_yaml_shorthands_build_the_right_dimensions():
    assert dim_from_any("eta", 3.0) == Fixed(value=3.0)
    assert dim_from_any("p_mode", ["capacity"]) == Categorical(choices=("capacity",))
    assert dim_from_any("eta", {"type": "float", "low": 1, "high": 2, "log": True}) == FloatDim(low=1, high=2, log=True)
    assert dim_from_any("search_epochs", {"type": "int", "low": 1, "high": 3}) == IntDim(low=1, high=3)


@pytest.mark.parametrize("raw, match", [
    ({"type": "float", "low": 5, "high": 1}, "low <= high"),
    ({"type": "float", "low": 0, "high": 1, "log": True}, "low > 0"),
    ({"type": "gauss", "low": 0}, "type one of"),
    ({"type": "categorical", "choices": []}, "non-empty"),
    ({"type": "float", "low": 1, "hi": 2}, "unknown field"),
])
def test_bad_dimensions_are_rejected_with_the_value(raw, match):
    with pytest.raises(ConfigError, match=match):
        dim_from_any("eta", raw)


def test_space_checks_names_and_values():
    with pytest.raises(ConfigError, match="Unknown search-space parameter 'etta'.*eta"):
        SearchSpace.from_dict({"etta": 1.0})
    with pytest.raises(ConfigError, match="'eta'.*must be > 0.*-1"):
        SearchSpace.from_dict({"eta": {"type": "float", "low": -1, "high": 1}})
    with pytest.raises(ConfigError, match="'p_mode' must be one of"):
        SearchSpace.from_dict({"p_mode": ["capacity", "adaptive"]})
    with pytest.raises(ConfigError, match="integer"):
        SearchSpace.from_dict({"search_epochs": {"type": "float", "low": 1, "high": 3}})


def test_round_trip_and_canonical_order():
    sp = SearchSpace.from_dict(dict(reversed(list(SPACE.items()))))
    assert list(sp.dims) == [n for n in PARAMS if n in SPACE]   # p_mode before kappa/p_fixed
    assert SearchSpace.from_dict(sp.to_dict()) == sp
    assert sp.varying() == ["budget_avg_bits", "proxy_size", "eta", "p_mode", "kappa"]
    assert sp.possible_values("proxy_size") == (500, 1000) and sp.possible_values("eta") is None


def test_kappa_is_sampled_only_in_capacity_mode():
    sp = SearchSpace.from_dict(SPACE)
    cap = sp.sample(optuna.trial.FixedTrial({"budget_avg_bits": 3.0, "proxy_size": 500, "eta": 10.0,
                                             "p_mode": "capacity", "kappa": 20.0}))
    assert cap["kappa"] == 20.0 and "p_fixed" not in cap
    fixed = sp.sample(optuna.trial.FixedTrial({"budget_avg_bits": 3.0, "proxy_size": 500, "eta": 10.0,
                                               "p_mode": "fixed"}))
    assert fixed["p_fixed"] == 3.0 and "kappa" not in fixed


def test_define_by_run_drives_a_real_optuna_study():
    sp = SearchSpace.from_dict(SPACE)
    fn = sp.define_by_run()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), pruner=optuna.pruners.NopPruner())
    seen_modes = set()
    for _ in range(12):
        trial = study.ask()
        constants = fn(trial)
        assert constants == {"search_epochs": 2} | ({"p_fixed": 3.0} if trial.params["p_mode"] == "fixed" else {})
        assert 2.5 <= trial.params["budget_avg_bits"] <= 5.0 and 1 <= trial.params["eta"] <= 100
        assert ("kappa" in trial.params) == (trial.params["p_mode"] == "capacity")
        seen_modes.add(trial.params["p_mode"])
        study.tell(trial, 0.0)
    assert seen_modes == {"capacity", "fixed"}


def test_first_point_is_deterministic():
    sp = SearchSpace.from_dict(SPACE)
    assert sp.first_point() == {"budget_avg_bits": 2.5, "proxy_size": 500, "eta": 1.0, "p_mode": "capacity",
                                "kappa": 8.0, "search_epochs": 2}


def test_budget_buckets():
    edges = [2.75, 3.5, 4.5]
    assert [bucket_of(b, edges) for b in (2.0, 2.75, 3.0, 3.5, 4.49, 6.0)] == [0, 1, 1, 2, 2, 3]
    assert bucket_of(5.0, []) == 0
    assert bucket_label(0, edges) == "< 2.75" and bucket_label(2, edges) == "[3.5, 4.5)"
    assert bucket_label(3, edges) == ">= 4.5"


def test_define_by_run_pickles():   # Tune saves its searcher (and this function) with plain pickle
    import pickle

    fn = pickle.loads(pickle.dumps(SearchSpace.from_dict(SPACE).define_by_run()))
    assert fn(optuna.trial.FixedTrial({"budget_avg_bits": 3.0, "proxy_size": 500, "eta": 2.0,
                                       "p_mode": "fixed"})) == {"p_fixed": 3.0, "search_epochs": 2}


def test_dimension_errors_name_the_dimension_and_the_misspelt_field():
    from gmpq_core.errors import ConfigError
    from search_spaces.space import dim_from_any

    with pytest.raises(ConfigError, match=r"Dimension 'proxy_size': A categorical dimension needs a non-empty list"):
        dim_from_any("proxy_size", [])
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['hgh'\]\. Did you mean 'high' \(not 'hgh'\)\? "
                                          r"Its fields: \['high', 'log', 'low'\]"):
        dim_from_any("eta", {"type": "float", "low": 1, "hgh": 100, "log": True})
