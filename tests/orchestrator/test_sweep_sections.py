"""Unknown sweep-config keys (sweep_config, sweep_sections): a key written in the wrong place is answered with
the section it belongs in, before any fuzzy "did you mean", and the internal ``testing:`` section stays out of
the messages unless the user wrote it."""
from __future__ import annotations

import argparse

import pytest
import yaml

from gmpq_core.errors import ConfigError
from orchestrator.cli import main
from orchestrator.sweep_config import SweepConfig, load_sweep_config


def _load(tmp_path, data):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_sweep_config(path, overrides={"out_dir": str(tmp_path / "o")})


def _error(tmp_path, data) -> str:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, data)
    return " ".join(str(e.value).split())


def test_a_space_key_at_the_top_level_names_the_space_section_not_teacher_epochs(tmp_path):
    # 'teacher_epochs' was suggested: following it silently changed the teachers' training
    msg = _error(tmp_path, {"preset": "demo", "search_epochs": 1})
    assert "'search_epochs' belongs in the 'space:' section (space: {search_epochs: 1})" in msg
    assert "gmpq sweep --epochs sets it too" in msg
    assert "teacher_epochs" not in msg.split("Known keys")[0] and "Did you mean" not in msg


@pytest.mark.parametrize("key, value, want", [
    ("cpu", 2, "'cpu' belongs in the 'resources:' section (resources: {cpu: 2})"),
    ("top_k", 3, "'top_k' belongs in the 'finetune:' section (finetune: {top_k: 3})"),
    ("fp_epochs", 2, "'fp_epochs' belongs in the 'transfer:' section (transfer: {fp_epochs: 2})"),
    ("kwargs", {"n_warmup_steps": 1}, "'kwargs' belongs in one of the sections 'pruner:' (the Optuna pruner) or "
                                      "'sampler:' (the Optuna sampler), not at the top level (e.g. pruner: {kwargs: "
                                      "{n_warmup_steps: 1}})"),
    ("w_bits", [2, 4], "'w_bits' belongs in the 'candidates:' section (candidates: {w_bits: [2, 4]})"),
    ("recalibrate_bn_batches", 4, "'recalibrate_bn_batches' belongs in the 'search:' section"),
    ("batch_size", 32, "'batch_size' belongs in one of the sections 'search:'"),
])
def test_every_section_key_at_the_top_level_names_its_section(tmp_path, key, value, want):
    msg = _error(tmp_path, {"preset": "demo", key: value})
    assert want in msg and "Did you mean" not in msg


def test_a_key_of_several_sections_names_each_of_them(tmp_path):
    msg = _error(tmp_path, {"preset": "demo", "batch_size": 32})
    assert all(f"'{s}:'" in msg for s in ("search", "transfer", "finetune")), msg


def test_a_real_typo_still_gets_its_suggestion_next_to_a_misplaced_key(tmp_path):
    msg = _error(tmp_path, {"preset": "demo", "search_epochs": 1, "n_trails": 3})
    assert "'search_epochs' belongs in the 'space:' section" in msg
    assert "Did you mean 'n_trials' (not 'n_trails')?" in msg
    assert "Did you mean 'teacher_epochs'" not in msg


@pytest.mark.parametrize("section, key, value, want", [
    ("finetune", "search_epochs", 1, "'search_epochs' belongs in the 'space:' section (space: {search_epochs: 1}), "
                                     "not in 'finetune:'; gmpq sweep --epochs sets it too"),
    ("resources", "n_trials", 3, "'n_trials' belongs at the top level (n_trials: 3), not in 'resources:'; "
                                 "gmpq sweep --n-trials sets it too"),
    ("space", "batch_size", 32, "'batch_size' belongs in one of the sections 'search:'"),
    ("transfer", "top_k", 3, "'top_k' belongs in the 'finetune:' section (finetune: {top_k: 3}), not in 'transfer:'"),
    ("search", "proxy_size", 500, "'proxy_size' belongs in the 'space:' section (space: {proxy_size: 500}), "
                                  "not in 'search:'"),
    ("pruner", "gpu", 0.5, "'gpu' belongs in the 'resources:' section (resources: {gpu: 0.5}), not in 'pruner:'"),
])
def test_a_key_inside_the_wrong_section_names_where_it_belongs(tmp_path, section, key, value, want):
    msg = _error(tmp_path, {"preset": "demo", section: {key: value}})
    assert want in msg, msg
    assert "Did you mean" not in msg


def test_a_typo_inside_a_section_keeps_its_own_message(tmp_path):
    msg = _error(tmp_path, {"preset": "demo", "finetune": {"top_kk": 3}})
    assert "Did you mean 'top_k' (not 'top_kk')?" in msg and "belongs" not in msg


def test_a_pruner_argument_beside_its_name_says_it_goes_under_kwargs(tmp_path):
    msg = _error(tmp_path, {"pruner": {"name": "percentile", "percentile": 30.0, "kwargs": {"n_warmup_steps": 1}}})
    assert ("A pruner's own arguments go under 'kwargs': pruner: {name: percentile, kwargs: {n_warmup_steps: 1, "
            "percentile: 30.0}}.") in msg, msg
    assert "go under 'kwargs'" not in _error(tmp_path, {"preset": "demo", "finetune": {"top_kk": 3}})
    typo = _error(tmp_path, {"pruner": {"nme": "median"}})           # a typo of 'name' is only a typo
    assert "Did you mean 'name' (not 'nme')?" in typo and "go under 'kwargs'" not in typo
    flags = _error(tmp_path, {"pruner": {"name": "median", "bootstrap": True}})
    assert "pruner: {name: median, kwargs: {bootstrap: true}}" in flags       # YAML, as the file is written


def test_the_cli_answers_a_misplaced_key_with_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("preset: demo\nsearch_epochs: 1\n")
    assert main(["sweep", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "belongs in the 'space:' section (space: {search_epochs: 1})" in err and "Traceback" not in err


def test_the_flag_hints_match_the_sweep_flags():
    """The "--epochs sets it too" hints name the flags that really set those keys."""
    from orchestrator.commands.sweep import overrides_from_args
    from orchestrator.sweep_sections import KEY_FLAGS

    class _Names(argparse.Namespace):
        def __getattr__(self, name):
            return name

    by_key = {key: "--" + dest.replace("_", "-") for key, dest in overrides_from_args(_Names()).items()}
    assert KEY_FLAGS == by_key


def test_testing_is_not_listed_among_the_known_keys_but_stays_accepted(tmp_path):
    msg = _error(tmp_path, {"preset": "demo", "colour": "red"})
    assert "Known keys:" in msg and "'space'" in msg and "testing" not in msg
    cfg = _load(tmp_path, {"preset": "demo", "testing": {"raise_trials": [1]}})
    assert cfg.testing.raise_trials == (1,)
    with pytest.raises(ConfigError, match="testing"):          # 'testing' is named where the user wrote it
        SweepConfig.from_dict({**cfg.to_dict(), "testing": {"raise_trial": [1]}})


def test_the_search_settings_name_inside_space_names_the_dimension(tmp_path):
    """The review: space: {epochs: 2} was sent to 'transfer:' or 'finetune:' (their epochs), not search_epochs."""
    msg = _error(tmp_path, {"preset": "demo", "space": {"epochs": 2}})
    assert "'epochs' is called 'search_epochs' in 'space:' (space: {search_epochs: 2}); gmpq sweep --epochs sets " \
           "it too." in msg
    assert "transfer" not in msg.split("Known keys")[0]
