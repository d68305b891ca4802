"""`gmpq finetune --policy SWEEP/policies/<trial_id>.json` without --fp-checkpoint fine-tunes from the sweep's FP
target model (SWEEP/shared.json's target_model_path, the one the final stage uses) when it fits the command line,
instead of training a new FP model (shrunk by --max-steps-per-epoch / --train-size); the resume checks keep
refusing a checkpoint started from another FP model."""
from __future__ import annotations

import json
import os

import torch

from gmpq_core.fileio import atomic_write_json, save_checkpoint
from gmpq_core.finetune import CHECKPOINT_NAME, state_digest
from gmpq_core.models import build_model
from gmpq_core.policy import BitPolicy
from orchestrator.cli import main

from test_finetune_checkpoints import refused  # same folder (pytest puts it on sys.path)

# UCI digits (8x8, in scikit-learn): a whole fine-tune takes about a second
TINY = ["--train-size", "16", "--test-size", "10", "--batch-size", "16", "--max-steps-per-epoch", "1"]


def target_model(path, *, seed: int = 0, dataset: str = "digits"):
    """What prepare_target_model caches: a resnet20 state dict for 8x8 grey digits and the .json of its meta."""
    torch.manual_seed(seed)
    save_checkpoint(path, build_model("resnet20", num_classes=10, in_channels=1).state_dict())
    atomic_write_json(path.with_suffix(".json"), {"top1": 90.0, "seconds": 1.0, "meta": {
        "model": "resnet20", "dataset": dataset, "data_root": None, "image_size": None, "small_input": True,
        "num_classes": 10, "in_channels": 1, "input_size": 8}})
    return path


def sweep(tmp_path, name: str = "sweep", *, recorded_dir=None, dataset: str = "digits", shared: bool = True):
    """A sweep folder as `gmpq pareto` leaves it: shared.json naming the FP target model (in a cache beside it) and
    policies/t1.json, whose meta names the sweep folder (``recorded_dir``: where it was when it wrote it)."""
    d = tmp_path / name
    recorded = recorded_dir or d
    target = target_model(d / "cache" / "target_fp_abc.pt", dataset=dataset)
    if shared:
        atomic_write_json(d / "shared.json", {"target_model_path": str(recorded / "cache" / target.name)})
    net = build_model("resnet20", num_classes=10, in_channels=1)
    base = BitPolicy.uniform(net, 4, 4)
    BitPolicy(layers=base.layers, fingerprint=base.fingerprint, meta={
        "model": "resnet20", "dataset": dataset, "in_channels": 1, "num_classes": 10, "small_input": True,
        "input_size": 8, "sweep": "demo", "sweep_dir": str(recorded), "trial_id": "t1"}).save(d / "policies" / "t1.json")
    return d / "policies" / "t1.json", target


def result(out) -> dict:
    return json.loads((out / "finetune_result.json").read_text())


def test_a_sweeps_policy_is_fine_tuned_from_the_sweeps_fp_target_model(tmp_path, capsys):
    """It trained a new FP model first, on the capped data (25 % top-1 in the audit)."""
    policy, target = sweep(tmp_path)
    out = tmp_path / "out"
    assert main(["finetune", "--policy", str(policy), *TINY, "--out", str(out)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"using the sweep's FP target model {target} (pass --fp-checkpoint to use another)" in err
    assert "training the FP model" not in err and not (out / "fp.pt").exists()
    assert result(out)["fp_checkpoint"] == str(target) and result(out)["dataset"] == "digits"
    fp = torch.load(out / "checkpoints" / CHECKPOINT_NAME, weights_only=True)["fp"]
    assert fp == {"sha256": state_digest(torch.load(target, weights_only=True)), "source": os.path.abspath(target)}
    assert main(["finetune", "--policy", str(policy), *TINY, "--epochs", "2", "--out", str(out)]) == 0
    assert "continuing from epoch 1 to 2" in capsys.readouterr().err            # the same FP model: continued


def test_a_checkpoint_started_from_the_sweeps_model_is_refused_once_that_model_changed_or_is_gone(tmp_path, capsys):
    policy, target = sweep(tmp_path)
    out = tmp_path / "out"
    run = ["finetune", "--policy", str(policy), *TINY, "--epochs", "2", "--out", str(out)]
    assert main(run) == 0
    capsys.readouterr()
    target_model(target, seed=1)                               # the cache file written over with other weights
    err = refused(capsys, run)
    assert f"was started from the FP model '{target}' (weights sha256 " in err
    assert "but that file holds other weights now" in err and f"Put those weights back in '{target}'" in err
    target.unlink()                                  # gone: this run would train a new one; refused before that
    assert main(run) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"was started from the FP model '{target}' (weights sha256 " in err
    assert "but this run trains a new FP model first" in err and f"Put it back at '{target}'" in err
    assert "training the FP model" not in err and not (out / "fp.pt").exists()


def test_the_sweeps_model_is_not_used_when_the_command_line_asks_for_another(tmp_path, capsys):
    policy, target = sweep(tmp_path)
    out = tmp_path / "out"
    assert main(["finetune", "--policy", str(policy), *TINY, "--num-classes", "12", "--fp-epochs", "1",
                 "--out", str(out)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"no --fp-checkpoint: training the FP model first (1 epoch); the sweep's FP target model {target} is not "
            "used: it is --num-classes 10, but this command line has --num-classes 12") in err
    assert result(out)["num_classes"] == 12 and result(out)["fp_checkpoint"] == str(out / "fp.pt")
    policy, target = sweep(tmp_path, "other", dataset="mnist5k")          # another dataset than --dataset
    assert main(["finetune", "--policy", str(policy), *TINY, "--dataset", "digits", "--fp-epochs", "1",
                 "--out", str(tmp_path / "out2")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"the sweep's FP target model {target} is not used: it was trained on 'mnist5k', not on --dataset "
            "digits") in err
    assert main(["finetune", "--policy", str(policy), *TINY, "--dataset", "digits", "--fp-checkpoint",
                 str(out / "fp.pt"), "--num-classes", "12", "--out", str(tmp_path / "out3")]) == 0
    assert "sweep's FP target model" not in capsys.readouterr().err                  # --fp-checkpoint: as before


def test_a_folder_whose_fine_tune_started_from_its_own_fp_model_keeps_it(tmp_path, capsys):
    """Folders written before this default (DIR/fp.pt trained there) resume as they did, with a word about the
    sweep's model."""
    policy, target = sweep(tmp_path, shared=False)                   # no shared.json yet: the FP model is trained
    out = tmp_path / "out"
    run = ["finetune", "--policy", str(policy), *TINY, "--fp-epochs", "1", "--out", str(out)]
    assert main(run) == 0
    assert "training the FP model first" in capsys.readouterr().err
    atomic_write_json(policy.parent.parent / "shared.json", {"target_model_path": str(target)})
    assert main([*run, "--epochs", "2"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"reusing the FP model {out / 'fp.pt'} from an earlier run (not the sweep's FP target model {target}: "
            f"pass --fp-checkpoint {target} and another --out to fine-tune from that one)") in err
    assert "continuing from epoch 1 to 2" in err and result(out)["fp_checkpoint"] == str(out / "fp.pt")


def test_a_copied_sweep_reads_its_own_shared_json_and_a_moved_policy_its_sweeps(tmp_path, capsys):
    """A sweep folder copied elsewhere: its policy's meta and shared.json name the original folder (gone here)."""
    policy, target = sweep(tmp_path, "copy", recorded_dir=tmp_path / "original")
    assert main(["finetune", "--policy", str(policy), *TINY, "--out", str(tmp_path / "out")]) == 0
    assert f"using the sweep's FP target model {target} " in capsys.readouterr().err
    policy, target = sweep(tmp_path)
    moved = tmp_path / "t1.json"                                      # the policy file alone, out of its sweep
    moved.write_text(policy.read_text())
    assert main(["finetune", "--policy", str(moved), *TINY, "--out", str(tmp_path / "out2")]) == 0
    assert f"using the sweep's FP target model {target} " in capsys.readouterr().err


def test_a_users_model_given_by_a_relative_path_is_the_recorded_absolute_one(tmp_path, monkeypatch):
    """--model ./my_cnn.py:build names the file the sweep recorded as /abs/my_cnn.py:build: its FP target model fits
    (it was refused as another model, and a new FP model trained)."""
    import argparse

    from orchestrator.commands._finetune_fp import sweep_target

    policy, target = sweep(tmp_path)
    (tmp_path / "my_cnn.py").write_text("from torch import nn\n\ndef build(*, num_classes, in_channels, small_input):\n"
                                        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    meta = json.loads(target.with_suffix(".json").read_text())
    meta["meta"]["model"] = f"{tmp_path / 'my_cnn.py'}:build"
    atomic_write_json(target.with_suffix(".json"), meta)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(policy=str(policy), dataset=None, model="./my_cnn.py:build", input_size=None,
                              in_channels=None, num_classes=None, small_input=None)
    path, info, why = sweep_target(args, BitPolicy.load(policy))
    assert path == target and why == ""
