"""A resume compares the sampler by effective values: an argument Optuna's signature keeps as a None placeholder
(TPE's ``multivariate``) written out at the value Optuna picks for the sweep's two objectives is no change."""
from __future__ import annotations

import warnings
from dataclasses import replace

import optuna
import pytest
import yaml

from gmpq_core.errors import ConfigError
from orchestrator.cli import main
from orchestrator.results import trial_row, write_results
from orchestrator.sampling import make_sampler, with_defaults
from orchestrator.sweep_config import SamplerConfig, save_resolved_config
from orchestrator.sweep_resume import _check_same_config

from demo_config import demo_cfg   # same folder (pytest puts it on sys.path)


def _saved(tmp_path, kwargs: dict) -> str:
    """A sweep folder whose saved config has the TPE sampler with ``kwargs`` (as written)."""
    out = str(tmp_path / "s")
    save_resolved_config(replace(demo_cfg(out_dir=out), sampler=SamplerConfig(name="tpe", kwargs=kwargs)))
    assert yaml.safe_load((tmp_path / "s" / "sweep_config.yaml").read_text())["sampler"]["kwargs"] == kwargs
    return out


def _resume(out: str, kwargs: dict) -> None:
    _check_same_config(replace(demo_cfg(out_dir=out), sampler=SamplerConfig(name="tpe", kwargs=kwargs)).resolved())


@pytest.mark.parametrize("saved, now", [({}, {"multivariate": False}), ({"multivariate": False}, {}),
                                        ({"group": True}, {"group": True, "multivariate": True}),
                                        ({"group": True, "multivariate": True}, {"group": True})])
def test_resume_takes_tpe_multivariate_written_as_its_effective_default(tmp_path, saved, now):
    _resume(_saved(tmp_path, saved), now)


def test_resume_refuses_tpe_multivariate_turned_on(tmp_path):
    out = _saved(tmp_path, {})
    with pytest.raises(ConfigError) as e:
        _resume(out, {"multivariate": True})
    said = " ".join(str(e.value).split())
    assert "--resume must use the sweep's saved config, but these settings differ" in said, said
    assert "sampler.kwargs.multivariate (saved False, now True)" in said, said


def _suggestions(sampler: optuna.samplers.BaseSampler) -> list[tuple[float, float]]:
    """Eight trials' parameters on a two-objective study, as the sweep's (maximize, minimize)."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # group without multivariate: Optuna's notice per trial
        study.optimize(lambda t: (t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1),
                                  t.params["x"] * t.params["y"]), n_trials=8)
    return [(t.params["x"], t.params["y"]) for t in study.trials]


@pytest.mark.parametrize("group", [False, True])
def test_the_effective_multivariate_is_what_optuna_does_for_two_objectives(group):
    """Reference: the value ``with_defaults`` writes out draws the same trials as leaving the placeholder."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    kwargs = {"n_startup_trials": 2, "group": group}
    written = with_defaults("tpe", kwargs)
    assert written["multivariate"] is group
    placeholder = _suggestions(make_sampler("tpe", kwargs, seed=0))
    assert _suggestions(make_sampler("tpe", written, seed=0)) == placeholder
    if not group:                                       # (group needs multivariate: only True is allowed there)
        assert _suggestions(make_sampler("tpe", {**kwargs, "multivariate": True}, seed=0)) != placeholder


def test_nsga2_mutation_prob_is_compared_as_written(tmp_path):
    """Its None (1 / the parent trial's parameter count) is no value one can write: left as written."""
    assert "mutation_prob" not in with_defaults("nsga2", {})
    out = str(tmp_path / "s")
    save_resolved_config(replace(demo_cfg(out_dir=out), sampler=SamplerConfig(name="nsga2")))
    _check_same_config(replace(demo_cfg(out_dir=out), sampler=SamplerConfig(
        name="nsga2", kwargs={"mutation_prob": None})).resolved())                     # null: the same placeholder
    with pytest.raises(ConfigError, match=r"sampler.kwargs.mutation_prob \(saved unset, now 0.5\)"):
        _check_same_config(replace(demo_cfg(out_dir=out), sampler=SamplerConfig(
            name="nsga2", kwargs={"mutation_prob": 0.5})).resolved())


def _finished_folder(tmp_path) -> str:
    """A sweep folder (TPE, no argument written) whose 2 trials ended: ``--resume --check`` stops after the config
    check (nothing left to run), with no data, model or Ray."""
    out = str(tmp_path / "s")
    save_resolved_config(replace(demo_cfg(out_dir=out, n_trials=2, cache_dir=str(tmp_path / "c")),
                                 sampler=SamplerConfig()))
    write_results(out, [trial_row(trial_id=f"t{i}", config={"budget_avg_bits": 3.0}, status="completed",
                                  last_result={"transfer_top1": 70.0, "bitops": 1}) for i in range(2)], [])
    return out


@pytest.mark.parametrize("multivariate, status", [(False, 0), (True, 2)])
def test_gmpq_sweep_resume_with_tpe_multivariate_written_out(tmp_path, capsys, multivariate, status):
    out = _finished_folder(tmp_path)
    saved = yaml.safe_load((tmp_path / "s" / "sweep_config.yaml").read_text())
    saved["sampler"]["kwargs"] = {"multivariate": multivariate}
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(saved))
    assert main(["sweep", "--config", str(tmp_path / "new.yaml"), "--out", out, "--resume", "--check"]) == status
    captured = capsys.readouterr()
    said = " ".join((captured.out + captured.err).split())
    if multivariate:
        assert "sampler.kwargs.multivariate (saved False, now True)" in said, said
    else:
        assert "config OK" in said and "already ran all its 2 trials" in said, said
