"""Sweep search spaces as data: a few frozen dimension types and the space that holds them.

A ``SearchSpace`` maps a *known* parameter name (``PARAMS``) to one dimension:

- ``FloatDim(low=, high=, log=)`` / ``IntDim(low=, high=, log=, step=)``: a range (bounds inclusive);
- ``Categorical(choices=(...))``: one of a few values;
- ``Fixed(value=)``: not searched, but recorded with every trial.

The YAML form is one mapping per dimension, with shorthands: a scalar is ``Fixed``, a list is
``Categorical``::

    budget_avg_bits: {type: float, low: 2.5, high: 5.0}
    proxy_size: [500, 1000]
    eta: {type: float, low: 1, high: 100, log: true}
    search_epochs: 2

``kappa`` is only sampled when ``p_mode`` is ``capacity`` and ``p_fixed`` only when it is ``fixed``
(conditional dimensions: ``define_by_run`` skips them otherwise). The space never imports Optuna:
``define_by_run`` works with anything that has Optuna's ``suggest_float/int/categorical``.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence, Union

from gmpq_core.errors import ConfigError, did_you_mean

__all__ = ["FloatDim", "IntDim", "Categorical", "Fixed", "Dim", "ParamSpec", "PARAMS", "SearchSpace",
           "dim_from_any", "bucket_of", "bucket_label", "DefineByRun"]


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, but got {what}={value!r}.")
    return value


@dataclass(frozen=True, kw_only=True)
class FloatDim:
    """A real range [low, high]; ``log=True`` samples uniformly in log space (needs low > 0)."""
    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "low", float(_num(self.low, "low")))
        object.__setattr__(self, "high", float(_num(self.high, "high")))
        if self.low > self.high:
            raise ConfigError(f"A float range needs low <= high, but got low={self.low}, high={self.high}.")
        if self.log and self.low <= 0:
            raise ConfigError(f"A log-scale range needs low > 0, but got low={self.low}; use e.g. low=1e-5.")

    def values_bounds(self) -> tuple[float, float]:
        return self.low, self.high

    def suggest(self, trial: Any, name: str) -> float:
        if self.low == self.high:
            return self.low
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def to_dict(self) -> dict:
        return {"type": "float", "low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True, kw_only=True)
class IntDim:
    """An integer range [low, high] (inclusive) with ``step``; ``log=True`` needs low >= 1, step 1."""
    low: int
    high: int
    log: bool = False
    step: int = 1

    def __post_init__(self) -> None:
        for what in ("low", "high", "step"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"An integer range needs integer {what}, but got {what}={v!r}.")
        if self.low > self.high:
            raise ConfigError(f"An integer range needs low <= high, but got low={self.low}, high={self.high}.")
        if self.step < 1:
            raise ConfigError(f"An integer range needs step >= 1, but got step={self.step}.")
        if self.log and (self.low < 1 or self.step != 1):
            raise ConfigError(f"A log-scale integer range needs low >= 1 and step=1, but got low={self.low}, "
                              f"step={self.step}.")

    def values_bounds(self) -> tuple[int, int]:
        return self.low, self.high

    def suggest(self, trial: Any, name: str) -> int:
        if self.low == self.high:
            return self.low
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def to_dict(self) -> dict:
        return {"type": "int", "low": self.low, "high": self.high, "log": self.log, "step": self.step}


@dataclass(frozen=True, kw_only=True)
class Categorical:
    """One of ``choices`` (str, int, float or bool values, no repeats)."""
    choices: tuple

    def __post_init__(self) -> None:
        choices = tuple(self.choices) if isinstance(self.choices, (list, tuple)) else None
        if not choices:
            shown = list(self.choices) if isinstance(self.choices, (list, tuple)) else self.choices
            raise ConfigError(f"A categorical dimension needs a non-empty list of choices (e.g. [500, 1000]), but got "
                              f"{shown!r}.")
        for c in choices:
            if not isinstance(c, (str, int, float, bool)):
                raise ConfigError(f"Categorical choices must be str/int/float/bool, but got {c!r} in {list(choices)}.")
        if len(set(choices)) != len(choices):
            raise ConfigError(f"Categorical choices must not repeat, but got {list(choices)}.")
        object.__setattr__(self, "choices", choices)

    def values_bounds(self) -> tuple[Any, Any]:
        nums = [c for c in self.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        return (min(nums), max(nums)) if len(nums) == len(self.choices) else (None, None)

    def suggest(self, trial: Any, name: str) -> Any:
        if len(self.choices) == 1:
            return self.choices[0]
        return trial.suggest_categorical(name, list(self.choices))

    def to_dict(self) -> dict:
        return {"type": "categorical", "choices": list(self.choices)}


@dataclass(frozen=True, kw_only=True)
class Fixed:
    """A constant: not searched, recorded with every trial."""
    value: Any

    def values_bounds(self) -> tuple[Any, Any]:
        return self.value, self.value

    def suggest(self, trial: Any, name: str) -> Any:
        return self.value

    def to_dict(self) -> dict:
        return {"type": "fixed", "value": self.value}


Dim = Union[FloatDim, IntDim, Categorical, Fixed]
_DIM_TYPES: dict[str, type] = {"float": FloatDim, "int": IntDim, "categorical": Categorical, "fixed": Fixed}


def _varies(dim: Dim) -> bool:
    if isinstance(dim, Fixed):
        return False
    if isinstance(dim, Categorical):
        return len(dim.choices) > 1
    return dim.low != dim.high


def dim_from_any(name: str, value: Any) -> Dim:
    """Build a dimension from its YAML form (mapping with ``type``), a list (categorical) or a scalar."""
    if isinstance(value, (FloatDim, IntDim, Categorical, Fixed)):
        return value
    if isinstance(value, (list, tuple)):
        try:
            return Categorical(choices=tuple(value))
        except ConfigError as e:
            raise ConfigError(f"Dimension '{name}': {e}") from None
    if not isinstance(value, Mapping):
        return Fixed(value=value)
    kind = value.get("type")
    if kind not in _DIM_TYPES:
        raise ConfigError(f"Dimension '{name}' needs type one of {sorted(_DIM_TYPES)}, but got type={kind!r} "
                          f"in {dict(value)}.")
    kwargs = {k: v for k, v in value.items() if k != "type"}
    if kind == "categorical" and "choices" in kwargs:
        kwargs["choices"] = tuple(kwargs["choices"]) if isinstance(kwargs["choices"], list) else kwargs["choices"]
    known = {f.name for f in fields(_DIM_TYPES[kind])}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"Dimension '{name}' ({kind}) has unknown field(s) {unknown}.{did_you_mean(unknown, known)} "
                          f"Its fields: {sorted(known)}.")
    try:
        return _DIM_TYPES[kind](**kwargs)
    except TypeError as e:
        raise ConfigError(f"Dimension '{name}' ({kind}) is missing a field: {e}. Its fields: {sorted(known)}.") from None
    except ConfigError as e:
        raise ConfigError(f"Dimension '{name}': {e}") from None


@dataclass(frozen=True)
class ParamSpec:
    """What a known parameter means and which values it accepts."""
    kind: type            # float, int or str
    description: str
    positive: bool = False
    choices: tuple = ()
    minimum: float | None = None
    only_if: tuple[str, str] | None = None   # (other parameter, value) that enables this one


PARAMS: dict[str, ParamSpec] = {
    "budget_avg_bits": ParamSpec(float, "BitOPs budget as an average bitwidth b: sum_l MACs_l * b * b", True),
    "proxy_size": ParamSpec(int, "number of proxy images (stratified subset of the proxy train split)", True),
    "eta": ParamSpec(float, "attribution (generalization) loss weight, docs/method.md, section 7", True),
    "lam": ParamSpec(float, "complexity loss weight lambda, docs/method.md, section 8", True),
    "p_mode": ParamSpec(str, "capacity-aware or fixed attribution power p, docs/method.md, section 7",
                        choices=("capacity", "fixed")),
    "kappa": ParamSpec(float, "capacity-aware p = kappa * mean_l 1/(E[b_w] E[b_a])", True,
                       only_if=("p_mode", "capacity")),
    "p_fixed": ParamSpec(float, "fixed attribution power p", True, only_if=("p_mode", "fixed")),
    "lr_arch": ParamSpec(float, "architecture-parameter learning rate", True),
    "lr": ParamSpec(float, "network-weight learning rate of the search", True),
    "search_epochs": ParamSpec(int, "search epochs on the proxy", True, minimum=1),
}


def _check_value(name: str, value: Any) -> None:
    spec = PARAMS[name]
    if spec.kind is str:
        if value not in spec.choices:
            raise ConfigError(f"'{name}' must be one of {list(spec.choices)}, but got {name}={value!r}.")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"'{name}' ({spec.description}) must be a number, but got {name}={value!r}.")
    if spec.kind is int and not float(value).is_integer():
        raise ConfigError(f"'{name}' must be an integer, but got {name}={value!r}.")
    if spec.positive and value <= 0:
        raise ConfigError(f"'{name}' ({spec.description}) must be > 0, but got {name}={value!r}.")
    if spec.minimum is not None and value < spec.minimum:
        raise ConfigError(f"'{name}' must be >= {spec.minimum}, but got {name}={value!r}.")


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Named dimensions of a sweep (insertion order = sampling order)."""
    dims: Mapping[str, Dim] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.dims, Mapping):
            raise ConfigError(f"A search space must be a mapping name -> dimension, but got {self.dims!r}.")
        dims: dict[str, Dim] = {}
        for name, raw in self.dims.items():
            if name not in PARAMS:
                raise ConfigError(f"Unknown search-space parameter '{name}'.{did_you_mean([str(name)], PARAMS)} "
                                  f"Known parameters: {', '.join(PARAMS)}.")
            dim = dim_from_any(name, raw)
            self._check_dim(name, dim)
            dims[name] = dim
        order = [n for n in PARAMS if n in dims]   # canonical order: conditions come after what they test
        object.__setattr__(self, "dims", {n: dims[n] for n in order})

    @staticmethod
    def _check_dim(name: str, dim: Dim) -> None:
        spec = PARAMS[name]
        if isinstance(dim, Fixed):
            _check_value(name, dim.value)
        elif isinstance(dim, Categorical):
            for c in dim.choices:
                _check_value(name, c)
        else:
            if spec.kind is str:
                raise ConfigError(f"'{name}' takes one of {list(spec.choices)}; give a list, not a {type(dim).__name__}.")
            if spec.kind is int and isinstance(dim, FloatDim):
                raise ConfigError(f"'{name}' is an integer: use {{type: int, ...}} or a list, not a float range.")
            _check_value(name, dim.low)
            _check_value(name, dim.high)

    # -- views --------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.dims

    def __getitem__(self, name: str) -> Dim:
        return self.dims[name]

    def is_empty(self) -> bool:
        return not self.dims

    def varying(self) -> list[str]:
        """Names of the dimensions that are actually searched (not fixed, more than one value)."""
        return [n for n, d in self.dims.items() if _varies(d)]

    def possible_values(self, name: str) -> tuple | None:
        """All values of a Fixed/Categorical dimension; None for a range or an absent name."""
        dim = self.dims.get(name)
        if isinstance(dim, Fixed):
            return (dim.value,)
        if isinstance(dim, Categorical):
            return dim.choices
        return None

    def bounds(self, name: str) -> tuple[Any, Any]:
        return self.dims[name].values_bounds()

    def _enabled(self, name: str, params: Mapping[str, Any]) -> bool:
        cond = PARAMS[name].only_if
        if cond is None:
            return True
        other, wanted = cond
        if other in params:
            return params[other] == wanted
        return other not in self.dims   # condition on an absent parameter: core default decides

    # -- sampling -----------------------------------------------------------------------------
    def sample(self, trial: Any) -> dict[str, Any]:
        """Draw one configuration with an Optuna-like ``trial`` (define-by-run, conditions honoured)."""
        params: dict[str, Any] = {}
        for name, dim in self.dims.items():
            if self._enabled(name, params):
                params[name] = dim.suggest(trial, name)
        return params

    def define_by_run(self) -> "DefineByRun":
        """The callable to pass as ``OptunaSearch(space=...)``: suggests varying dims, returns fixed ones."""
        return DefineByRun(self)

    def first_point(self) -> dict[str, Any]:
        """A deterministic configuration (lower bounds / first choices), for validation dry runs."""
        return self.sample(_FirstValueTrial())

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict]:
        return {n: d.to_dict() for n, d in self.dims.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SearchSpace":
        if d is None:
            return cls(dims={})
        if not isinstance(d, Mapping):
            raise ConfigError(f"'space' must be a mapping parameter -> dimension, but got {d!r}.")
        return cls(dims=dict(d))


class DefineByRun:
    """Picklable define-by-run function of a space (Tune pickles its searcher with plain pickle)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> dict[str, Any]:
        params = self.space.sample(trial)
        return {n: v for n, v in params.items() if not _varies(self.space.dims[n])}


class _FirstValueTrial:
    """Optuna-like trial that always answers the lower bound or the first choice."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        return low

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return low

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return choices[0]


def bucket_of(avg_bits: float, edges: Sequence[float]) -> int:
    """Budget bucket index: 0 below edges[0], i for edges[i-1] <= avg_bits < edges[i], len(edges) above."""
    return bisect.bisect_right(list(edges), float(avg_bits))


def bucket_label(index: int, edges: Sequence[float]) -> str:
    """Human label of a bucket, e.g. '[2.75, 3.5)' or '< 2.75' or '>= 4.5'."""
    edges = list(edges)
    if not edges:
        return "all"
    if index <= 0:
        return f"< {edges[0]:g}"
    if index >= len(edges):
        return f">= {edges[-1]:g}"
    return f"[{edges[index - 1]:g}, {edges[index]:g})"
