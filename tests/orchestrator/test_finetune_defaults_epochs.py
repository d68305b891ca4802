"""`gmpq finetune --policy/--uniform` interrupted and rerun with a smaller --epochs: a total above the epochs done
continues the checkpoint on the cosine schedule of the new total (as the Ray Train final stage does); the total the
checkpoint has already done keeps it as it is (nothing left to train, as in the final stage); fewer are refused
before any work, in one paragraph naming both numbers and the fix."""
from __future__ import annotations

import json

import pytest
import torch

from gmpq_core.fileio import load_checkpoint
from gmpq_core.finetune import CHECKPOINT_NAME
from gmpq_core.reporting import ListReporter
from orchestrator.cli import main
from orchestrator.commands import finetune as finetune_cmd

from test_finetune_checkpoints import FINETUNE, fp_dir, refused  # same folder (pytest puts it on sys.path)


def interrupted(tmp_path, monkeypatch, *, epochs: int, done: int) -> tuple[list[str], object]:
    """An --out folder holding the checkpoint of an ``epochs``-epoch fine-tune stopped after epoch ``done`` (its
    reporter asked it to stop, as an interrupt between epochs does); the command line without --epochs."""
    ckpt, out = fp_dir(tmp_path), tmp_path / "out"
    run = [*FINETUNE, "--fp-checkpoint", ckpt, "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr(finetune_cmd, "ProgressReporter", lambda *a, **k: ListReporter(stop_after=done))
        assert main([*run, "--epochs", str(epochs)]) == 0
    state = torch.load(out / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
    assert (state["epoch"], state["config"]["epochs"]) == (done, epochs)
    return run, out


class Interrupting(ListReporter):
    """Ctrl-C right after the first epoch this run trains (its checkpoint is saved before the report)."""

    def report(self, step, metrics):
        raise KeyboardInterrupt


def test_a_3_epoch_fine_tune_stopped_after_epoch_1_continues_with_epochs_2(tmp_path, capsys, monkeypatch):
    """It was refused ("holds a 3-epoch fine-tune, 1 of them done ... cannot be shortened")."""
    run, out = interrupted(tmp_path, monkeypatch, epochs=3, done=1)
    first = torch.load(out / "checkpoints" / CHECKPOINT_NAME, weights_only=True)["history"]
    capsys.readouterr()
    assert main([*run, "--epochs", "2"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"continuing from epoch 1 to 2: the fine-tune in {out / 'checkpoints' / CHECKPOINT_NAME} was started "
            "with --epochs 3; its cosine schedule is shortened to 2 epochs (as gmpq finetune --sweep does)") in err
    assert "[finetune] epoch 1/" not in err and "[finetune] epoch 2/2" in err
    result = json.loads((out / "finetune_result.json").read_text())
    assert (result["epochs_run"], result["resumed_from_epoch"], result["config"]["epochs"]) == (2, 1, 2)
    assert [h["epoch"] for h in result["history"]] == [1, 2] and result["history"][0] == first[0]
    state = torch.load(out / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
    assert (state["epoch"], state["config"]["epochs"], state["total_steps"], state["scheduler"]["T_max"]) == \
        (2, 2, 2, 2)                                    # one step per epoch (--max-steps-per-epoch 1)
    assert main([*run, "--epochs", "2"]) == 0          # finished now: kept and evaluated again
    assert "already fine-tuned for 2 epoch(s)" in capsys.readouterr().err


def test_fewer_epochs_than_done_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    run, out = interrupted(tmp_path, monkeypatch, epochs=3, done=2)
    capsys.readouterr()
    last = out / "checkpoints" / CHECKPOINT_NAME
    kept = last.read_bytes()
    monkeypatch.setattr(finetune_cmd, "load_fp_model", lambda *a, **k: pytest.fail("refused after loading FP"))
    err = refused(capsys, [*run, "--epochs", "1"])
    assert err == (f"gmpq: error: The fine-tune checkpoint '{last}', kept from an earlier run in this --out folder, "
                   "holds a 3-epoch fine-tune, 2 of them done, but this run has --epochs 1: that fine-tune has already "
                   "run more epochs (2), and it continues from its checkpoint and cannot go back. Pass --epochs 2 to "
                   "keep it as it is, --epochs 3 or more to continue it (--epochs 3 finishes it as started), another "
                   f"--out for a 1-epoch fine-tune, or delete '{out / 'checkpoints'}' to start this folder's "
                   "fine-tune afresh.")
    assert last.read_bytes() == kept


def test_as_many_epochs_as_done_keep_an_interrupted_fine_tune_as_it_is(tmp_path, capsys, monkeypatch):
    """It was refused ("has already run as many epochs"), while gmpq finetune --sweep trains nothing and reports the
    checkpoint's last epoch: both now finish, writing the result files from the checkpoint."""
    run, out = interrupted(tmp_path, monkeypatch, epochs=3, done=2)
    last = out / "checkpoints" / CHECKPOINT_NAME
    kept, state = last.read_bytes(), torch.load(last, weights_only=True)
    capsys.readouterr()
    assert main([*run, "--epochs", "2"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"nothing left to train: the fine-tune in {last} was started with --epochs 3 and has done 2 epoch(s), as "
            "many as --epochs 2; writing quantized.pt and finetune_result.json from it as it is (its weights are "
            "those of epoch 2 of the 3-epoch cosine schedule); --epochs 3 or more continue it (--epochs 3 finishes it "
            "as started)") in err
    assert "[finetune] epoch" not in err and last.read_bytes() == kept          # nothing trained
    result = json.loads((out / "finetune_result.json").read_text())
    assert (result["epochs_run"], result["resumed_from_epoch"]) == (2, 2)
    assert result["history"] == state["history"] and result["top1"] == state["history"][-1]["top1"]
    assert main([*run, "--epochs", "3"]) == 0                    # and it still finishes as started
    assert json.loads((out / "finetune_result.json").read_text())["epochs_run"] == 3


def test_keeping_an_interrupted_fine_tune_removes_the_integer_file_of_the_model_it_replaces(tmp_path, capsys,
                                                                                            monkeypatch):
    """A finished 1-epoch fine-tune exported, then continued to 3 and interrupted after 2, then kept at --epochs 2: the
    new quantized.pt holds the epoch-2 weights, so the 1-epoch model's integer file beside it must go; a rerun that
    writes the same weights again leaves the new integer file."""
    ckpt, out = fp_dir(tmp_path), tmp_path / "out"
    run = [*FINETUNE, "--fp-checkpoint", ckpt, "--out", str(out)]
    assert main([*run, "--epochs", "1"]) == 0 and main(["export", str(out)]) == 0
    stale = out / "quantized.int.pt"
    with monkeypatch.context() as m:                                 # Ctrl-C once epoch 2 is saved: no files written
        m.setattr(finetune_cmd, "ProgressReporter", lambda *a, **k: Interrupting())
        assert main([*run, "--epochs", "3"]) == 130
    assert load_checkpoint(out / "quantized.pt")["results"]["epochs"] == 1 and stale.is_file()
    capsys.readouterr()
    assert main([*run, "--epochs", "2"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "nothing left to train" in err and not stale.exists() and f"removed {stale}" in err
    assert main(["export", str(out)]) == 0 and main([*run, "--epochs", "2"]) == 0
    assert stale.is_file()                                       # the same weights: its integer file still holds them


def test_a_longer_fine_tune_names_the_shorter_totals_that_continue_it(tmp_path, capsys, monkeypatch):
    run, out = interrupted(tmp_path, monkeypatch, epochs=4, done=2)
    capsys.readouterr()
    err = refused(capsys, [*run, "--epochs", "1"])
    assert ("Pass --epochs 2 to keep it as it is, --epochs 3 or more to continue it (--epochs 4 finishes it as "
            "started; a total under 4 continues it on the cosine schedule of that total, as gmpq finetune --sweep "
            "does)") in err
    assert main([*run, "--epochs", "3"]) == 0
    assert "continuing from epoch 2 to 3" in capsys.readouterr().err
    assert json.loads((out / "finetune_result.json").read_text())["epochs_run"] == 3
