"""The search step replayed from a CUDA graph (gmpq_core/graph_step.py): the setting, the eager fallback
and its gradients on CPU; on CUDA (marked gpu), replays that follow the eager step step by step, a batch
of another shape in between, bf16 autocast, a caller's zero_grad, and a whole search with and without."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from gmpq_core.errors import ConfigError
from gmpq_core.graph_step import GraphedSearchStep, use_cuda_graph
from gmpq_core.search import SearchConfig, _make_optimizer, search_step

from test_search import _cfg, _data, _search, _teacher   # same folder (pytest puts it on sys.path)
from test_search_step import _setup

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_the_setting_is_checked_and_on_needs_cuda():
    assert use_cuda_graph("auto", "cpu") is False and use_cuda_graph("off", "cuda") is False
    assert use_cuda_graph("auto", "cuda:0") is True and use_cuda_graph("on", torch.device("cuda")) is True
    with pytest.raises(ConfigError, match=r"cuda_graph='on' needs a CUDA device.*'cpu'.*'auto'"):
        use_cuda_graph("on", "cpu")
    with pytest.raises(ConfigError, match="cuda_graph"):
        SearchConfig(cuda_graph="yes")
    assert SearchConfig.from_dict(SearchConfig(cuda_graph="auto").to_dict()).cuda_graph == "auto"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        _search(_cfg(cuda_graph="on"))


def _runner(net, teacher, opt, cfg, kw, **extra):
    return GraphedSearchStep(net, teacher, opt, cfg, mode="second_order", **kw, **extra)


def test_off_cuda_the_runner_is_the_eager_step_bit_for_bit():
    teacher, net, x, y, cfg, kw = _setup()
    twin = copy.deepcopy(net)
    opt, opt_twin = _make_optimizer(net, cfg), _make_optimizer(twin, cfg)
    run = _runner(net, teacher, opt, cfg, kw)
    for step in (1, 2):
        got = run(x, y, epoch=1, step=step)
        want = search_step(twin, teacher, x, y, opt_twin, cfg, **kw, epoch=1, step=step)
        assert got == want
    assert run.counts == {"captures": 0, "replays": 0, "eager": 2} and run.graph is None
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_an_eager_step_writes_its_gradients_into_the_captured_ones():
    # what a batch of another shape does once a graph exists: the graph's .grad tensors stay the parameters'
    teacher, net, x, y, cfg, kw = _setup()
    opt = _make_optimizer(net, cfg)
    run = _runner(net, teacher, opt, cfg, kw)
    params = [p for g in opt.param_groups for p in g["params"]]
    kept = [torch.full_like(p, 7.0) for p in params]
    run._grads = list(zip(params, kept))
    twin = copy.deepcopy(net)
    opt_twin = _make_optimizer(twin, cfg)
    search_step(twin, teacher, x, y, opt_twin, cfg, **kw)
    run(x, y)
    for p, g, t in zip(params, kept, [t for g in opt_twin.param_groups for t in g["params"]]):
        assert t.grad is not None and p.grad is g and torch.equal(g, t.grad)


def test_a_parameter_without_an_eager_gradient_keeps_none_and_replays_unset_the_uncaptured_ones():
    teacher, net, x, y, cfg, kw = _setup()
    opt = _make_optimizer(net, cfg)
    run = _runner(net, teacher, opt, cfg, kw)
    frozen = next(iter(net.parameters()))
    frozen.requires_grad_(False)                        # the eager step gives it no gradient
    kept = torch.full_like(frozen, 7.0)
    run._grads = [(frozen, kept)]
    before = frozen.detach().clone()
    run(x, y)
    assert frozen.grad is None and bool((kept == 7.0).all())   # not zero-filled: no decay/momentum update
    assert torch.equal(frozen.detach(), before)
    other = list(net.parameters())[1]
    run._grads, run._no_grad = [], [other]
    other.grad = torch.ones_like(other)                 # left by an eager step: a replay must not apply it again
    run._keep_captured_grads(copy=False)
    assert other.grad is None


class _Bookkeeping(GraphedSearchStep):
    """The runner's choice per batch (eager / capture / replay) with the CUDA parts replaced by a record."""

    def _key(self, x, y, epoch):
        return None if self.cfg.inject_nan_at_epoch == epoch else (tuple(x.shape),)

    def _capture(self, x, y, key):
        self.key = key
        self.counts["captures"] += 1
        return True

    def _replay(self, x, y, epoch, step):
        self.counts["replays"] += 1

    def _eager(self, x, y, epoch, step, *, side):
        self.counts["eager"] += 1


def test_one_capture_serves_every_epoch_and_the_smaller_last_batch_stays_eager():
    teacher, net, x, y, cfg, kw = _setup()
    run = _Bookkeeping(net, teacher, _make_optimizer(net, cfg), cfg, mode="second_order", **kw)
    full, small = torch.zeros(8, 1), torch.zeros(5, 1)
    for epoch in range(1, 9):
        for step, batch in enumerate([full] * 5 + [small], start=1):
            run(batch, batch, epoch=epoch, step=step)
    # 3 eager warm-ups, the capture (and its replay) at the 4th full batch, then replays; each epoch's
    # small batch once, eagerly (it never becomes "warmup batches in a row")
    assert run.counts == {"captures": 1, "replays": 2 + 7 * 5, "eager": 3 + 8}
    for _ in range(4):                       # a shape that stays is captured after its warm-up steps
        run(small, small)
    assert run.counts["captures"] == 2 and run.key == ((5, 1),)


def _cuda_setup(impl="fused"):
    teacher, net, x, y, cfg, kw = _setup(mixture_impl=impl)
    from gmpq_core.supernet import set_mixture_impl_
    teacher, net = teacher.cuda(), net.cuda()
    set_mixture_impl_(net, impl)
    kw = {**kw, "macs_vec": kw["macs_vec"].cuda()}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 8, 8, generator=g).cuda(), torch.randint(0, 4, (8,), generator=g).cuda())
               for _ in range(8)]
    return teacher, net, batches, cfg, kw


def _close(a, b, tol):
    return abs(a - b) <= tol * max(1.0, abs(b))


def _follow(shapes_small_at=(), impl="fused", autocast=False, zero_grad_between=False, tol=1e-4, stream=False):
    teacher, net, batches, cfg, kw = _cuda_setup(impl)
    twin = copy.deepcopy(net)
    opt, opt_twin = _make_optimizer(net, cfg), _make_optimizer(twin, cfg)
    run = _runner(net, teacher, opt, cfg, kw, strict=True, teacher_stream=stream)   # the twin: one stream
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else torch.enable_grad
    for step, (x, y) in enumerate(batches, start=1):
        if step in shapes_small_at:
            x, y = x[:5], y[:5]
        with ctx():
            got = run(x, y, step=step)
            want = search_step(twin, teacher, x, y, opt_twin, cfg, **kw, step=step)
        for field in ("loss", "ce", "l_gen", "penalty", "p", "ard"):
            assert _close(getattr(got, field), getattr(want, field), tol), (step, field, got, want)
        if zero_grad_between:
            opt.zero_grad(set_to_none=True)
    for a, b in zip(net.parameters(), twin.parameters()):
        assert (a - b).abs().max() <= tol * max(1.0, float(b.abs().max()))
    return run


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("impl", ["fused", "triton"])
def test_replays_follow_the_eager_step(impl):
    if impl == "triton":
        pytest.importorskip("triton")
    run = _follow(impl=impl)
    assert run.counts == {"captures": 1, "replays": 5, "eager": 3}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("impl", ["fused", "triton"])
def test_the_teacher_on_its_own_stream_gives_the_one_stream_step(impl):
    # eager steps (the warm-ups, a smaller batch) and replays of a graph with the teacher's branch
    if impl == "triton":
        pytest.importorskip("triton")
    run = _follow(shapes_small_at=(7,), impl=impl, stream=True)
    assert run.counts == {"captures": 1, "replays": 4, "eager": 4}
    run = _follow(impl=impl, autocast=True, zero_grad_between=True, tol=2e-2, stream=True)
    assert run.counts["replays"] == 5


def test_off_cuda_the_teacher_stream_is_ignored():
    teacher, net, x, y, cfg, kw = _setup()
    twin = copy.deepcopy(net)
    opt, opt_twin = _make_optimizer(net, cfg), _make_optimizer(twin, cfg)
    for step in (1, 2):
        got = search_step(net, teacher, x, y, opt, cfg, **kw, step=step, teacher_stream=True)
        assert got == search_step(twin, teacher, x, y, opt_twin, cfg, **kw, step=step)


@pytest.mark.gpu
@gpu
def test_a_smaller_batch_runs_eagerly_between_replays():
    run = _follow(shapes_small_at=(6,))
    assert run.counts == {"captures": 1, "replays": 4, "eager": 4}


@pytest.mark.gpu
@gpu
def test_bf16_autocast_and_a_callers_zero_grad():
    run = _follow(impl="fused", autocast=True, zero_grad_between=True, tol=2e-2)
    assert run.counts["replays"] == 5


@pytest.mark.gpu
@gpu
def test_a_search_with_graphs_follows_the_eager_search(caplog):
    # what a real job adds to the steps: an evaluation between epochs (no-grad forward passes, eval mode)
    # and a smaller last batch in every epoch
    batches = _data(batches=6)
    data = [(x.cuda(), y.cuda()) for x, y in batches[:5]] + [(batches[5][0][:5].cuda(), batches[5][1][:5].cuda())]
    evals = [(x.cuda(), y.cuda()) for x, y in _data(seed=3, batches=2)]
    with caplog.at_level(logging.DEBUG, logger="gmpq_core.search"):
        runs = {mode: _search(_cfg(cuda_graph=mode, epochs=3), teacher=_teacher(), data=data, device="cuda",
                              eval_loader=evals) for mode in ("off", "on")}
    counts = [r.getMessage() for r in caplog.records if "search steps on CUDA graphs" in r.getMessage()]
    # one capture for 15 full batches over 3 epochs: 3 eager warm-ups, then replays; 3 small batches eager
    assert counts == ["search steps on CUDA graphs: {'captures': 1, 'replays': 12, 'eager': 6}"]
    assert runs["on"].policy.layers == runs["off"].policy.layers
    assert runs["on"].proxy_top1 == pytest.approx(runs["off"].proxy_top1, abs=100 / 16 + 1e-6)
    for h_on, h_off in zip(runs["on"].history, runs["off"].history):
        assert h_on["ce"] == pytest.approx(h_off["ce"], rel=1e-4)
        assert h_on["ard"] == pytest.approx(h_off["ard"], abs=1e-4)
        assert h_on["proxy_top1"] == pytest.approx(h_off["proxy_top1"], abs=100 / 16 + 1e-6)   # one image of 16
        assert h_on["expected_gbitops"] == pytest.approx(h_off["expected_gbitops"], rel=1e-5)
