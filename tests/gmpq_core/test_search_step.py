"""One GMPQ search step and the loop's settings, checked against their definitions (METHOD.md 4-5):
the loss is CE + eta * L_gen + lam * penalty and its gradient is what updates the parameters; only the
architecture logits sit in the architecture group; both learning rates step down x0.1; p is recomputed
from the current softmax every step; the teacher runs in the mode the config asks for."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gmpq_core.search as search_mod
from gmpq_core.attribution import find_feature_layer, gradcam
from gmpq_core.bitops import layer_macs
from gmpq_core.complexity import Budget, complexity_penalty
from gmpq_core.losses import capacity_p, generalization_loss
from gmpq_core.models import build_model
from gmpq_core.search import SearchConfig, _make_optimizer, _teacher_mode_, search_step
from gmpq_core.supernet import arch_parameters, build_supernet, calibrate_supernet_, expected_bits, mixed_layers

from test_search import _cfg, _data, _search, _teacher  # same folder (pytest puts it on sys.path)


def _setup(**cfg_kw):
    torch.manual_seed(0)
    teacher = build_model("resnet20", num_classes=4, in_channels=1, width=4).eval()
    net = build_supernet(copy.deepcopy(teacher)).train()
    x, y = _data(batches=1)[0]
    calibrate_supernet_(net, x)
    macs = {n: layer_macs(teacher, 8, 1)[n] for n in mixed_layers(net)}
    cfg = SearchConfig(**{"eta": 7.0, "lam": 0.3, "budget": Budget(avg_bits=2.5), **cfg_kw})
    kw = dict(layer=find_feature_layer(teacher, model_name="resnet20", input_size=8, in_channels=1),
              macs_vec=torch.tensor([float(m) for m in macs.values()]), budget_bitops=cfg.budget.to_bitops(macs),
              first_macs=next(iter(macs.values())))
    return teacher, net, x, y, cfg, kw


def _parts(net, teacher, x, y, cfg, kw):
    """CE, L_gen, penalty and p of ``net`` on the batch, computed from their definitions."""
    _, t_maps = gradcam(teacher, x, kw["layer"], mode="detached")
    logits, s_maps = gradcam(net, x, kw["layer"], mode="second_order")
    _, ew, ea = expected_bits(net)
    p = capacity_p(ew, ea, cfg.kappa)
    pen = complexity_penalty((kw["macs_vec"] * ew * ea).sum(), mode=cfg.penalty, budget_bitops=kw["budget_bitops"],
                             first_layer_macs=kw["first_macs"])
    return F.cross_entropy(logits, y), generalization_loss(s_maps, t_maps, p), pen, p


def test_the_step_minimises_ce_plus_eta_l_gen_plus_lam_penalty():
    teacher, net, x, y, cfg, kw = _setup()
    twin = copy.deepcopy(net)
    ce, l_gen, pen, p = _parts(twin, teacher, x, y, cfg, kw)
    assert float(pen.detach()) > 0                         # the 2.5-bit budget binds: the penalty term is live
    (ce + cfg.eta * l_gen + cfg.lam * pen).backward()
    opt = _make_optimizer(net, cfg)
    st = search_step(net, teacher, x, y, opt, cfg, **kw)
    assert st.ce == pytest.approx(float(ce.detach()), rel=1e-5) and st.l_gen == pytest.approx(float(l_gen.detach()), rel=1e-5)
    assert st.penalty == pytest.approx(float(pen.detach()), rel=1e-5) and st.p == pytest.approx(p, rel=1e-6)
    assert st.loss == pytest.approx(st.ce + cfg.eta * st.l_gen + cfg.lam * st.penalty, rel=1e-6)
    for (name, a), b in zip(net.named_parameters(), twin.parameters()):   # the same gradient reached every tensor
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name


def test_p_is_recomputed_from_the_current_softmax_at_every_step():
    teacher, net, x, y, cfg, kw = _setup(lr_arch=5.0)
    opt = _make_optimizer(net, cfg)
    seen = []
    for _ in range(3):
        _, ew, ea = expected_bits(net)
        seen.append((capacity_p(ew, ea, cfg.kappa), search_step(net, teacher, x, y, opt, cfg, **kw).p))
    assert all(got == pytest.approx(want, rel=1e-6) for want, got in seen)
    assert abs(seen[2][0] - seen[0][0]) > 1e-3              # the architecture moved, and p with it


def test_only_the_architecture_logits_are_in_the_architecture_group():
    _, net, _, _, cfg, _ = _setup(lr=0.2, lr_arch=0.03, weight_decay=1e-4, arch_weight_decay=5e-3)
    weights, arch = _make_optimizer(net, cfg).param_groups
    assert {id(p) for p in arch["params"]} == {id(p) for p in arch_parameters(net)}
    names = {id(p): n for n, p in net.named_parameters()}
    assert all(names[id(p)].rsplit(".", 1)[-1] in ("alpha_w", "alpha_a") for p in arch["params"])
    in_weights = {names[id(p)] for p in weights["params"]}
    assert any(n.endswith(".clips") for n in in_weights) and any(".bn" in n or "bn1" in n for n in in_weights)
    assert not in_weights & {names[id(p)] for p in arch["params"]}
    assert len(in_weights) + len(arch["params"]) == len(list(net.parameters()))
    assert (weights["lr"], weights["weight_decay"], arch["lr"], arch["weight_decay"]) == (0.2, 1e-4, 0.03, 5e-3)


def test_both_learning_rates_drop_tenfold_every_lr_step_epochs():
    from gmpq_core.reporting import ListReporter

    rep = ListReporter()
    _search(_cfg(epochs=3, lr_step_epochs=2, lr=0.2, lr_arch=0.04, max_steps_per_epoch=1), rep)
    got = [(m["lr"], m["lr_arch"]) for _, m in rep.records]
    assert got == [pytest.approx(v) for v in [(0.2, 0.04), (0.2, 0.04), (0.02, 0.004)]]


@pytest.mark.parametrize("bn_train", [False, True])
def test_the_teacher_runs_in_the_mode_the_config_asks_for(monkeypatch, bn_train):
    modes = []
    real = search_mod._teacher_mode_

    def spy(teacher, flag):
        out = real(teacher, flag)
        modes.append({type(m).__name__: m.training for m in out.modules()})
        return out
    monkeypatch.setattr(search_mod, "_teacher_mode_", spy)
    caller_teacher = _teacher()
    _search(_cfg(epochs=1, max_steps_per_epoch=1, teacher_bn_train=bn_train), teacher=caller_teacher)
    # eval mode: the BatchNorms are folded into the convolutions (bn_fold.py); in training mode they stay
    assert modes and all(m.get("BatchNorm2d") is (True if bn_train else None) and m["Conv2d"] is False
                         for m in modes)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in caller_teacher.modules()) == 21   # untouched
    teacher = _teacher_mode_(build_model("resnet20", num_classes=4, in_channels=1, width=4), bn_train)
    assert {m.training for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {bn_train}
    assert not teacher.training


def test_a_grad_cam_layer_named_by_a_conv_keeps_its_own_output_in_the_folded_teacher(monkeypatch):
    teachers = []
    real = search_mod.teacher_gradcam

    def spy(model, x, layer, **kw):
        teachers.append(model)
        return real(model, x, layer, **kw)
    monkeypatch.setattr(search_mod, "teacher_gradcam", spy)
    _search(_cfg(epochs=1, max_steps_per_epoch=1, gradcam_layer="layer3.2.conv2"))
    t = teachers[0]
    assert isinstance(t.layer3[2].bn2, torch.nn.BatchNorm2d) and t.layer3[2].conv2.bias is None   # kept
    assert isinstance(t.layer3[2].bn1, torch.nn.Identity)                                          # the rest folded
