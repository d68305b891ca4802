"""The sweep's Optuna sampler as a config section (``sampler: {name, kwargs}``): each one drives the sweep's real
multi-objective searcher over the demo space, bad names and arguments are one paragraph, a resume keeps it."""
from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from gmpq_core.errors import ConfigError
from orchestrator.sampling import SAMPLERS, make_sampler, warmup_text, with_defaults
from orchestrator.sweep import OBJECTIVES, SweepOptunaSearch
from orchestrator.sweep_config import SamplerConfig, load_sweep_config, save_resolved_config
from orchestrator.sweep_resume import _check_same_config

from demo_config import config_error, demo_cfg   # same folder (pytest puts it on sys.path)


_cfg, _error = demo_cfg, config_error


SMALL_START = {"tpe": {"n_startup_trials": 2}, "random": {}, "nsga2": {"population_size": 4}, "qmc": {},
               "gp": {"n_startup_trials": 2}}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_each_sampler_suggests_the_sweep_trials_within_the_space_and_takes_both_objectives(name):
    cfg = _cfg(sampler={"name": name, "kwargs": SMALL_START[name]})
    searcher = SweepOptunaSearch(space=cfg.space.define_by_run(), metric=[m for m, _ in OBJECTIVES],
                                 mode=[d for _, d in OBJECTIVES], sampler=make_sampler(
                                     cfg.sampler.name, cfg.sampler.kwargs, seed=cfg.seed))
    assert type(searcher._sampler).__name__ == SAMPLERS[name][0]
    seen = []
    for i in range(7):
        config = searcher.suggest(f"t{i}")
        assert 2.5 <= config["budget_avg_bits"] <= 5.0 and config["proxy_size"] in (500, 1000)
        assert 1 <= config["eta"] <= 100 and config["p_mode"] in ("capacity", "fixed")
        seen.append(config["budget_avg_bits"])
        searcher.on_trial_complete(f"t{i}", {"transfer_top1": 60 + 5 * config["budget_avg_bits"],
                                             "bitops": 1e8 * config["budget_avg_bits"] ** 2})
    assert len(set(seen)) > 1                                      # not one point over and over
    assert len(searcher._ot_study.get_trials()) == 7
    assert all(len(t.values) == 2 for t in searcher._ot_study.get_trials())


def test_the_sampler_is_seeded_by_the_config_seed():
    def first_budgets(seed: int) -> list[float]:
        searcher = SweepOptunaSearch(space=_cfg().space.define_by_run(), metric=[m for m, _ in OBJECTIVES],
                                     mode=[d for _, d in OBJECTIVES], sampler=make_sampler("random", seed=seed))
        return [searcher.suggest(f"t{i}")["budget_avg_bits"] for i in range(3)]
    assert first_budgets(3) == first_budgets(3) != first_budgets(4)


def test_the_default_is_tpe_with_optunas_defaults_and_the_config_round_trips(tmp_path):
    assert _cfg(sampler=None).sampler.name == "tpe" and _cfg(sampler=None).sampler.kwargs == {}
    cfg = _cfg(out_dir=str(tmp_path / "s"), sampler={"name": "nsga2", "kwargs": {"population_size": 8}})
    save_resolved_config(cfg)
    saved = yaml.safe_load((tmp_path / "s" / "sweep_config.yaml").read_text())
    assert saved["sampler"] == {"name": "nsga2", "kwargs": {"population_size": 8}}
    again = load_sweep_config(tmp_path / "s" / "sweep_config.yaml")
    assert again.sampler == cfg.sampler


def test_unknown_sampler_lists_the_choices():
    said = _error(sampler={"name": "cmaes"})
    assert "Unknown sampler 'cmaes'" in said and "tpe (TPESampler" in said and "nsga2 (NSGAIISampler" in said
    assert "sampler: {name: tpe, kwargs: {n_startup_trials: 4}}" in said
    assert "Did you mean 'tpe'" in _error(sampler={"name": "tpee"}) or "'tpe'" in _error(sampler={"name": "tpee"})


def test_bad_sampler_arguments_are_named_with_the_fix():
    said = _error(sampler={"name": "tpe", "kwargs": {"n_startup": 3}})
    assert "takes no argument(s) ['n_startup']" in said and "n_startup_trials" in said
    said = _error(sampler={"name": "tpe", "kwargs": {"seed": 3}})
    assert "sampler.kwargs.seed=3" in said and "'seed' (top level of the config, or --seed)" in said
    said = _error(sampler={"name": "tpe", "kwargs": {"n_startup_trials": "3"}})
    assert "sampler.kwargs.n_startup_trials must be int, but got '3' (str)" in said
    said = _error(sampler={"name": "tpe", "kwargs": {"multivariate": 1}})
    assert "sampler.kwargs.multivariate must be bool" in said
    said = _error(sampler={"name": "qmc", "kwargs": {"qmc_type": "latin"}})
    assert "Bad arguments for the 'qmc' sampler (QMCSampler)" in said and "halton" in said and ".." not in said
    said = _error(sampler={"name": "random", "n_startup_trials": 3})
    assert "A sampler's own arguments go under 'kwargs': sampler: {name: random, kwargs: {n_startup_trials: 3}}" in said


def test_no_experimental_or_slow_space_warning(recwarn):
    make_sampler("qmc", seed=0)
    make_sampler("gp", seed=0)
    assert not [w for w in recwarn if "experimental" in str(w.message)]
    test_each_sampler_suggests_the_sweep_trials_within_the_space_and_takes_both_objectives("gp")   # a GP's fit
    assert not [w for w in recwarn if "Define-by-run" in str(w.message)]


def test_warmup_line_when_every_trial_would_be_random():
    said = warmup_text("tpe", {}, 6)
    assert said and "first 10 trials are random" in said and "this sweep has 6" in said
    assert "sampler: {name: tpe, kwargs: {n_startup_trials: 3}}" in said
    assert warmup_text("tpe", {}, 11) is None
    assert warmup_text("tpe", {"n_startup_trials": 10}, 6) is None          # chosen knowingly (the demo)
    assert "population_size=50" in warmup_text("nsga2", {}, 48)
    assert warmup_text("random", {}, 3) is None


def test_a_sweep_start_warns_when_every_trial_is_random(tmp_path, caplog):
    from orchestrator.sweep_checks import check_sweep_config

    cfg = replace(_cfg(out_dir=str(tmp_path / "s"), cache_dir=str(tmp_path / "c")), sampler=SamplerConfig())
    with caplog.at_level("WARNING"):
        check_sweep_config(cfg, make_folders=False)
    assert "every trial is drawn at random" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_sweep_config(_cfg(out_dir=str(tmp_path / "t"), cache_dir=str(tmp_path / "c")), make_folders=False)
    assert "drawn at random" not in caplog.text                              # the demo preset sets the count


def test_resume_refuses_another_sampler_and_takes_a_default_written_out(tmp_path):
    out = str(tmp_path / "s")
    save_resolved_config(replace(_cfg(out_dir=out), sampler=SamplerConfig()))       # TPE, no argument written
    assert yaml.safe_load((tmp_path / "s" / "sweep_config.yaml").read_text())["sampler"]["kwargs"] == {}
    _check_same_config(_cfg(out_dir=out, sampler={"name": "tpe", "kwargs": {"n_startup_trials": 10}}).resolved())
    with pytest.raises(ConfigError) as e:
        _check_same_config(_cfg(out_dir=out, sampler={"name": "random", "kwargs": {}}).resolved())
    assert "sampler.name (saved tpe, now random)" in " ".join(str(e.value).split())
    assert with_defaults("tpe", {})["n_startup_trials"] == 10



def test_a_folder_saved_before_the_sampler_section_resumes_with_the_demo_preset(tmp_path):
    out = tmp_path / "s"
    save_resolved_config(_cfg(out_dir=str(out)))
    saved = yaml.safe_load((out / "sweep_config.yaml").read_text())
    del saved["sampler"]                                               # as sweeps saved it before the section
    (out / "sweep_config.yaml").write_text(yaml.safe_dump(saved))
    assert load_sweep_config(out / "sweep_config.yaml").sampler == SamplerConfig()
    _check_same_config(_cfg(out_dir=str(out)).resolved())              # demo: n_startup_trials 10 written out


def test_a_sampler_given_by_name_alone_says_how_to_write_it():
    said = _error(sampler="nsga2")
    assert "'sampler' must be a mapping, but got 'nsga2'. Write it as sampler: {name: nsga2}." in said


def test_the_gp_sampler_finds_greenlet_and_does_not_warn_of_slower_suggestions():
    """Optuna's GP sampler batches its acquisition optimisation with greenlet (a dependency of ours); without it,
    Optuna logs "The 'greenlet' package is unavailable ... slower suggestions" when the GP sampler first runs."""
    import subprocess
    import sys

    code = ("import importlib.util, optuna\n"
            "spec = importlib.util.find_spec('optuna._gp.batched_lbfgsb')\n"
            "if spec: importlib.import_module('optuna._gp.batched_lbfgsb')\n"
            "print('module' if spec else 'none')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "none":
        pytest.skip("this Optuna has no batched GP optimiser")
    assert "greenlet" not in done.stderr
