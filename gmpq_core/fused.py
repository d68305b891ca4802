"""Memory-lean mixtures of quantizers (issue: speed).

The reference activation mixture ``sum_j p_j * Q_j(x)`` builds an autograd graph that keeps about
five full activation-sized tensors per candidate alive until backward. ``act_mixture`` computes
the same value and the same gradients (for x, the probabilities p and the clips) as ONE autograd
node that saves only ``x`` (plus the tiny p and clip vectors) and recomputes each candidate in
backward. Weight mixtures are small (weights, not activations) and stay on the reference path.

Gradients (per candidate j, a_j = |clip_j| + 1e-8, s_j = a_j / n_j, STE for rounding, PACT for a):
  unsigned: y_j = min(relu(x), a_j);  dy_j/dx = 1[0 < x < a_j];  dy_j/da_j = 1[x >= a_j]
  signed:   y_j = clamp(x, -a_j, a_j); dy_j/dx = 1[|x| < a_j];   dy_j/da_j = 1[x >= a_j] - 1[x <= -a_j]
  q_j = round(y_j / s_j) * s_j (forward), dq_j/dy_j = 1 (STE)
  dL/dx = g * sum_j p_j dy_j/dx;  dL/dp_j = sum(g * q_j);  dL/dclip_j = p_j * sum(g * dy_j/da_j) * sign(clip_j)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["act_mixture", "act_mixture_reference", "levels_for"]


def levels_for(bits: int, signed: bool) -> int:
    """Number of positive quantization steps n: 2^b - 1 (unsigned) or 2^(b-1) - 1 (signed, >= 1)."""
    return max(2 ** (bits - 1) - 1, 1) if signed else 2 ** bits - 1


def _clipped(x: Tensor, a: Tensor, signed: bool) -> Tensor:
    return torch.maximum(torch.minimum(x, a), -a) if signed else torch.minimum(torch.relu(x), a)


def act_mixture_reference(x: Tensor, probs: Tensor, clips: Tensor, bits: Sequence[int], signed: bool) -> Tensor:
    """Straightforward ``sum_j probs[j] * Q_{bits[j]}(x; clips[j])`` through plain autograd."""
    from .quantizers import quantize_activation
    out = None
    for j, b in enumerate(bits):
        term = probs[j] * quantize_activation(x, clips[j], int(b), signed)
        out = term if out is None else out + term
    return out


class _ActMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, probs: Tensor, clips: Tensor, bits: tuple[int, ...], signed: bool) -> Tensor:
        a = clips.detach().abs() + 1e-8
        out = torch.zeros_like(x)
        for j, b in enumerate(bits):
            s = a[j] / levels_for(b, signed)
            q = torch.round(_clipped(x, a[j], signed) / s).mul_(s)
            out.add_(q.mul_(probs[j]))
        ctx.save_for_backward(x, probs, clips)
        ctx.bits, ctx.signed = bits, signed
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, probs, clips = ctx.saved_tensors
        bits, signed = ctx.bits, ctx.signed
        a = clips.abs() + 1e-8
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gp = torch.zeros_like(probs) if ctx.needs_input_grad[1] else None
        gc = torch.zeros_like(clips) if ctx.needs_input_grad[2] else None
        pos = x > 0
        for j, b in enumerate(bits):
            aj = a[j]
            if signed:
                inside = x.abs() < aj
                upper, lower = x >= aj, x <= -aj
            else:
                inside = pos & (x < aj)
                upper, lower = x >= aj, None
            if gx is not None:
                gx.add_(torch.where(inside, g, 0.0).mul_(probs[j]))
            if gp is not None:
                s = aj / levels_for(b, signed)
                q = torch.round(_clipped(x, aj, signed) / s).mul_(s)
                gp[j] = (g * q).sum()
            if gc is not None:
                da = (g * upper).sum() - ((g * lower).sum() if lower is not None else 0.0)
                gc[j] = probs[j] * da * torch.sign(clips[j])
        return gx, gp, gc, None, None


def act_mixture(x: Tensor, probs: Tensor, clips: Tensor, bits: Sequence[int], signed: bool) -> Tensor:
    """``sum_j probs[j] * Q_{bits[j]}(x; clips[j])`` as one recompute-in-backward autograd node.

    x: any shape; probs, clips: 1-D of len(bits). Same values and gradients as
    ``act_mixture_reference`` (up to float rounding), saving only x between forward and backward.
    Not twice-differentiable w.r.t. x: the second-order Grad-CAM term only differentiates the
    network head after the feature map, which this node does not belong to.
    """
    return _ActMixture.apply(x, probs, clips, tuple(int(b) for b in bits), bool(signed))
