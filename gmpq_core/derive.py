"""From architecture probabilities to a discrete bit policy that never exceeds its budget (METHOD.md 4.1, 5).

1. Per layer, independently: argmax of the weight and of the activation probabilities.
2. Repair (ours, deterministic): while the policy's BitOPs exceed the budget, among all layers and
   both choices (weight, activation) take the one-step-lower move with the smallest
   ``probability margin lost / BitOPs saved``, where the margin lost is p[current] - p[one lower];
   ties go to the earlier layer, then to the weight choice. Stops as soon as the policy fits.
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


def select_bits(layers: Sequence[LayerChoice], budget_bitops: int | None) -> dict[str, QuantSpec]:
    """Argmax per layer, then the greedy repair until sum MACs * b_w * b_a <= ``budget_bitops``."""
    iw = [_argmax(c.pw) for c in layers]
    ia = [_argmax(c.pa) for c in layers]

    def cost() -> int:
        return sum(c.macs * c.w_bits[iw[k]] * c.a_bits[ia[k]] for k, c in enumerate(layers))

    if budget_bitops is not None:
        floor = sum(c.macs * c.w_bits[0] * c.a_bits[0] for c in layers)
        if floor > budget_bitops:
            raise BudgetInfeasibleError(
                f"budget {budget_bitops / 1e9:.4g} GBitOPs is below the all-minimum-bits policy "
                f"({floor / 1e9:.4g} GBitOPs); no policy over these candidates fits it.")
        current = cost()
        while current > budget_bitops:
            best = None  # (score, layer index, 0 = weight / 1 = activation, saved)
            for k, c in enumerate(layers):
                bw, ba = c.w_bits[iw[k]], c.a_bits[ia[k]]
                if iw[k] > 0:
                    saved = c.macs * (bw - c.w_bits[iw[k] - 1]) * ba
                    if saved > 0:
                        cand = ((c.pw[iw[k]] - c.pw[iw[k] - 1]) / saved, k, 0, saved)
                        best = cand if best is None or cand[:3] < best[:3] else best
                if ia[k] > 0:
                    saved = c.macs * bw * (ba - c.a_bits[ia[k] - 1])
                    if saved > 0:
                        cand = ((c.pa[ia[k]] - c.pa[ia[k] - 1]) / saved, k, 1, saved)
                        best = cand if best is None or cand[:3] < best[:3] else best
            if best is None:  # only zero-MAC layers left above the minimum; cannot happen when floor fits
                break
            _, k, which, saved = best
            if which == 0:
                iw[k] -= 1
            else:
                ia[k] -= 1
            current -= saved
    return {c.name: QuantSpec(w_bits=c.w_bits[iw[k]], a_bits=c.a_bits[ia[k]]) for k, c in enumerate(layers)}


def derive_policy(supernet: nn.Module, budget_bitops: int | None, macs: Mapping[str, int]) -> BitPolicy:
    """The discrete policy of a searched supernet: argmax per layer, repaired to fit ``budget_bitops``
    (None: plain argmax). ``macs`` maps each mixed layer's FQN to its MACs per image."""
    from .supernet import arch_probs
    probs = arch_probs(supernet)
    if not probs:
        raise ConfigError("derive_policy needs a supernet (build_supernet); this model has no mixed layers.")
    missing = [n for n in probs if n not in macs]
    if missing:
        raise ConfigError(f"No MAC count for mixed layers {missing[:3]}; pass macs from layer_macs on this model.")
    choices = [LayerChoice(name=n, macs=int(macs[n]), w_bits=d["w_bits"], a_bits=d["a_bits"], pw=d["w"], pa=d["a"])
               for n, d in probs.items()]
    layers = select_bits(choices, budget_bitops)
    meta = {"kind": "gmpq search", "budget_bitops": budget_bitops}
    return BitPolicy(layers=layers, fingerprint=fingerprint(supernet), meta=meta)
