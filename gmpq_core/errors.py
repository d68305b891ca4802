"""The project's exception hierarchy (shallow, each with a builtin mix-in).

Callers can catch ``GMPQError`` for everything the tool raises on purpose, or the builtin
(``ValueError``/``RuntimeError``) they already handle.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable

__all__ = ["GMPQError", "ConfigError", "BudgetInfeasibleError", "PolicyMismatchError", "DataError",
           "DatasetNotDownloadedError", "CheckpointError", "NonFiniteLossError", "did_you_mean"]


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


class DatasetNotDownloadedError(DataError):
    """A dataset that downloads into its folder is not there, and ``load_dataset(..., download=False)`` asked for no
    download (a check that writes nothing). ``title``: the dataset's name in words; ``folder``: the absolute folder
    the download would create; ``info`` / ``sizes``: the DatasetInfo and (train, test) image counts it will have,
    filled in by the registry (None when unknown)."""

    def __init__(self, message: str, *, title: str, folder: str, info: Any = None,
                 sizes: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.title, self.folder, self.info, self.sizes = title, folder, info, sizes


class CheckpointError(GMPQError, RuntimeError):
    """A checkpoint or result file is missing, truncated or corrupted."""


class NonFiniteLossError(GMPQError, RuntimeError):
    """A training or search loss became NaN or infinite (the trial is failed, not retried silently)."""


def did_you_mean(unknown: Iterable[str], known: Iterable[str]) -> str:
    """The sentence to add to an "unknown key" message: the known keys closest to the misspelled ones
    (" Did you mean 'eta' (not 'etaa')?"), or "" when none is close."""
    known = sorted(known)
    pairs = [(k, m[0]) for k in unknown if (m := difflib.get_close_matches(str(k), known, n=1, cutoff=0.7))]
    if not pairs:
        return ""
    return " Did you mean " + ", ".join(f"'{m}' (not '{k}')" for k, m in pairs) + "?"
