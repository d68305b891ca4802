"""Fused activation and weight mixtures (fused.py, fused_kernels.py, fused_triton.py) against the straightforward
reference: values, gradients, dtypes, layouts, impl names, the Triton kernels (in the interpreter and on CUDA). The
fused conv node, the mixtures in a supernet, compiled and autocast: test_fused_conv.py."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fused_checks import _assert_all_close, _gen   # same folder (pytest puts it on sys.path)
from gmpq_core.errors import ConfigError
from gmpq_core.fused import (act_mixture, act_mixture_reference, resolve_mixture_impl, weight_mixture,
                             weight_mixture_reference)
from gmpq_core.search_config import SearchConfig

BIT_SETS = [(2, 3, 4, 6), (1, 8), (4,), (2, 3, 5, 7, 8)]


def _act_case(bits, signed, dtype=torch.float64, shape=(4, 3, 5, 5), seed=0):
    gen = _gen(seed + len(bits) + 10 * signed)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 3
    logits = torch.randn(len(bits), generator=gen, dtype=dtype)
    clips = torch.rand(len(bits), generator=gen, dtype=dtype) * 3 + 0.5
    clips[0] = -clips[0]  # a negative clip acts through |clip|, its gradient through sign(clip)
    g = torch.randn(shape, generator=gen, dtype=dtype)
    return x, logits, clips, g


def _act_run(fn, x0, logits0, clips0, g, bits, signed):
    x, lg, clips = (t.clone().requires_grad_() for t in (x0, logits0, clips0))
    out = fn(x, torch.softmax(lg, 0), clips, bits, signed)
    (out * g).sum().backward()
    return out.detach(), x.grad, lg.grad, clips.grad


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("p", [1.0, 0.7])
@pytest.mark.parametrize("bits", [2, 8])
def test_one_candidate_with_a_constant_probability_matches_the_reference(monkeypatch, bits, p, signed):
    """The fixed-policy layers' case (its own 3-5 pass backward kernel on the CPU): x and clip gradients,
    float64, against the reference; and exactly at the bounds (0, a, -a) against the general kernel (the
    reference's min/max split a tie's gradient in half there, by the documented convention)."""
    import gmpq_core.fused_kernels as fk
    calls = []
    real = fk._one_act_backward
    monkeypatch.setattr(fk, "_one_act_backward", lambda *a: calls.append(1) or real(*a))
    x0, _, clips0, g = _act_case((bits,), signed)
    probs = torch.tensor([p], dtype=torch.float64)                        # a constant: no grad_probs pass
    got = {}
    for name, fn in (("reference", act_mixture_reference), ("fused", lambda *a: act_mixture(*a, impl="fused"))):
        x, clips = x0.clone().requires_grad_(), clips0.clone().requires_grad_()
        out = fn(x, probs, clips, (bits,), signed)
        out.backward(g)
        got[name] = [out.detach(), x.grad, clips.grad]
    assert calls == [1]                                                      # the fast path ran
    _assert_all_close(got["reference"], got["fused"], atol=1e-9)
    assert got["fused"][2].abs().item() > 0                                  # the clip gets a gradient
    a = clips0.abs() + 1e-8                                                  # float64, as the kernel computes it
    x0.view(-1)[:3] = torch.cat([torch.zeros(1, dtype=torch.float64), a, -a])   # exactly at 0, a and -a
    fast = fk.act_bwd_impl(g, x0, probs, clips0, [bits], signed, "fused", need_probs=False)
    general = fk.act_bwd_impl(g, x0, probs, clips0, [bits], signed, "fused", need_probs=True)
    assert len(calls) == 2
    assert torch.equal(fast[0], general[0]) and torch.allclose(fast[2], general[2], atol=1e-12, rtol=0)


def test_the_one_candidate_fast_path_is_for_the_cpu_only():
    """Off the CPU the per-candidate bounds are 0-d tensors, which hardtanh_backward refuses as Scalars: the
    general kernel runs there (meta tensors stand in for a GPU's)."""
    from gmpq_core.fused_kernels import act_bwd_impl
    x, g = torch.empty(2, 3, 4, 4, device="meta"), torch.empty(2, 3, 4, 4, device="meta")
    for signed in (False, True):
        gx, gp, gc = act_bwd_impl(g, x, torch.ones(1, device="meta"), torch.ones(1, device="meta"), [4], signed,
                                  "fused", need_probs=False)
        assert gx.shape == x.shape and gp is None and gc.shape == (1,)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", BIT_SETS)
def test_fused_act_mixture_matches_reference_values_and_gradients(signed, bits):
    case = _act_case(bits, signed)
    ref = _act_run(act_mixture_reference, *case, bits, signed)
    fused = _act_run(lambda *a: act_mixture(*a, impl="fused"), *case, bits, signed)
    _assert_all_close(ref, fused, atol=1e-9)
    assert any(float(t.abs().sum()) > 0 for t in ref[1:])  # the gradients are not trivially zero


@pytest.mark.parametrize("bits", [(2, 3, 4, 6), (1, 8)])
def test_fused_weight_mixture_matches_reference_values_and_gradients(bits):
    gen = _gen(len(bits))
    w0 = torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float64)
    logits0 = torch.randn(len(bits), generator=gen, dtype=torch.float64)
    g = torch.randn(w0.shape, generator=gen, dtype=torch.float64)
    _assert_all_close(*_weight_runs(w0, logits0, g, bits, "fused"), atol=1e-9)


def _weight_runs(w0, logits0, g, bits, impl):
    """(output, grad W, grad logits) of the reference weight mixture and of ``impl``, on the same inputs."""
    results = []
    for fn in (weight_mixture_reference, lambda *a: weight_mixture(*a, impl=impl)):
        w, lg = w0.clone().requires_grad_(), logits0.clone().requires_grad_()
        out = fn(w, torch.softmax(lg, 0), bits)
        (out * g).sum().backward()
        results.append((out.detach(), w.grad, lg.grad))
    return results


def test_channels_last_input_keeps_its_layout_and_values():
    bits = (2, 4, 8)
    x, lg, clips, g = _act_case(bits, False, shape=(2, 4, 3, 3))
    xc, gc = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    ref = _act_run(act_mixture_reference, x, lg, clips, g, bits, False)
    got = _act_run(lambda *a: act_mixture(*a, impl="fused"), xc, lg, clips, gc, bits, False)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    _assert_all_close([r.contiguous() for r in ref], [t.contiguous() for t in got], atol=1e-9)


def test_double_backward_through_the_fused_node_equals_the_reference():
    # create_graph=True: gradients of a gradient (w.r.t. the mixture probabilities) stay exact
    bits = (2, 3, 4)
    x0, lg0, clips0, g = _act_case(bits, True)
    grads = []
    for fn in (act_mixture_reference, lambda *a: act_mixture(*a, impl="fused")):
        x, lg, clips = (t.clone().requires_grad_() for t in (x0, lg0, clips0))
        out = fn(x, torch.softmax(lg, 0), clips, bits, True)
        (gx,) = torch.autograd.grad((out * g).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), [lg, clips], allow_unused=True))
    for r, f in zip(*grads):
        assert (r is None and f is None) or torch.allclose(r, f, atol=1e-9)


def test_bfloat16_inputs_compute_in_float32_and_return_bfloat16():
    bits = (2, 4, 8)
    x, lg, clips, g = _act_case(bits, False, dtype=torch.float32, shape=(64, 32))
    xb = x.bfloat16().requires_grad_()
    probs = torch.softmax(lg, 0).requires_grad_()
    out = act_mixture(xb, probs, clips, bits, False)
    out.backward(g.bfloat16())
    assert out.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16 and probs.grad.dtype == torch.float32
    ref = act_mixture_reference(xb.detach().float(), probs.detach(), clips, bits, False)
    assert torch.allclose(out.float(), ref, atol=0.02, rtol=0.01)


def test_impl_names_are_validated_and_auto_resolves_per_device():
    assert resolve_mixture_impl("auto", "cpu") == "fused"
    assert resolve_mixture_impl("compiled", "cpu") == "compiled"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_mixture_impl("triton", "cpu")
    with pytest.raises(ConfigError, match="impl="):
        act_mixture(torch.zeros(3), torch.ones(1), torch.ones(1), (4,), False, impl="fast")
    with pytest.raises(ConfigError, match="mixture_impl"):
        SearchConfig(mixture_impl="fast")
    assert SearchConfig.from_dict(SearchConfig(mixture_impl="reference").to_dict()).mixture_impl == "reference"
    with pytest.raises(ValueError, match="one entry per candidate"):
        act_mixture(torch.zeros(3), torch.ones(2), torch.ones(3), (2, 4), False)


@pytest.mark.slow
@pytest.mark.parametrize("signed", [False, True])
def test_compiled_impl_matches_reference(signed):
    bits = (2, 3, 4, 6)
    case = _act_case(bits, signed)
    ref = _act_run(act_mixture_reference, *case, bits, signed)
    got = _act_run(lambda *a: act_mixture(*a, impl="compiled"), *case, bits, signed)
    _assert_all_close(ref, got, atol=1e-9)


_INTERPRETER_SCRIPT = r"""
import json, sys
import torch
from gmpq_core import fused_triton as ft
from gmpq_core.fused import act_mixture_reference
out = []
for signed in (False, True):
    for bits in ((2, 3, 4, 6), (1, 8)):
        gen = torch.Generator().manual_seed(len(bits) + 10 * signed)
        x0 = torch.randn(2500, generator=gen, dtype=torch.float64) * 3   # 3 programs, a ragged tail
        lg = torch.randn(len(bits), generator=gen, dtype=torch.float64)
        clips = torch.rand(len(bits), generator=gen, dtype=torch.float64) * 3 + 0.5
        clips[0] = -clips[0]
        g = torch.randn(2500, generator=gen, dtype=torch.float64)
        x, probs, c = x0.clone().requires_grad_(), torch.softmax(lg, 0).detach().requires_grad_(), clips.clone().requires_grad_()
        ref = act_mixture_reference(x, probs, c, bits, signed)
        ref.backward(g)
        got = (ft.act_forward(x0, probs.detach(), clips, bits, signed),) + ft.act_backward(g, x0, probs.detach(), clips, bits, signed)
        out.append(max(float((r - t).abs().max()) for r, t in zip((ref.detach(), x.grad, probs.grad, c.grad), got)))
from gmpq_core.fused import weight_mixture_reference
for bits in ((2, 3, 4, 6), (1, 2, 8)):
    gen = torch.Generator().manual_seed(len(bits))
    w0 = torch.randn(2300, generator=gen, dtype=torch.float64) * 0.2   # 3 programs, a ragged tail
    w0[5] = 0.0                                                         # sign(0) = 0 for 1 bit
    probs = torch.softmax(torch.randn(len(bits), generator=gen, dtype=torch.float64), 0).requires_grad_()
    g = torch.randn(2300, generator=gen, dtype=torch.float64)
    ref = weight_mixture_reference(w0, probs, bits)
    ref.backward(g)
    got = (ft.weight_forward(w0, probs.detach(), bits), ft.weight_backward(g, w0, probs.detach(), bits))
    out.append(max(float((r - t).abs().max()) for r, t in zip((ref.detach(), probs.grad), got)))
print(json.dumps(out))
"""


def test_triton_kernels_match_reference_in_the_interpreter():   # a fresh interpreter: ~3-5 s (20 s under load)
    # TRITON_INTERPRET must be set before triton is first imported: run in a fresh interpreter
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True, check=False,
                         timeout=300, cwd=pathlib.Path(__file__).parents[2])
    assert res.returncode == 0, res.stderr[-3000:]
    errors = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(errors) == 6 and max(errors) < 1e-9, errors     # 4 activation cases, 2 weight cases


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "triton", "compiled"])
@pytest.mark.parametrize("signed", [False, True])
def test_cuda_impls_match_reference(impl, signed):
    bits = (2, 3, 4, 6)
    case = [t.cuda() for t in _act_case(bits, signed, dtype=torch.float32, shape=(8, 16, 33, 33))]
    ref = _act_run(act_mixture_reference, *case, bits, signed)
    got = _act_run(lambda *a: act_mixture(*a, impl=impl), *case, bits, signed)
    for r, f in zip(ref, got):  # float32: a rare x/s landing on a rounding tie may differ by one level
        assert (r - f).abs().max() < 1e-3 * max(1.0, float(r.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [(2, 3, 4, 6), (1, 2, 8)])
def test_cuda_triton_weight_kernels_match_reference(monkeypatch, bits):
    # fused_kernels.TRITON_WEIGHT_KERNELS: off by default until measured; its kernels on a GPU
    import gmpq_core.fused_kernels as fk
    monkeypatch.setattr(fk, "TRITON_WEIGHT_KERNELS", True)
    gen = _gen(len(bits))
    w0 = (torch.randn(64, 32, 3, 3, generator=gen) * 0.1).cuda().contiguous(memory_format=torch.channels_last)
    logits0 = torch.randn(len(bits), generator=gen).cuda()
    g = torch.randn(w0.shape, generator=gen).cuda()
    for r, f in zip(*_weight_runs(w0, logits0, g, bits, "triton")):   # float32: a rare W/s on a rounding tie may differ by one level
        assert (r - f).abs().max() < 1e-3 * max(1.0, float(r.abs().max()))
