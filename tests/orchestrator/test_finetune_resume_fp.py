"""`gmpq finetune` resuming into an --out folder: the FP checkpoint the fine-tune started from is recorded, a
resume from another one is refused (before any FP training), the same weights from another file or the folder's
own DIR/fp.pt resume, and DIR/checkpoints/last.pt is read once."""
from __future__ import annotations

import json
import shutil

import torch

from gmpq_core.fileio import save_checkpoint
from gmpq_core.models import build_model
from orchestrator.cli import main

from test_finetune_checkpoints import FINETUNE, refused  # same folder (pytest puts it on sys.path)


def fp_file(tmp_path, name: str, seed: int = 0) -> str:
    """``name/fp.pt``: a resnet20 state dict for 8x8 grey digits, its weights drawn with ``seed``."""
    torch.manual_seed(seed)
    save_checkpoint(tmp_path / name / "fp.pt", build_model("resnet20", num_classes=10, in_channels=1).state_dict())
    return str(tmp_path / name / "fp.pt")


def history(out) -> list:
    return json.loads((out / "finetune_result.json").read_text())["history"]


def test_a_resume_from_another_fp_checkpoint_is_refused_naming_both(tmp_path, capsys):
    """A rerun into the same --out with another --fp-checkpoint resumed the fine-tune started from the first one,
    and reported the second one's FP top-1 beside it."""
    a, b, out = fp_file(tmp_path, "a"), fp_file(tmp_path, "b", seed=1), tmp_path / "out"
    run = [*FINETUNE, "--epochs", "2", "--out", str(out)]
    assert main([*run, "--fp-checkpoint", a]) == 0
    capsys.readouterr()
    last = out / "checkpoints" / "last.pt"
    before = last.read_bytes()
    err = refused(capsys, [*run, "--fp-checkpoint", b, "--fp-epochs", "3"])     # no note before the refusal
    assert (f"The fine-tune checkpoint '{last}', kept from an earlier run in this --out folder, was started from the "
            f"FP model '{a}' (weights sha256 ") in err
    assert (f"but this run's FP model '{b}' has other weights (sha256 ") in err
    assert (f"Pass --fp-checkpoint {a} to resume it, pass another --out for this run, or delete "
            f"'{out / 'checkpoints'}' to start this folder's fine-tune afresh.") in err
    assert last.read_bytes() == before
    shutil.copy(a, tmp_path / "copy.pt")                     # the same weights elsewhere: resumed, none re-run
    assert main([*run, "--fp-checkpoint", str(tmp_path / "copy.pt")]) == 0
    assert len(history(out)) == 2


def test_an_fp_checkpoint_written_over_since_the_fine_tune_started_is_refused(tmp_path, capsys):
    a, out = fp_file(tmp_path, "a"), tmp_path / "out"
    run = [*FINETUNE, "--epochs", "2", "--fp-checkpoint", a, "--out", str(out)]
    assert main(run) == 0
    capsys.readouterr()
    fp_file(tmp_path, "a", seed=1)
    err = refused(capsys, run)
    assert (f"was started from the FP model '{a}' (weights sha256 ") in err
    assert "but that file holds other weights now (sha256 " in err and f"Put those weights back in '{a}'" in err


def test_a_resume_with_the_folders_own_fp_model_is_not_refused_and_one_that_would_train_another_is(tmp_path,
                                                                                                   capsys):
    """Without --fp-checkpoint the FP model is trained into DIR/fp.pt: a rerun reuses it and resumes (given as
    --fp-checkpoint too); a rerun that would train a new one (DIR/fp_result.json gone) is refused before training."""
    out = tmp_path / "out"
    run = [*FINETUNE, "--epochs", "2", "--fp-epochs", "1", "--out", str(out)]
    assert main(run) == 0
    capsys.readouterr()
    fp = out / "fp.pt"
    assert json.loads((out / "finetune_result.json").read_text())["fp_checkpoint"] == str(fp)
    assert main(run) == 0
    assert f"reusing the FP model {fp} from an earlier run" in capsys.readouterr().err
    assert main([*run, "--fp-checkpoint", str(fp)]) == 0
    assert len(history(out)) == 2
    capsys.readouterr()
    (out / "fp_result.json").unlink()
    before = fp.read_bytes()
    err = refused(capsys, run)
    assert (f"was started from the FP model '{fp}' (weights sha256 ") in err
    assert (f"but this run trains a new FP model first (no --fp-checkpoint, and no {fp} with its fp_result.json to "
            f"reuse): resuming would mix two FP models") in err
    assert f"Pass --fp-checkpoint {fp} to resume it" in err
    assert fp.read_bytes() == before and "training the FP model" not in err


def test_a_checkpoint_from_before_the_fp_record_resumes_with_any_fp_checkpoint(tmp_path, capsys):
    a, b, out = fp_file(tmp_path, "a"), fp_file(tmp_path, "b", seed=1), tmp_path / "out"
    run = [*FINETUNE, "--epochs", "2", "--out", str(out)]
    assert main([*run, "--fp-checkpoint", a]) == 0
    last = out / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["fp"]
    torch.save(state, last)
    assert main([*run, "--fp-checkpoint", b]) == 0
    assert len(history(out)) == 2


def test_the_fine_tune_checkpoint_is_read_once_on_a_resume(tmp_path, monkeypatch):
    """It was read by the command (to refuse before the FP training) and again by gmpq_core.finetune."""
    a, out = fp_file(tmp_path, "a"), tmp_path / "out"
    run = [*FINETUNE, "--epochs", "2", "--fp-checkpoint", a, "--out", str(out)]
    assert main(run) == 0
    reads, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *args, **kw: reads.append(str(f)) or real(f, *args, **kw))
    assert main(run) == 0
    assert reads.count(str(out / "checkpoints" / "last.pt")) == 1 and len(history(out)) == 2
