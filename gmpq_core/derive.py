"""From architecture probabilities to a discrete bit policy that never exceeds its budget (METHOD.md 4.1, 5).

1. Per layer, independently: argmax of the weight and of the activation probabilities.
2. Repair (ours, deterministic): while the policy's BitOPs exceed the budget, among all layers and
   both choices (weight, activation) take the one-step-lower move with the smallest
   ``probability margin lost / BitOPs saved``, where the margin lost is p[current] - p[one lower];
   ties go to the earlier layer, then to the weight choice. Stops as soon as the policy fits.
3. Optional fill (extension, ``fill=True``): raise bits one step at a time while the policy still
   fits, least probability lost first (an argmax policy can sit far below the budget when the
   softmax is still broad: its mode is lower than its expectation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import nn

from .errors import BudgetInfeasibleError, ConfigError
from .layers import fingerprint
from .policy import BitPolicy, QuantSpec

__all__ = ["LayerChoice", "select_bits", "derive_policy"]


@dataclass(frozen=True, kw_only=True)
class LayerChoice:
    """What the repair needs of one layer: candidates (ascending), their probabilities, its MACs."""
    name: str
    macs: int
    w_bits: Sequence[int]
    a_bits: Sequence[int]
    pw: Sequence[float]
    pa: Sequence[float]


def _argmax(p: Sequence[float]) -> int:
    return max(range(len(p)), key=lambda i: (p[i], -i))  # first index of the maximum


def _moves(layers: Sequence[LayerChoice], iw: list[int], ia: list[int], step: int):
    """Every one-step move (step -1 = lower, +1 = higher): (prob change, delta BitOPs, layer, 0 = w / 1 = a)."""
    for k, c in enumerate(layers):
        bw, ba = c.w_bits[iw[k]], c.a_bits[ia[k]]
        if 0 <= iw[k] + step < len(c.w_bits):
            j = iw[k] + step
            yield c.pw[j] - c.pw[iw[k]], c.macs * (c.w_bits[j] - bw) * ba, k, 0
        if 0 <= ia[k] + step < len(c.a_bits):
            j = ia[k] + step
            yield c.pa[j] - c.pa[ia[k]], c.macs * bw * (c.a_bits[j] - ba), k, 1


def select_bits(layers: Sequence[LayerChoice], budget_bitops: int | None, *,
                fill: bool = False) -> dict[str, QuantSpec]:
    """Argmax per layer, then the greedy repair until sum MACs * b_w * b_a <= ``budget_bitops``.

    ``fill=True`` (extension, off by default) then spends what the budget leaves: while a one-step
    raise still fits, take the one losing the least probability (p[current] - p[one higher]); ties
    go to the smaller BitOPs increase, then the earlier layer, then the weight.
    """
    iw = [_argmax(c.pw) for c in layers]
    ia = [_argmax(c.pa) for c in layers]
    if budget_bitops is None:
        return _specs(layers, iw, ia)
    floor = sum(c.macs * c.w_bits[0] * c.a_bits[0] for c in layers)
    if floor > budget_bitops:
        raise BudgetInfeasibleError(
            f"budget {budget_bitops / 1e9:.4g} GBitOPs is below the all-minimum-bits policy "
            f"({floor / 1e9:.4g} GBitOPs); no policy over these candidates fits it.")
    current = sum(c.macs * c.w_bits[iw[k]] * c.a_bits[ia[k]] for k, c in enumerate(layers))
    while current > budget_bitops:
        # score = probability margin lost per BitOP saved: (p[cur] - p[lower]) / saved
        options = [(-gain / -delta, k, which, delta) for gain, delta, k, which in _moves(layers, iw, ia, -1)
                   if delta < 0]
        if not options:  # cannot happen while the floor fits
            break
        _, k, which, delta = min(options, key=lambda o: o[:3])
        _apply(iw, ia, k, which, -1)
        current += delta
    while fill:
        options = [(-gain, delta, k, which) for gain, delta, k, which in _moves(layers, iw, ia, +1)
                   if 0 < delta <= budget_bitops - current]
        if not options:
            break
        _, delta, k, which = min(options)
        _apply(iw, ia, k, which, +1)
        current += delta
    return _specs(layers, iw, ia)


def _apply(iw: list[int], ia: list[int], k: int, which: int, step: int) -> None:
    if which == 0:
        iw[k] += step
    else:
        ia[k] += step


def _specs(layers: Sequence[LayerChoice], iw: list[int], ia: list[int]) -> dict[str, QuantSpec]:
    return {c.name: QuantSpec(w_bits=c.w_bits[iw[k]], a_bits=c.a_bits[ia[k]]) for k, c in enumerate(layers)}


def derive_policy(supernet: nn.Module, budget_bitops: int | None, macs: Mapping[str, int], *,
                  fill: bool = False) -> BitPolicy:
    """The discrete policy of a searched supernet: argmax per layer, repaired to fit ``budget_bitops``
    (None: plain argmax), optionally filled up to it (``fill``, see ``select_bits``). ``macs`` maps
    each mixed layer's FQN to its MACs per image."""
    from .supernet import arch_probs
    probs = arch_probs(supernet)
    if not probs:
        raise ConfigError("derive_policy needs a supernet (build_supernet); this model has no mixed layers.")
    missing = [n for n in probs if n not in macs]
    if missing:
        raise ConfigError(f"No MAC count for mixed layers {missing[:3]}; pass macs from layer_macs on this model.")
    choices = [LayerChoice(name=n, macs=int(macs[n]), w_bits=d["w_bits"], a_bits=d["a_bits"], pw=d["w"], pa=d["a"])
               for n, d in probs.items()]
    layers = select_bits(choices, budget_bitops, fill=fill)
    meta = {"kind": "gmpq search", "budget_bitops": budget_bitops, "fill_budget": fill}
    return BitPolicy(layers=layers, fingerprint=fingerprint(supernet), meta=meta)
