"""The frozen teacher split at its Grad-CAM layer (gmpq_core/teacher_pass.py): the same logits and maps as the
hooked pass for every registry model, the im2col stem, what cannot be split, the compile fallback, and a
search step with the split teacher."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import gmpq_core.teacher_pass as tp
from gmpq_core.attribution import find_feature_layer, gradcam
from gmpq_core.bn_fold import frozen_teacher_
from gmpq_core.models import build_model
from gmpq_core.search import _make_optimizer, search_step
from gmpq_core.errors import ConfigError
from gmpq_core.search_config import SearchConfig
from gmpq_core.teacher_pass import TeacherPass, UnfoldConv2d, split_teacher, teacher_gradcam, use_compiled_teacher

from test_search import _cfg, _search  # same folder (pytest puts it on sys.path)
from test_search_step import _setup


def _frozen(name, in_ch=3, size=32, **kw):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_channels=in_ch, small_input=size <= 64, **kw)
    x = torch.randn(6, in_ch, size, size)
    with torch.no_grad():            # BatchNorm statistics other than the initial ones
        model.train()(x)
    layer = find_feature_layer(model, model_name=name, input_size=size, in_channels=in_ch)
    return frozen_teacher_(model, keep=(layer,)), x, layer


@pytest.mark.parametrize("name,in_ch,size", [("resnet20", 1, 28), ("resnet18", 3, 32), ("resnet18", 3, 96),
                                             ("mobilenet_v2", 3, 32)])
@pytest.mark.parametrize("unfold", [False, True])
def test_the_split_teacher_gives_the_hooked_pass(name, in_ch, size, unfold):
    teacher, x, layer = _frozen(name, in_ch, size)
    want_logits, want_maps = gradcam(teacher, x, layer, mode="detached")
    split = split_teacher(copy.deepcopy(teacher), layer, unfold_stem=unfold)
    assert isinstance(split, TeacherPass)
    assert any(isinstance(m, UnfoldConv2d) for m in split.modules()) == (unfold and in_ch <= 4)
    for target in ("pred", "label"):
        y = torch.arange(x.shape[0]) % 5
        want = gradcam(teacher, x, layer, target=target, labels=y, mode="detached")
        got = teacher_gradcam(split, x, layer, target=target, labels=y)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
        assert not got[0].requires_grad and not got[1].requires_grad
    torch.testing.assert_close(split(x), want_logits, rtol=1e-5, atol=1e-5)
    assert want_maps.shape == got[1].shape
    assert not any(p.requires_grad for p in split.parameters())


@pytest.mark.parametrize("stride,padding,bias,chunk", [(2, 3, False, 1 << 30), (1, 1, True, 1), (2, 0, True, 5000)])
def test_the_im2col_convolution_is_the_convolution(monkeypatch, stride, padding, bias, chunk):
    monkeypatch.setattr(tp, "_UNFOLD_CHUNK_BYTES", chunk)       # 1: one image per chunk
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 8, 7 if padding == 3 else 3, stride=stride, padding=padding, bias=bias)
    conv.eval().requires_grad_(False)                          # a frozen teacher's
    x = torch.randn(5, 3, 19, 17)
    unf = UnfoldConv2d(conv)
    got = unf.im2col(x)                                          # what a compiled trunk runs
    torch.testing.assert_close(got, conv(x).detach(), rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(unf(x), conv(x))                          # eagerly: the convolution itself


def test_only_few_channel_plain_convolutions_are_unfolded():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(4, 4, 3, groups=2),
                          nn.Conv2d(1, 4, 3, padding="same"), nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"))
    assert tp.unfold_stems_(model) == 1
    assert [type(m).__name__ for m in model] == ["UnfoldConv2d", "Conv2d", "Conv2d", "Conv2d", "Conv2d"]


class _StemInsideTheLayer(nn.Module):
    """The Grad-CAM layer holds the stem (VGG's ``features``): the split must not swap the teacher's own conv."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_the_teacher_keeps_its_own_modules_and_copies_keep_the_compile():
    model = _StemInsideTheLayer().eval().requires_grad_(False)
    keys = set(model.state_dict())
    split = split_teacher(model, "features", unfold_stem=True, compile_trunk=True, compile_options={"freezing": True})
    assert type(model.features[0]) is nn.Conv2d and set(model.state_dict()) == keys
    assert isinstance(split.trunk.features[0], UnfoldConv2d)
    twin = copy.deepcopy(split)
    assert twin.compiled and twin._fast["options"] == {"freezing": True} and twin.layer == "features"
    assert twin.trunk.features[0].conv.weight is not split.trunk.features[0].conv.weight
    with pytest.raises(ConfigError, match=r"split at its layer 'features', but its Grad-CAM maps were asked for at "
                                          r"'fc'; split it at 'fc' \(split_teacher\) or ask for 'features'"):
        teacher_gradcam(split, torch.randn(1, 3, 4, 4), "fc")


class _ReadsEarly(nn.Module):
    """A head that reads a tensor from before the feature layer: cannot be split there."""

    def __init__(self):
        super().__init__()
        self.stem, self.body, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(8, 2)

    def forward(self, x):
        s = self.stem(x)
        f = self.body(s)
        return self.fc(torch.cat([f.mean((2, 3)), s.mean((2, 3))], 1))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:                 # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.fc(self.body(x).mean((2, 3)))


def test_what_cannot_be_split_keeps_the_hooked_pass():
    for model, layer in ((_ReadsEarly().eval(), "body"), (_Untraceable().eval(), "body")):
        assert split_teacher(model, layer) is None
    x = torch.randn(2, 3, 8, 8)
    model = _ReadsEarly().eval()
    got, want = teacher_gradcam(model, x, "body"), gradcam(model, x, "body", mode="detached")   # the hooked pass
    torch.testing.assert_close(got[1], want[1])


def test_a_failed_compile_falls_back_to_the_eager_trunk(caplog):
    teacher, x, layer = _frozen("resnet20", 1, 28)
    split = split_teacher(copy.deepcopy(teacher), layer)

    def broken(_x):
        raise RuntimeError("no compiler here\nsecond line")

    split._fast["trunk"] = broken
    assert split.compiled
    with caplog.at_level(logging.WARNING, logger="gmpq_core.teacher_pass"):
        got = split.gradcam(x)
    assert not split.compiled
    assert [r.getMessage() for r in caplog.records] == [
        "the teacher's forward pass could not be compiled (RuntimeError: no compiler here); it runs eagerly from now "
        "on (teacher_compile: off skips the attempt)."]
    torch.testing.assert_close(got[1], gradcam(teacher, x, layer, mode="detached")[1], rtol=1e-4, atol=1e-6)
    assert "_fast" not in dict(split.named_modules())


def test_a_search_step_with_the_split_teacher_is_the_same_step():
    teacher, net, x, y, cfg, kw = _setup()
    frozen = frozen_teacher_(copy.deepcopy(teacher), keep=(kw["layer"],))
    split = split_teacher(copy.deepcopy(frozen), kw["layer"])
    twin = copy.deepcopy(net)
    opt, opt_twin = _make_optimizer(net, cfg), _make_optimizer(twin, cfg)
    for step in (1, 2):
        got = search_step(net, split, x, y, opt, cfg, **kw, step=step)
        want = search_step(twin, frozen, x, y, opt_twin, cfg, **kw, step=step)
        for field in ("loss", "ce", "l_gen", "penalty", "p", "ard"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-5, abs=1e-7), field
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_when_the_teacher_is_compiled():
    auto = dict(input_size=224, steps=2000)
    assert use_compiled_teacher("auto", "cuda:0", **auto) is True
    assert use_compiled_teacher("auto", "cpu", **auto) is False
    assert use_compiled_teacher("auto", "cuda", input_size=96, steps=10_000) is False      # host-bound sizes
    assert use_compiled_teacher("auto", "cuda", input_size=224, steps=1999) is False       # the compile would not pay
    assert use_compiled_teacher("on", "cpu", input_size=8, steps=1) is True
    assert use_compiled_teacher("off", "cuda", **auto) is False
    with pytest.raises(ConfigError, match=r"teacher_compile must be one of \('auto', 'on', 'off'\), but got 'yes'"):
        use_compiled_teacher("yes", "cuda", **auto)
    with pytest.raises(ConfigError, match="teacher_compile"):
        SearchConfig(teacher_compile="yes")
    with pytest.raises(ConfigError, match=r"teacher_compile='on' compiles a frozen teacher, but teacher_bn_train=true"):
        SearchConfig(teacher_compile="on", teacher_bn_train=True)
    assert SearchConfig(teacher_bn_train=True).teacher_compile == "auto"      # auto leaves such a teacher as it is
    assert SearchConfig.from_dict(SearchConfig(teacher_compile="off").to_dict()).teacher_compile == "off"


def test_a_search_runs_its_steps_and_evaluation_on_the_split_teacher_when_asked(monkeypatch):
    # the wiring of search_policy, without the compile itself (seconds on a GPU, far more on this CPU)
    import gmpq_core.search as search_mod
    made, used = [], []
    real_split, real_maps = search_mod.split_teacher, search_mod.teacher_gradcam

    def split(teacher, layer, **kw):
        made.append(kw)
        return real_split(teacher, layer, **{**kw, "compile_trunk": False})

    def maps(teacher, *a, **kw):
        used.append(type(teacher).__name__)
        return real_maps(teacher, *a, **kw)
    monkeypatch.setattr(search_mod, "split_teacher", split)
    monkeypatch.setattr(search_mod, "teacher_gradcam", maps)
    on = _search(_cfg(epochs=1, max_steps_per_epoch=2, teacher_compile="on"))
    assert made == [{"compile_trunk": True, "unfold_stem": True}] and set(used) == {"TeacherPass"}
    made.clear()
    used.clear()
    off = _search(_cfg(epochs=1, max_steps_per_epoch=2))                 # auto on a CPU: the hooked teacher
    assert made == [] and set(used) == {"ResNetCifar"}
    assert on.policy.layers == off.policy.layers
    assert on.history[0]["l_gen"] == pytest.approx(off.history[0]["l_gen"], rel=1e-5)
    assert on.ard == pytest.approx(off.ard, abs=1e-6)
    with pytest.raises(ConfigError, match="teacher_compile"):
        _search(_cfg(teacher_compile="always"))


@pytest.mark.slow
def test_the_compiled_trunk_compiles_once_for_warm_up_and_capture_and_runs_other_inputs_eagerly():
    # a warm-up step runs under the epoch's autocast (cast cache on), a CUDA-graph capture under autocast with
    # the cache off (graph_step.py): the capture must find the trunk compiled, not compile it again; a batch of
    # another size (the epoch's last) runs the eager trunk. On the CPU, with TorchInductor's C++ backend.
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    teacher, x, layer = _frozen("resnet20", 1, 28)
    split = split_teacher(teacher, layer, compile_trunk=True, unfold_stem=True)
    want = gradcam(teacher, x, layer, mode="detached")[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = split.gradcam(x)[1]
        graphs = counters["stats"]["unique_graphs"]
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            split.gradcam(x)
        split.gradcam(x[:3])
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs and split.compiled
    torch.testing.assert_close(first, want, rtol=0.1, atol=0.1 * float(want.abs().max()))
    torch.testing.assert_close(split.gradcam(x)[1], want, rtol=1e-4, atol=1e-6)   # float32: eager, exact


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_compiled_split_teacher_in_replayed_steps_gives_the_eager_steps():
    from gmpq_core.graph_step import GraphedSearchStep
    teacher, net, x, y, cfg, kw = _setup()
    frozen = frozen_teacher_(copy.deepcopy(teacher), keep=(kw["layer"],)).cuda()
    split = split_teacher(frozen, kw["layer"], compile_trunk=True, unfold_stem=True)
    xc = x.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):      # the compiled maps are the hooked pass's
        got, want = split.gradcam(xc), gradcam(frozen, xc, kw["layer"], mode="detached")
    assert split.compiled
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(got[1], want[1], rtol=5e-2, atol=5e-2 * float(want[1].abs().max()))
    net = net.cuda()
    kw = {**kw, "macs_vec": kw["macs_vec"].cuda()}
    twin = copy.deepcopy(net)
    opt, opt_twin = _make_optimizer(net, cfg), _make_optimizer(twin, cfg)
    run = GraphedSearchStep(net, split, opt, cfg, mode="second_order", strict=True, teacher_stream=True, **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 8):     # the same compiled teacher replayed from the graph and run eagerly
        xb, yb = torch.randn(8, 1, 8, 8, generator=g).cuda(), torch.randint(0, 4, (8,), generator=g).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = run(xb, yb, step=step)
            want = search_step(twin, split, xb, yb, opt_twin, cfg, **kw, step=step)
        for field in ("loss", "ce", "l_gen", "ard"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-2, abs=1e-3), (step, field)
    assert split.compiled and run.counts == {"captures": 1, "replays": 4, "eager": 3}
