"""Training precision (gmpq_core.precision): the setting's values, and bf16 autocast in every training loop.

On the CPU ``bf16`` is opt-in (``auto`` is float32 there), so these tests run the bf16 paths with CPU
autocast; the CUDA ones (``auto`` = bf16 + channels_last) are marked gpu.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gmpq_core.complexity import Budget
from gmpq_core.errors import ConfigError
from gmpq_core.finetune import FinetuneConfig, finetune
from gmpq_core.precision import PRECISIONS, autocast, check_precision, resolve_precision
import gmpq_core.search as search_mod
from gmpq_core.search import SearchConfig, search_policy
from gmpq_core.train import TrainConfig, evaluate, train_fp, train_one_epoch, training_layout_

from test_finetune import mixed_policy
from test_search import _data, _teacher
from test_train import TinyLoader, tiny_net

CUDA = torch.cuda.is_available()


def _conv_spy(monkeypatch) -> list:
    """Record the dtype of every ``F.conv2d`` output from now on (the quantized layers' fused convolution too)."""
    seen, real = [], torch.nn.functional.conv2d

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out.dtype)
        return out
    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    return seen


def test_the_values_and_what_they_mean_on_the_cpu():
    assert PRECISIONS == ("auto", "fp32", "bf16")
    assert resolve_precision("auto", "cpu") == "fp32"        # the CPU keeps float32 unless asked
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    for bad in ("fp16", "BF16", None, 16):
        with pytest.raises(ConfigError, match=r"precision must be one of auto, fp32, bf16.*Use 'auto'") as e:
            resolve_precision(bad, "cpu")
        assert repr(bad) in str(e.value)                      # the message names the value
    with pytest.raises(ConfigError, match="Did you mean 'bf16'"):
        check_precision("bf61")
    with pytest.raises(ConfigError, match="search precision must be"):
        check_precision("x", "search precision")


def test_a_gpu_without_bfloat16_keeps_float32_under_auto_and_refuses_bf16_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Tesla V100-SXM2-32GB")
    assert resolve_precision("auto", "cuda") == "fp32"
    with pytest.raises(ConfigError, match=r"cuda needs a GPU with bfloat16.*Tesla V100.*use precision='fp32'"):
        resolve_precision("bf16", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))   # H100/H200
    assert resolve_precision("auto", "cuda:0") == "bf16"


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without a GPU")
def test_bf16_on_cuda_without_a_gpu_says_so_and_auto_stays_float32():
    assert resolve_precision("auto", "cuda") == "fp32"
    with pytest.raises(ConfigError, match="no usable GPU; use precision='fp32'"):
        resolve_precision("bf16", "cuda:0")


def test_autocast_runs_convolutions_in_bf16_only_when_asked():
    conv, x = nn.Conv2d(2, 3, 3), torch.randn(1, 2, 5, 5)
    with autocast("bf16", "cpu"):
        assert conv(x).dtype == torch.bfloat16
    for p in ("auto", "fp32"):
        with autocast(p, "cpu"):
            assert conv(x).dtype == torch.float32


def test_bf16_training_runs_the_convs_in_bf16_tracks_fp32_and_keeps_float32_weights(monkeypatch):
    losses, models = {}, {}
    for p in ("fp32", "bf16"):
        torch.manual_seed(0)
        model, loader = tiny_net(), TinyLoader(n=128)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with monkeypatch.context() as m:
            seen = _conv_spy(m)
            losses[p] = [train_one_epoch(model, loader, opt, precision=p)["loss"] for _ in range(3)]
        assert seen and set(seen) == {torch.bfloat16 if p == "bf16" else torch.float32}
        models[p] = model
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.05)      # the same trajectory, rounded
    assert losses["bf16"] != losses["fp32"]                                # but not the float32 numbers
    assert all(p.dtype == torch.float32 for p in models["bf16"].parameters())
    with monkeypatch.context() as m:
        seen = _conv_spy(m)
        ev_bf16 = evaluate(models["bf16"], TinyLoader(seed=1), precision="bf16")
    assert set(seen) == {torch.bfloat16}
    ev_fp32 = evaluate(models["bf16"], TinyLoader(seed=1), precision="fp32")
    assert abs(ev_bf16["top1"] - ev_fp32["top1"]) <= 5 and ev_bf16["loss"] == pytest.approx(ev_fp32["loss"], abs=0.05)


def test_train_fp_in_bf16_learns_and_fp32_is_what_auto_means_on_the_cpu():
    cfg = TrainConfig(epochs=8, lr=0.1, batch_size=16)
    runs = {}
    for p in ("auto", "fp32", "bf16"):
        m = tiny_net()
        res = train_fp(m, TinyLoader(n=128), TinyLoader(seed=1), config=cfg, precision=p)
        runs[p] = (m.state_dict(), res)
    assert runs["fp32"][1].top1 >= 90 and runs["bf16"][1].top1 >= 90
    for k, v in runs["auto"][0].items():                    # auto on the CPU: bit-identical to fp32
        assert torch.equal(v, runs["fp32"][0][k]), k
    assert any(not torch.equal(v, runs["bf16"][0][k]) for k, v in runs["fp32"][0].items() if v.is_floating_point())
    with pytest.raises(ConfigError, match="fp16"):
        train_fp(tiny_net(), TinyLoader(), config=cfg, precision="fp16")


def test_a_bf16_fine_tune_quantizes_in_bf16_and_matches_fp32(monkeypatch):
    fp = tiny_net()
    train_fp(fp, TinyLoader(n=128), config=TrainConfig(epochs=8, lr=0.1, batch_size=16))
    res, seen = {}, {}
    for p in ("fp32", "bf16"):
        with monkeypatch.context() as m:
            seen[p] = _conv_spy(m)
            res[p] = finetune(fp, mixed_policy(fp), TinyLoader(n=128), TinyLoader(seed=1),
                              config=FinetuneConfig(epochs=2, distill=True), input_size=8, in_channels=1, precision=p)
    assert set(seen["fp32"]) == {torch.float32}
    fp32_passes = seen["bf16"][:3] + seen["bf16"][-3:]      # the calibration first, the BitOPs count last
    assert fp32_passes == [torch.float32] * 6 and set(seen["bf16"][3:-3]) == {torch.bfloat16}
    assert res["fp32"].top1 >= 80 and abs(res["bf16"].top1 - res["fp32"].top1) <= 5
    assert [h["train_loss"] for h in res["bf16"].history] != [h["train_loss"] for h in res["fp32"].history]
    assert all(p.dtype == torch.float32 for p in res["bf16"].model.parameters())
    with monkeypatch.context() as m, autocast("bf16", "cpu"):
        seen = _conv_spy(m)
        res["bf16"].model.eval()(next(iter(TinyLoader()))[0])
    assert set(seen) == {torch.bfloat16}                  # the quantized convs too


def test_a_bf16_search_runs_its_steps_in_bf16_and_returns_a_budget_true_policy():
    teacher, data = _teacher(), _data()
    cfg = SearchConfig(epochs=2, batch_size=8, budget=Budget(avg_bits=3), recalibrate_bn_batches=2)
    losses = {}
    for p in ("fp32", "bf16"):
        with pytest.MonkeyPatch.context() as mp:
            seen = _conv_spy(mp)
            l_gen = []
            real = search_mod.generalization_loss
            mp.setattr(search_mod, "generalization_loss", lambda *a: l_gen.append(real(*a)) or l_gen[-1])
            res = search_policy(teacher, data, config=cfg, input_size=8, in_channels=1, model_name="resnet20",
                                precision=p)
        assert torch.bfloat16 in seen if p == "bf16" else set(seen) == {torch.float32}
        assert l_gen and all(t.dtype == torch.float32 for t in l_gen)   # the attribution loss in float32 either way
        losses[p] = [h["l_gen"] for h in res.history]
    # the first epoch's L_gen (two steps) agrees; later epochs follow diverging trajectories on this tiny
    # network (bf16 / fp32 of epoch 2's L_gen: 0.52-1.64 over 6 seeds, epoch 1's: 0.89-1.24)
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=0.3) and losses["bf16"] != losses["fp32"]
    assert res.epochs_run == 2 and res.bitops_quantized <= res.budget_bitops
    assert all(v == v for v in (res.proxy_top1, res.ard, res.p))   # finite
    with pytest.raises(ConfigError, match="'half'"):
        search_policy(teacher, data, config=cfg, input_size=8, in_channels=1, precision="half")


def test_the_training_layout_follows_the_precision_on_a_gpu_only(monkeypatch):
    m = training_layout_(nn.Conv2d(2, 2, 3), "cpu", "fp32")
    assert m.weight.is_contiguous(memory_format=torch.channels_last)    # the CPU: channels_last either way
    meta = training_layout_(nn.Conv2d(2, 2, 3).to("meta"), "meta", "auto")
    assert meta.weight.is_contiguous()
    import gmpq_core.precision as precision_mod
    monkeypatch.setattr(precision_mod, "_cuda_bf16", lambda dev: True)    # a GPU with bfloat16 (layout only)
    assert training_layout_(nn.Conv2d(2, 2, 3), "cuda", "auto").weight.is_contiguous(memory_format=torch.channels_last)
    assert training_layout_(nn.Conv2d(2, 2, 3), "cuda", "fp32").weight.is_contiguous()
    monkeypatch.setattr(precision_mod, "_cuda_bf16", lambda dev: False)
    assert training_layout_(nn.Conv2d(2, 2, 3), "cuda", "auto").weight.is_contiguous()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_auto_on_a_gpu_is_bf16_in_channels_last_through_search_and_fine_tune():
    dev = torch.device("cuda")
    assert resolve_precision("auto", dev) == ("bf16" if torch.cuda.get_device_capability(dev)[0] >= 8 else "fp32")
    if resolve_precision("auto", dev) != "bf16":
        pytest.skip("this GPU has no bfloat16")
    net = training_layout_(nn.Conv2d(2, 2, 3).to(dev), dev, "auto")
    assert net.weight.is_contiguous(memory_format=torch.channels_last)
    assert training_layout_(nn.Conv2d(2, 2, 3).to(dev), dev, "fp32").weight.is_contiguous()
    teacher, data = _teacher(), _data()
    for graph in ("off", "auto"):
        cfg = SearchConfig(epochs=2, batch_size=8, budget=Budget(avg_bits=3), recalibrate_bn_batches=2,
                           cuda_graph=graph)
        res = search_policy(copy.deepcopy(teacher), data, config=cfg, input_size=8, in_channels=1,
                            model_name="resnet20", device="cuda")
        assert res.bitops_quantized <= res.budget_bitops and res.ard == res.ard
    fp = tiny_net()
    train_fp(fp, TinyLoader(n=128), config=TrainConfig(epochs=6, lr=0.05, batch_size=16), device="cuda")
    res = finetune(fp, mixed_policy(fp), TinyLoader(n=128), TinyLoader(seed=1), config=FinetuneConfig(epochs=2),
                   input_size=8, in_channels=1, device="cuda")
    assert res.top1 >= 70        # 79.7 % in float32 on a CPU; 3 FP epochs (50 %) were too few since the fused SGD
