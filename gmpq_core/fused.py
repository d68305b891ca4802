"""Fused mixtures of quantizers (issue 5, speed): one autograd node per mixture, recompute in backward.

The reference activation mixture ``sum_j p_j * Q_j(x)`` builds an autograd graph that keeps about
five activation-sized tensors per candidate alive until backward and runs ~10 elementwise passes
per candidate. Here each mixture is ONE custom operator (``torch.ops.gmpq.act_mixture`` /
``torch.ops.gmpq.weight_mixture``, registered with ``torch.library.custom_op``, so it also works
inside ``torch.compile`` graphs without a graph break) that saves only its inputs and recomputes
the candidates in backward; ``gmpq.mixed_conv2d`` does both mixtures and the convolution in one
node that keeps only x and W (the mixed operands are recomputed in backward; except "fused" on a CPU
and "triton" on CUDA, the defaults there, which keep them too: ``KEEP_OPERANDS_ON``, ``_ConvFn``). ``impl``:

- ``"reference"``: the straightforward autograd formula (``act_mixture_reference``);
- ``"fused"``: eager PyTorch kernels, few passes, in place (any device);
- ``"compiled"``: the same kernels compiled by TorchInductor (dynamic shapes, one compile per
  candidate set / signedness / dtype; C++/OpenMP on CPU): about one pass forward, one backward;
- ``"triton"``: hand-written Triton kernels (CUDA; ``fused_triton.py``); weights use ``"fused"``.

Activation gradients (per candidate j, a_j = |clip_j| + 1e-8, n_j levels, s_j = a_j / n_j, STE for
the rounding, PACT for the clip; METHOD.md 3):
  unsigned: y_j = clamp(x, 0, a_j);  dy_j/dx = 1[0 < x < a_j];  dy_j/da_j = 1[x >= a_j]
  signed:   y_j = clamp(x, -a_j, a_j); dy_j/dx = 1[|x| < a_j];  dy_j/da_j = sign(x) 1[|x| >= a_j]
  q_j = s_j round(y_j / s_j);  dL/dx = g sum_j p_j dy_j/dx;  dL/dp_j = sum(g q_j);
  dL/dclip_j = p_j sum(g dy_j/da_j) sign(clip_j)
(at exact ties x == a_j the reference's ``minimum`` splits the gradient in halves; here x >= a_j
counts fully as clipped). Weight mixture ``sum_i p_i Qw_i(W)`` (t = max|W|, s_i = t / (2^(b-1)-1),
b = 1: sign(W) mean|W|): dL/dW = g (STE, t covers all of W), dL/dp_i = sum(g Qw_i(W)).
Half/bfloat16 inputs are computed in float32 and rounded back (sums accumulate in float32).
When a backward runs with ``create_graph=True`` the gradients are taken through the reference
formula instead, so higher-order derivatives stay exact.

Host cost: the custom operators are what ``torch.compile`` traces. In eager mode the same nodes run
as ``torch.autograd.Function`` s calling the same kernels (same values, same saved tensors), which
skips the custom-op dispatch (~0.1-0.2 ms host time per call); the supernet calls the unchecked
``_act_mixture`` / ``_weight_mixture`` / ``_mixed_conv2d`` (its candidates are validated once).

Files: the reference formulas in ``fused_reference.py``, the custom operators and the forward / backward formulas
they share with the eager nodes in ``fused_ops.py``, the kernels in ``fused_kernels.py`` / ``fused_triton.py``;
here the eager nodes and the public API.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError
from .fused_kernels import act_bwd_impl, act_fwd_impl, levels_for, w_bwd_impl, w_fwd_impl
from .fused_ops import _act_grads, _conv_bwd_impl, _conv_fwd_impl, _conv_grads, _conv_operands, _weight_grads
from .fused_reference import act_mixture_reference, weight_mixture_reference

__all__ = ["IMPLS", "act_mixture", "act_mixture_reference", "weight_mixture", "weight_mixture_reference",
           "mixed_conv2d", "levels_for", "resolve_mixture_impl"]

IMPLS = ("reference", "fused", "compiled", "triton")


def _no_probs_grad(grad, w, probs, bits, impl) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# eager twins of the operators: same kernels, saved tensors and gradients, no custom-op dispatch
class _ActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, clips, bits, signed, impl):
        ctx.save_for_backward(x, probs, clips)
        ctx.static = (bits, signed, impl)
        return act_fwd_impl(x, probs, clips, bits, signed, impl)

    @staticmethod
    def backward(ctx, grad):
        need_probs = ctx.needs_input_grad[1]   # constant probabilities (a fixed-policy layer): no grad_probs pass
        return _act_grads(ctx, grad, functools.partial(act_bwd_impl, need_probs=need_probs))


class _WeightFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, probs, bits, impl):
        ctx.save_for_backward(w, probs)
        ctx.static = (bits, impl)
        return w_fwd_impl(w, probs, bits, impl)

    @staticmethod
    def backward(ctx, grad):
        return _weight_grads(ctx, grad, w_bwd_impl if ctx.needs_input_grad[1] else _no_probs_grad)


# (impl, device type) pairs whose one-node conv keeps its mixed operands for backward (see _ConvFn)
KEEP_OPERANDS_ON = frozenset({("fused", "cpu"), ("triton", "cuda")})


def keeps_operands(impl: str, device: torch.device, keep: bool | None = None) -> bool:
    """Whether the one-node conv keeps its two mixed operands for backward: ``keep`` when given (a layer's
    ``keep_operands``), else the default rule (the eager "fused" kernels on a CPU and the Triton kernels on a
    GPU, ``KEEP_OPERANDS_ON``)."""
    return (impl, device.type) in KEEP_OPERANDS_ON if keep is None else bool(keep)


class _ConvFn(torch.autograd.Function):
    """With the eager "fused" kernels on a CPU the node also keeps the two mixed operands for backward instead
    of recomputing them there: memory is plentiful and passes are not (the quantized fine-tune's step
    1.07-1.14x faster on the 2-core machine, for 1.37x (ResNet-20) / 1.64x (ResNet-18) the saved-tensor
    bytes; benchmarks/RESULTS.md "Session 13"). So do the Triton kernels on a GPU: the search step of
    ResNet-18 at 224 px replayed from a CUDA graph 1.88 -> 1.74x an FP step, for 1.06 -> 1.40x its peak
    memory, inside the issue's 1.5x (H200, RESULTS.md "Session 18"). The compiled kernels, whose one-pass
    recompute is cheap, keep only the node's inputs. ``keep`` (True / False) overrides the rule
    (``keeps_operands``; the benchmark's "+keep" / "+recompute" variants)."""
    @staticmethod
    def forward(ctx, x, w, bias, pa, clips, a_bits, signed, pw, w_bits, stride, padding, dilation, groups, impl,
                keep=None):
        operands = _conv_operands(x, w, pa, clips, a_bits, signed, pw, w_bits, impl)
        ctx.save_for_backward(x, w, bias, pa, clips, pw, *(operands if keeps_operands(impl, x.device, keep) else ()))
        ctx.static = (a_bits, signed, w_bits, stride, padding, dilation, groups, impl)
        return _conv_fwd_impl(x, w, bias, pa, clips, a_bits, signed, pw, w_bits, stride, padding, dilation, groups,
                              impl, operands=operands)

    @staticmethod
    def backward(ctx, grad):
        need = ctx.needs_input_grad
        return *_conv_grads(ctx, grad, functools.partial(_conv_bwd_impl, need_pa=need[3], need_pw=need[7])), None


# unchecked entry points (bits: tuple of ints, signed: bool, stride/padding/dilation: lists of 2 ints)
def _act_mixture(x: Tensor, probs: Tensor, clips: Tensor, bits: tuple[int, ...], signed: bool, impl: str) -> Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.gmpq.act_mixture(x, probs, clips, list(bits), signed, impl)
    return _ActFn.apply(x, probs, clips, bits, signed, impl)


def _weight_mixture(w: Tensor, probs: Tensor, bits: tuple[int, ...], impl: str) -> Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.gmpq.weight_mixture(w, probs, list(bits), impl)
    return _WeightFn.apply(w, probs, bits, impl)


def _mixed_conv2d(x, w, bias, pa, clips, a_bits, signed, pw, w_bits, stride, padding, dilation, groups, impl,
                  keep=None):
    if torch.compiler.is_compiling():     # the compiled node recomputes (keep does not apply)
        return torch.ops.gmpq.mixed_conv2d(x, w, bias, pa, clips, list(a_bits), signed, pw, list(w_bits), stride,
                                           padding, dilation, groups, impl)
    return _ConvFn.apply(x, w, bias, pa, clips, a_bits, signed, pw, w_bits, stride, padding, dilation, groups, impl,
                         keep)


# ---------------------------------------------------------------------------------------------
# public API
def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ConfigError(f"mixture impl must be one of {', '.join(map(repr, IMPLS))}, but got impl={impl!r}.")
    return impl


def _check_lengths(what: str, bits: Sequence[int], **vectors: Tensor) -> tuple[int, ...]:
    bits = tuple(int(b) for b in bits)
    for name, v in vectors.items():
        if v.dim() != 1 or v.shape[0] != len(bits):
            raise ValueError(f"{what}: {name} must be 1-D with one entry per candidate ({len(bits)}), "
                             f"but got shape {tuple(v.shape)}.")
    return bits


def act_mixture(x: Tensor, probs: Tensor, clips: Tensor, bits: Sequence[int], signed: bool, *,
                impl: str = "fused") -> Tensor:
    """``sum_j probs[j] * Q_{bits[j]}(x; clips[j])`` (PACT activation quantizers, STE) as one node.

    x: any shape, float64/32/16/bfloat16 (output has x's dtype and memory format); probs, clips:
    1-D, one entry per candidate in ``bits``. Same values and gradients (for x, probs, clips) as
    ``act_mixture_reference`` up to float rounding; saves only x, probs and clips for backward.
    """
    bits = _check_lengths("act_mixture", bits, probs=probs, clips=clips)
    if _check_impl(impl) == "reference":
        return act_mixture_reference(x, probs, clips, bits, bool(signed))
    return _act_mixture(x, probs, clips, bits, bool(signed), impl)


def weight_mixture(w: Tensor, probs: Tensor, bits: Sequence[int], *, impl: str = "fused") -> Tensor:
    """``sum_i probs[i] * Qw_{bits[i]}(W)`` (symmetric per-tensor weight quantizers, STE) as one node;
    same values and gradients as ``weight_mixture_reference``, saving only W and probs."""
    bits = _check_lengths("weight_mixture", bits, probs=probs)
    if _check_impl(impl) == "reference":
        return weight_mixture_reference(w, probs, bits)
    return _weight_mixture(w, probs, bits, impl)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(u) for u in v]


def mixed_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, probs_a: Tensor, clips: Tensor,
                 a_bits: Sequence[int], signed: bool, probs_w: Tensor, w_bits: Sequence[int], *,
                 stride=1, padding=0, dilation=1, groups: int = 1, impl: str = "fused") -> Tensor:
    """The composite mixed layer ``conv2d(act_mixture(x), weight_mixture(W), bias)`` as one node that saves
    only its inputs: the two mixed operands are recomputed in backward (one activation-sized and one
    weight-sized tensor less per layer kept for backward than the two separate nodes). Exceptions
    (``keeps_operands``): ``impl="fused"`` on a CPU and ``impl="triton"`` on CUDA keep them too, trading that
    memory for the recompute's passes."""
    a_bits = _check_lengths("mixed_conv2d", a_bits, probs_a=probs_a, clips=clips)
    w_bits = _check_lengths("mixed_conv2d", w_bits, probs_w=probs_w)
    if _check_impl(impl) == "reference":
        return F.conv2d(act_mixture_reference(x, probs_a, clips, a_bits, bool(signed)),
                        weight_mixture_reference(weight, probs_w, w_bits), bias, stride, padding, dilation, groups)
    return _mixed_conv2d(x, weight, bias, probs_a, clips, a_bits, bool(signed), probs_w, w_bits, _pair(stride),
                         _pair(padding), _pair(dilation), int(groups), impl)


def resolve_mixture_impl(name: str, device: str | torch.device = "cpu") -> str:
    """The implementation to use for ``name`` on ``device``: ``"auto"`` is ``"triton"`` on CUDA when
    Triton is importable, else ``"fused"``; ``"triton"`` without CUDA + Triton is a ConfigError."""
    from .fused_triton import triton_available
    dev = torch.device(device)
    if name == "auto":
        return "triton" if dev.type == "cuda" and triton_available() else "fused"
    _check_impl(name)
    if name == "triton" and not (dev.type == "cuda" and triton_available()):
        raise ConfigError(f"mixture_impl='triton' needs a CUDA device and the triton package, but the device is "
                          f"{dev} (triton importable: {triton_available()}). Use 'auto', 'fused' or 'compiled'.")
    return name
