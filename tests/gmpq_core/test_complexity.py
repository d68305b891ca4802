import pytest
import torch

from gmpq_core.bitops import count_bitops, layer_macs
from gmpq_core.complexity import (Budget, avg_bits_range, bitops_range, check_budget, complexity_penalty,
                                  expected_bitops)
from gmpq_core.errors import BudgetInfeasibleError, ConfigError
from gmpq_core.models import build_model
from gmpq_core.policy import BitCandidates, BitPolicy
from gmpq_core.supernet import arch_parameters, build_supernet, mixed_layers


@pytest.fixture(scope="module")
def resnet20():
    model = build_model("resnet20", in_channels=1)
    net = build_supernet(model)
    all_macs = layer_macs(model, 28, 1)
    macs = {n: all_macs[n] for n in mixed_layers(net)}
    return model, net, macs


@pytest.mark.parametrize("kwargs,match", [({}, "exactly one"), ({"avg_bits": 3, "gbitops": 1.0}, "exactly one"),
                                          ({"avg_bits": 0}, "avg_bits"), ({"avg_bits": float("nan")}, "avg_bits"),
                                          ({"gbitops": -1.0}, "gbitops"), ({"avg_bits": True}, "avg_bits")])
def test_budget_validation_echoes_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Budget(**kwargs)


def test_budget_to_bitops(resnet20):
    model, _, macs = resnet20
    b3 = Budget(avg_bits=3).to_bitops(macs)
    assert b3 == count_bitops(model, BitPolicy.uniform(model, 3, 3), 28, 1).bitops_quantized
    assert Budget(gbitops=0.25).to_bitops(macs) == 250_000_000
    assert Budget.from_any({"avg_bits": 4}) == Budget(avg_bits=4) and Budget.from_any(None) is None
    with pytest.raises(ConfigError, match="budget keys"):
        Budget.from_any({"bits": 4})


def test_expected_bitops_under_the_softmax(resnet20):
    model, net, macs = resnet20
    total = sum(macs.values())
    assert float(expected_bitops(net, macs).detach()) == pytest.approx(total * 3.75 ** 2, rel=1e-6)
    # one-hot logits: the expectation is the discrete policy's BitOPs
    one_hot = build_supernet(model)
    layers = {}
    for k, (name, m) in enumerate(mixed_layers(one_hot).items()):
        i, j = k % 4, (k + 1) % 4
        with torch.no_grad():
            m.alpha_w.fill_(-1e4)
            m.alpha_w[i] = 0
            m.alpha_a.fill_(-1e4)
            m.alpha_a[j] = 0
        layers[name] = (m.w_candidates[i], m.a_candidates[j])
    ref = count_bitops(model, BitPolicy(layers=layers), 28, 1).bitops_quantized
    assert float(expected_bitops(one_hot, macs).detach()) == pytest.approx(ref, rel=1e-6)


def test_hinge_penalty_is_zero_at_or_below_budget_and_grows_above():
    e = lambda v: torch.tensor(float(v))  # noqa: E731
    at = complexity_penalty(e(100), budget_bitops=100, first_layer_macs=10)
    below = complexity_penalty(e(60), budget_bitops=100, first_layer_macs=10)
    assert float(at) == 0.0 and float(below) == 0.0
    x = e(150).requires_grad_(True)
    above = complexity_penalty(x, budget_bitops=100, first_layer_macs=10)
    assert float(above.detach()) == pytest.approx(0.5 ** 2 * 100 / 10)
    above.backward()
    assert float(x.grad) == pytest.approx(1 / 10)  # same gradient as the official penalty at E = 1.5 B
    assert float(complexity_penalty(e(300), budget_bitops=100, first_layer_macs=10)) > float(above.detach())
    assert float(complexity_penalty(e(150), mode="official", first_layer_macs=10)) == pytest.approx(15.0)
    assert float(complexity_penalty(e(150), budget_bitops=None, first_layer_macs=10)) == 0.0
    with pytest.raises(ConfigError, match="penalty"):
        complexity_penalty(e(1), mode="lagrange", first_layer_macs=1)


def test_infeasible_budget_message_names_the_feasible_range(resnet20):
    _, _, macs = resnet20
    lo, hi = bitops_range(macs, BitCandidates())
    with pytest.raises(BudgetInfeasibleError) as err:
        check_budget(Budget(gbitops=0.01).to_bitops(macs), macs, BitCandidates(), model_name="resnet20", input_size=28)
    msg = str(err.value)
    assert msg.startswith(f"budget 0.01 GBitOPs is below the all-2-bit policy ({lo / 1e9:.2f} GBitOPs) for "
                          f"resnet20 at 28 px; feasible range {lo / 1e9:.2f} .. {hi / 1e9:.2f} GBitOPs "
                          "(average bits 2 .. 6)")
    with pytest.raises(BudgetInfeasibleError, match="above the all-6-bit policy"):
        check_budget(hi + 1, macs, BitCandidates(), model_name="resnet20", input_size=28)
    check_budget(lo, macs, BitCandidates())
    check_budget(hi, macs, BitCandidates())
    with pytest.raises(BudgetInfeasibleError, match="W2A4"):
        check_budget(lo // 2, macs, BitCandidates(w_bits=(2, 8), a_bits=(4, 8)))


@pytest.mark.parametrize("candidates, bits, bad", [
    (BitCandidates(), (2, 3.5, 6), (0.5, 1, 1.99, 6.01, 9)),
    (BitCandidates(w_bits=(2, 8), a_bits=(4, 8)), (8 ** 0.5, 8), (2.8, 8.01)),
])
def test_an_average_bits_budget_is_feasible_exactly_in_the_candidates_range(resnet20, candidates, bits, bad):
    # the range a search config checks is the one the model's BitOPs give, on any model (the reference)
    from gmpq_core.search_config import SearchConfig

    _, _, macs = resnet20
    lo, hi = bitops_range(macs, candidates)
    total = sum(macs.values())
    assert avg_bits_range(candidates) == pytest.approx(((lo / total) ** 0.5, (hi / total) ** 0.5))
    for b in bits:
        check_budget(Budget(avg_bits=b).to_bitops(macs), macs, candidates)
        SearchConfig(candidates=candidates, budget={"avg_bits": b})
    for b in bad:
        with pytest.raises(BudgetInfeasibleError, match=rf"The budget avg_bits={b!r} is outside the feasible range "
                                                        rf"{avg_bits_range(candidates)[0]:.3g} \.\. "):
            SearchConfig(candidates=candidates, budget={"avg_bits": b})


@pytest.mark.parametrize("mode", ["hinge", "official"])
def test_large_complexity_weight_lowers_expected_bits_in_a_few_steps(resnet20, mode):
    model, _, macs = resnet20
    net = build_supernet(model)
    budget = Budget(avg_bits=2.5).to_bitops(macs)
    opt = torch.optim.SGD(arch_parameters(net), lr=0.01, momentum=0.9)
    first = macs[next(iter(macs))]
    history = []
    for _ in range(5):
        exp = expected_bitops(net, macs)
        history.append(float(exp.detach()))
        loss = 10.0 * complexity_penalty(exp, mode=mode, budget_bitops=budget, first_layer_macs=first)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(b < a for a, b in zip(history, history[1:]))
    assert history[-1] < 0.9 * history[0]
