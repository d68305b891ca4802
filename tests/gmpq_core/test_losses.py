import pytest
import torch

from gmpq_core.errors import ConfigError
from gmpq_core.losses import (average_ranks, capacity_p, choose_p, generalization_loss, rank_distance, spearman)
from gmpq_core.models import build_model
from gmpq_core.supernet import build_supernet, expected_bits, mixed_layers


def _maps(seed=0, shape=(5, 4, 4)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_l_gen_is_zero_for_identical_maps_at_p_1():
    a = _maps()
    assert float(generalization_loss(a, a.clone(), 1.0)) == pytest.approx(0.0, abs=1e-12)
    assert float(generalization_loss(a, a.clone(), 3.0)) > 1e-4  # sharpened target differs from the map


@pytest.mark.parametrize("p", [1.0, 1.7, 6.0])
def test_l_gen_is_invariant_to_positive_scaling(p):
    s, t = _maps(1), _maps(2)
    ref = generalization_loss(s, t, p)
    scale_s = torch.tensor([0.01, 3.0, 7.0, 1e3, 0.5])[:, None, None]
    assert torch.allclose(generalization_loss(s * scale_s, t * 42.0, p), ref, rtol=1e-5)


def test_l_gen_matches_the_formula_and_detaches_the_teacher():
    s, t = _maps(3).requires_grad_(True), _maps(4).requires_grad_(True)
    p = 2.5
    sh = s.flatten(1) / s.flatten(1).norm(dim=1, keepdim=True)
    tp = t.flatten(1) ** p
    th = tp / tp.norm(dim=1, keepdim=True)
    loss = generalization_loss(s, t, p)
    assert torch.allclose(loss, ((sh - th) ** 2).mean())
    loss.backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("scale", [0.05, 1.0, 50.0])
def test_l_gen_target_survives_a_large_p_at_any_map_scale(scale):
    """p = 24 (all-1-bit candidates): maps peaking at 0.05 used to underflow to all-zero targets (a constant
    L_gen, no gradient) and maps peaking at 50 to overflow (NaN). The target must equal the float64 one."""
    torch.manual_seed(0)
    teacher = torch.rand(4, 7, 7) * scale
    student = torch.rand(4, 7, 7, requires_grad=True)
    exact = teacher.double() ** 24
    exact = (exact.flatten(1) / exact.flatten(1).norm(dim=1, keepdim=True)).float()
    want = (student.detach().flatten(1) / student.detach().flatten(1).norm(dim=1, keepdim=True) - exact).pow(2).mean()
    loss = generalization_loss(student, teacher, 24.0)
    assert torch.isfinite(loss) and torch.allclose(loss, want, rtol=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    p = torch.tensor(24.0)                                # the capacity mode's p is a 0-d tensor
    assert torch.allclose(generalization_loss(student, teacher, p), want, rtol=1e-5)


def test_l_gen_gradient_is_finite_for_an_all_zero_student_map():
    s = torch.zeros(2, 3, 3, requires_grad=True)
    generalization_loss(torch.relu(s), _maps(5, (2, 3, 3)), 3.0).backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("bits,expected", [(2, 6.0), (4, 1.5), (3, 24 / 9)])
def test_capacity_p_for_uniform_bits(bits, expected):
    e = torch.full((7,), float(bits))
    assert capacity_p(e, e) == pytest.approx(expected)


def test_capacity_p_of_a_fresh_supernet_is_about_1_71():
    net = build_supernet(build_model("resnet20", in_channels=1))
    _, ew, ea = expected_bits(net)
    assert capacity_p(ew, ea) == pytest.approx(24 / 3.75 ** 2, rel=1e-6)  # 1.7067
    for m in mixed_layers(net).values():  # put all mass on 2 bits
        with torch.no_grad():
            m.alpha_w.copy_(torch.tensor([100.0, 0, 0, 0]))
            m.alpha_a.copy_(torch.tensor([100.0, 0, 0, 0]))
    _, ew, ea = expected_bits(net)
    assert capacity_p(ew, ea) == pytest.approx(6.0, rel=1e-6)
    assert choose_p("fixed", ew, ea, p_fixed=3.0) == 3.0
    with pytest.raises(ConfigError, match="p_mode"):
        choose_p("adaptive", ew, ea)


def test_average_ranks_and_spearman_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (6, 25), generator=g).float()  # many ties, like ReLU'd maps
    b = torch.randint(0, 5, (6, 25), generator=g).float()
    for i in range(6):
        ref = torch.tensor(stats.rankdata(a[i].numpy()) - 1.0, dtype=torch.float64)
        assert torch.allclose(average_ranks(a)[i], ref)
        assert float(spearman(a, b)[i]) == pytest.approx(stats.spearmanr(a[i].numpy(), b[i].numpy())[0], abs=1e-9)


def test_rank_distance_bounds_and_rank_preservation():
    a = _maps(6)
    assert rank_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    assert rank_distance(a, a ** 3 * 5) == pytest.approx(0.0, abs=1e-12)  # monotone map keeps the ranking
    assert rank_distance(a, -a) == pytest.approx(2.0, abs=1e-12)
    z = torch.zeros(5, 4, 4)
    assert rank_distance(z, z) == 0.0 and rank_distance(z, a) == pytest.approx(1.0)
