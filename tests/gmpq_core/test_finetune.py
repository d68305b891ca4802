"""QAT fine-tune: preparation, BitOPs, checkpoint/resume, and (slow) accuracy on real Fashion-MNIST."""
from __future__ import annotations

import time

import pytest
import torch

from gmpq_core.bitops import count_bitops
from gmpq_core.errors import CheckpointError, PolicyMismatchError
from gmpq_core.finetune import CHECKPOINT_NAME, FinetuneConfig, finetune, prepare_quantized
from gmpq_core.policy import BitPolicy
from gmpq_core.qmodules import QuantConv2d, quantized_layers
from gmpq_core.reporting import ListReporter

from test_train import TinyLoader, tiny_net  # same folder (pytest puts it on sys.path)


def mixed_policy(model) -> BitPolicy:
    base = BitPolicy.uniform(model, 4, 4)
    return BitPolicy(layers={"conv1": {"w_bits": 2, "a_bits": 3}, "conv2": {"w_bits": 4, "a_bits": 6}},
                     fingerprint=base.fingerprint)


def test_prepare_quantized_copies_applies_and_calibrates():
    fp = tiny_net()
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    x = next(iter(TinyLoader()))[0]
    q = prepare_quantized(fp, mixed_policy(fp), x)
    assert all(torch.equal(before[k], v) for k, v in fp.state_dict().items())  # FP model untouched
    assert set(quantized_layers(q)) == {"conv1", "conv2"} and not isinstance(fp.conv1, QuantConv2d)
    assert (q.conv1.w_bits, q.conv1.a_bits, q.conv2.a_bits) == (2, 3, 6)
    assert float(q.conv1.act.clip.detach()) != 6.0  # calibrated away from the PACT init
    q8 = prepare_quantized(fp, mixed_policy(fp), x, include_stem=True, include_classifier=True)
    assert set(quantized_layers(q8)) == {"stem", "conv1", "conv2", "fc"}


def test_the_fine_tune_uses_plain_momentum_and_fp_training_nesterov():
    """METHOD.md 6: SGD momentum 0.9 for the fine-tune (Nesterov a switch); the FP recipe (ours) is Nesterov."""
    from gmpq_core.errors import ConfigError
    from gmpq_core.train import TrainConfig, make_optimizer

    net = torch.nn.Linear(3, 2)
    assert make_optimizer(net, FinetuneConfig()).param_groups[0]["nesterov"] is False
    assert make_optimizer(net, FinetuneConfig(nesterov=True)).param_groups[0]["nesterov"] is True
    assert make_optimizer(net, TrainConfig()).param_groups[0]["nesterov"] is True
    assert make_optimizer(net, TrainConfig(momentum=0.0)).param_groups[0]["nesterov"] is False   # torch needs momentum
    with pytest.raises(ConfigError, match="nesterov must be True or False"):
        FinetuneConfig(nesterov="yes")


def test_policy_that_does_not_fit_raises():
    fp = tiny_net()
    bad = BitPolicy(layers={"conv1": {"w_bits": 4, "a_bits": 4}})
    with pytest.raises(PolicyMismatchError, match="conv2"):
        finetune(fp, bad, TinyLoader(), TinyLoader(seed=1), config=FinetuneConfig(), input_size=8, in_channels=1)


def test_finetune_reports_per_epoch_and_counts_bitops_of_the_policy():
    fp, rep = tiny_net(), ListReporter()
    pol = mixed_policy(fp)
    res = finetune(fp, pol, TinyLoader(), TinyLoader(seed=1), config=FinetuneConfig(epochs=2, distill=True),
                   input_size=8, in_channels=1, reporter=rep)
    assert res.epochs_run == 2 and [s for s, _ in rep.records] == [1, 2]
    assert res.top1 == rep.records[-1][1]["top1"]
    ref = count_bitops(fp, pol, 8, 1)
    assert res.bitops.bitops_quantized == ref.bitops_quantized
    assert res.bitops.bitops_total == ref.bitops_total
    # hand count: conv1 4->8, 3x3, stride 2 on 8x8 -> 4x4 out; conv2 8->8, 3x3 on 4x4
    assert ref.bitops_quantized == 4 * 9 * 8 * 16 * 2 * 3 + 8 * 9 * 8 * 16 * 4 * 6



def test_the_distillation_teacher_runs_with_its_batchnorm_folded_and_the_fp_model_stays(monkeypatch):
    import gmpq_core.finetune as finetune_mod

    seen = []
    real = finetune_mod.run_epochs
    monkeypatch.setattr(finetune_mod, "run_epochs", lambda *a, **k: seen.append(k["teacher"]) or real(*a, **k))
    fp = tiny_net()
    finetune(fp, mixed_policy(fp), TinyLoader(), TinyLoader(seed=1), config=FinetuneConfig(epochs=1, distill=True),
             input_size=8, in_channels=1)
    (teacher,) = seen
    assert isinstance(teacher.bn, torch.nn.Identity) and teacher.stem.bias is not None and not teacher.training
    assert isinstance(fp.bn, torch.nn.BatchNorm2d) and fp.stem.bias is None             # the caller's model


def test_finetune_resumes_from_its_checkpoint_like_an_uninterrupted_run(tmp_path):
    cfg = FinetuneConfig(epochs=3, lr=0.02, distill=True)
    fp = tiny_net()
    pol = mixed_policy(fp)
    full = finetune(fp, pol, TinyLoader(), TinyLoader(seed=1), config=cfg, input_size=8, in_channels=1)

    ck = tmp_path / "ck"
    first = finetune(fp, pol, TinyLoader(), TinyLoader(seed=1), config=cfg, input_size=8, in_channels=1,
                     checkpoint_dir=ck, reporter=ListReporter(stop_after=1))
    assert first.epochs_run == 1 and (ck / CHECKPOINT_NAME).is_file()
    state = torch.load(ck / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 1 and set(state) >= {"model", "optimizer", "scheduler", "history"}

    rep = ListReporter()
    resumed = finetune(fp, pol, TinyLoader(), TinyLoader(seed=1), config=cfg, input_size=8, in_channels=1,
                       checkpoint_dir=ck, reporter=rep)
    assert [s for s, _ in rep.records] == [2, 3]
    assert resumed.epochs_run == full.epochs_run == 3
    assert resumed.history == full.history
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()))


def test_resuming_with_other_settings_is_refused(tmp_path):
    fp = tiny_net()
    pol = mixed_policy(fp)
    finetune(fp, pol, TinyLoader(), TinyLoader(seed=1), config=FinetuneConfig(epochs=2), input_size=8,
             in_channels=1, checkpoint_dir=tmp_path, reporter=ListReporter(stop_after=1))
    with pytest.raises(CheckpointError, match="lr=0.01"):
        finetune(fp, pol, TinyLoader(), TinyLoader(seed=1), config=FinetuneConfig(epochs=2, lr=0.05),
                 input_size=8, in_channels=1, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="nesterov=False"):        # the optimizer state would bring it back
        finetune(fp, pol, TinyLoader(), TinyLoader(seed=1), config=FinetuneConfig(epochs=2, nesterov=True),
                 input_size=8, in_channels=1, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="precision 'fp32' but this run trains in 'bf16'.*--precision fp32"):
        finetune(fp, pol, TinyLoader(), TinyLoader(seed=1), config=FinetuneConfig(epochs=2), input_size=8,
                 in_channels=1, checkpoint_dir=tmp_path, precision="bf16")
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["precision"] == "fp32"           # auto on a CPU
    del state["precision"]       # from before the key: unknown (auto was bf16 on a GPU already), not checked
    state["optimizer"]["param_groups"][0]["fused"] = None          # and written by the unfused SGD
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    import gmpq_core.finetune as finetune_mod
    opts = []
    real = finetune_mod.run_epochs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune_mod, "run_epochs", lambda *a, **k: opts.append(k["optimizer"]) or real(*a, **k))
        assert finetune(fp, pol, TinyLoader(), TinyLoader(seed=1), config=FinetuneConfig(epochs=2), input_size=8,
                        in_channels=1, checkpoint_dir=tmp_path, precision="bf16").epochs_run == 2
    assert opts[0].param_groups[0]["fused"] is True        # the resumed optimizer keeps its own implementation
    other = BitPolicy.uniform(fp, 8, 8)
    with pytest.raises(CheckpointError, match="different bit policy"):
        finetune(fp, other, TinyLoader(), TinyLoader(seed=1), config=FinetuneConfig(epochs=2),
                 input_size=8, in_channels=1, checkpoint_dir=tmp_path, precision="bf16")
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)   # a checkpoint from before the key:
    del state["config"]["nesterov"]                                     # it was written with Nesterov momentum
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="nesterov=True"):
        finetune(fp, pol, TinyLoader(), TinyLoader(seed=1), config=FinetuneConfig(epochs=2),
                 input_size=8, in_channels=1, checkpoint_dir=tmp_path, precision="bf16")



def test_a_checkpoint_of_another_dataset_or_model_is_refused_and_one_from_before_run_info_resumes(tmp_path):
    """run_info (what the caller trains on: dataset, model options) is saved with the state; a resume under other
    values was silent (the folder of a digits run continued on MNIST). Keys the checkpoint lacks are not checked."""
    fp = tiny_net()
    pol = mixed_policy(fp)
    digits = {"dataset": "digits", "model": "tiny", "input_size": 8}

    def run(run_info, **kw):
        return finetune(fp, pol, TinyLoader(), TinyLoader(seed=1), config=FinetuneConfig(epochs=2), input_size=8,
                        in_channels=1, checkpoint_dir=tmp_path, run_info=run_info, **kw)
    run(digits, reporter=ListReporter(stop_after=1))
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["run"] == digits
    with pytest.raises(CheckpointError, match=r"written by a fine-tune with dataset='digits', but this run has "
                                              r"dataset='mnist5k'; resume with the same settings"):
        run({**digits, "dataset": "mnist5k"})
    with pytest.raises(CheckpointError, match=r"with input_size=8, but this run has input_size=16"):
        run({**digits, "input_size": 16})
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    del state["run"]                                           # written before run_info existed: resumes
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    rep = ListReporter()
    assert run({**digits, "dataset": "mnist5k", "train_size": 16}, reporter=rep).epochs_run == 2
    assert [s for s, _ in rep.records] == [2]
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["run"]["dataset"] == "mnist5k"
    assert run({**digits, "dataset": "mnist5k", "seed_note": "new key"}).epochs_run == 2   # a key it lacks

class _Echo(ListReporter):
    """Prints each epoch (seen with -s) so a long run's numbers survive an interruption."""

    def __init__(self, name: str, t0: float) -> None:
        super().__init__()
        self.name, self.t0 = name, t0

    def report(self, step, metrics):
        super().report(step, metrics)
        print(f"[{self.name}] epoch {step}: top1 {metrics['top1']:.2f} ({time.perf_counter() - self.t0:.0f} s)",
              flush=True)


@pytest.mark.slow
def test_resnet20_fashion_mnist_fp_reaches_85_and_w4a4_stays_within_2_points():
    """Issue 2: FP resnet20 >= 85% test top-1 on Fashion-MNIST in 2 CPU epochs; W4A4 QAT (1 epoch) within 2."""
    from gmpq_core.data import load_dataset, make_loader
    from gmpq_core.models import build_model
    from gmpq_core.train import TrainConfig, train_fp

    bundle = load_dataset("fashion_mnist")
    train = make_loader(bundle.train, bundle.info, batch_size=128, train=True, seed=0)
    test = make_loader(bundle.test, bundle.info, batch_size=512, train=False)
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    t0 = time.perf_counter()
    fp = train_fp(model, train, test, config=TrainConfig(epochs=2, lr=0.1, weight_decay=5e-4, batch_size=128),
                  reporter=_Echo("fp", t0))
    t1 = time.perf_counter()
    q = finetune(model, BitPolicy.uniform(model, 4, 4), train, test, config=FinetuneConfig(epochs=1, lr=0.01),
                 input_size=28, in_channels=1, reporter=_Echo("w4a4", t0))
    t2 = time.perf_counter()
    print(f"\nFP top-1 {fp.top1:.2f}% ({t1 - t0:.0f} s); W4A4 top-1 {q.top1:.2f}% ({t2 - t1:.0f} s); "
          f"W4A4 {q.bitops.bitops_quantized / 1e9:.3f} GBitOPs quantized layers")
    assert fp.top1 >= 85.0
    assert q.top1 >= fp.top1 - 2.0
