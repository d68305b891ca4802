"""Fixed-policy quantized layers (qmodules.py): the fused path against the reference formulas."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmpq_core import BitPolicy, ConfigError, apply_policy_, build_model, calibrate_, searchable_layers
from gmpq_core.policy import QuantSpec
from gmpq_core.qmodules import QUANT_IMPLS, QuantConv2d, QuantLinear, quantized_layers, set_quant_impl_

BITS = [(2, 4), (1, 2), (3, 1), (8, 8), (4, 3)]   # (w_bits, a_bits)


def _layer(kind, w_bits, a_bits, signed, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "conv":
        base = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=True).double()
        x = torch.randn(3, 6, 9, 9, generator=gen, dtype=torch.float64) * 2
        mod = QuantConv2d.from_float(base, QuantSpec(w_bits=w_bits, a_bits=a_bits))
    else:
        base = nn.Linear(7, 4).double()
        x = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 2
        mod = QuantLinear.from_float(base, QuantSpec(w_bits=w_bits, a_bits=a_bits))
    with torch.no_grad():
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen, dtype=torch.float64))
        mod.act.clip.fill_(-1.3 if signed else 1.7)   # a negative clip acts through |clip|
    mod.act.set_signed(signed)
    return mod.double(), x


def _run(mod, x, impl, g):
    mod = copy.deepcopy(mod)
    set_quant_impl_(mod, impl)
    x = x.clone().requires_grad_()
    out = mod(x)
    (out * g).sum().backward()
    return [out.detach(), x.grad, mod.weight.grad, mod.bias.grad, mod.act.clip.grad]


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("w_bits,a_bits", BITS)
def test_fused_layer_matches_the_reference_formulas(kind, signed, w_bits, a_bits):
    mod, x = _layer(kind, w_bits, a_bits, signed)
    with torch.no_grad():
        g = torch.randn_like(mod(x))
    ref, fused = _run(mod, x, "reference", g), _run(mod, x, "auto", g)
    for name, r, f in zip(("out", "grad x", "grad W", "grad bias", "grad clip"), ref, fused):
        assert torch.allclose(r, f, atol=1e-9, rtol=0), (name, (r - f).abs().max())
    assert float(ref[4].abs()) > 0 and float(ref[1].abs().sum()) > 0   # clipped and unclipped inputs both occur


def test_fused_layer_saves_only_its_inputs_for_backward(monkeypatch):
    import gmpq_core.fused as fused
    monkeypatch.setattr(fused, "KEEP_OPERANDS_ON", frozenset())     # no impl keeps the mixed operands
    mod, x = _layer("conv", 2, 4, False)
    x = x.float().requires_grad_()
    mod = mod.float()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mod(x)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()   # x, not the quantized copy of it
    monkeypatch.setattr(fused, "KEEP_OPERANDS_ON", frozenset({("fused", "cpu")}))
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = mod(x)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 2 and big[0].data_ptr() == x.data_ptr() and not torch.equal(big[1], x)   # x and x quantized
    y.sum().backward()                                           # from the kept operands


def test_32_bit_layers_are_not_quantized_on_either_path():
    mod, x = _layer("conv", 2, 2, False)
    mod.w_bits = mod.act.bits = 32     # not a policy's bitwidth (1..8), but a layer may be built with it
    for impl in ("auto", "reference"):
        set_quant_impl_(mod, impl)
        assert torch.equal(mod(x), F.conv2d(x, mod.weight, mod.bias, mod.stride, mod.padding))


def _shift_batchnorms_(model):
    """Random BN shifts. At init (beta = 0) a channel whose quantized inputs are all zero is exactly 0 at the
    next ReLU, where an ulp of difference between two correct implementations decides the gradient."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.bias, std=0.1)


def test_qat_steps_on_fused_layers_follow_the_reference_steps():
    # three SGD steps of a policy-quantized ResNet-20 (float64): same loss and weights either way
    torch.manual_seed(0)
    fp = build_model("resnet20", num_classes=10, in_channels=1, small_input=True).double()
    _shift_batchnorms_(fp)
    names = list(searchable_layers(fp))
    policy = BitPolicy(layers={n: QuantSpec(w_bits=(2, 3, 4)[i % 3], a_bits=(4, 2, 3)[i % 3])
                               for i, n in enumerate(names)})
    x, y = torch.randn(16, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (16,))
    q = calibrate_(apply_policy_(copy.deepcopy(fp), policy), x)
    runs = {}
    for impl in ("reference", "auto"):
        m = set_quant_impl_(copy.deepcopy(q), impl).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        runs[impl] = (losses, m.state_dict())
    assert runs["auto"][0] == pytest.approx(runs["reference"][0], abs=1e-9)
    for k, v in runs["reference"][1].items():
        assert torch.allclose(v.double(), runs["auto"][1][k].double(), atol=1e-7, rtol=1e-6), k
    assert runs["reference"][0][0] != runs["reference"][0][-1]   # the steps trained something


def test_float32_layer_under_bfloat16_autocast_trains_like_the_reference():
    # the conv runs in bf16 under autocast; the backward must recompute its operands in that dtype
    mod, x = _layer("conv", 3, 4, False)
    mod, x = mod.float(), x.float()
    grads = {}
    for impl in ("reference", "auto"):
        m = set_quant_impl_(copy.deepcopy(mod), impl)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(xi)
        out.float().square().sum().backward()
        assert out.dtype == torch.bfloat16
        grads[impl] = (xi.grad, m.weight.grad, m.act.clip.grad)
    for r, f in zip(grads["reference"], grads["auto"]):   # bf16 products: compare at bf16 precision
        assert r.dtype == f.dtype and (r - f).abs().max() <= 2e-2 * max(1.0, float(r.abs().max()))


def test_a_first_forward_in_inference_mode_does_not_spoil_later_training(monkeypatch):
    from gmpq_core import qmodules
    monkeypatch.setattr(qmodules, "_ONES", {})    # as in a fresh process
    mod, x = _layer("conv", 2, 4, False)
    with torch.inference_mode():
        mod(x)
    out = mod(x.requires_grad_())
    out.sum().backward()                          # failed when the cached [1.] was an inference tensor
    assert mod.weight.grad is not None


def test_second_order_gradcam_through_float64_quantized_layers_matches_the_reference():
    from gmpq_core.attribution import gradcam
    torch.manual_seed(0)
    fp = build_model("resnet20", num_classes=10, in_channels=1, small_input=True).double().eval()
    _shift_batchnorms_(fp)
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    policy = BitPolicy(layers={n: QuantSpec(w_bits=3, a_bits=4) for n in searchable_layers(fp)})
    q = calibrate_(apply_policy_(fp, policy), x)
    grads = {}
    for impl in ("reference", "auto"):
        m = set_quant_impl_(copy.deepcopy(q), impl)
        # feature map layer2: its Grad-CAM gradient (create_graph) runs back through layer3's quantized layers
        _, maps = gradcam(m, x, "layer2", mode="second_order")
        (g,) = torch.autograd.grad(maps.square().sum(), m.layer2[0].conv1.weight)
        grads[impl] = g
    # values ~1e-2; a rounding-level difference in the forward (a level flipped at a tie) moves them ~1e-8
    assert torch.allclose(grads["reference"], grads["auto"], atol=1e-6, rtol=0)
    assert float(grads["reference"].abs().max()) > 1e-4


def test_set_quant_impl_names_the_bad_value_and_the_choices():
    mod, _ = _layer("conv", 2, 4, False)
    with pytest.raises(ConfigError, match=r"'fast'.*'auto'"):
        set_quant_impl_(mod, "fast")
    assert set_quant_impl_(mod, "fused") is mod and mod.quant_impl == "fused"
    assert "reference" in QUANT_IMPLS and set(quantized_layers(mod)) == {""}


@pytest.mark.gpu
@pytest.mark.parametrize("signed", [False, True])
def test_cuda_fused_layer_matches_the_reference(signed):
    mod, x = _layer("conv", 3, 4, signed)
    mod, x = mod.float().cuda(), x.float().cuda()
    g = torch.randn_like(mod(x))
    ref, fused = _run(mod, x, "reference", g), _run(mod, x, "auto", g)   # auto: Triton on CUDA
    for r, f in zip(ref, fused):   # float32: a value on a rounding tie may land one level apart
        assert (r - f).abs().max() < 1e-3 * max(1.0, float(r.abs().max()))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = copy.deepcopy(mod)(x.requires_grad_())
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_a_supernets_fixed_layers_follow_its_mixture_impl():
    # the search's mixture_impl reaches a quantized stem / classifier and the policy's discretized layers
    from gmpq_core.supernet import (build_supernet, discretize, mixed_layers, quantize_stem_and_classifier_,
                                    set_mixture_impl_)
    fp = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    net = build_supernet(fp)
    fixed = quantize_stem_and_classifier_(net, include_stem=True, include_classifier=True, bits=8)
    set_mixture_impl_(net, "reference")
    assert set(fixed) == {"conv1", "fc"} and {m.quant_impl for m in quantized_layers(net).values()} == {"reference"}
    policy = BitPolicy(layers={n: QuantSpec(w_bits=m.w_candidates[0], a_bits=m.a_candidates[0])
                               for n, m in mixed_layers(net).items()})
    assert {m.quant_impl for m in quantized_layers(discretize(net, policy)).values()} == {"reference"}


def test_calibration_warns_about_a_signed_layer_given_1_bit_activations(caplog):
    """A policy with 1-bit activations on a layer with signed inputs quantizes to 3 levels but counts 1 bit: the search
    warned, a fine-tune of a written policy did not (a review)."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(2, 1, 12, 12)            # the stem's output is signed (no ReLU before layer "1")
    for a_bits, warned in ((1, True), (2, False)):
        q = apply_policy_(copy.deepcopy(net), BitPolicy(layers={"1": (4, a_bits), "3": (4, 1)}))
        caplog.clear()
        with caplog.at_level("WARNING", logger="gmpq_core.qmodules"):
            calibrate_(q, x)
        said = [r.getMessage() for r in caplog.records if "3 levels" in r.getMessage()]
        assert bool(said) == warned and (not said or "(1)" in said[0])     # layer "3" reads ReLU output: unsigned
