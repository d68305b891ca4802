"""The fused mixtures' nodes as ``torch.library`` custom operators (``gmpq::act_mixture``, ``gmpq::weight_mixture``,
``gmpq::mixed_conv2d`` and their backward operators: what ``torch.compile`` traces; registered on import), and the
forward / backward formulas they share with the eager ``torch.autograd.Function`` s in ``fused.py`` (the maths
there)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused_kernels import act_bwd_impl, act_fwd_impl, w_bwd_impl, w_fwd_impl
from .fused_reference import _reference_grads, act_mixture_reference, weight_mixture_reference


# ---------------------------------------------------------------------------------------------
# backward formulas shared by the custom operators (compiled graphs) and the eager Functions;
# ``bwd`` is the backward custom operator (traced) or the plain implementation (eager)
def _act_grads(ctx, grad, bwd):
    x, probs, clips = ctx.saved_tensors
    bits, signed, impl = ctx.static
    if torch.is_grad_enabled():  # double backward: differentiate the reference formula
        gx, gp, gc = _reference_grads(lambda *t: act_mixture_reference(*t, bits, signed), (x, probs, clips), grad)
    else:
        gx, gp, gc = bwd(grad, x, probs, clips, list(bits), signed, impl)
    return gx, gp, gc, None, None, None


def _weight_grads(ctx, grad, bwd):
    w, probs = ctx.saved_tensors
    bits, impl = ctx.static
    if torch.is_grad_enabled():
        _, gp = _reference_grads(lambda *t: weight_mixture_reference(*t, bits), (w, probs), grad)
    else:
        gp = bwd(grad, w, probs, list(bits), impl)
    return grad, gp, None, None  # d/dW = g: the STE passes everything (t = max|W| covers W)


def _conv_operands(x, w, pa, clips, a_bits, signed, pw, w_bits, impl) -> tuple[Tensor, Tensor]:
    xq, wq = act_fwd_impl(x, pa, clips, a_bits, signed, impl), w_fwd_impl(w, pw, w_bits, impl)
    return xq, wq.to(xq.dtype)  # bf16 activations meet an fp32 weight under autocast


def _conv_fwd_impl(x, w, bias, pa, clips, a_bits, signed, pw, w_bits, stride, padding, dilation, groups, impl,
                   operands=None):
    xq, wq = operands or _conv_operands(x, w, pa, clips, a_bits, signed, pw, w_bits, impl)
    b = None if bias is None else bias.detach().to(xq.dtype)
    with torch.no_grad():
        return F.conv2d(xq, wq, b, stride, padding, dilation, groups)


def _conv_bwd_impl(grad, x, w, pa, clips, a_bits, signed, pw, w_bits, stride, padding, dilation, groups, impl,
                   has_bias, need_pa=True, need_pw=True, operands=None):
    # the mixed operands: kept by the forward (the eager node on a CPU), else recomputed, one pass each
    xq, wq = operands or _conv_operands(x, w, pa, clips, a_bits, signed, pw, w_bits, impl)
    if xq.dtype != grad.dtype:   # the forward's conv ran under autocast (a float32 x): its lower-precision dtype
        xq, wq = xq.to(grad.dtype), wq.to(grad.dtype)
    with torch.no_grad():
        gxq, gwq, gb = torch.ops.aten.convolution_backward(grad, xq, wq, [w.shape[0]] if has_bias else None, stride,
                                                          padding, dilation, False, [0, 0], groups,
                                                          [True, True, has_bias])
    del xq
    gx, gpa, gc = act_bwd_impl(gxq, x, pa, clips, a_bits, signed, impl, need_pa)
    gpw = w_bwd_impl(gwq, w, pw, w_bits, impl) if need_pw else None
    gb = gb.to(w.dtype) if has_bias else w.new_empty(0)
    return gx, gwq.to(w.dtype), gb, gpa, gc, gpw


def _conv_grads(ctx, grad, bwd):
    saved = ctx.saved_tensors
    x, w, bias, pa, clips, pw = saved[:6]
    kept = {"operands": tuple(saved[6:])} if len(saved) > 6 else {}    # the eager node on a CPU: xq, wq
    a_bits, signed, w_bits, stride, padding, dilation, groups, impl = ctx.static
    if torch.is_grad_enabled():
        def ref(x, w, bias, pa, clips, pw):    # autocast is off in backward: the operands in x's dtype, as forward
            xq = act_mixture_reference(x, pa, clips, a_bits, signed)
            return F.conv2d(xq, weight_mixture_reference(w, pw, w_bits).to(xq.dtype),
                            None if bias is None else bias.to(xq.dtype), stride, padding, dilation, groups)
        gx, gw, gb, gpa, gc, gpw = _reference_grads(ref, (x, w, bias, pa, clips, pw), grad)
    else:
        gx, gw, gb, gpa, gc, gpw = bwd(grad, x, w, pa, clips, list(a_bits), signed, pw, list(w_bits), stride,
                                       padding, dilation, groups, impl, bias is not None, **kept)
        gb = gb if bias is not None else None
    return gx, gw, gb, gpa, gc, None, None, gpw, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# custom operators (what torch.compile sees)
@torch.library.custom_op("gmpq::act_mixture", mutates_args=())
def _act_op(x: Tensor, probs: Tensor, clips: Tensor, bits: list[int], signed: bool, impl: str) -> Tensor:
    return act_fwd_impl(x, probs, clips, bits, signed, impl)


@torch.library.custom_op("gmpq::act_mixture_backward", mutates_args=())
def _act_bwd_op(grad: Tensor, x: Tensor, probs: Tensor, clips: Tensor, bits: list[int], signed: bool,
                impl: str) -> tuple[Tensor, Tensor, Tensor]:
    return act_bwd_impl(grad, x, probs, clips, bits, signed, impl)


def _act_setup(ctx, inputs, output) -> None:
    x, probs, clips, bits, signed, impl = inputs
    ctx.save_for_backward(x, probs, clips)
    ctx.static = (tuple(bits), bool(signed), impl)


@torch.library.custom_op("gmpq::weight_mixture", mutates_args=())
def _weight_op(w: Tensor, probs: Tensor, bits: list[int], impl: str) -> Tensor:
    return w_fwd_impl(w, probs, bits, impl)


@torch.library.custom_op("gmpq::weight_mixture_backward", mutates_args=())
def _weight_bwd_op(grad: Tensor, w: Tensor, probs: Tensor, bits: list[int], impl: str) -> Tensor:
    return w_bwd_impl(grad, w, probs, bits, impl)


def _weight_setup(ctx, inputs, output) -> None:
    w, probs, bits, impl = inputs
    ctx.save_for_backward(w, probs)
    ctx.static = (tuple(bits), impl)


@torch.library.custom_op("gmpq::mixed_conv2d", mutates_args=())
def _conv_op(x: Tensor, w: Tensor, bias: Tensor | None, pa: Tensor, clips: Tensor, a_bits: list[int], signed: bool,
             pw: Tensor, w_bits: list[int], stride: list[int], padding: list[int], dilation: list[int], groups: int,
             impl: str) -> Tensor:
    return _conv_fwd_impl(x, w, bias, pa, clips, a_bits, signed, pw, w_bits, stride, padding, dilation, groups, impl)


@torch.library.custom_op("gmpq::mixed_conv2d_backward", mutates_args=())
def _conv_bwd_op(grad: Tensor, x: Tensor, w: Tensor, pa: Tensor, clips: Tensor, a_bits: list[int], signed: bool,
                 pw: Tensor, w_bits: list[int], stride: list[int], padding: list[int], dilation: list[int],
                 groups: int, impl: str, has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _conv_bwd_impl(grad, x, w, pa, clips, a_bits, signed, pw, w_bits, stride, padding, dilation, groups, impl,
                          has_bias)


def _conv_setup(ctx, inputs, output) -> None:
    x, w, bias, pa, clips, a_bits, signed, pw, w_bits, stride, padding, dilation, groups, impl = inputs
    ctx.save_for_backward(x, w, bias, pa, clips, pw)  # not the mixed operands: they are recomputed
    ctx.static = (tuple(a_bits), bool(signed), tuple(w_bits), list(stride), list(padding), list(dilation),
                  int(groups), impl)


def _register_fakes_and_autograd() -> None:
    def act_fake(x, probs, clips, bits, signed, impl):
        return torch.empty_like(x)

    def act_bwd_fake(grad, x, probs, clips, bits, signed, impl):
        return torch.empty_like(x), torch.empty_like(probs), torch.empty_like(clips)

    def conv_fake(x, w, bias, pa, clips, a_bits, signed, pw, w_bits, stride, padding, dilation, groups, impl):
        b = None if bias is None else bias.to(x.dtype)
        return F.conv2d(torch.empty_like(x), torch.empty_like(w, dtype=x.dtype), b, stride, padding, dilation, groups)

    def conv_bwd_fake(grad, x, w, pa, clips, a_bits, signed, pw, w_bits, stride, padding, dilation, groups, impl,
                      has_bias):
        return (torch.empty_like(x), torch.empty_like(w), w.new_empty(w.shape[0] if has_bias else 0),
                torch.empty_like(pa), torch.empty_like(clips), torch.empty_like(pw))

    _act_op.register_fake(act_fake)
    _act_bwd_op.register_fake(act_bwd_fake)
    _weight_op.register_fake(lambda w, probs, bits, impl: torch.empty_like(w))
    _weight_bwd_op.register_fake(lambda grad, w, probs, bits, impl: torch.empty_like(probs))
    _conv_op.register_fake(conv_fake)
    _conv_bwd_op.register_fake(conv_bwd_fake)
    _act_op.register_autograd(lambda ctx, g: _act_grads(ctx, g, torch.ops.gmpq.act_mixture_backward),
                              setup_context=_act_setup)
    _weight_op.register_autograd(lambda ctx, g: _weight_grads(ctx, g, torch.ops.gmpq.weight_mixture_backward),
                                 setup_context=_weight_setup)
    _conv_op.register_autograd(lambda ctx, g: _conv_grads(ctx, g, torch.ops.gmpq.mixed_conv2d_backward),
                               setup_context=_conv_setup)


_register_fakes_and_autograd()
