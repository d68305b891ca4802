"""Eager kernels of the fused quantizer mixtures (no autograd), used by ``fused.py`` (maths there).

Kernels work on flat (1-D, contiguous) tensors: eager PyTorch ("fused") as written, or compiled by
TorchInductor ("compiled"); ``*_impl`` wrap them for tensors of any shape and memory format.

Host cost matters here (one call per layer per pass, tiny tensors on a GPU): the per-candidate
scalars (steps s_j, p_j s_j) are computed as ONE vector op each from a cached constant vector per
(bits, signed, device, dtype) and split with one ``unbind``, instead of ~4 scalar ops per candidate.
The values are bit-for-bit those of the per-candidate scalar formulas ``a_j / n_j``: on CPU
``a / n`` (true division), on CUDA ``a * fl(1 / n)`` (PyTorch's CUDA ``tensor / python number``
multiplies by the rounded reciprocal, so that is what the scalar formula computed there). That holds for
this eager path; the Triton kernel (``fused_triton.py``) divides ``a / n`` inside the kernel and the
"compiled" path traces ``a[j] / n``, so on CUDA a value exactly at a rounding tie can land one level
apart between implementations (the CUDA tests compare them at 1e-3 relative tolerance).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .quantizers import _upcast, levels_for  # the one levels formula (re-exported: gmpq_core.fused imports it here)

__all__ = ["levels_for", "act_fwd_impl", "act_bwd_impl", "w_fwd_impl", "w_bwd_impl"]

_EPS = 1e-8  # a = |clip| + 1e-8, as in quantizers.quantize_activation


_DIVISORS: dict[tuple, Tensor] = {}


def _steps(a: Tensor, levels: tuple[int, ...]) -> Tensor:
    """s_j = a_j / levels[j] for a 1-D ``a`` (one op; the constant vector is cached per device/dtype)."""
    if torch.compiler.is_compiling():  # traced: the plain per-candidate formula, as Inductor always saw it
        return torch.stack([a[j] / n for j, n in enumerate(levels)])
    key = (levels, a.device, a.dtype)
    d = _DIVISORS.get(key)
    if d is None:
        n = torch.tensor(levels, dtype=a.dtype)
        d = _DIVISORS[key] = (1.0 / n if a.is_cuda else n).to(a.device)  # see the module docstring
    return a * d if a.is_cuda else a / d


# ---------------------------------------------------------------------------------------------
# kernels on flat (1-D, contiguous) tensors

def _dot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b) of two 1-D tensors: BLAS dot in eager, a fusable reduction when compiling."""
    return (a * b).sum() if torch.compiler.is_compiling() else torch.dot(a, b)


def _act_bounds(xf: Tensor, clips: Tensor, bits: tuple[int, ...], signed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(lower bounds, a = |clip| + eps, steps s = a / n), each [J] in xf's dtype."""
    a = clips.to(xf.dtype).abs() + _EPS
    s = _steps(a, tuple(levels_for(b, signed) for b in bits))
    return (-a if signed else torch.zeros_like(a)), a, s


def _scalars(t: Tensor) -> list:
    """The entries of a small 1-D tensor, one per candidate: Python floats on the CPU (an elementwise op with
    a Python scalar runs ~3x faster there than with a 0-d tensor operand: ``clamp`` 0.5 vs 1.7 ms on 1.6 M
    floats; the values are the same, float32 -> float -> float32 is exact), 0-d tensors elsewhere (reading
    them on a GPU would wait for the device) and while compiling."""
    return t.tolist() if t.device.type == "cpu" and not torch.compiler.is_compiling() else list(t.unbind())


def _accumulate_(out: Tensor | None, q: Tensor, c) -> Tensor:
    """out += c * q for a Python float or a 0-d tensor ``c``; ``out=None`` (the first candidate) scales
    ``q`` in place and returns it (no zero-filled accumulator: one pass less per call)."""
    if out is None:
        return q.mul_(c)
    return out.add_(q, alpha=c) if isinstance(c, float) else out.addcmul_(q, c)


def _act_forward_kernel(x: Tensor, probs: Tensor, clips: Tensor, bits: tuple[int, ...], signed: bool) -> Tensor:
    xf = _upcast(x)
    lo, a, s = _act_bounds(xf, clips, bits, signed)
    ps = probs.to(xf.dtype) * s
    out = q = None                                             # q: scratch, reused by candidates 2..J
    for lo_j, a_j, s_j, ps_j in zip(*map(_scalars, (lo, a, s, ps))):
        q = torch.clamp(xf, lo_j, a_j, out=q).div_(s_j).round_()  # integer level of candidate j
        out = _accumulate_(out, q, ps_j)
        q = None if q is out else q                            # the first candidate's q became the output
    return out.to(x.dtype)


def _act_backward_kernel(g: Tensor, x: Tensor, probs: Tensor, clips: Tensor, bits: tuple[int, ...],
                         signed: bool, need_probs: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
    """(grad_x, grad_probs, grad_clips); ``need_probs=False`` skips grad_probs (None): one pass per candidate
    less, for a caller whose probabilities are constants (a fixed-policy layer, qmodules.py).
    Masks are float tensors (0./1.) multiplied in: ``torch.where`` with a bool mask costs ~10x an
    arithmetic pass on the CPU. (So an inf/NaN upstream gradient at a masked-out element gives NaN here, 0
    through ``where``; a float16 GradScaler skips such a step either way.)"""
    xf, gf = _upcast(x), _upcast(g)
    lo, a, s = _act_bounds(xf, clips, bits, signed)
    p = probs.to(xf.dtype)
    if len(bits) == 1 and not need_probs and xf.device.type == "cpu" and not torch.compiler.is_compiling():
        return _one_act_backward(gf, xf, p, clips, lo, a, signed, x.dtype)
    mag, gs = (xf.abs(), gf * torch.sign(xf)) if signed else (xf, gf)
    w, q = None, torch.empty_like(xf)                          # w = sum_j p_j 1[inside_j]; q: scratch
    inside, gq = [], []
    for lo_j, a_j, s_j, p_j in zip(*map(_scalars, (lo, a, s, p))):
        torch.lt(mag, a_j, out=q)                              # 1[|x| < a_j] (as 0./1.)
        inside.append(_dot(gs, q))
        w = _accumulate_(w, q, p_j)
        q = torch.empty_like(xf) if q is w else q
        if need_probs:
            gq.append(_dot(gf, torch.clamp(xf, lo_j, a_j, out=q).div_(s_j).round_()))
    if not signed:
        w.mul_(torch.gt(xf, 0.0, out=q))                       # unsigned: inside_j is 0 < x < a_j
    gx = gf * w
    da = gs.sum() - torch.stack(inside)                        # sum g dy_j/da_j
    gc = p * da * torch.sign(clips.to(xf.dtype))
    gp = (torch.stack(gq) * s).to(probs.dtype) if need_probs else None
    return gx.to(x.dtype), gp, gc.to(clips.dtype)


def _one_act_backward(gf: Tensor, xf: Tensor, p: Tensor, clips: Tensor, lo: Tensor, a: Tensor, signed: bool,
                      dtype: torch.dtype) -> tuple[Tensor, None, Tensor]:
    """``_act_backward_kernel`` for one candidate with a constant probability on the CPU (a fixed-policy
    layer, the quantized fine-tune): 3 passes over x unsigned, 5 signed, instead of 7 and 9. grad_x =
    p g 1[lo < x < a] in one pass (``hardtanh_backward``: the same strict comparisons; it selects where the
    general kernel multiplies by a mask, so an inf/NaN gradient at a masked-out element gives 0 here, NaN
    there: the clip's gradient is non-finite either way); grad_a = p (sum g 1[x >= a] - sum g 1[x <= -a]
    when signed) sign(clip). The bounds are Python floats (``_scalars`` on the CPU)."""
    (lo_0,), (a_0,), (p_0,) = _scalars(lo), _scalars(a), _scalars(p)
    gx = torch.ops.aten.hardtanh_backward(gf, xf, lo_0, a_0)
    if p_0 != 1.0:
        gx.mul_(p_0)
    q = torch.ge(xf, a_0, out=torch.empty_like(xf))          # 1[x >= a] as 0./1.
    da = _dot(gf, q)
    if signed:                                                 # minus sum g 1[x <= -a]
        da = da - _dot(gf, torch.le(xf, lo_0, out=q))
    gc = p * da * torch.sign(clips.to(xf.dtype))
    return gx.to(dtype), None, gc.to(clips.dtype)


def _weight_threshold(wf: Tensor) -> Tensor:
    lo, hi = torch.aminmax(wf)
    return torch.maximum(-lo, hi).clamp_min(1e-8)              # t = max|W|, one pass


def _weight_steps(wf: Tensor, bits: tuple[int, ...]) -> Tensor:
    """Steps s_i [I] of Qw_i(W) = s_i k_i: t / (2^(b-1) - 1), and mean|W| for b = 1."""
    s = _steps(_weight_threshold(wf).expand(len(bits)), tuple(levels_for(b) for b in bits))
    if 1 in bits:
        key = ("b=1", bits, wf.device)
        one = None if torch.compiler.is_compiling() else _DIVISORS.get(key)
        if one is None:
            one = torch.tensor([b == 1 for b in bits], device=wf.device)
            if not torch.compiler.is_compiling():
                _DIVISORS[key] = one
        s = torch.where(one, wf.abs().mean(), s)
    return s


def _weight_levels(wf: Tensor, b: int, s: Tensor, k: Tensor) -> Tensor:
    """Integer levels k of Qw_b(W) = s k (b = 1: sign(W)), written into the scratch tensor ``k``."""
    return torch.sign(wf, out=k) if b == 1 else torch.div(wf, s, out=k).round_()


def _weight_forward_kernel(w: Tensor, probs: Tensor, bits: tuple[int, ...]) -> Tensor:
    wf = _upcast(w)
    s = _weight_steps(wf, bits)
    ps = probs.to(wf.dtype) * s
    out, scratch = torch.zeros_like(wf), torch.empty_like(wf)
    for b, s_i, ps_i in zip(bits, s.unbind(), ps.unbind()):
        out.addcmul_(_weight_levels(wf, b, s_i, scratch), ps_i)
    return out.to(w.dtype)


def _weight_backward_kernel(g: Tensor, w: Tensor, probs: Tensor, bits: tuple[int, ...]) -> Tensor:
    wf, gf = _upcast(w), _upcast(g)
    s, scratch = _weight_steps(wf, bits), torch.empty_like(wf)
    gk = [_dot(gf, _weight_levels(wf, b, s_i, scratch)) for b, s_i in zip(bits, s.unbind())]
    return (torch.stack(gk) * s).to(probs.dtype)


_KERNELS: dict[str, Callable] = {"act_forward": _act_forward_kernel, "act_backward": _act_backward_kernel,
                                 "weight_forward": _weight_forward_kernel, "weight_backward": _weight_backward_kernel}
_COMPILED: dict[str, Callable] = {}


# The weight mixtures of impl "triton" in Triton kernels too (fused_triton.weight_forward / weight_backward),
# instead of the eager kernels' ~25 small torch kernels per layer and pass. Written in session 19 without a GPU
# (tested in Triton's CPU interpreter against the reference); off until a GPU measures it
# (benchmarks/bench_search_step.py variant "+tweights").
TRITON_WEIGHT_KERNELS = False


def _kernel(impl: str, name: str, device: torch.device) -> Callable:
    if impl == "triton" and device.type == "cuda" and (name.startswith("act") or TRITON_WEIGHT_KERNELS):
        from . import fused_triton
        return getattr(fused_triton, name)
    if impl == "compiled":
        if name not in _COMPILED:  # one compile per (candidate set, signedness, dtype), any shape
            _COMPILED[name] = torch.compile(_KERNELS[name], dynamic=True, fullgraph=True)
        return _COMPILED[name]
    return _KERNELS[name]  # "fused" (and triton on a non-CUDA tensor or for weights)


def _flat(t: Tensor, like: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``t`` as a 1-D tensor in the memory order of ``like`` (a view when possible), and the inverse."""
    shape = like.shape
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = shape
        flat = t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1)
        return flat, lambda r: r.view(n, h, w, c).permute(0, 3, 1, 2)
    return t.contiguous().view(-1), lambda r: r.view(shape)


# ---------------------------------------------------------------------------------------------
# implementations on tensors of any shape (no autograd)
def _same_layout(out: Tensor, like: Tensor) -> Tensor:
    """``out`` in ``like``'s memory layout (strides compared where a dimension has more than one element: a
    depthwise [C, 1, k, k] or a 1x1 weight is dense in both formats and needs no copy)."""
    same = all(a == b for a, b, n in zip(out.stride(), like.stride(), like.shape) if n > 1)
    return out if same else torch.empty_like(like).copy_(out)


# (callers run them with autograd off: inside an autograd.Function / below the autograd key, or
# under no_grad; no ``detach`` or grad-mode switch per call, each costs host time)
def act_fwd_impl(x: Tensor, probs: Tensor, clips: Tensor, bits: Sequence[int], signed: bool, impl: str) -> Tensor:
    xf, back = _flat(x, x)
    out = _kernel(impl, "act_forward", x.device)(xf, probs, clips, tuple(bits), signed)
    return _same_layout(back(out), x)


def act_bwd_impl(grad: Tensor, x: Tensor, probs: Tensor, clips: Tensor, bits: Sequence[int], signed: bool,
                 impl: str, need_probs: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
    """(grad_x, grad_probs, grad_clips); grad_probs is None with ``need_probs=False``."""
    xf, back = _flat(x, x)
    gf, _ = _flat(grad, x)
    gx, gp, gc = _kernel(impl, "act_backward", x.device)(gf, xf, probs, clips, tuple(bits), signed, need_probs)
    return _same_layout(back(gx), x), gp, gc


def w_fwd_impl(w: Tensor, probs: Tensor, bits: Sequence[int], impl: str) -> Tensor:
    wf, back = _flat(w, w)                 # memory order: no copy of a channels_last weight
    out = _kernel(impl, "weight_forward", w.device)(wf, probs, tuple(bits))
    return _same_layout(back(out), w)


def w_bwd_impl(grad: Tensor, w: Tensor, probs: Tensor, bits: Sequence[int], impl: str) -> Tensor:
    wf, _ = _flat(w, w)
    gf, _ = _flat(grad, w)
    return _kernel(impl, "weight_backward", w.device)(gf, wf, probs, tuple(bits))
