"""One sweep trial without Ray: the transfer check (gmpq_core.transfer) and ``run_trial``'s reports."""
from __future__ import annotations

import json

import pytest
import torch

from gmpq_core.data import load_dataset
from gmpq_core.policy import BitPolicy
from gmpq_core.transfer import (TransferCheck, load_target_model, prepare_target_model, run_transfer_check,
                                target_slices)

CHECK = TransferCheck(train_size=64, test_size=50, batch_size=32, fp_epochs=1, fp_train_size=128, fp_batch_size=32)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, prepare_target_model(model="resnet20", dataset="fashion_mnist", check=CHECK, cache_dir=cache)


def test_target_slices_are_fixed_and_stratified():
    bundle = load_dataset("fashion_mnist")
    a_train, a_test = target_slices(bundle, CHECK)
    b_train, b_test = target_slices(bundle, CHECK)
    assert len(a_train) == 64 and len(a_test) == 50
    assert torch.equal(a_train.labels, b_train.labels) and torch.equal(a_test.images, b_test.images)
    assert torch.bincount(a_test.labels, minlength=10).tolist() == [5] * 10


def test_target_model_is_trained_once_then_read_from_the_cache(target):
    cache, first = target
    assert not first.cached and first.path.is_file() and 0 <= first.top1 <= 100
    again = prepare_target_model(model="resnet20", dataset="fashion_mnist", check=CHECK, cache_dir=cache)
    assert again.cached and again.path == first.path and again.top1 == first.top1
    assert json.loads(first.path.with_suffix(".json").read_text())["meta"]["fp_epochs"] == CHECK.fp_epochs


def test_another_test_slice_reuses_the_fp_target_model_and_measures_it_on_that_slice(target, tmp_path):
    """transfer.test_size only picks the images the model is measured on: a walkthrough saw the FP target model
    retrained (59 s at its size, minutes at the demo's) after changing it. Files keyed by it (earlier versions) stay
    readable for the slice they were keyed by."""
    import shutil
    from dataclasses import replace

    from gmpq_core.transfer import _target_key, _target_meta, fp_reference_top1

    cache, first = target
    other = replace(CHECK, test_size=80)
    again = prepare_target_model(model="resnet20", dataset="fashion_mnist", check=other, cache_dir=cache)
    assert again.cached and again.path == first.path
    model, _ = load_target_model(first.path)
    bundle = load_dataset("fashion_mnist")
    assert again.top1 == pytest.approx(fp_reference_top1(model, target_slices(bundle, other)[1], bundle.info))
    recorded = json.loads(first.path.with_suffix(".json").read_text())["top1_by_test_size"]
    assert recorded == {"50": first.top1, "80": again.top1}
    assert prepare_target_model(model="resnet20", dataset="fashion_mnist", check=other, cache_dir=cache).top1 == \
        again.top1                                             # measured once
    old_cache = tmp_path / "old"                               # as an earlier version keyed and wrote it
    old_cache.mkdir()
    key = dict(model="resnet20", dataset="fashion_mnist", check=CHECK, data_root=None, image_size=None,
               small_input=True)
    old = old_cache / f"target_fp_{_target_key(_target_meta(**key, legacy=True))}.pt"
    shutil.copy(first.path, old)
    info = json.loads(first.path.with_suffix(".json").read_text())
    old.with_suffix(".json").write_text(json.dumps({"meta": {**info["meta"], "test_size": 50}, "top1": first.top1,
                                                    "seconds": 1.0}))
    read = prepare_target_model(model="resnet20", dataset="fashion_mnist", check=CHECK, cache_dir=old_cache)
    assert read.cached and read.path == old and read.top1 == first.top1
    pinned = {**key, "data_root": "/data/fm"}                  # the key session 22's code computed for these (a review:
    assert _target_key(_target_meta(**pinned, legacy=True)) == "a4a0e5915676"    # the legacy key must not drift)


def test_transfer_check_is_identical_for_identical_inputs_and_leaves_the_fp_model_alone(target):
    _, tm = target
    model, meta = load_target_model(tm.path)
    assert meta["num_classes"] == 10 and meta["in_channels"] == 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bundle = load_dataset("fashion_mnist")
    train, test = target_slices(bundle, CHECK)
    policy = BitPolicy.uniform(model, 4, 4)
    r1 = run_transfer_check(model, policy, train, test, bundle.info, check=CHECK)
    r2 = run_transfer_check(model, policy, train, test, bundle.info, check=CHECK)
    assert r1["transfer_top1"] == r2["transfer_top1"] and 0 <= r1["transfer_top1"] <= 100
    assert r1["bitops_report"].bitops_quantized == sum(c.macs * 16 for c in r1["bitops_report"].layers if c.quantized)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_transfer_check_config_rejects_bad_values():
    from gmpq_core.errors import ConfigError

    with pytest.raises(ConfigError, match="transfer.lr must be > 0"):
        TransferCheck(lr=0)
    with pytest.raises(ConfigError, match="Unknown transfer setting.*epoch"):
        TransferCheck.from_dict({"epoch": 1})


def test_run_trial_reports_every_epoch_then_the_full_row(tmp_path, target):
    from orchestrator.sweep import prepare_shared
    from orchestrator.sweep_config import load_sweep_config
    from orchestrator.trainable import EPOCH_KEYS, FINAL_KEYS, run_trial

    cache, _ = target
    cfg = load_sweep_config(preset="demo", overrides={
        "out_dir": str(tmp_path), "cache_dir": str(cache), "teacher_epochs": 1, "proxy_eval_size": 50,
        "space.proxy_size": [100], "search.batch_size": 32, "search.max_steps_per_epoch": 1,
        "search.recalibrate_bn_batches": 1, "transfer": CHECK.to_dict()})
    context = prepare_shared(cfg, threads=1)
    reports: list[dict] = []
    params = {"budget_avg_bits": 3.0, "proxy_size": 100, "eta": 10.0, "lam": 1e-4, "p_mode": "fixed",
              "p_fixed": 3.0, "lr_arch": 0.01, "search_epochs": 2}
    final = run_trial(params, context, reports.append, trial_id="t0")
    assert [r["epoch"] for r in reports[:-1]] == [1, 2] and reports[-1] is final
    for r in reports[:-1]:
        assert r["phase"] == "search" and set(EPOCH_KEYS) <= set(r) and r["prune_value"] == r["proxy_top1"]
        assert r["budget_bucket"] == 0                                   # 3.0 bits < the first edge 3.25
        assert r["search_epochs"] == 2                   # the trial's own epoch count: the scheduler keeps its last
    assert set(FINAL_KEYS) <= set(final) and final["done"] is True and final["phase"] == "transfer"
    assert final["bitops"] <= final["budget_bitops"]
    policy = BitPolicy.from_json(final["policy_json"])
    layers = json.loads(final["layers_json"])
    assert sorted(entry["name"] for entry in layers) == sorted(policy.layers)
    assert all(policy.layers[e["name"]].w_bits == e["w_bits"] and policy.layers[e["name"]].a_bits == e["a_bits"]
               for e in layers)
    events = [json.loads(line) for line in (tmp_path / "trial_events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "epoch", "epoch", "transfer", "end"]
    assert [(e["epoch"], e["of"]) for e in events if e["event"] == "epoch"] == [(1, 2), (2, 2)]
