"""`gmpq finetune --policy/--uniform` rerun into its --out folder with more --epochs continues the fine-tune from its
checkpoint (as `gmpq finetune --sweep` does: the cosine schedule rebuilt for the new total) and replaces the result
files; fewer --epochs than a finished fine-tune's are refused in one paragraph (an interrupted one, kept as it is
by as many --epochs as it has done: test_finetune_defaults_epochs.py); other recipe changes stay refused."""
from __future__ import annotations

import json
import math

import torch

from gmpq_core.fileio import load_checkpoint
from gmpq_core.finetune import CHECKPOINT_NAME
from orchestrator.cli import main

from test_finetune_checkpoints import FINETUNE, fp_dir, refused  # same folder (pytest puts it on sys.path)


def result(out) -> dict:
    return json.loads((out / "finetune_result.json").read_text())


def test_more_epochs_continue_the_fine_tune_and_replace_its_result_files(tmp_path, capsys):
    """It was refused ("written with epochs=1 but this run has epochs=2"): the user had to start over."""
    ckpt, out = fp_dir(tmp_path), tmp_path / "out"
    run = [*FINETUNE, "--fp-checkpoint", ckpt, "--out", str(out)]
    assert main([*run, "--epochs", "1"]) == 0
    one = result(out)
    assert main(["export", str(out)]) == 0                       # gmpq export's integer file of the 1-epoch model
    stale = out / "quantized.int.pt"
    assert stale.is_file()
    capsys.readouterr()
    assert main([*run, "--epochs", "2"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert not stale.exists() and f"removed {stale}" in err and f"run 'gmpq export {out}' again" in err
    assert (f"continuing from epoch 1 to 2: the fine-tune in {out / 'checkpoints' / CHECKPOINT_NAME} was run with "
            "--epochs 1; its cosine schedule is stretched to 2 epochs (as gmpq finetune --sweep does), and "
            "quantized.pt and finetune_result.json are replaced by the 2-epoch result") in err
    two = result(out)
    assert (two["epochs_run"], two["resumed_from_epoch"], two["config"]["epochs"]) == (2, 1, 2)
    assert [h["epoch"] for h in two["history"]] == [1, 2] and two["history"][0] == one["history"][0]
    assert load_checkpoint(out / "quantized.pt")["results"]["epochs"] == 2
    state = torch.load(out / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
    assert (state["epoch"], state["config"]["epochs"]) == (2, 2)
    assert main(["export", str(out)]) == 0
    assert main([*run, "--epochs", "2"]) == 0                     # done: nothing trained, the files rewritten
    assert "already fine-tuned for 2 epoch(s)" in capsys.readouterr().err
    assert stale.is_file()                                         # the same weights: its integer file still holds them
    assert len(result(out)["history"]) == 2


def test_the_continued_schedule_is_the_final_stages():
    """Both modes enter the cosine schedule of the new total at the steps done (one set_cosine_position_), which
    is the cosine formula at the new total, stepped on from there."""
    from gmpq_core.train import make_cosine_scheduler, set_cosine_position_, sgd

    lrs = []
    for place in (set_cosine_position_,):
        opt = sgd([torch.nn.Parameter(torch.zeros(2))], lr=0.05, momentum=0.9, weight_decay=0.0)
        sched = make_cosine_scheduler(opt, 30)
        place(opt, sched, 10, 30)
        seen = [opt.param_groups[0]["lr"]]
        for _ in range(5):
            opt.step()
            sched.step()
            seen.append(opt.param_groups[0]["lr"])
        lrs.append(seen)
    assert math.isclose(lrs[0][0], 0.05 * (1 + math.cos(math.pi * 10 / 30)) / 2, rel_tol=1e-12)
    assert math.isclose(lrs[0][-1], 0.05 * (1 + math.cos(math.pi * 15 / 30)) / 2, rel_tol=1e-9)


def test_fewer_epochs_are_refused_in_one_paragraph_and_leave_the_files(tmp_path, capsys):
    ckpt, out = fp_dir(tmp_path), tmp_path / "out"
    run = [*FINETUNE, "--fp-checkpoint", ckpt, "--out", str(out)]
    assert main([*run, "--epochs", "2"]) == 0
    capsys.readouterr()
    kept = {f: (out / f).read_bytes() for f in ("quantized.pt", "finetune_result.json", "checkpoints/last.pt")}
    err = refused(capsys, [*run, "--epochs", "1"])
    last = out / "checkpoints" / CHECKPOINT_NAME
    assert err == (f"gmpq: error: The fine-tune checkpoint '{last}', kept from an earlier run in this --out folder, "
                   "holds a 2-epoch fine-tune, but this run has --epochs 1: a fine-tune continues from its checkpoint "
                   "and cannot be shortened (more epochs continue it). Pass --epochs 2 (or more) to keep or continue "
                   f"it, another --out for a 1-epoch fine-tune, or delete '{out / 'checkpoints'}' to start this "
                   "folder's fine-tune afresh.")
    assert {f: (out / f).read_bytes() for f in kept} == kept
    state = torch.load(last, weights_only=True)                 # a 3-epoch fine-tune interrupted after epoch 2
    state["config"]["epochs"] = 3
    torch.save(state, last)
    err = refused(capsys, [*run, "--epochs", "1"])
    assert "holds a 3-epoch fine-tune, 2 of them done, but this run has --epochs 1" in err
    assert ("Pass --epochs 2 to keep it as it is, --epochs 3 or more to continue it (--epochs 3 finishes it as "
            "started)") in err


def test_other_settings_stay_refused_with_more_epochs_and_before_the_fp_training(tmp_path, capsys):
    """A recipe change was refused only after the FP model had been trained; more epochs do not lift it."""
    out = tmp_path / "out"
    run = [*FINETUNE, "--fp-epochs", "1", "--out", str(out)]
    assert main([*run, "--epochs", "1"]) == 0
    capsys.readouterr()
    err = refused(capsys, [*run, "--epochs", "2", "--lr", "0.02"])
    assert "was written with --lr 0.01, but this run has --lr 0.02. Pass --lr 0.01 to resume it" in err
    assert "continuing" not in err
    last = out / "checkpoints" / CHECKPOINT_NAME        # a checkpoint from before the FP record, and no kept FP
    state = torch.load(last, weights_only=True)         # model: this run would train one; refused before that
    del state["fp"]
    torch.save(state, last)
    (out / "fp_result.json").unlink()
    err = refused(capsys, [*run, "--epochs", "2", "--weight-decay", "0.001"])
    assert "was written with --weight-decay 4e-05" in err and "training the FP model" not in err


def test_a_recipe_flag_changed_on_a_rerun_is_refused_naming_the_flags_and_another_out(tmp_path, capsys):
    """--lr, --weight-decay, --batch-size, ... got the core's "written with lr=0.01 ...; resume with the same
    settings" (a field name, not the flag, and no other --out), where --train-size got the flags."""
    ckpt, out = fp_dir(tmp_path), tmp_path / "out"
    run = [*FINETUNE, "--fp-checkpoint", ckpt, "--epochs", "2", "--out", str(out)]
    assert main(run) == 0                                         # (TINY: 1 step per epoch)
    last = out / "checkpoints" / CHECKPOINT_NAME
    state = torch.load(last, weights_only=True)
    state["epoch"], state["history"] = 1, state["history"][:1]   # as if stopped after the first of its 2 epochs
    torch.save(state, last)
    capsys.readouterr()
    fresh = f"another --out for this run, or delete '{out / 'checkpoints'}' to start this folder's fine-tune afresh."
    batch = state["config"]["batch_size"]
    err = refused(capsys, [*run, "--lr", "0.05", "--batch-size", str(batch + 1)])
    assert err == (f"gmpq: error: The fine-tune checkpoint '{last}', kept from an earlier run in this --out folder, "
                   f"was written with --lr 0.01 --batch-size {batch}, but this run has --lr 0.05 --batch-size "
                   f"{batch + 1}. Pass --lr 0.01 --batch-size {batch} to resume it, {fresh}")
    err = refused(capsys, [*run, "--include-stem"])
    assert (f"was written with no --include-stem, but this run has --include-stem. Leave out --include-stem to "
            f"resume it, pass {fresh}") in err
    err = refused(capsys, [*run, "--max-steps-per-epoch", "2", "--distill"])
    assert ("was written with --max-steps-per-epoch 1 and no --distill, but this run has --max-steps-per-epoch 2 "
            "--distill. Pass --max-steps-per-epoch 1 without --distill to resume it") in err
    assert main(run) == 0                                         # the same flags resume it
    assert result(out)["resumed_from_epoch"] == 1


def test_a_checkpoint_from_before_the_schedule_length_was_recorded_is_continued(tmp_path, capsys):
    ckpt, out = fp_dir(tmp_path), tmp_path / "out"
    run = [*FINETUNE, "--fp-checkpoint", ckpt, "--out", str(out)]
    assert main([*run, "--epochs", "1"]) == 0
    last = out / "checkpoints" / CHECKPOINT_NAME
    state = torch.load(last, weights_only=True)
    del state["total_steps"], state["run"], state["fp"]              # as the first versions wrote it
    torch.save(state, last)
    assert main([*run, "--epochs", "3"]) == 0
    assert "continuing from epoch 1 to 3" in capsys.readouterr().err
    assert result(out)["epochs_run"] == 3 and len(result(out)["history"]) == 3
