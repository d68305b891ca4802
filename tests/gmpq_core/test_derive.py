import random

import pytest
import torch

from gmpq_core.bitops import count_bitops, layer_macs
from gmpq_core.derive import LayerChoice, derive_policy, select_bits
from gmpq_core.errors import BudgetInfeasibleError
from gmpq_core.layers import fingerprint
from gmpq_core.models import build_model
from gmpq_core.supernet import build_supernet, mixed_layers


def _cost(layers, specs):
    return sum(c.macs * specs[c.name].w_bits * specs[c.name].a_bits for c in layers)


def _random_layers(rng, n):
    out = []
    for k in range(n):
        wb = sorted(rng.sample(range(1, 9), rng.randint(1, 4)))
        ab = sorted(rng.sample(range(1, 9), rng.randint(1, 4)))
        pw = [rng.random() for _ in wb]
        pa = [rng.random() for _ in ab]
        out.append(LayerChoice(name=f"l{k}", macs=rng.randint(1, 10**6), w_bits=wb, a_bits=ab,
                               pw=[v / sum(pw) for v in pw], pa=[v / sum(pa) for v in pa]))
    return out


def test_policies_from_random_probabilities_and_budgets_never_exceed_the_budget():
    rng = random.Random(1234)
    for _ in range(400):
        layers = _random_layers(rng, rng.randint(1, 25))
        lo = sum(c.macs * c.w_bits[0] * c.a_bits[0] for c in layers)
        hi = sum(c.macs * c.w_bits[-1] * c.a_bits[-1] for c in layers)
        budget = rng.randint(lo, hi)
        specs = select_bits(layers, budget)
        assert _cost(layers, specs) <= budget
        for c in layers:
            assert specs[c.name].w_bits in c.w_bits and specs[c.name].a_bits in c.a_bits
        assert select_bits(layers, budget) == specs  # deterministic


def test_argmax_is_kept_when_it_fits():
    layers = [LayerChoice(name="a", macs=10, w_bits=(2, 4, 8), a_bits=(2, 4), pw=(0.2, 0.5, 0.3), pa=(0.6, 0.4)),
              LayerChoice(name="b", macs=5, w_bits=(2, 4), a_bits=(2, 4), pw=(0.1, 0.9), pa=(0.5, 0.5))]
    specs = select_bits(layers, None)
    assert (specs["a"].w_bits, specs["a"].a_bits, specs["b"].w_bits, specs["b"].a_bits) == (4, 2, 4, 2)
    assert select_bits(layers, 10 * 8 + 5 * 8) == specs


def test_repair_lowers_the_smallest_margin_per_bitop_first():
    # argmax: a = W4A4 (margin 0.1 to W2), b = W4A4 (margin 0.8 to W2); both save the same BitOPs,
    # so the cheap-to-lose layer a goes down first and one move suffices.
    layers = [LayerChoice(name="a", macs=100, w_bits=(2, 4), a_bits=(4,), pw=(0.45, 0.55), pa=(1.0,)),
              LayerChoice(name="b", macs=100, w_bits=(2, 4), a_bits=(4,), pw=(0.1, 0.9), pa=(1.0,))]
    specs = select_bits(layers, 100 * 4 * 4 + 100 * 2 * 4)
    assert (specs["a"].w_bits, specs["b"].w_bits) == (2, 4)
    # equal margins: the move that saves more BitOPs per margin wins (the bigger layer)
    layers = [LayerChoice(name="s", macs=10, w_bits=(2, 4), a_bits=(4,), pw=(0.4, 0.6), pa=(1.0,)),
              LayerChoice(name="big", macs=1000, w_bits=(2, 4), a_bits=(4,), pw=(0.4, 0.6), pa=(1.0,))]
    specs = select_bits(layers, 10 * 16 + 1000 * 16 - 1)
    assert (specs["s"].w_bits, specs["big"].w_bits) == (4, 2)


def test_ties_go_to_the_earlier_layer_then_to_the_weight():
    same = dict(macs=50, w_bits=(2, 4), a_bits=(2, 4), pw=(0.5, 0.5), pa=(0.5, 0.5))
    layers = [LayerChoice(name="first", **same), LayerChoice(name="second", **same)]
    # uniform probabilities: argmax takes the lowest candidate, so start from W4A4 via a tiny tilt
    layers = [LayerChoice(name=c.name, macs=c.macs, w_bits=c.w_bits, a_bits=c.a_bits, pw=(0.5, 0.5 + 1e-9),
                          pa=(0.5, 0.5 + 1e-9)) for c in layers]
    specs = select_bits(layers, 2 * 50 * 16 - 1)
    assert (specs["first"].w_bits, specs["first"].a_bits) == (2, 4)
    assert (specs["second"].w_bits, specs["second"].a_bits) == (4, 4)


def test_budget_below_the_floor_is_rejected():
    layers = [LayerChoice(name="a", macs=10, w_bits=(2, 4), a_bits=(2, 4), pw=(0.5, 0.5), pa=(0.5, 0.5))]
    with pytest.raises(BudgetInfeasibleError, match="below the all-minimum-bits"):
        select_bits(layers, 39)


def test_derive_policy_on_a_supernet_with_random_logits():
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1)
    net = build_supernet(model)
    all_macs = layer_macs(model, 28, 1)
    macs = {n: all_macs[n] for n in mixed_layers(net)}
    g = torch.Generator().manual_seed(7)
    for trial in range(5):
        for m in mixed_layers(net).values():
            with torch.no_grad():
                m.alpha_w.copy_(torch.randn(4, generator=g) * 3)
                m.alpha_a.copy_(torch.randn(4, generator=g) * 3)
        lo, hi = sum(macs.values()) * 4, sum(macs.values()) * 36
        budget = int(lo + (hi - lo) * float(torch.rand(1, generator=g)) * 0.5)
        policy = derive_policy(net, budget, macs)
        assert policy.fingerprint == fingerprint(model)
        assert count_bitops(model, policy, 28, 1, macs=all_macs).bitops_quantized <= budget
        unconstrained = derive_policy(net, None, macs)
        for name, m in mixed_layers(net).items():
            assert unconstrained.layers[name].w_bits == m.w_candidates[int(m.alpha_w.argmax())]


def test_fill_spends_the_leftover_budget_without_exceeding_it():
    rng = random.Random(99)
    for _ in range(300):
        layers = _random_layers(rng, rng.randint(1, 20))
        lo = sum(c.macs * c.w_bits[0] * c.a_bits[0] for c in layers)
        hi = sum(c.macs * c.w_bits[-1] * c.a_bits[-1] for c in layers)
        budget = rng.randint(lo, hi)
        plain, filled = select_bits(layers, budget), select_bits(layers, budget, fill=True)
        assert _cost(layers, plain) <= _cost(layers, filled) <= budget
        for c in layers:  # fill only raises, and what is left cannot pay for any one-step raise
            assert filled[c.name].w_bits >= plain[c.name].w_bits and filled[c.name].a_bits >= plain[c.name].a_bits
            s = filled[c.name]
            wi, ai = list(c.w_bits).index(s.w_bits), list(c.a_bits).index(s.a_bits)
            left = budget - _cost(layers, filled)
            if wi + 1 < len(c.w_bits):
                assert c.macs * (c.w_bits[wi + 1] - s.w_bits) * s.a_bits > left
            if ai + 1 < len(c.a_bits):
                assert c.macs * s.w_bits * (c.a_bits[ai + 1] - s.a_bits) > left


def test_fill_raises_where_the_least_probability_is_lost():
    layers = [LayerChoice(name="a", macs=10, w_bits=(2, 4), a_bits=(2,), pw=(0.9, 0.1), pa=(1.0,)),
              LayerChoice(name="b", macs=10, w_bits=(2, 4), a_bits=(2,), pw=(0.6, 0.4), pa=(1.0,))]
    specs = select_bits(layers, 10 * 4 + 10 * 8, fill=True)  # room for exactly one raise
    assert (specs["a"].w_bits, specs["b"].w_bits) == (2, 4)
