"""A sweep config built from the demo preset with changes, and the one-line ConfigError a change gets."""
from __future__ import annotations

import pytest

from gmpq_core.errors import ConfigError
from orchestrator.sweep_config import SweepConfig, deep_merge
from search_spaces.presets import load_preset


def demo_cfg(**changes) -> SweepConfig:
    """The demo preset with ``changes`` merged in (as a YAML file over ``preset: demo`` would be)."""
    return SweepConfig.from_dict(deep_merge(load_preset("demo"), changes))


def config_error(**changes) -> str:
    """The ConfigError ``demo_cfg(**changes)`` raises, its whitespace folded to single spaces."""
    with pytest.raises(ConfigError) as e:
        demo_cfg(**changes)
    return " ".join(str(e.value).split())
