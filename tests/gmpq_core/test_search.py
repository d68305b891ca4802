import json

import pytest
import torch

from gmpq_core.complexity import Budget
from gmpq_core.errors import BudgetInfeasibleError, ConfigError, NonFiniteLossError
from gmpq_core.models import build_model
from gmpq_core.reporting import ListReporter
from gmpq_core.search import SearchConfig, SearchResult, search_policy

REPORT_KEYS = {"proxy_top1", "ce", "l_gen", "expected_gbitops", "p", "ard", "lr"}


def _data(seed=0, batches=2, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, size, size, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(batches)]


def _teacher():
    torch.manual_seed(0)
    return build_model("resnet20", num_classes=4, in_channels=1, width=4).eval()


def _search(cfg, reporter=None, teacher=None, data=None, **kw):
    return search_policy(teacher or _teacher(), data or _data(), config=cfg, input_size=8, in_channels=1,
                         reporter=reporter, model_name="resnet20", **kw)


def _cfg(**kw):
    base = dict(epochs=2, batch_size=8, budget=Budget(avg_bits=3), recalibrate_bn_batches=2)
    return SearchConfig(**{**base, **kw})


def test_search_reports_every_epoch_and_returns_a_budget_true_policy():
    rep = ListReporter()
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    rng = torch.get_rng_state()
    res = _search(_cfg(), rep, teacher=teacher)
    assert isinstance(res, SearchResult) and res.epochs_run == 2
    assert [s for s, _ in rep.records] == [1, 2]
    assert all(REPORT_KEYS <= set(m) for _, m in rep.records)
    assert res.budget_bitops is not None and res.bitops_quantized <= res.budget_bitops
    assert res.bitops_total > res.bitops_quantized
    assert 0 <= res.proxy_top1 <= 100 and 0 <= res.ard <= 2 and res.p == pytest.approx(24 / 3.75 ** 2, rel=0.05)
    assert set(res.arch_probs) == set(res.policy.layers) and len(res.policy.layers) == 20
    json.dumps(res.to_dict())
    for k, v in teacher.state_dict().items():  # the caller's teacher is untouched
        assert torch.equal(v, before[k])
    assert all(p.requires_grad for p in teacher.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_same_seed_gives_the_same_policy():
    a, b = _search(_cfg(seed=3)), _search(_cfg(seed=3))
    assert a.policy.layers == b.policy.layers
    assert a.arch_probs == b.arch_probs
    assert [h["ce"] for h in a.history] == [h["ce"] for h in b.history]


def test_should_stop_is_honoured_between_epochs():
    rep = ListReporter(stop_after=1)
    res = _search(_cfg(epochs=3), rep)
    assert res.epochs_run == 1 and len(rep.records) == 1 and len(res.history) == 1


def test_non_finite_loss_raises_within_that_epoch():
    rep = ListReporter()
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 1"):
        _search(_cfg(epochs=3, inject_nan_at_epoch=2), rep)
    assert [s for s, _ in rep.records] == [1]


def test_large_complexity_weight_lowers_expected_bitops_over_epochs():
    res = _search(_cfg(epochs=3, lam=50.0, lr_arch=0.05, budget=Budget(avg_bits=2.2)))
    exp = [h["expected_gbitops"] for h in res.history]
    assert exp[0] > exp[1] > exp[2]
    assert res.history[-1]["expected_avg_bits"] < 3.6


def test_infeasible_budget_is_rejected_before_training():
    rep = ListReporter()
    with pytest.raises(BudgetInfeasibleError, match="feasible range"):
        _search(_cfg(budget=Budget(gbitops=1e-6)), rep)
    assert rep.records == []


def test_official_switches_run():
    cfg = _cfg(epochs=1, penalty="official", p_mode="fixed", init_from_fp=False, teacher_bn_train=True,
               target_class="label", second_order=False, calibrate_clips=False, budget=None, temperature=2.0,
               gradcam_layer="layer2")
    res = _search(cfg, eval_loader=_data(seed=9, batches=1))
    assert res.p == 3.0 and res.budget_bitops is None and res.epochs_run == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in res.history[0].values())


def test_the_final_ard_uses_the_search_target_class(monkeypatch):
    """With target_class="label" the derived policy's ARD compares the label's maps, as every search step does."""
    import gmpq_core.search as search_mod

    seen = []
    real = search_mod.gradcam

    def spy(model, x, layer, *, target="pred", labels=None, mode="second_order"):
        seen.append((mode, target, labels is not None))
        return real(model, x, layer, target=target, labels=labels, mode=mode)
    monkeypatch.setattr(search_mod, "gradcam", spy)
    real_teacher = search_mod.teacher_gradcam

    def spy_teacher(model, x, layer, *, target="pred", labels=None):
        seen.append(("teacher", target, labels is not None))
        return real_teacher(model, x, layer, target=target, labels=labels)
    monkeypatch.setattr(search_mod, "teacher_gradcam", spy_teacher)
    _search(_cfg(epochs=1, target_class="label", max_steps_per_epoch=1))
    assert {m for m, _, _ in seen} == {"second_order", "detached", "teacher"}
    assert all(t == "label" and has for _, t, has in seen)


def test_a_search_without_budget_warns_that_lam_has_no_effect(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="gmpq_core.search"):
        _search(_cfg(epochs=1, budget=None, max_steps_per_epoch=1))
    assert "no budget" in caplog.text and "lam=0.0003 has no effect" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gmpq_core.search"):
        _search(_cfg(epochs=1, budget=None, penalty="official", max_steps_per_epoch=1))
    assert "no budget" not in caplog.text


def test_a_signed_layer_with_a_1_bit_activation_candidate_is_named_in_a_warning(caplog):
    """Signed 1-bit activations quantize to {-a, 0, a}: 3 levels counted as 1 bit (MobileNetV2's linear bottlenecks)."""
    import logging

    from gmpq_core.policy import BitCandidates

    torch.manual_seed(0)
    teacher = build_model("mobilenet_v2", num_classes=4, in_channels=1, small_input=True).eval()
    data = _data(size=8)
    cfg = _cfg(epochs=1, max_steps_per_epoch=1, budget=None, candidates=BitCandidates(w_bits=(2, 4), a_bits=(1, 4)))
    with caplog.at_level(logging.WARNING, logger="gmpq_core.search"):
        search_policy(teacher, data, config=cfg, input_size=8, in_channels=1, model_name="mobilenet_v2")
    assert "signed inputs have 1 among their activation candidates (features.2.conv.0.0" in caplog.text


def test_the_stem_and_classifier_can_be_searched_around_at_fixed_bits():
    """METHOD.md 2's switch: stem and classifier quantized at stem_bits through the search; the budget covers
    the searched layers, the BitOPs count all quantized ones, and the fine-tune deploys the policy the same way."""
    from gmpq_core.bitops import count_bitops, layer_macs
    from gmpq_core.finetune import prepare_quantized
    from gmpq_core.layers import stem_and_classifier
    from gmpq_core.policy import BitPolicy
    from gmpq_core.qmodules import QuantConv2d, QuantLinear

    res = _search(_cfg(epochs=1, max_steps_per_epoch=1, include_stem=True, include_classifier=True, stem_bits=6))
    teacher = _teacher()
    stem, classifier = stem_and_classifier(teacher)
    macs = layer_macs(teacher, 8, 1)
    searched = count_bitops(teacher, BitPolicy(layers=res.policy.layers), 8, 1, macs=macs).bitops_quantized
    assert searched <= res.budget_bitops                                  # the budget: searched layers only
    assert res.bitops_quantized == searched + (macs[stem] + macs[classifier]) * 36
    assert count_bitops(teacher, res.policy, 8, 1).bitops_quantized == res.bitops_quantized   # as its meta says
    assert res.policy.meta["include_stem"] and res.policy.meta["include_classifier"] and res.policy.meta["stem_bits"] == 6
    deployed = prepare_quantized(teacher, res.policy, _data()[0][0])
    s, c = deployed.get_submodule(stem), deployed.get_submodule(classifier)
    assert isinstance(s, QuantConv2d) and isinstance(c, QuantLinear) and (s.w_bits, s.a_bits, c.a_bits) == (6, 6, 6)
    assert float(s.act.clip.detach()) != 6.0                             # calibrated like every quantized layer
    plain = prepare_quantized(teacher, _search(_cfg(epochs=1, max_steps_per_epoch=1)).policy, _data()[0][0])
    assert not isinstance(plain.get_submodule(stem), QuantConv2d)          # the default keeps them FP
    with pytest.raises(ConfigError, match="stem_bits must be a whole number of bits in 1..8, but got stem_bits=12"):
        SearchConfig(stem_bits=12)


def test_search_config_round_trip_and_validation():
    cfg = SearchConfig(budget=Budget(gbitops=1.5), candidates=[2, 4, 8], eta=20.0, max_steps_per_epoch=5)
    d = cfg.to_dict()
    assert d["budget"] == {"gbitops": 1.5} and d["candidates"] == {"w_bits": [2, 4, 8], "a_bits": [2, 4, 8]}
    assert SearchConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ConfigError, match="Unknown search config keys") as refused:
        SearchConfig.from_dict({"etaa": 1})
    assert "eta," in str(refused.value) and "inject_nan_at_epoch" not in str(refused.value)   # settings, not switches
    for bad, match in [({"penalty": "lagrange"}, "penalty"), ({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"),
                       ({"p_mode": "auto"}, "p_mode"), ({"momentum": 1.0}, "momentum"),
                       ({"budget": {"avg_bits": 0}}, "avg_bits"), ({"candidates": [0, 2]}, "candidate")]:
        with pytest.raises(ConfigError, match=match):
            SearchConfig(**bad)
    with pytest.raises(BudgetInfeasibleError, match=r"avg_bits=20 is outside the feasible range 2 \.\. 8"):
        SearchConfig(budget={"avg_bits": 20}, candidates=[2, 4, 8])     # what the candidates reach, on any model


@pytest.fixture(scope="module")
def fmnist_job(tmp_path_factory):
    pytest.importorskip("gmpq_core.data")
    from gmpq_core.data import load_dataset
    from gmpq_core.errors import DataError
    try:
        load_dataset("fashion_mnist")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    from gmpq_core.jobs import SearchJob
    return SearchJob(proxy_size=500, teacher_epochs=1, eval_size=200, cache_dir=str(tmp_path_factory.mktemp("cache")),
                     search=SearchConfig(epochs=1, batch_size=64, budget=Budget(avg_bits=3)))


@pytest.mark.slow
def test_one_epoch_search_on_a_real_fashion_mnist_proxy_runs(fmnist_job):
    from gmpq_core.jobs import run_search_job
    rep = ListReporter()
    res = run_search_job(fmnist_job, reporter=rep)
    assert res.epochs_run == 1 and res.bitops_quantized <= res.budget_bitops
    assert res.policy.meta["model"] == "resnet20" and res.policy.meta["input_size"] == 28
    assert res.policy.meta["in_channels"] == 1 and res.policy.meta["num_classes"] == 10
    assert res.policy.meta["precision"] == "fp32"                  # auto on the CPU, recorded with the policy
    assert rep.records[0][1]["proxy_top1"] >= 0 and 0 < res.ard < 2
    from gmpq_core.jobs import load_teacher
    assert res.policy.meta["teacher_top1"] == load_teacher(fmnist_job).test_top1     # the policy says how good


@pytest.mark.slow
def test_teacher_cache_is_reused_and_a_damaged_file_is_retrained(fmnist_job):
    from gmpq_core.jobs import get_teacher, teacher_cache_path
    from gmpq_core.data import load_dataset
    first = get_teacher(fmnist_job)
    path = teacher_cache_path(fmnist_job, load_dataset("fashion_mnist").info)
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    again = get_teacher(fmnist_job)
    assert path.stat().st_mtime_ns == stamp
    path.write_bytes(b"truncated")
    retrained = get_teacher(fmnist_job)
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]) and torch.equal(v, retrained.state_dict()[k])


def test_the_teacher_is_measured_on_held_out_images_and_an_older_cache_entry_once(tmp_path, monkeypatch):
    pytest.importorskip("gmpq_core.data")
    from gmpq_core.data import load_dataset, make_loader, proxy
    from gmpq_core.errors import DataError
    from gmpq_core.fileio import load_checkpoint, save_checkpoint
    from gmpq_core.jobs import SearchJob, load_teacher, teacher_cache_path
    from gmpq_core.train import evaluate
    try:
        bundle = load_dataset("fashion_mnist")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    job = SearchJob(proxy_size=100, teacher_epochs=1, eval_size=120, cache_dir=str(tmp_path),
                    search=SearchConfig(epochs=1, batch_size=50))
    first = load_teacher(job)
    held_out = make_loader(proxy(bundle.test, 1000, 0), bundle.info, batch_size=250, train=False)
    assert not first.cached and first.test_images == 1000 and first.num_classes == 10   # not the job's eval_size
    assert first.test_top1 == pytest.approx(evaluate(first.model, held_out)["top1"])   # the test slice, not the proxy
    again = load_teacher(job)
    assert again.cached and again.test_top1 == first.test_top1 and again.seconds == pytest.approx(first.seconds)
    path = teacher_cache_path(job, bundle.info)
    ckpt = load_checkpoint(path)                      # a cache entry written before the accuracy was recorded
    meta = {k: v for k, v in ckpt["meta"].items() if k not in ("test_top1", "test_images")}
    save_checkpoint(path, {"state_dict": ckpt["state_dict"], "meta": meta})
    import gmpq_core.jobs as jobs

    def read_only(*a, **k):                            # a read-only cache (root ignores chmod): write refused
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(jobs, "save_checkpoint", read_only)
    readonly = load_teacher(job)                       # measured and used, not recorded, no retraining
    monkeypatch.undo()
    assert readonly.cached and readonly.test_top1 == pytest.approx(first.test_top1)
    assert "test_top1" not in load_checkpoint(path)["meta"]
    older = load_teacher(job)
    assert older.cached and older.test_top1 == pytest.approx(first.test_top1)
    assert load_checkpoint(path)["meta"]["test_top1"] == pytest.approx(first.test_top1)     # measured once, kept


@pytest.mark.parametrize("top1,classes,weak", [(54.9, 10, True), (55.0, 10, False), (50.0, 1000, True),
                                               (50.1, 1000, False)])
def test_a_teacher_nearer_chance_than_a_perfect_score_is_warned_about(top1, classes, weak):
    from gmpq_core.jobs import SearchJob, Teacher
    teacher = Teacher(model=torch.nn.Identity(), test_top1=top1, test_images=1000, train_top1=None, seconds=0.0,
                      cached=True, num_classes=classes)
    msg = teacher.weak_message(SearchJob(proxy_size=500, teacher_epochs=2))
    assert (msg is not None) == weak
    if weak:
        assert f"{top1:.1f}%" in msg and "1000 held-out" in msg and "teacher_epochs (now 2" in msg
        assert "proxy_size" in msg and "500" in msg and "\n" not in msg
        assert f"below {teacher.weak_below:.3g}%" in msg and (classes == 10) == ("chance, 10%" in msg)


def test_search_job_round_trip_and_flat_search_keys():
    from gmpq_core.jobs import SearchJob
    job = SearchJob(proxy_size=300, search=SearchConfig(epochs=2, budget=Budget(avg_bits=3)))
    assert SearchJob.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    flat = SearchJob.from_dict({"model": "resnet20", "epochs": 3, "search": {"eta": 1.0}})
    assert flat.search.epochs == 3 and flat.search.eta == 1.0
    with pytest.raises(ConfigError, match="Unknown model"):
        SearchJob(model="resnet21")
    with pytest.raises(ConfigError, match="Unknown keys"):
        SearchJob.from_dict({"proxysize": 3})


@pytest.mark.parametrize("p_mode", ["capacity", "fixed"])
def test_a_search_step_reads_the_device_once(monkeypatch, p_mode):
    """One device-to-host read per step (after backward is queued, before the update): on a GPU every
    read is a synchronisation that stops the host from queueing ahead."""
    import sys

    import gmpq_core.search as search_mod
    from gmpq_core import fused_kernels

    reads: list[str] = []
    counting = [False]
    cpu_only = fused_kernels._scalars.__code__   # reads CPU tensors only (free there): see the test below
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            if counting[0] and sys._getframe(1).f_code is not cpu_only:
                reads.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_step = search_mod.search_step

    def step(*a, **k):
        counting[0] = True
        try:
            return real_step(*a, **k)
        finally:
            counting[0] = False
    monkeypatch.setattr(search_mod, "search_step", step)
    _search(_cfg(epochs=1, p_mode=p_mode))
    assert reads == ["tolist", "tolist"]          # two batches, one read each


def test_the_fused_kernels_read_per_candidate_scalars_on_the_cpu_only():
    from gmpq_core.fused_kernels import _scalars
    assert _scalars(torch.tensor([0.5, 2.0])) == [0.5, 2.0]            # CPU: Python floats (faster ops)
    on_meta = _scalars(torch.empty(2, device="meta"))                  # any other device: no read
    assert len(on_meta) == 2 and all(isinstance(t, torch.Tensor) and t.dim() == 0 for t in on_meta)


def test_check_job_loads_the_dataset_once(monkeypatch):
    """The review: check_job loaded the dataset, then check_job_budget loaded it again (an imagefolder dataset: a
    second full directory scan before the search starts)."""
    from gmpq_core import jobs
    from gmpq_core.jobs import SearchJob

    real, loads = jobs.load_dataset, []

    def counting(*a, **kw):
        loads.append(a)
        return real(*a, **kw)
    monkeypatch.setattr(jobs, "load_dataset", counting)
    job = SearchJob(proxy_size=300, search=SearchConfig(epochs=1, budget=Budget(avg_bits=3)))
    assert jobs.check_job(job, gradcam_where="search.gradcam_layer") > 0 and len(loads) == 1
