"""The sections of a sweep config (``SweepConfig``'s nested mappings) as frozen dataclasses: ``Resources`` (per
trial), ``PrunerConfig`` (the Optuna pruner by name), ``FinetuneStage`` (the final Ray Train fine-tune) and
``FaultInjection`` (the reliability tests' ``testing:`` switches), with the small checks ``sweep_config`` shares
(``_require``, ``_is_pos``, ``_from_mapping``: a section given as a mapping, its unknown keys refused). Torch-free,
like ``sweep_config`` (the light CLI path imports it)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from gmpq_core.errors import ConfigError, did_you_mean

__all__ = ["Resources", "PrunerConfig", "FinetuneStage", "FaultInjection"]


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_pos(value: Any, *, integer: bool = False) -> bool:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    return ok and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _from_mapping(cls: type, section: str, d: Any) -> Any:
    if isinstance(d, cls):
        return d
    _require(d is None or isinstance(d, Mapping), f"'{section}' must be a mapping, but got {d!r}.")
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    _require(not unknown, f"Unknown key(s) {unknown} in '{section}'.{did_you_mean(unknown, known)} "
                          f"Known keys: {sorted(known)}.")
    return cls(**d)


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Per-trial resources: CPU slots and a GPU fraction (fractions share a GPU without isolation)."""
    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        _require(_is_pos(self.cpu), f"resources.cpu must be a number > 0 (CPU slots per trial, e.g. 1), but got cpu={self.cpu!r}.")
        _require(isinstance(self.gpu, (int, float)) and not isinstance(self.gpu, bool) and self.gpu >= 0,
                 f"resources.gpu must be >= 0 (e.g. 0.25), but got gpu={self.gpu!r}.")

    def to_ray(self) -> dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass(frozen=True, kw_only=True)
class PrunerConfig:
    """An ``optuna.pruners`` pruner by name (median|percentile|successive_halving|hyperband|none)."""
    name: str = "median"
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .pruning import make_pruner
        _require(isinstance(self.kwargs, Mapping), f"pruner.kwargs must be a mapping, but got {self.kwargs!r}.")
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        make_pruner(self.name, self.kwargs)


@dataclass(frozen=True, kw_only=True)
class FinetuneStage:
    """The final Ray Train fine-tune of the selected policies (read by orchestrator.final_stage)."""
    top_k: int = 2
    workers: int | str = 2                   # per policy; "auto": the cluster's CPUs (GPUs) / policies at once
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.01
    distill: bool = False
    max_steps_per_epoch: int | None = None
    nesterov: bool = False                   # plain SGD momentum, as METHOD.md 6 says
    max_concurrent: int | None = None        # policies fine-tuned side by side (null: as many as the cluster holds)
    train_size: int | None = None            # stratified target train / test images (null: the full split)
    test_size: int | None = None

    def __post_init__(self) -> None:
        _require(self.max_concurrent is None or _is_pos(self.max_concurrent, integer=True),
                 f"finetune.max_concurrent must be a positive integer or null (as many as the cluster holds), "
                 f"but got max_concurrent={self.max_concurrent!r}.")
        _require(self.workers == "auto" or _is_pos(self.workers, integer=True),
                 f"finetune.workers must be a positive integer or 'auto' (the cluster's CPUs, or GPUs, shared by "
                 f"the policies fine-tuned at once), but got workers={self.workers!r}.")
        for name in ("top_k", "epochs", "batch_size"):
            _require(_is_pos(getattr(self, name), integer=True),
                     f"finetune.{name} must be a positive integer, but got {name}={getattr(self, name)!r}.")
        _require(_is_pos(self.lr), f"finetune.lr must be > 0, but got lr={self.lr!r}.")
        _require(isinstance(self.distill, bool), f"finetune.distill must be true/false, got {self.distill!r}.")
        _require(isinstance(self.nesterov, bool), f"finetune.nesterov must be true/false, got {self.nesterov!r}.")
        _require(self.max_steps_per_epoch is None or _is_pos(self.max_steps_per_epoch, integer=True),
                 f"finetune.max_steps_per_epoch must be a positive integer or null, got {self.max_steps_per_epoch!r}.")
        for name in ("train_size", "test_size"):
            _require(getattr(self, name) is None or _is_pos(getattr(self, name), integer=True),
                     f"finetune.{name} must be a positive integer or null (the full split), but got "
                     f"{name}={getattr(self, name)!r}.")


@dataclass(frozen=True, kw_only=True)
class FaultInjection:
    """``testing:`` switches of the reliability tests (leave empty in real sweeps). Trials are named by
    their 1-based creation number (the ``_<n>_`` in Tune's trial folder names): ``raise_trials`` raise
    at the start of their first ``raise_attempts`` attempts; ``nan_trials`` get
    ``SearchConfig.inject_nan_at_epoch = nan_epoch`` (their loss turns NaN in that epoch, every attempt)."""
    raise_trials: tuple[int, ...] = ()
    raise_attempts: int = 1
    nan_trials: tuple[int, ...] = ()
    nan_epoch: int = 1

    def __post_init__(self) -> None:
        for name in ("raise_trials", "nan_trials"):
            v = getattr(self, name)
            _require(isinstance(v, (list, tuple)) and all(_is_pos(n, integer=True) for n in v),
                     f"testing.{name} must be a list of trial numbers (1, 2, ...), but got {v!r}.")
            object.__setattr__(self, name, tuple(v))
        for name in ("raise_attempts", "nan_epoch"):
            _require(_is_pos(getattr(self, name), integer=True),
                     f"testing.{name} must be a positive integer, but got {getattr(self, name)!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"raise_trials": list(self.raise_trials), "raise_attempts": self.raise_attempts,
                "nan_trials": list(self.nan_trials), "nan_epoch": self.nan_epoch}
