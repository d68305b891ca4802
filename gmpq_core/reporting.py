"""The tiny protocol through which core loops report progress (STYLE.md: a do-nothing default).

Adapters in ``orchestrator/`` connect it to Ray Tune, Optuna pruning and MLflow; the CLI connects
it to a progress bar. Core code never prints.
"""
from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

__all__ = ["Reporter", "NullReporter", "ListReporter"]


@runtime_checkable
class Reporter(Protocol):
    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Receive the metrics of one step (an epoch for training/search loops)."""

    def should_stop(self) -> bool:
        """Return True to end the loop early (checked between epochs)."""


class NullReporter:
    """Reporter that does nothing and never stops (the default)."""

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        return None

    def should_stop(self) -> bool:
        return False


class ListReporter:
    """Reporter that keeps every report in memory; stops after ``stop_after`` reports if given."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []
        self.stop_after = stop_after

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        self.records.append((step, dict(metrics)))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.records) >= self.stop_after
