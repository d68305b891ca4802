"""The reference formulas of the quantizer mixtures (plain autograd; ``fused.py`` has the maths): what the fused
nodes' values and gradients are checked against, and what their backward differentiates under ``create_graph=True``
(``_reference_grads``), so that higher-order derivatives stay exact."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["act_mixture_reference", "weight_mixture_reference"]


def act_mixture_reference(x: Tensor, probs: Tensor, clips: Tensor, bits: Sequence[int], signed: bool) -> Tensor:
    """Straightforward ``sum_j probs[j] * Q_{bits[j]}(x; clips[j])`` through plain autograd (a half/bfloat16
    x is computed, and summed, in float32 and returned in x's dtype, as by the kernels)."""
    from .quantizers import _upcast, quantize_activation
    xf = _upcast(x)
    out = None
    for j, b in enumerate(bits):
        term = probs[j] * quantize_activation(xf, clips[j], int(b), signed)
        out = term if out is None else out + term
    return out if xf is x else out.to(x.dtype)


def weight_mixture_reference(w: Tensor, probs: Tensor, bits: Sequence[int]) -> Tensor:
    """``sum_i probs[i] * Qw_{bits[i]}(W)`` with d/dW = g (STE) and d/dprobs[i] = sum(g Qw_i(W)); a half/bfloat16
    W is computed in float32 and the sum returned in W's dtype; the sum's matmul runs outside autocast."""
    from .quantizers import _no_autocast, _upcast, quantize_weight
    with torch.no_grad():
        wf = _upcast(w)
        q = torch.stack([quantize_weight(wf, int(b)) for b in bits])
    with _no_autocast(q.device):
        mix = torch.tensordot(probs.to(q.dtype), q, dims=1)
    return w - w.detach() + mix.to(w.dtype)


def _reference_grads(fn: Callable[..., Tensor], inputs: tuple, grad: Tensor) -> list[Tensor | None]:
    """Gradients through the reference formula with a graph (backward under create_graph=True)."""
    need = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    with torch.enable_grad():
        out = fn(*inputs)
        got = torch.autograd.grad(out, [inputs[i] for i in need], grad, create_graph=True, allow_unused=True)
    res: list[Tensor | None] = [None] * len(inputs)
    for i, gi in zip(need, got):
        res[i] = gi
    return res
