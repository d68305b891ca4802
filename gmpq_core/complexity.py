"""Budgets, expected BitOPs and the complexity penalty of the search (METHOD.md 4.1).

BitOPs of layer l = MACs_l * b_w,l * b_a,l; in the search the expectation under the softmax,
``sum_l MACs_l * E[b_w,l] * E[b_a,l]``, over the searchable (quantized) layers only.

Penalty modes:
- ``"hinge"`` (ours): zero at or under the budget B, hinge-squared on the ratio above it,
  ``relu(E/B - 1)^2 * B / MACs_1``. The factor B / MACs_1 (MACs_1 = MACs of the first searchable
  layer) expresses it in the official penalty's units, so one lambda means the same in both modes:
  at E = 1.5 B both have the same gradient.
- ``"official"``: ``E / MACs_1``, no target; only lambda moves the trade-off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import BudgetInfeasibleError, ConfigError
from .policy import BitCandidates

__all__ = ["PENALTIES", "CANDIDATES_HOW", "Budget", "avg_bits_range", "check_avg_bits", "bitops_range", "check_budget",
           "expected_bitops", "complexity_penalty"]

PENALTIES = ("hinge", "official")


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A BitOPs budget over the searchable layers: give exactly one of ``avg_bits`` or ``gbitops``.

    ``avg_bits = b`` means the BitOPs of the uniform WbAb policy: sum_l MACs_l * b * b. Which ``b`` a search can
    meet depends on its bit candidates only (``avg_bits_range``): ``SearchConfig`` checks it.
    """
    avg_bits: float | None = None
    gbitops: float | None = None

    def __post_init__(self) -> None:
        if (self.avg_bits is None) == (self.gbitops is None):
            raise ConfigError(f"A budget needs exactly one of avg_bits or gbitops, but got avg_bits="
                              f"{self.avg_bits!r}, gbitops={self.gbitops!r} (e.g. Budget(avg_bits=3)).")
        if self.avg_bits is not None and not (_num(self.avg_bits) and self.avg_bits > 0):
            raise ConfigError(f"budget avg_bits must be a positive number of bits, but got avg_bits={self.avg_bits!r} "
                              "(e.g. avg_bits=3).")
        if self.gbitops is not None and not (_num(self.gbitops) and self.gbitops > 0):
            raise ConfigError(f"budget gbitops must be a positive number, but got gbitops={self.gbitops!r}.")

    def to_bitops(self, macs: Mapping[str, int]) -> int:
        """The budget in BitOPs for searchable-layer MACs ``macs`` (FQN -> MACs per image)."""
        if self.gbitops is not None:
            return int(round(self.gbitops * 1e9))
        return int(round(sum(int(m) for m in macs.values()) * self.avg_bits * self.avg_bits))

    def describe(self) -> str:
        return f"{self.avg_bits:g} average bits" if self.avg_bits is not None else f"{self.gbitops:g} GBitOPs"

    def to_dict(self) -> dict[str, float]:
        return {"avg_bits": self.avg_bits} if self.avg_bits is not None else {"gbitops": self.gbitops}

    @classmethod
    def from_any(cls, value: Any) -> "Budget | None":
        """None, a Budget, or a mapping {avg_bits: b} / {gbitops: g}."""
        if value is None or isinstance(value, Budget):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"avg_bits", "gbitops"}
            if unknown:
                raise ConfigError(f"budget keys must be avg_bits or gbitops, but got {sorted(unknown)}.")
            return cls(avg_bits=value.get("avg_bits"), gbitops=value.get("gbitops"))
        raise ConfigError(f"budget must be {{avg_bits: B}} or {{gbitops: G}}, but got {value!r}.")


# how a search changes its bit candidates: the 'candidates' key of its YAML (a SearchConfig key; in a sweep config a
# top-level section); gmpq search has no flag for them
CANDIDATES_HOW = ("change the bit candidates ('candidates: [2, 3, 4, 6, 8]', or {w_bits: [...], a_bits: [...]}, in "
                  "the YAML file of 'gmpq search --config FILE' or 'gmpq sweep --config FILE')")


def _policy_name(w_bits: int, a_bits: int) -> str:
    return f"{w_bits}-bit" if w_bits == a_bits else f"W{w_bits}A{a_bits}"


def avg_bits_range(candidates: BitCandidates) -> tuple[float, float]:
    """The average-bits budgets (``Budget.avg_bits``) the candidates can meet, on any model:
    sqrt(min w * min a) .. sqrt(max w * max a), as sum_l MACs_l * b^2 lies between the all-minimum and the
    all-maximum policies' BitOPs exactly then."""
    return (math.sqrt(min(candidates.w_bits) * min(candidates.a_bits)),
            math.sqrt(max(candidates.w_bits) * max(candidates.a_bits)))


def check_avg_bits(avg_bits: float, candidates: BitCandidates) -> None:
    """BudgetInfeasibleError naming the feasible range when ``avg_bits`` lies outside ``avg_bits_range``."""
    lo, hi = avg_bits_range(candidates)
    if lo - 1e-9 <= avg_bits <= hi + 1e-9:
        return
    low = _policy_name(min(candidates.w_bits), min(candidates.a_bits))
    high = _policy_name(max(candidates.w_bits), max(candidates.a_bits))
    raise BudgetInfeasibleError(
        f"The budget avg_bits={avg_bits!r} is outside the feasible range {lo:.3g} .. {hi:.3g} average bits of the bit "
        f"candidates (w_bits {list(candidates.w_bits)}, a_bits {list(candidates.a_bits)}: the all-{low} .. "
        f"all-{high} policies). Choose a budget inside that range, or {CANDIDATES_HOW}.")


def bitops_range(macs: Mapping[str, int], candidates: BitCandidates) -> tuple[int, int]:
    """(all-minimum-bits, all-maximum-bits) BitOPs over the layers in ``macs``."""
    total = sum(int(m) for m in macs.values())
    return (total * min(candidates.w_bits) * min(candidates.a_bits),
            total * max(candidates.w_bits) * max(candidates.a_bits))


def check_budget(budget_bitops: int, macs: Mapping[str, int], candidates: BitCandidates, *,
                 model_name: str | None = None, input_size: int | Sequence[int] | None = None,
                 label: str | None = None) -> None:
    """Raise BudgetInfeasibleError if ``budget_bitops`` lies outside what the candidates reach (``label``: what the
    message calls the budget, e.g. the flag that gave it; default "budget G GBitOPs")."""
    lo, hi = bitops_range(macs, candidates)
    total = sum(int(m) for m in macs.values())
    if lo <= budget_bitops <= hi:
        return
    what = model_name or "this model"
    if isinstance(input_size, int):
        at = f" at {input_size} px"
    else:
        at = f" at {tuple(input_size)} px" if input_size else ""
    wmin, amin, wmax, amax = (min(candidates.w_bits), min(candidates.a_bits), max(candidates.w_bits),
                              max(candidates.a_bits))
    low_name, high_name = _policy_name(wmin, amin), _policy_name(wmax, amax)
    side = (f"below the all-{low_name} policy ({lo / 1e9:.2f} GBitOPs)" if budget_bitops < lo
            else f"above the all-{high_name} policy ({hi / 1e9:.2f} GBitOPs)")
    avg = lambda b: f"{math.sqrt(b / total):.3g}" if total else "?"  # noqa: E731
    raise BudgetInfeasibleError(
        f"{label or f'budget {budget_bitops / 1e9:.4g} GBitOPs'} is {side} for {what}{at}; feasible range "
        f"{lo / 1e9:.2f} .. {hi / 1e9:.2f} GBitOPs (average bits {avg(lo)} .. {avg(hi)}). Choose a budget "
        f"inside that range, or {CANDIDATES_HOW}.")


def expected_bitops(model: nn.Module, macs: Mapping[str, int]) -> Tensor:
    """sum_l MACs_l * E[b_w,l] * E[b_a,l] over the mixed layers of ``model`` (0-d, differentiable)."""
    from .supernet import expected_bits
    names, ew, ea = expected_bits(model)
    missing = [n for n in names if n not in macs]
    if missing:
        raise ConfigError(f"No MAC count for mixed layers {missing[:3]}; compute macs with layer_macs on the "
                          "same model and input size.")
    m = ew.new_tensor([float(macs[n]) for n in names])
    return (m * ew * ea).sum()


def complexity_penalty(expected: Tensor, *, mode: str = "hinge", budget_bitops: int | None = None,
                       first_layer_macs: int) -> Tensor:
    """The complexity term L_comp (0-d). ``hinge`` needs ``budget_bitops`` (without one it is 0)."""
    if first_layer_macs <= 0:
        raise ValueError(f"first_layer_macs must be positive, but got {first_layer_macs}.")
    if mode == "official":
        return expected / float(first_layer_macs)
    if mode == "hinge":
        if budget_bitops is None:
            return expected * 0.0
        ratio = expected / float(budget_bitops)
        return torch.relu(ratio - 1.0).pow(2) * (float(budget_bitops) / float(first_layer_macs))
    raise ConfigError(f"penalty must be one of {PENALTIES}, but got penalty={mode!r}.")
