"""Fused quantizer mixtures (fused.py, fused_triton.py) against the straightforward reference."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gmpq_core.errors import ConfigError
from gmpq_core.fused import (act_mixture, act_mixture_reference, mixed_conv2d, resolve_mixture_impl,
                             weight_mixture, weight_mixture_reference)
from gmpq_core.models import build_model
from gmpq_core.policy import BitCandidates
from gmpq_core.search_config import SearchConfig
from gmpq_core.supernet import build_supernet, calibrate_supernet_, mixed_layers, set_mixture_impl_

BIT_SETS = [(2, 3, 4, 6), (1, 8), (4,), (2, 3, 5, 7, 8)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


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


def _assert_all_close(ref, got, atol):
    for r, f in zip(ref, got):
        assert r.dtype == f.dtype and r.shape == f.shape
        assert torch.allclose(r, f, atol=atol, rtol=0), (r - f).abs().max()


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


def _conv_case(groups, seed=0):
    gen = _gen(seed)
    a_bits, w_bits = (2, 4, 8), (1, 3, 4)
    x = torch.randn(2, 4, 7, 7, generator=gen, dtype=torch.float64) * 2
    w = torch.randn(6, 4 // groups, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    la, lw = (torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(2))
    clips = torch.rand(3, generator=gen, dtype=torch.float64) * 2 + 0.5
    return (x, w, b, la, clips, lw), a_bits, w_bits


def _conv_run(impl, tensors, a_bits, w_bits, groups, signed):
    x, w, b, la, clips, lw = (t.clone().requires_grad_() for t in tensors)
    y = mixed_conv2d(x, w, b, torch.softmax(la, 0), clips, a_bits, signed, torch.softmax(lw, 0), w_bits,
                     stride=2, padding=1, groups=groups, impl=impl)
    (y * torch.cos(y)).sum().backward()
    return [y.detach()] + [t.grad for t in (x, w, b, la, clips, lw)]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_fused_mixed_conv_matches_reference_values_and_gradients(groups, signed):
    tensors, a_bits, w_bits = _conv_case(groups)
    ref = _conv_run("reference", tensors, a_bits, w_bits, groups, signed)
    _assert_all_close(ref, _conv_run("fused", tensors, a_bits, w_bits, groups, signed), atol=1e-9)


@pytest.mark.parametrize("keep", [False, True])
def test_what_the_fused_conv_node_keeps_for_backward(monkeypatch, keep):
    # the memory claim (a GPU): the fused conv node saves x, W, bias and the small vectors, no mixed operand;
    # on a CPU (keep) it also keeps the two mixed operands instead of recomputing them in backward
    import gmpq_core.fused as fused
    monkeypatch.setattr(fused, "KEEP_OPERANDS_ON", frozenset({("fused", "cpu")}) if keep else frozenset())
    (x, w, b, la, clips, lw), a_bits, w_bits = _conv_case(1)
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    pa, pw = torch.softmax(la, 0).requires_grad_(), torch.softmax(lw, 0).requires_grad_()
    saved = {}
    for impl in ("reference", "fused"):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            y = mixed_conv2d(x, w, b, pa, clips, a_bits, False, pw, w_bits, stride=2, padding=1, impl=impl)
        y.backward(torch.ones_like(y))
        saved[impl] = sum(sizes)
    assert saved["fused"] == (2 if keep else 1) * (x.numel() + w.numel()) + b.numel() + 3 * 3
    assert saved["reference"] > 3 * x.numel() + 3 * w.numel()
    if keep:                # another impl (one-pass kernels, cheap to recompute) keeps only its inputs; "triton"
        sizes = []          # on a CPU tensor runs the eager kernels, so this needs no GPU and no compiler
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fused._mixed_conv2d(x, w, b, pa, clips, tuple(a_bits), False, pw, tuple(w_bits), [2, 2], [1, 1],
                                [1, 1], 1, "triton")
        assert sum(sizes) == x.numel() + w.numel() + b.numel() + 3 * 3


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


def _tiny_supernet(impl, conv_node=None):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=3, in_channels=1).double()
    net = build_supernet(model, BitCandidates(w_bits=(2, 3, 4), a_bits=(2, 4, 8)))
    x = torch.randn(4, 1, 8, 8, generator=_gen(1), dtype=torch.float64)
    calibrate_supernet_(net, x)
    gen = _gen(2)
    with torch.no_grad():
        for m in mixed_layers(net).values():
            m.alpha_a.copy_(torch.randn(m.alpha_a.shape, generator=gen, dtype=torch.float64))
            m.alpha_w.copy_(torch.randn(m.alpha_w.shape, generator=gen, dtype=torch.float64))
    return set_mixture_impl_(net.train(), impl, conv_node=conv_node), x


@pytest.mark.parametrize("conv_node", [False, True])
def test_supernet_step_with_fused_mixtures_equals_reference_loss_and_gradients(conv_node):
    # the search loss (CE + Grad-CAM imitation, second order) on a tiny resnet20, float64
    from gmpq_core.attribution import gradcam
    from gmpq_core.losses import generalization_loss
    results = []
    for impl in ("reference", "fused"):
        net, x = _tiny_supernet(impl, conv_node=conv_node if impl == "fused" else None)
        y = torch.tensor([0, 1, 2, 0])
        logits, maps = gradcam(net, x, "layer3", mode="second_order")
        loss = F.cross_entropy(logits, y) + 40 * generalization_loss(maps, maps.detach().flip(0) + 0.1, 2.0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in net.named_parameters()}))
    (l_ref, g_ref), (l_fused, g_fused) = results
    assert torch.allclose(l_ref, l_fused, atol=1e-10)
    assert g_ref.keys() == g_fused.keys()
    for name in g_ref:
        assert torch.allclose(g_ref[name], g_fused[name], atol=1e-8), name


def _small_supernet(conv_node):
    """stem conv, two searchable convs and a searchable linear (unsigned, signed, signed inputs), classifier."""
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    net = build_supernet(model, BitCandidates(w_bits=(2, 4), a_bits=(3, 8)))
    x = torch.randn(2, 1, 6, 6, generator=_gen(3), dtype=torch.float64)
    calibrate_supernet_(net, x)
    assert [m.signed for m in mixed_layers(net).values()] == [False, True, True]
    return set_mixture_impl_(net.train(), "fused", conv_node=conv_node), x


@pytest.mark.parametrize("conv_node", [False, True])
def test_supernet_with_fused_op_compiles_into_one_graph_without_breaks(conv_node):
    # dynamo sees each custom op as one node; aot_eager also traces the registered backward
    net, x = _small_supernet(conv_node)
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    out = torch.compile(net, backend="aot_eager", fullgraph=True)(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    ref = net(x)
    ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-12)
    for n, p in net.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-10), n


@pytest.mark.slow
def test_supernet_compiles_with_inductor_on_cpu_and_matches_eager():
    # minutes on a loaded 2-core machine (Inductor's C++ compile of a resnet20 forward and backward)
    net, x = _tiny_supernet("fused", conv_node=True)
    ref = net(x)
    ref.sum().backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    out = torch.compile(net, fullgraph=True)(x)
    out.sum().backward()
    assert torch.allclose(out, ref, atol=1e-10)
    for n, p in net.named_parameters():
        assert torch.allclose(want[n], p.grad, atol=1e-8), n


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


@pytest.mark.gpu
def test_cuda_bf16_autocast_search_step_runs_with_triton():
    net, x = _tiny_supernet("triton")
    net, x = net.float().cuda(), x.float().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    assert all(m.alpha_a.grad is not None for m in mixed_layers(net).values())



@pytest.mark.gpu
def test_cuda_triton_conv_node_that_keeps_its_operands_gives_the_recompute_gradients():
    grads, saved = {}, {}
    for keep in (False, True):
        torch.manual_seed(0)
        net, x = _tiny_supernet("triton")
        net, x = net.float().cuda(), x.float().cuda()
        set_mixture_impl_(net, "triton", keep_operands=keep)
        sizes = []
        with torch.autocast("cuda", dtype=torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out = net(x)
        out.float().sum().backward()
        grads[keep] = [p.grad.float() for p in net.parameters() if p.grad is not None]
        saved[keep] = sum(sizes)
    assert saved[True] > saved[False]                  # the operands were kept, not recomputed
    assert len(grads[True]) == len(grads[False]) > 0
    for a, b in zip(grads[False], grads[True]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)


def test_search_with_fused_mixtures_follows_the_reference_search():
    # whole search_policy runs (2 epochs, tiny resnet20, float64): same history, probabilities, policy
    from test_search import _cfg, _data, _search, _teacher
    runs = {}
    for impl in ("reference", "fused"):
        data = [(x.double(), y) for x, y in _data()]
        runs[impl] = _search(_cfg(mixture_impl=impl), teacher=_teacher().double(), data=data)
    ref, fused = runs["reference"], runs["fused"]
    assert fused.policy.layers == ref.policy.layers
    for h_ref, h_fused in zip(ref.history, fused.history):
        assert h_fused["ce"] == pytest.approx(h_ref["ce"], abs=1e-10)
        assert h_fused["l_gen"] == pytest.approx(h_ref["l_gen"], abs=1e-10)
    for name, probs in ref.arch_probs.items():
        for key in ("w", "a"):
            assert fused.arch_probs[name][key] == pytest.approx(probs[key], abs=1e-12)


def test_eager_path_equals_the_custom_operators_bit_for_bit():
    # eager calls skip the custom-op dispatch (autograd.Function twins); values and gradients are identical
    (x, w, b, la, clips, lw), a_bits, w_bits = _conv_case(1)
    bits = tuple(a_bits)
    runs = []
    for op in (False, True):
        xs, ws, bs, cs = (t.clone().requires_grad_() for t in (x, w, b, clips))
        pa, pw = torch.softmax(la, 0).requires_grad_(), torch.softmax(lw, 0).requires_grad_()
        args = (xs, ws, bs, pa, cs, list(bits), True, pw, list(w_bits), [2, 2], [1, 1], [1, 1], 1, "fused")
        y = torch.ops.gmpq.mixed_conv2d(*args) if op else mixed_conv2d(*args[:9], stride=2, padding=1)
        a = (torch.ops.gmpq.act_mixture(xs, pa, cs, list(bits), False, "fused") if op
             else act_mixture(xs, pa, cs, bits, False))
        m = torch.ops.gmpq.weight_mixture(ws, pw, list(w_bits), "fused") if op else weight_mixture(ws, pw, w_bits)
        (y.square().sum() + a.square().sum() + m.square().sum()).backward()
        runs.append([y, a, m, xs.grad, ws.grad, bs.grad, pa.grad, cs.grad, pw.grad])
    for eager, op in zip(*runs):
        assert torch.equal(eager, op)


@pytest.mark.parametrize("impl", ["fused", "triton"])
def test_a_layers_keep_setting_overrides_the_rule_with_the_same_values_and_gradients(impl):
    # keep=True / False: the node keeps its mixed operands or recomputes them in backward, whatever the impl and
    # device ("triton" on a CPU tensor runs the eager kernels); a benchmark's "+keep" variant uses it on a GPU
    import gmpq_core.fused as fused
    (x0, w0, b0, la, clips, lw), a_bits, w_bits = _conv_case(1)
    out = {}
    for keep in (False, True):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        pa, pw = torch.softmax(la, 0).requires_grad_(), torch.softmax(lw, 0).requires_grad_()
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            y = fused._mixed_conv2d(x, w, b, pa, clips, tuple(a_bits), False, pw, tuple(w_bits), [2, 2], [1, 1],
                                    [1, 1], 1, impl, keep)
        (y * torch.cos(y)).sum().backward()
        assert sum(sizes) == (2 if keep else 1) * (x.numel() + w.numel()) + b.numel() + 3 * 3
        out[keep] = [y.detach(), x.grad, w.grad, b.grad, pa.grad, pw.grad]
    _assert_all_close(out[False], out[True], atol=1e-12)
    assert fused.keeps_operands("fused", torch.device("cpu")) and not fused.keeps_operands("triton", torch.device("cpu"))
    assert not fused.keeps_operands("fused", torch.device("cuda")) and fused.keeps_operands("triton", torch.device("cuda"))
    assert not fused.keeps_operands("triton", torch.device("cuda"), False)
    assert not fused.keeps_operands("compiled", torch.device("cuda")) and not fused.keeps_operands("compiled", torch.device("cpu"))
