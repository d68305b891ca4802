"""Uniform quantizers with straight-through estimators (METHOD.md section 3).

One quantizer serves every bitwidth: bits are arguments, not subclasses.

- Weights: symmetric, per tensor, threshold t = max|W| (detached, recomputed each call: ours),
  step t / (2^(b-1) - 1), levels {-(2^(b-1)-1) .. 2^(b-1)-1} * step. b = 1 is binary:
  sign(W) * mean|W|.
- Activations (PACT): unsigned clip to [0, a] with learnable a, step a / (2^b - 1). Inputs that can
  be negative (e.g. MobileNetV2 block inputs, which have no ReLU) use the signed variant: clip to
  [-a, a] with step a / (2^(b-1) - 1). Rounding uses a straight-through estimator; the gradient
  w.r.t. a is PACT's (1 where the input is clipped at a).

Precision: half/bfloat16 inputs (a bf16 activation under autocast, a bf16 model) are computed in float32 and
the result rounded back to the input's dtype, as the fused kernels do (``fused_kernels``), so both give the
same values in any dtype up to rounding ties; float32 and float64 inputs are computed in their own dtype (no
copy), except that a half/bfloat16 clip or threshold is taken in float32 too. The gradients come back in each
input's dtype.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

__all__ = ["round_ste", "quantize_weight", "quantize_activation", "levels_for", "weight_step", "ActQuantizer"]


def _upcast(t: Tensor) -> Tensor:
    """``t`` in float32 when half/bfloat16 (differentiable), else ``t`` itself."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device`` if it is on there (a float32 matmul stays float32), else a no-op."""
    dev = device.type
    on = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
    return torch.autocast(dev, enabled=False) if on else contextlib.nullcontext()


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def levels_for(bits: int, signed: bool = True) -> int:
    """Number of positive quantization steps n, the largest integer code: 2^(b-1) - 1 when signed (codes -n..n, at
    least 1: a 1-bit weight is its sign), 2^b - 1 when not (codes 0..n). Weights are signed; the one formula of the
    quantizers, the fused kernels and ``integer_model``."""
    return max(2 ** (bits - 1) - 1, 1) if signed else 2 ** bits - 1


def _threshold(w: Tensor, threshold: Tensor | None) -> Tensor:
    return torch.clamp(w.detach().abs().amax() if threshold is None else _upcast(threshold.detach()), min=1e-8)


def weight_step(w: Tensor, bits: int, threshold: Tensor | None = None) -> Tensor:
    """The (detached) step of ``quantize_weight``: 1 bit, mean |w|; else the threshold (max |w| unless given,
    at least 1e-8) over ``levels_for(bits)``. ``integer_model`` writes the codes with the same step.
    Float32 for a half/bfloat16 ``w`` (the step the quantizer computes with)."""
    w = _upcast(w.detach())
    if bits == 1:
        return w.abs().mean()
    return _threshold(w, threshold) / levels_for(bits)


def quantize_weight(w: Tensor, bits: int, threshold: Tensor | None = None) -> Tensor:
    """Symmetric per-tensor fake quantization of a weight with an STE (gradient 1 inside [-t, t]).
    Half/bfloat16 ``w``: computed in float32, returned in ``w``'s dtype (module docstring)."""
    if bits >= 32:
        return w
    wf = _upcast(w)
    if bits == 1:
        out = wf + (torch.sign(wf.detach()) * weight_step(wf, 1) - wf).detach()
    else:
        t = _threshold(wf, threshold)
        step = t / levels_for(bits)
        wc = torch.where(wf.detach().abs() <= t, wf, torch.maximum(torch.minimum(wf.detach(), t), -t))
        out = wc + (torch.round(wc / step) * step - wc).detach()
    return out if wf is w else out.to(w.dtype)


def quantize_activation(x: Tensor, clip: Tensor, bits: int, signed: bool = False) -> Tensor:
    """PACT fake quantization of an activation with learnable clip ``clip`` (a 0-d tensor).
    Half/bfloat16 ``x`` (or clip): computed in float32, returned in ``x``'s dtype (module docstring)."""
    if bits >= 32:
        return x
    xf = _upcast(x)
    a = torch.abs(_upcast(clip)) + 1e-8
    y = torch.maximum(torch.minimum(xf, a), -a) if signed else torch.minimum(torch.relu(xf), a)
    step = a.detach() / levels_for(bits, signed)
    out = y + (torch.round(y / step) * step - y).detach()
    return out if xf is x else out.to(x.dtype)


class ActQuantizer(nn.Module):
    """PACT activation quantizer at a fixed bitwidth, with a learnable clip and a signed flag.

    ``calibrate(x)`` sets the clip from one batch (the 99.9th percentile of |x|) and the signed
    flag (whether the batch has negative values); ``set_signed(flag)`` sets the flag.

    The flag is kept twice: as the ``signed`` buffer (in the state dict, so checkpoints carry it) and
    as a Python bool that ``forward`` reads. Reading the buffer in ``forward`` would copy it from the
    device every call: on a GPU, one synchronisation per quantized layer per forward pass. Something that
    writes the buffer in place (DDP's buffer broadcast) does not update the bool: the Ray Train stage
    calibrates every worker on the same batch, so the workers' flags agree already.
    """

    def __init__(self, bits: int, clip_init: float = 6.0, signed: bool = False) -> None:
        super().__init__()
        self.bits = int(bits)
        self.clip = nn.Parameter(torch.tensor(float(clip_init)))
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self._signed = bool(signed)

    def set_signed(self, flag: bool) -> None:
        with torch.no_grad():
            self.signed.fill_(bool(flag))
        self._signed = bool(flag)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._signed = bool(self.signed)          # once per load, not per forward

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        flat = x.detach().float().flatten()
        if flat.numel() > 1_000_000:
            # evenly spaced sample, indices in int64 (a float32 linspace rounds past the end above 2**24)
            idx = torch.arange(1_000_000, device=flat.device, dtype=torch.int64) * (flat.numel() - 1) // 999_999
            flat = flat[idx]
        self.set_signed(bool((flat < 0).any()))
        self.clip.fill_(max(float(torch.quantile(flat.abs(), 0.999)), 1e-3))

    def forward(self, x: Tensor) -> Tensor:
        return quantize_activation(x, self.clip, self.bits, self._signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self._signed}"
