"""The project's exception hierarchy (shallow, each with a builtin mix-in).

Callers can catch ``GMPQError`` for everything the tool raises on purpose, or the builtin
(``ValueError``/``RuntimeError``) they already handle.
"""
from __future__ import annotations

__all__ = ["GMPQError", "ConfigError", "BudgetInfeasibleError", "PolicyMismatchError", "DataError",
           "CheckpointError", "NonFiniteLossError"]


class GMPQError(Exception):
    """Base class of every error the tool raises on purpose (bad input, impossible request)."""


class ConfigError(GMPQError, ValueError):
    """A configuration value is invalid: the message names the value and the fix."""


class BudgetInfeasibleError(GMPQError, ValueError):
    """A BitOPs budget lies outside what the candidates can reach for this model."""


class PolicyMismatchError(GMPQError, ValueError):
    """A bit policy does not fit the model it is applied to."""


class DataError(GMPQError, RuntimeError):
    """A dataset cannot be found, read or subset as asked."""


class CheckpointError(GMPQError, RuntimeError):
    """A checkpoint or result file is missing, truncated or corrupted."""


class NonFiniteLossError(GMPQError, RuntimeError):
    """A training or search loss became NaN or infinite (the trial is failed, not retried silently)."""
