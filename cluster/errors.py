"""Errors raised by the cluster helpers (both are ``GMPQError``s, so the CLI prints one paragraph)."""
from __future__ import annotations

from gmpq_core.errors import ConfigError, GMPQError

__all__ = ["ClusterError", "ConfigError"]


class ClusterError(GMPQError, RuntimeError):
    """A process the tool starts or joins (Ray node, MLflow server) failed, timed out or is missing."""
