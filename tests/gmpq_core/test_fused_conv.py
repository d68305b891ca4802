"""The fused conv node (``mixed_conv2d``: saved tensors, kept operands, the custom operators against the eager
path) and fused mixtures in a supernet (a search step, a whole search, torch.compile, bf16 autocast on CUDA)
against the straightforward reference. The activation and weight mixtures alone: test_fused.py."""
import pytest
import torch
import torch.nn.functional as F

from fused_checks import _assert_all_close, _gen   # same folder (pytest puts it on sys.path)
from gmpq_core.fused import act_mixture, mixed_conv2d, weight_mixture
from gmpq_core.models import build_model
from gmpq_core.policy import BitCandidates
from gmpq_core.supernet import build_supernet, calibrate_supernet_, mixed_layers, set_mixture_impl_


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
