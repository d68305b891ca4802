"""The saved sweep config (sweep_config.save_resolved_config) and the resume check that compares with it
(sweep_resume._check_same_config): the internal ``testing:`` section is saved only when it is set, and sweeps
saved with or without it resume."""
from __future__ import annotations

import pytest
import yaml

from gmpq_core.errors import ConfigError
from orchestrator.sweep_config import SweepConfig, load_sweep_config, save_resolved_config
from orchestrator.sweep_resume import _check_same_config


def _demo(tmp_path, **overrides):
    return load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), **overrides})


def test_the_saved_config_has_no_testing_section_when_it_holds_only_defaults(tmp_path):
    saved = yaml.safe_load(save_resolved_config(_demo(tmp_path)).read_text())
    assert "testing" not in saved
    assert "testing" not in _demo(tmp_path).to_dict()
    assert SweepConfig.from_dict(saved).testing == _demo(tmp_path).testing       # loads back to the defaults


def test_a_testing_section_that_is_set_is_saved_and_read_back(tmp_path):
    cfg = _demo(tmp_path, testing={"raise_trials": [1], "nan_trials": [2]})
    saved = yaml.safe_load(save_resolved_config(cfg).read_text())
    assert saved["testing"]["raise_trials"] == [1] and saved["testing"]["nan_trials"] == [2]
    back = load_sweep_config(tmp_path / "sweep_config.yaml")
    assert back.testing == cfg.testing
    _check_same_config(back.resolved())                       # resuming from the saved file: the same sweep


def test_a_sweep_saved_without_testing_resumes(tmp_path):
    save_resolved_config(_demo(tmp_path))
    _check_same_config(_demo(tmp_path).resolved())
    _check_same_config(load_sweep_config(tmp_path / "sweep_config.yaml").resolved())


def test_an_old_sweep_saved_with_a_default_testing_section_resumes(tmp_path):
    """Sweep folders written before the section was left out hold 'testing:' with its defaults."""
    path = save_resolved_config(_demo(tmp_path))
    old = yaml.safe_load(path.read_text())
    old["testing"] = {"raise_trials": [], "raise_attempts": 1, "nan_trials": [], "nan_epoch": 1}
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    _check_same_config(_demo(tmp_path).resolved())                               # --resume --preset demo
    _check_same_config(load_sweep_config(path).resolved())                      # --resume alone


def test_a_resume_that_changes_a_set_testing_section_is_refused(tmp_path):
    save_resolved_config(_demo(tmp_path, testing={"raise_trials": [1]}))
    with pytest.raises(ConfigError, match=r"testing\.raise_trials \(saved \[1\], now \[\]\)"):
        _check_same_config(_demo(tmp_path).resolved())


def test_resuming_a_finished_sweep_says_so_at_once_without_ray(tmp_path, capsys):
    """The walkthrough: --resume on a finished sweep started Ray (~10 s), repeated the weak-model warnings and said
    "resuming"; a sweep with a failed trial still resumes (it runs again)."""
    import ray

    from orchestrator.results import trial_row, write_results
    from orchestrator.sweep import run_sweep

    if ray.is_initialized():
        pytest.skip("Ray already runs in this test process")
    cfg = _demo(tmp_path, n_trials=2)
    save_resolved_config(cfg)
    rows = [trial_row(trial_id=t, config={"budget_avg_bits": 3.0}, status=s, last_result={"transfer_top1": 70.0})
            for t, s in (("a", "completed"), ("b", "pruned"))]
    write_results(tmp_path, rows, [])
    changed = load_sweep_config(tmp_path / "sweep_config.yaml", overrides={"finetune.test_size": 300})
    summary = run_sweep(changed, resume=True)                    # (gmpq run --resume --finetune-test-size 300)
    assert (summary.n_completed, summary.n_pruned, summary.n_failed, summary.interrupted) == (1, 1, 0, False)
    assert "already ran all its 2 trials" in capsys.readouterr().err and not ray.is_initialized()
    assert [r["trial_id"] for r in summary.rows] == ["a", "b"]
    assert load_sweep_config(tmp_path / "sweep_config.yaml").finetune.test_size == 300     # saved for the next stages


def test_a_resume_asking_for_more_trials_is_accepted_and_fewer_refused(tmp_path):
    """A sweep may grow on resume (sweep_grow; test_sweep_grow.py), not shrink; other settings stay refused."""
    save_resolved_config(_demo(tmp_path))
    assert _check_same_config(_demo(tmp_path, n_trials=12).resolved()) == 6
    with pytest.raises(ConfigError) as e:
        _check_same_config(_demo(tmp_path, n_trials=3).resolved())
    said = " ".join(str(e.value).split())
    assert "--n-trials 3 is fewer than the 6 trials" in said and "cannot grow" not in said
    with pytest.raises(ConfigError) as e:
        _check_same_config(_demo(tmp_path, seed=3).resolved())
    said = " ".join(str(e.value).split())
    assert "seed (saved 0, now 3)" in said and said.count("another --out") == 1
