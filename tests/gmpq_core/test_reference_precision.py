"""The reference quantizer formulas compute in float32 for half/bfloat16 inputs, as the fused kernels do.

The fused (and Triton) kernels upcast a half/bfloat16 input to float32, compute, and round the result back
to the input's dtype. The reference formulas (``quantizers.quantize_activation`` / ``quantize_weight`` /
``weight_step``, ``fused.act_mixture_reference`` / ``weight_mixture_reference``; the ``quant_impl="reference"``
QAT layers and the ``mixture_impl="reference"`` supernet run on them) must do the same, also under bf16
autocast (whose matmuls would otherwise run the weight mixture's probability-weighted sum in bfloat16), so
that reference and fused give the same values and gradients in bfloat16 as in float32: same dtypes, and at
most a tiny fraction of elements more than one bf16 unit in the last place apart (the two formulas' float32
results differ in their last bit now and then, in float32 too; at a bf16 tie that rounds to neighbours).
With the reference computing in bf16 (before), 0.35-4.7 % of the activation mixture's outputs were further
apart, 77-100 % of the weight mixture's under autocast, and every probability / clip gradient.
"""
import copy

import pytest
import torch
from torch import nn

from gmpq_core.fused import act_mixture, act_mixture_reference, weight_mixture, weight_mixture_reference
from gmpq_core.policy import QuantSpec
from gmpq_core.qmodules import QuantConv2d, set_quant_impl_
from gmpq_core.quantizers import ActQuantizer, quantize_activation, quantize_weight, weight_step

MODES = ["autocast", "bf16"]   # bf16 x under CPU bf16 autocast (float32 parameters), or plain bf16 tensors
MAX_FRACTION = 1e-3            # elements allowed apart (rounding ties); large enough to be robust, far below 1 %


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ctx(mode):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else torch.autocast("cpu", enabled=False)


def _mismatch(name, r, f):
    """Fraction of elements of ``f`` apart from ``r`` by more than one unit in the last place of their dtype
    (bf16: the rounding of two float32 results that differ in their last bit, as reference and fused do in
    float32 too: ``y + (q - y)`` against ``k * (p s)``) plus 1e-5 of the tensor's largest magnitude (float32
    sums taken in another order). One quantization level of a low-bit candidate is far more than that."""
    assert r.dtype == f.dtype and r.shape == f.shape, (name, r.dtype, f.dtype, r.shape, f.shape)
    eps = torch.finfo(r.dtype).eps
    r, f = r.double(), f.double()
    tol = eps * r.abs() + 1e-5 * max(1.0, float(r.abs().max()))
    return float(((r - f).abs() > tol).double().mean())


def _assert_agree(ref, got, names):
    report = {n: _mismatch(n, r, f) for n, r, f in zip(names, ref, got)}
    print(report)
    for (n, frac), r in zip(report.items(), ref):
        limit = MAX_FRACTION if r.numel() > 100 else 0.0    # vectors (probs, clips): every entry close
        assert frac <= limit, (n, report)


def _untie(x, clips):
    """x with the elements exactly at +-|clip_j| moved to 0: there the reference's min/max split the gradient in
    halves between x and the clip (the documented convention), the fused kernels give it to the clip."""
    a = clips.detach().float().abs().view(-1, *([1] * x.dim()))
    tie = (x.detach().float().abs().unsqueeze(0) == a).any(0)
    return x.masked_fill(tie, 0.0)


# ---------------------------------------------------------------------------------------------
# activation mixture
def _act_inputs(mode, bits, signed, seed=0):
    gen = _gen(seed + len(bits) + 10 * signed)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32     # the parameters' dtype
    x = (torch.randn(8, 6, 12, 12, generator=gen) * 2).bfloat16()
    logits = torch.randn(len(bits), generator=gen).to(dtype)
    clips = (torch.rand(len(bits), generator=gen) * 3 + 0.5).to(dtype)
    clips[0] = -clips[0]                                            # acts through |clip|
    x = _untie(x, clips)
    g = torch.randn(x.shape, generator=gen).bfloat16()
    return x, logits, clips, g


def _act_run(fn, mode, x0, logits0, clips0, g, bits, signed):
    x, lg, clips = (t.clone().requires_grad_() for t in (x0, logits0, clips0))
    with _ctx(mode):
        out = fn(x, torch.softmax(lg, 0), clips, bits, signed)
    (out.float() * g.float()).sum().backward()
    return out.detach(), x.grad, lg.grad, clips.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [(2, 3, 4, 6), (2, 8), (4,)])
def test_act_mixture_reference_matches_fused_in_bfloat16(mode, signed, bits):
    case = _act_inputs(mode, bits, signed)
    ref = _act_run(act_mixture_reference, mode, *case, bits, signed)
    fused = _act_run(lambda *a: act_mixture(*a, impl="fused"), mode, *case, bits, signed)
    assert ref[0].dtype == torch.bfloat16 and ref[1].dtype == torch.bfloat16
    _assert_agree(ref, fused, ("out", "grad x", "grad logits", "grad clips"))
    assert float(ref[3].abs().sum()) > 0 and float(ref[1].float().abs().sum()) > 0


# ---------------------------------------------------------------------------------------------
# weight mixture
def _weight_inputs(mode, bits, seed=0):
    gen = _gen(seed + len(bits))
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32     # autocast keeps the weights float32
    w = (torch.randn(32, 16, 3, 3, generator=gen) * 0.1).to(dtype)
    logits = torch.randn(len(bits), generator=gen).to(dtype)
    g = torch.randn(w.shape, generator=gen).to(dtype)
    return w, logits, g


def _weight_run(fn, mode, w0, logits0, g, bits):
    w, lg = w0.clone().requires_grad_(), logits0.clone().requires_grad_()
    with _ctx(mode):
        out = fn(w, torch.softmax(lg, 0), bits)
    (out.float() * g.float()).sum().backward()
    return out.detach(), w.grad, lg.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", [(2, 3, 4, 6), (1, 8), (1, 2, 5)])
def test_weight_mixture_reference_matches_fused_in_bfloat16(mode, bits):
    case = _weight_inputs(mode, bits)
    ref = _weight_run(weight_mixture_reference, mode, *case, bits)
    fused = _weight_run(lambda *a: weight_mixture(*a, impl="fused"), mode, *case, bits)
    assert ref[0].dtype == case[0].dtype
    _assert_agree(ref, fused, ("out", "grad W", "grad logits"))


# ---------------------------------------------------------------------------------------------
# the QAT layers (one candidate, probability 1)
def _qat_conv(mode, signed, w_bits=3, a_bits=4, seed=0):
    gen = _gen(seed)
    base = nn.Conv2d(8, 6, 3, stride=1, padding=1, bias=True)
    mod = QuantConv2d.from_float(base, QuantSpec(w_bits=w_bits, a_bits=a_bits))
    with torch.no_grad():
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.2)
        mod.act.clip.fill_(-1.3 if signed else 1.7)
    mod.act.set_signed(signed)
    if mode == "bf16":
        mod = mod.bfloat16()
    x = _untie((torch.randn(4, 8, 10, 10, generator=gen) * 1.5).bfloat16(), mod.act.clip.detach().view(1))
    return mod, x


def _qat_run(mod, x, impl, mode):
    m = set_quant_impl_(copy.deepcopy(mod), impl)
    xi = x.clone().requires_grad_()
    with _ctx(mode):
        out = m(xi)
    g = torch.randn(out.shape, generator=_gen(7))
    (out.float() * g).sum().backward()
    return [out.detach(), xi.grad, m.weight.grad, m.bias.grad, m.act.clip.grad.view(1)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("w_bits,a_bits", [(3, 4), (1, 2), (8, 8)])
def test_qat_conv_reference_matches_fused_in_bfloat16(mode, signed, w_bits, a_bits):
    mod, x = _qat_conv(mode, signed, w_bits, a_bits)
    ref, fused = _qat_run(mod, x, "reference", mode), _qat_run(mod, x, "fused", mode)
    _assert_agree(ref, fused, ("out", "grad x", "grad W", "grad bias", "grad clip"))
    assert float(ref[4].abs().sum()) > 0


# ---------------------------------------------------------------------------------------------
# the quantizers themselves: a half/bfloat16 input is computed in float32 and rounded back
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_quantizer_computes_in_float32(dtype, signed, bits):
    gen = _gen(bits)
    x0 = (torch.randn(4000, generator=gen) * 2).to(dtype)
    clip0 = torch.tensor(1.37)
    g = torch.randn(4000, generator=gen).to(dtype).float()    # what comes back through an output in dtype
    runs = []
    for x0_ in (x0, x0.float()):
        x, clip = x0_.clone().requires_grad_(), clip0.clone().requires_grad_()
        out = quantize_activation(x, clip, bits, signed)
        (out.float() * g).sum().backward()
        runs.append((out.detach(), x.grad, clip.grad))
    (out, gx, gc), (out32, gx32, gc32) = runs
    assert out.dtype == gx.dtype == dtype and gc.dtype == torch.float32
    assert torch.equal(out, out32.to(dtype)) and torch.equal(gx, gx32.to(dtype)) and torch.equal(gc, gc32)
    q = ActQuantizer(bits, clip_init=1.37, signed=signed)
    assert torch.equal(q(x0).detach(), out)


def test_activation_quantizer_upcasts_a_bfloat16_clip():
    x = torch.randn(1000, generator=_gen(1)).bfloat16()
    clip = torch.tensor(0.75, dtype=torch.bfloat16, requires_grad=True)
    out = quantize_activation(x, clip, 3)
    out.float().sum().backward()
    assert clip.grad.dtype == torch.bfloat16
    assert torch.equal(out, quantize_activation(x.float(), clip.detach().float(), 3).bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_weight_quantizer_computes_in_float32(dtype, bits):
    gen = _gen(bits)
    w0 = (torch.randn(64, 27, generator=gen) * 0.1).to(dtype)
    g = torch.randn(w0.shape, generator=gen).to(dtype).float()
    runs = []
    for w0_ in (w0, w0.float()):
        w = w0_.clone().requires_grad_()
        out = quantize_weight(w, bits)
        (out.float() * g).sum().backward()
        runs.append((out.detach(), w.grad))
    (out, gw), (out32, gw32) = runs
    assert out.dtype == gw.dtype == dtype
    assert torch.equal(out, out32.to(dtype)) and torch.equal(gw, gw32.to(dtype))
    step = weight_step(w0, bits)
    assert step.dtype == torch.float32 and torch.equal(step, weight_step(w0.float(), bits))


def test_mixture_references_compute_in_float32():
    bits = (2, 3, 6)
    x0, lg, clips, _ = _act_inputs("autocast", bits, False)
    probs = torch.softmax(lg, 0)
    out = act_mixture_reference(x0, probs, clips, bits, False)
    assert torch.equal(out, act_mixture_reference(x0.float(), probs, clips, bits, False).bfloat16())
    w0 = torch.randn(16, 8, 3, 3, generator=_gen(2)).bfloat16()
    out = weight_mixture_reference(w0, probs, bits)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, weight_mixture_reference(w0.float(), probs, bits).bfloat16())


def test_autocast_does_not_change_the_float32_references():
    # float32 inputs under bf16 autocast: the same values and gradients as without it (no bf16 matmul inside)
    bits = (1, 3, 4)
    w0, lg0, g = _weight_inputs("autocast", bits)
    plain = _weight_run(weight_mixture_reference, "fp32", w0, lg0, g, bits)
    cast = _weight_run(weight_mixture_reference, "autocast", w0, lg0, g, bits)
    for r, f in zip(plain, cast):
        assert r.dtype == f.dtype == torch.float32 and torch.equal(r, f)
    x0, lg0, clips0, gx = _act_inputs("autocast", bits, True)
    plain = _act_run(act_mixture_reference, "fp32", x0.float(), lg0, clips0, gx, bits, True)
    cast = _act_run(act_mixture_reference, "autocast", x0.float(), lg0, clips0, gx, bits, True)
    for r, f in zip(plain, cast):
        assert r.dtype == f.dtype == torch.float32 and torch.equal(r, f)


def test_float64_stays_float64():
    gen = _gen(5)
    x = torch.randn(100, generator=gen, dtype=torch.float64)
    w = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    probs = torch.softmax(torch.randn(2, generator=gen, dtype=torch.float64), 0)
    clips = torch.tensor([1.1, 2.3], dtype=torch.float64)
    assert quantize_activation(x, clips[0], 4).dtype == torch.float64
    assert quantize_weight(w, 3).dtype == torch.float64 and weight_step(w, 3).dtype == torch.float64
    assert act_mixture_reference(x, probs, clips, (2, 4), False).dtype == torch.float64
    assert weight_mixture_reference(w, probs, (2, 4)).dtype == torch.float64



def test_double_backward_through_the_mixed_conv_node_under_bfloat16_autocast():
    # a Grad-CAM layer before a mixed conv: its gradient is taken with create_graph through the conv node, whose
    # backward re-runs the reference outside autocast (bf16 activations met the float32 weight: a dtype error)
    from gmpq_core.fused import mixed_conv2d

    g = _gen(3)
    x = torch.randn(2, 4, 6, 6, generator=g).bfloat16().requires_grad_()
    w = torch.randn(5, 4, 3, 3, generator=g).requires_grad_()
    bias = torch.randn(5, generator=g).requires_grad_()
    pa = torch.softmax(torch.randn(3, generator=g), 0).requires_grad_()
    pw = torch.softmax(torch.randn(2, generator=g), 0).requires_grad_()
    clips = torch.full((3,), 2.0).requires_grad_()
    grads = {}
    for impl in ("fused", "reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mixed_conv2d(x, w, bias, pa, clips, (2, 4, 8), False, pw, (2, 4), padding=1, impl=impl)
        (gx,) = torch.autograd.grad(out.float().square().sum(), x, create_graph=True)
        grads[impl] = torch.autograd.grad(gx.float().square().sum(), [w, pa, pw, clips])
    for r, f in zip(grads["reference"], grads["fused"]):
        assert r.dtype == f.dtype and torch.isfinite(f).all()
        assert torch.allclose(r, f, rtol=0.05, atol=0.05 * r.abs().max().item())
