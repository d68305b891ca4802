"""gmpq_core.errors.did_you_mean: the hint an "unknown key" message gives for a misspelled key."""
from __future__ import annotations

import pytest

from gmpq_core.errors import ConfigError, did_you_mean
from gmpq_core.search_config import SearchConfig


def test_names_the_closest_known_key_for_each_misspelling():
    hint = did_you_mean(["n_trails", "bach_size", "colour"], ["n_trials", "batch_size", "seed"])
    assert hint == " Did you mean 'n_trials' (not 'n_trails'), 'batch_size' (not 'bach_size')?"


def test_says_nothing_when_no_known_key_is_close():
    assert did_you_mean(["colour"], ["n_trials", "seed"]) == ""


def test_a_misspelled_search_setting_is_named_with_its_fix():
    with pytest.raises(ConfigError, match=r"\['lr_arc'\]\. Did you mean 'lr_arch' \(not 'lr_arc'\)\?"):
        SearchConfig.from_dict({"lr_arc": 0.1})
