"""FP training loop: learning, determinism, reporting/stopping, NaN detection, metrics by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmpq_core.errors import ConfigError, NonFiniteLossError
from gmpq_core.reporting import ListReporter
from gmpq_core.train import (TrainConfig, distillation_loss, evaluate, make_optimizer, train_fp,
                             train_one_epoch)


class TinyLoader:
    """Separable 4-class toy data, 1x8x8 images; order depends on (seed, epoch) only, like data.Loader."""

    def __init__(self, n: int = 64, batch_size: int = 16, seed: int = 0, classes: int = 4,
                 poison_batch: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + 2.0 * self.y.float().view(-1, 1, 1, 1)
        self.batch_size, self.seed, self.epoch, self.poison_batch = batch_size, seed, 0, poison_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        for b, i in enumerate(range(0, len(order), self.batch_size)):
            j = order[i:i + self.batch_size]
            x = self.x[j].clone()
            if b == self.poison_batch:
                x[0, 0, 0, 0] = float("inf")
            yield x, self.y[j]


class TinyNet(nn.Module):
    """stem conv -> two searchable convs -> (dropout) -> classifier; a few hundred parameters."""

    def __init__(self, classes: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 8, 3, 2, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, 1, 1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(self.drop(x.mean((2, 3))))


def tiny_net(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw)


def test_train_one_epoch_reduces_loss_on_separable_data():
    model, loader = tiny_net(), TinyLoader()
    before = evaluate(model, loader)["loss"]
    opt = make_optimizer(model, TrainConfig(lr=0.05))
    for epoch in range(4):
        loader.set_epoch(epoch)
        stats = train_one_epoch(model, loader, opt)
    after = evaluate(model, loader)
    assert set(stats) >= {"loss", "top1"}
    assert after["loss"] < 0.8 * before
    assert after["top1"] > 50.0  # chance is 25%


def test_train_fp_is_deterministic_for_the_seed_and_keeps_global_rng():
    cfg = TrainConfig(epochs=2, lr=0.05, seed=3)
    a, b = tiny_net(dropout=0.3), tiny_net(dropout=0.3)
    state = torch.get_rng_state()
    ra = train_fp(a, TinyLoader(), TinyLoader(seed=1), config=cfg)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global RNG is untouched
    rb = train_fp(b, TinyLoader(), TinyLoader(seed=1), config=cfg)
    assert ra.history == rb.history
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = tiny_net(dropout=0.3)
    train_fp(c, TinyLoader(), TinyLoader(seed=1), config=TrainConfig(epochs=2, lr=0.05, seed=4))
    assert not torch.equal(a.conv2.weight, c.conv2.weight)  # the seed drives dropout


def test_reporter_gets_one_report_per_epoch_and_should_stop_ends_training():
    rep = ListReporter(stop_after=2)
    calls = []
    res = train_fp(tiny_net(), TinyLoader(), TinyLoader(seed=1), config=TrainConfig(epochs=5, lr=0.05),
                   reporter=rep, progress=lambda done, total: calls.append((done, total)))
    assert res.epochs_run == 2 and len(res.history) == 2
    assert [step for step, _ in rep.records] == [1, 2]
    assert set(rep.records[0][1]) >= {"top1", "top5", "loss", "train_loss", "train_top1", "lr"}
    assert calls[:4] == [(1, 4), (2, 4), (3, 4), (4, 4)] and len(calls) == 8
    assert res.top1 == rep.records[-1][1]["top1"]


def test_cosine_schedule_reaches_zero_and_max_steps_caps_epochs():
    calls = []
    res = train_fp(tiny_net(), TinyLoader(), None, config=TrainConfig(epochs=2, lr=0.1, max_steps_per_epoch=2),
                   progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2), (1, 2), (2, 2)]
    assert res.history[0]["lr"] == pytest.approx(0.05)  # halfway through 4 steps: lr * (1 + cos(pi/2)) / 2
    assert res.history[1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_non_finite_loss_raises_naming_epoch_and_step():
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2"):
        train_fp(tiny_net(), TinyLoader(poison_batch=1), None, config=TrainConfig(epochs=1))


def test_huge_learning_rate_is_caught_as_non_finite():
    with pytest.raises(NonFiniteLossError, match=r"lr="):
        train_fp(tiny_net(), TinyLoader(n=256), None, config=TrainConfig(epochs=3, lr=1e12, weight_decay=0.0))


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits[x.long().flatten()]


def test_evaluate_top1_top5_and_loss_against_hand_count():
    # 7 classes; image i has label y[i]; rank of the label among the logits decides top-1 / top-5.
    logits = torch.tensor([[9., 1, 2, 3, 4, 5, 6],    # label 0: rank 1
                           [1., 2, 3, 4, 5, 6, 9],    # label 1: rank 7 (miss)
                           [1., 2, 9, 3, 4, 5, 6],    # label 3: rank 5 (top-5 hit)
                           [6., 5, 4, 3, 2, 1, 9]])   # label 6: rank 1
    y = torch.tensor([0, 1, 3, 6])
    loader = [(torch.tensor([0., 1.]), y[:2]), (torch.tensor([2., 3.]), y[2:])]
    out = evaluate(FixedLogits(logits), loader)
    assert out["top1"] == pytest.approx(50.0)
    assert out["top5"] == pytest.approx(75.0)
    assert out["loss"] == pytest.approx(float(F.cross_entropy(logits, y)))


def test_distillation_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1])
    T, alpha = 3.0, 0.7
    p_t = torch.softmax(t / T, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, 1))).sum(1).mean()
    expected = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y)
    assert float(distillation_loss(s, t, y, alpha=alpha, temperature=T)) == pytest.approx(float(expected), rel=1e-5)


def test_distillation_from_a_teacher_trains_and_leaves_the_teacher_alone():
    teacher, student, loader = tiny_net(1), tiny_net(2), TinyLoader()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = make_optimizer(student, TrainConfig(lr=0.05))
    stats = train_one_epoch(student, loader, opt, teacher=teacher, distill_alpha=0.5)
    assert math.isfinite(stats["loss"]) and not teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("field,value", [("epochs", 0), ("lr", -0.1), ("lr", float("nan")), ("momentum", 1.0),
                                         ("batch_size", 0), ("max_steps_per_epoch", 0), ("seed", -1)])
def test_train_config_rejects_bad_values_echoing_them(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_training_layout_is_channels_last_on_the_cpu_and_trains_the_same():
    import copy

    import torch.nn.functional as F

    from gmpq_core.models import build_model
    from gmpq_core.train import training_layout_
    torch.manual_seed(0)
    base = build_model("resnet20", num_classes=10, in_channels=1, small_input=True).double()
    x, y = torch.randn(8, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (8,))
    runs = {}
    for layout in ("nchw", "cpu"):
        m = copy.deepcopy(base)
        if layout == "cpu":
            assert training_layout_(m, "cpu") is m
            assert m.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        runs[layout] = m.state_dict()
    for k, v in runs["nchw"].items():
        assert torch.allclose(v, runs["cpu"][k], atol=1e-10, rtol=0), k
    meta = torch.nn.Conv2d(2, 2, 3).to("meta")
    training_layout_(meta, "meta")                       # any other device: left as it is
    assert meta.weight.is_contiguous()


def test_train_fp_hands_the_model_back_in_the_standard_layout():
    from gmpq_core.models import build_model
    from gmpq_core.train import TrainConfig, train_fp
    torch.manual_seed(0)
    m = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    train_fp(m, data, config=TrainConfig(epochs=1, batch_size=8), device="cpu")   # trained in channels_last
    assert all(p.is_contiguous() for p in m.parameters())   # as a model loaded from a file is


def test_a_random_supernet_init_does_not_depend_on_the_memory_format():
    from gmpq_core.models import build_model
    from gmpq_core.supernet import build_supernet
    m = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    nchw = build_supernet(m, init_from_fp=False, seed=3).state_dict()
    cl = build_supernet(m.to(memory_format=torch.channels_last), init_from_fp=False, seed=3).state_dict()
    assert all(torch.equal(v, cl[k]) for k, v in nchw.items() if torch.is_tensor(v))


def test_every_optimizer_of_the_loops_is_torchs_fused_sgd_where_it_has_one_with_the_same_updates():
    from gmpq_core.search import _make_optimizer
    from gmpq_core.search_config import SearchConfig
    from gmpq_core.supernet import build_supernet
    from gmpq_core.train import sgd

    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    models = [tiny_net(), tiny_net()]
    opts = [torch.optim.SGD(models[0].parameters(), **kw), sgd(models[1].parameters(), **kw)]
    assert [o.param_groups[0]["fused"] for o in opts] == [None, True]
    x, y = next(iter(TinyLoader()))
    for _ in range(3):
        for m, o in zip(models, opts):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert make_optimizer(tiny_net(), TrainConfig()).param_groups[0]["fused"] is True
    assert all(g["fused"] for g in _make_optimizer(build_supernet(tiny_net()), SearchConfig()).param_groups)
    on_meta = sgd(torch.nn.Linear(2, 2, device="meta").parameters(), lr=0.1)   # no fused kernel there
    assert not on_meta.param_groups[0]["fused"]
    net = tiny_net()
    groups = sgd([{"params": net.parameters(), "lr": 0.2}], lr=0.1).param_groups    # a generator in a group
    assert len(groups[0]["params"]) == len(list(net.parameters())) and groups[0]["fused"] and groups[0]["lr"] == 0.2
