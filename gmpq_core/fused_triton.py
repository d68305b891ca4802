"""Triton kernels for the activation mixture ``sum_j p_j Q_j(x)`` (CUDA; see fused.py for the maths), and
for the weight mixture (``weight_forward`` / ``weight_backward``: one pass each instead of ~25 small torch
kernels per layer; used only with ``fused_kernels.TRITON_WEIGHT_KERNELS``, off until measured on a GPU).

- forward: ONE pass, reads x once and writes the output once; all candidates are evaluated in
  registers (float32, or float64 for float64 inputs).
- backward: ONE pass, reads x and g once, writes grad_x once, and writes per-program partial sums
  of ``g * q_j`` (for grad_p) and ``g * dy_j/da_j`` (for grad_clip), shape [programs, 2J]; the host
  reduces them in a second, tiny stage (deterministic, no atomics).

Rounding is round-half-to-even like ``torch.round`` (written with ``floor`` so the same kernel runs
in Triton's CPU interpreter, ``TRITON_INTERPRET=1``, which is how it is tested without a GPU).
Entry points take flat (1-D, contiguous) tensors, as the fused custom op hands them over.
Triton is imported lazily: this module imports without it (``triton_available()`` is then False).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["triton_available", "act_forward", "act_backward", "weight_forward", "weight_backward", "BLOCK"]

BLOCK = 1024


try:  # optional: the kernels exist only where triton imports
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch wheels for Linux ship triton
    triton = tl = None


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package imports (kernels still need CUDA or TRITON_INTERPRET=1)."""
    return triton is not None


if triton is not None:
    @triton.jit
    def _round_half_even(v):
        f = tl.floor(v)
        d = v - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)

    @triton.jit
    def _candidate(x, a_ptr, p_ptr, n_ptr, j, SIGNED: tl.constexpr, COMPUTE: tl.constexpr):
        """Candidate j: clip a, probability p, step s = a / n_j, and x clamped to [-a, a] or [0, a]."""
        a = tl.load(a_ptr + j).to(COMPUTE)
        p = tl.load(p_ptr + j).to(COMPUTE)
        s = a / tl.load(n_ptr + j).to(COMPUTE)
        if SIGNED:
            y = tl.minimum(tl.maximum(x, -a), a)
        else:
            y = tl.minimum(tl.maximum(x, 0.0), a)
        return a, p, s, y

    @triton.jit
    def _fwd(x_ptr, out_ptr, p_ptr, a_ptr, n_ptr, numel, J: tl.constexpr, SIGNED: tl.constexpr,
             BLOCK_SIZE: tl.constexpr, COMPUTE: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        acc = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
        for j in tl.static_range(J):
            a, p, s, y = _candidate(x, a_ptr, p_ptr, n_ptr, j, SIGNED, COMPUTE)
            acc += _round_half_even(y / s) * (p * s)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd(x_ptr, g_ptr, gx_ptr, part_ptr, p_ptr, a_ptr, n_ptr, numel, J: tl.constexpr, SIGNED: tl.constexpr,
             BLOCK_SIZE: tl.constexpr, COMPUTE: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        w = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
        for j in tl.static_range(J):
            a, p, s, y = _candidate(x, a_ptr, p_ptr, n_ptr, j, SIGNED, COMPUTE)
            if SIGNED:
                inside = tl.abs(x) < a
                dyda = tl.where(x >= a, 1.0, 0.0) - tl.where(x <= -a, 1.0, 0.0)
            else:
                inside = (x > 0.0) & (x < a)
                dyda = tl.where(x >= a, 1.0, 0.0)
            w += tl.where(inside, p, 0.0)
            q = _round_half_even(y / s) * s
            tl.store(part_ptr + pid * (2 * J) + j, tl.sum(g * q, axis=0))
            tl.store(part_ptr + pid * (2 * J) + J + j, tl.sum(g * dyda, axis=0))
        tl.store(gx_ptr + offs, (g * w).to(gx_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _w_level(w, s_ptr, one_ptr, j, COMPUTE: tl.constexpr):
        """Candidate j of the weight mixture: its step s and the integer level k of w (sign(w) for 1 bit)."""
        s = tl.load(s_ptr + j).to(COMPUTE)
        sign = tl.where(w > 0.0, 1.0, tl.where(w < 0.0, -1.0, 0.0))
        k = tl.where(tl.load(one_ptr + j) != 0, sign, _round_half_even(w / s))
        return s, k

    @triton.jit
    def _wfwd(w_ptr, out_ptr, ps_ptr, s_ptr, one_ptr, numel, J: tl.constexpr, BLOCK_SIZE: tl.constexpr,
              COMPUTE: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        acc = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)
        for j in tl.static_range(J):
            s, k = _w_level(w, s_ptr, one_ptr, j, COMPUTE)
            acc += k * tl.load(ps_ptr + j).to(COMPUTE)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _wbwd(g_ptr, w_ptr, part_ptr, s_ptr, one_ptr, numel, J: tl.constexpr, BLOCK_SIZE: tl.constexpr,
              COMPUTE: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        for j in tl.static_range(J):
            s, k = _w_level(w, s_ptr, one_ptr, j, COMPUTE)
            tl.store(part_ptr + pid * J + j, tl.sum(g * k, axis=0))


_LEVELS: dict[tuple, Tensor] = {}
_ONE_BIT: dict[tuple, Tensor] = {}


def _levels(bits: Sequence[int], signed: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The levels n_j as a device tensor, built once per (bits, signed, dtype, device): no
    host-to-device copy per call."""
    key = (tuple(bits), bool(signed), dtype, device)
    n = _LEVELS.get(key)
    if n is None:
        from .fused_kernels import levels_for
        n = _LEVELS[key] = torch.tensor([float(levels_for(int(b), signed)) for b in bits], dtype=dtype,
                                        device=device)
    return n


def _params(x: Tensor, probs: Tensor, clips: Tensor, bits: Sequence[int], signed: bool):
    fwd, bwd = _fwd, _bwd
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    compute = tl.float64 if wide == torch.float64 else tl.float32
    a = clips.detach().to(wide).abs().add_(1e-8)  # a fresh contiguous 1-D tensor
    p = probs.detach().to(wide).contiguous()
    n = _levels(bits, signed, wide, x.device)
    grid = (triton.cdiv(x.numel(), BLOCK),)
    return fwd, bwd, grid, compute, wide, p, a, n


def act_forward(x: Tensor, probs: Tensor, clips: Tensor, bits: Sequence[int], signed: bool) -> Tensor:
    """Forward of the activation mixture on a flat contiguous ``x``; output has x's dtype."""
    fwd, _, grid, compute, _, p, a, n = _params(x, probs, clips, bits, signed)
    out = torch.empty_like(x)
    fwd[grid](x, out, p, a, n, x.numel(), J=len(bits), SIGNED=bool(signed), BLOCK_SIZE=BLOCK, COMPUTE=compute)
    return out


def act_backward(g: Tensor, x: Tensor, probs: Tensor, clips: Tensor, bits: Sequence[int],
                 signed: bool, need_probs: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
    """(grad_x, grad_probs, grad_clips) of the activation mixture for upstream gradient ``g``; grad_probs
    is None with ``need_probs=False`` (the kernel's partial sums for it cost nothing extra: same pass)."""
    _, bwd, grid, compute, wide, p, a, n = _params(x, probs, clips, bits, signed)
    J = len(bits)
    gx = torch.empty_like(x)
    part = torch.empty((grid[0], 2 * J), dtype=wide, device=x.device)
    bwd[grid](x, g.contiguous(), gx, part, p, a, n, x.numel(), J=J, SIGNED=bool(signed), BLOCK_SIZE=BLOCK,
              COMPUTE=compute)
    sums = part.sum(dim=0)
    gp = sums[:J]
    gc = p * sums[J:] * torch.sign(clips.detach().to(wide))
    return gx, gp.to(probs.dtype) if need_probs else None, gc.to(clips.dtype)


def _one_bit(bits: Sequence[int], device: torch.device) -> Tensor:
    """1 where a weight candidate has 1 bit (sign(W) levels), else 0; a device tensor built once per bits."""
    key = (tuple(bits), device)
    if key not in _ONE_BIT:
        _ONE_BIT[key] = torch.tensor([int(b == 1) for b in bits], dtype=torch.int32, device=device)
    return _ONE_BIT[key]


def weight_forward(w: Tensor, probs: Tensor, bits: Sequence[int]) -> Tensor:
    """Forward of the weight mixture ``sum_j p_j s_j k_j(W)`` on a flat contiguous ``w`` in ONE pass (the steps
    s_j from ``fused_kernels._weight_steps``, as the eager kernel); output has w's dtype."""
    from .fused_kernels import _upcast, _weight_steps
    wf = _upcast(w)
    s = _weight_steps(wf, tuple(bits))
    ps = probs.detach().to(s.dtype) * s
    out = torch.empty_like(w)
    compute = tl.float64 if s.dtype == torch.float64 else tl.float32
    _wfwd[(triton.cdiv(w.numel(), BLOCK),)](wf, out, ps, s, _one_bit(bits, w.device), w.numel(), J=len(bits),
                                            BLOCK_SIZE=BLOCK, COMPUTE=compute)
    return out


def weight_backward(g: Tensor, w: Tensor, probs: Tensor, bits: Sequence[int]) -> Tensor:
    """grad_probs of the weight mixture, ``s_j sum(g k_j(W))``, from ONE pass over g and W (per-program partial
    sums, reduced on the host side as for the activations); grad_W is g itself (the STE, fused.py)."""
    from .fused_kernels import _upcast, _weight_steps
    wf = _upcast(w)
    s = _weight_steps(wf, tuple(bits))
    grid = (triton.cdiv(w.numel(), BLOCK),)
    part = torch.empty((grid[0], len(bits)), dtype=s.dtype, device=w.device)
    compute = tl.float64 if s.dtype == torch.float64 else tl.float32
    _wbwd[grid](g.contiguous(), wf, part, s, _one_bit(bits, w.device), w.numel(), J=len(bits), BLOCK_SIZE=BLOCK,
                COMPUTE=compute)
    return (part.sum(dim=0) * s).to(probs.dtype)
