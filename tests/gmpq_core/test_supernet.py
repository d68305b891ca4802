import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmpq_core.layers import searchable_layers
from gmpq_core.models import build_model, list_models
from gmpq_core.errors import PolicyMismatchError
from gmpq_core.policy import BitCandidates, BitPolicy
from gmpq_core.quantizers import quantize_activation, quantize_weight
from gmpq_core.supernet import (MixedConv2d, MixedLinear, arch_parameters, build_supernet, calibrate_supernet_,
                                discretize, expected_bits, mixed_layers, set_temperature_, weight_parameters)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomise(layer, seed=0):
    g = _gen(seed)
    with torch.no_grad():
        layer.alpha_w.copy_(torch.randn(layer.alpha_w.shape, generator=g, dtype=layer.alpha_w.dtype))
        layer.alpha_a.copy_(torch.randn(layer.alpha_a.shape, generator=g, dtype=layer.alpha_a.dtype))
        layer.clips.copy_(0.5 + torch.rand(layer.clips.shape, generator=g, dtype=layer.clips.dtype) * 2)


def _double_sum(layer, x, op):
    """sum_i sum_j pw_i pa_j op(Qa_j(x), Qw_i(W)): one op per (weight, activation) pair."""
    pw, pa = torch.softmax(layer.alpha_w, 0), torch.softmax(layer.alpha_a, 0)
    out = 0
    for i, bw in enumerate(layer.w_candidates):
        for j, ba in enumerate(layer.a_candidates):
            xq = quantize_activation(x, layer.clips[j], ba, layer.signed)
            out = out + pw[i] * pa[j] * op(xq, quantize_weight(layer.weight, bw))
    return out


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("kind", ["conv", "depthwise", "linear"])
def test_composite_layer_equals_explicit_double_sum(kind, signed):
    cands = BitCandidates(w_bits=(2, 3, 5), a_bits=(1, 4, 8))
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(6, 5), torch.randn(4, 6, generator=_gen(1), dtype=torch.float64) * 2
        layer = MixedLinear.from_float(base.double(), cands)
        op = lambda a, w: F.linear(a, w, layer.bias)  # noqa: E731
    else:
        groups = 4 if kind == "depthwise" else 1
        base = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=groups).double()
        x = torch.randn(2, 4, 7, 7, generator=_gen(1), dtype=torch.float64) * 2
        layer = MixedConv2d.from_float(base, cands)
        op = lambda a, w: F.conv2d(a, w, layer.bias, stride=2, padding=1, groups=groups)  # noqa: E731
    layer.signed = signed
    _randomise(layer)
    x.requires_grad_(True)
    params = [layer.alpha_w, layer.alpha_a, layer.clips, layer.weight, x]
    y = layer(x)
    ref = _double_sum(layer, x, op)
    assert torch.allclose(y, ref, atol=1e-10)
    upstream = torch.randn(y.shape, generator=_gen(2), dtype=y.dtype)
    g1 = torch.autograd.grad((y * upstream).sum(), params)
    g2 = torch.autograd.grad((ref * upstream).sum(), params)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-9)


def test_supernet_keeps_fqns_weights_and_leaves_model_untouched():
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1)
    before = copy.deepcopy(model.state_dict())
    net = build_supernet(model)
    assert all(not isinstance(m, (MixedConv2d, MixedLinear)) for m in model.modules())
    assert list(mixed_layers(net)) == list(searchable_layers(model))
    for name, m in mixed_layers(net).items():
        assert torch.equal(m.weight, model.get_submodule(name).weight)
        assert torch.equal(m.alpha_w, torch.zeros(4)) and torch.equal(m.alpha_a, torch.zeros(4))
        assert torch.equal(m.clips, torch.full((4,), 6.0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    names = {id(p) for p in arch_parameters(net)}
    assert len(names) == 2 * 20 and not names & {id(p) for p in weight_parameters(net)}


_SLOW = {"resnet18", "resnet50"}  # seconds each on a loaded 2-core machine


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n
                                  for n in sorted(list_models())])
def test_supernet_forward_backward_on_every_registered_model(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_channels=3, small_input=True)
    net = build_supernet(model, BitCandidates(w_bits=(2, 4), a_bits=(3, 8)))
    x = torch.randn(4, 3, 8, 8, generator=_gen())  # batch 4: train-mode BN on 1x1 maps still passes gradients
    calibrate_supernet_(net, x)
    out = net(x)
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    _, ew, ea = expected_bits(net)
    (out.square().mean() + ew.sum() * 1e-3).backward()
    layers = mixed_layers(net)
    assert len(layers) == len(searchable_layers(model))
    assert all(m.alpha_w.grad is not None and m.alpha_a.grad is not None for m in layers.values())
    assert any(float(m.alpha_a.grad.abs().sum()) > 0 for m in layers.values())


def test_calibration_fits_the_inputs_the_search_trains_on_and_keeps_the_bn_statistics():
    """Clips come from a training-mode pass (batch statistics), not from fresh running statistics (mean 0,
    variance 1 with ``init_from_fp=False``, which gave clips 2-3x smaller than the inputs seen in training)."""
    torch.manual_seed(0)
    net = build_supernet(build_model("resnet20", num_classes=10, in_channels=1, small_input=True))
    x = torch.randn(16, 1, 28, 28, generator=_gen())
    seen = {}
    layer = mixed_layers(net)["layer3.1.conv1"]
    hook = layer.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach().clone()))
    net.train()
    with torch.no_grad():
        net(x)                                            # what the search's first step quantizes
    hook.remove()
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running_" in k or "num_batches" in k}
    net.eval()
    calibrate_supernet_(net, x)
    want = torch.quantile(seen["x"].abs().flatten().float(), 0.999)
    # (up to the upstream layers' quantization, which calibration changes as it goes: 1e-4 here)
    assert torch.allclose(layer.clips.detach(), want.expand_as(layer.clips), rtol=1e-2)
    assert not net.training                               # the caller's mode is kept
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())


def test_calibration_detects_signed_inputs_and_sets_clips():
    torch.manual_seed(0)
    net = build_supernet(build_model("mobilenet_v2", num_classes=3, small_input=True))
    calibrate_supernet_(net, torch.randn(2, 3, 8, 8, generator=_gen()))
    flags = {n: m.signed for n, m in mixed_layers(net).items()}
    assert flags["features.1.conv.0.0"] is False          # after the stem's ReLU6
    assert flags["features.2.conv.0.0"] is True           # after a linear bottleneck
    assert all(float(c) != 6.0 for m in mixed_layers(net).values() for c in m.clips.detach())
    sd = net.state_dict()
    fresh = build_supernet(build_model("mobilenet_v2", num_classes=3, small_input=True))
    fresh.load_state_dict(sd)
    assert {n: m.signed for n, m in mixed_layers(fresh).items()} == flags


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1)
    state = torch.get_rng_state()
    a = build_supernet(model, init_from_fp=False, seed=3)
    b = build_supernet(model, init_from_fp=False, seed=3)
    c = build_supernet(model, init_from_fp=False, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    w = lambda net: net.get_submodule("layer1.0.conv1").weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))
    assert not torch.equal(w(a), model.layer1[0].conv1.weight)


def test_eval_weight_cache_follows_in_place_updates():
    layer = MixedConv2d.from_float(nn.Conv2d(3, 4, 3, bias=False), BitCandidates())
    x = torch.randn(1, 3, 5, 5, generator=_gen())
    with torch.no_grad():
        y1 = layer(x)
        assert torch.equal(layer(x), y1)
        layer.weight.mul_(2.0)
        y2 = layer(x)
    assert torch.allclose(y2, 2 * y1, atol=1e-5)


def test_one_hot_logits_make_the_supernet_equal_its_discretized_policy():
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1).eval()
    net = build_supernet(model).eval()
    x = torch.randn(2, 1, 12, 12, generator=_gen())
    calibrate_supernet_(net, x)
    g = _gen(5)
    layers = {}
    for name, m in mixed_layers(net).items():
        i, j = int(torch.randint(4, (1,), generator=g)), int(torch.randint(4, (1,), generator=g))
        with torch.no_grad():
            m.alpha_w.fill_(-1e4)
            m.alpha_w[i] = 0
            m.alpha_a.fill_(-1e4)
            m.alpha_a[j] = 0
        layers[name] = {"w_bits": m.w_candidates[i], "a_bits": m.a_candidates[j]}
    policy = BitPolicy(layers=layers)
    fixed = discretize(net, policy).eval()
    with torch.no_grad():
        assert torch.allclose(net(x), fixed(x), atol=1e-4)


def test_a_fixed_bit_stem_and_classifier_run_quantized_in_the_supernet_and_calibrate_with_it():
    from gmpq_core.qmodules import QuantConv2d, QuantLinear
    from gmpq_core.supernet import quantize_stem_and_classifier_

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=4, in_channels=1)
    net = build_supernet(model)
    x = torch.randn(4, 1, 12, 12, generator=_gen())
    before = net(x).detach()
    specs = quantize_stem_and_classifier_(net, include_stem=True, include_classifier=True, bits=2)
    assert set(specs) == {"conv1", "fc"} and isinstance(net.conv1, QuantConv2d) and isinstance(net.fc, QuantLinear)
    assert torch.equal(net.conv1.weight, model.conv1.weight)              # FP weights kept
    calibrate_supernet_(net, x, clips=False)                              # the official switch: clips stay 6.0
    assert float(net.conv1.act.clip.detach()) == 6.0
    calibrate_supernet_(net, x)
    assert float(net.conv1.act.clip.detach()) != 6.0 and float(net.fc.act.clip.detach()) != 6.0
    assert not torch.allclose(net(x), before, atol=1e-3)                  # 2-bit stem and classifier: another net
    assert set(mixed_layers(net)) == set(searchable_layers(model))        # the searched layers are unchanged


def test_discretizing_an_activation_width_the_search_never_had_is_refused():
    net = build_supernet(build_model("resnet20", in_channels=1), BitCandidates(w_bits=(2, 4), a_bits=(2, 4)))
    layers = {n: {"w_bits": 4, "a_bits": 4} for n in mixed_layers(net)}
    layers["layer2.0.conv1"] = {"w_bits": 4, "a_bits": 8}
    with pytest.raises(PolicyMismatchError, match=r"'layer2\.0\.conv1' a_bits=8.*candidates \[2, 4\]"):
        discretize(net, BitPolicy(layers=layers))


def test_temperature_sharpens_the_distribution():
    net = build_supernet(build_model("resnet20", in_channels=1))
    m = next(iter(mixed_layers(net).values()))
    with torch.no_grad():
        m.alpha_w.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    p1 = float(m.probs_w()[1].detach())
    set_temperature_(net, 0.5)
    assert float(m.probs_w()[1].detach()) > p1
    with pytest.raises(ValueError, match=r"temperature must be > 0, but got temperature=0\.0"):
        set_temperature_(net, 0.0)


def test_expected_bits_stay_float32_under_bf16_autocast():
    """A review found E[b] computed as a matmul, which autocast runs in bf16 (8 significant bits): the budget penalty
    and the capacity p saw 3.75 for 3.746 bits, and an architecture step under one bf16 ulp did not move them."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    sn = build_supernet(net)
    for i, layer in enumerate(mixed_layers(sn).values()):
        _randomise(layer, seed=i)
    _, w32, a32 = expected_bits(sn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, w, a = expected_bits(sn)
        layer = next(iter(mixed_layers(sn).values()))
        with torch.no_grad():
            layer.alpha_w[0] += 1e-3
        _, w_moved, _ = expected_bits(sn)
    assert w.dtype == a.dtype == torch.float32
    torch.testing.assert_close(w, w32, rtol=1e-6, atol=0)
    torch.testing.assert_close(a, a32, rtol=1e-6, atol=0)
    assert (w_moved[0] - w[0]).abs() > 1e-5
