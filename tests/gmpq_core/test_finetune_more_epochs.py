"""A fine-tune checkpoint is continued by a run of more epochs than it has done (its cosine schedule rebuilt for the
new total, longer or shorter than its own, and entered at the steps done, as the Ray Train final stage does), and
kept as it is by a run of as many (nothing left to train, as in the final stage), refused to a run of fewer; every other recipe change stays
refused, and checkpoints written before the schedule length was recorded keep working."""
from __future__ import annotations

import math

import pytest
import torch

from gmpq_core.errors import CheckpointError
from gmpq_core.finetune import CHECKPOINT_NAME, FinetuneConfig, finetune
from gmpq_core.policy import BitPolicy
from gmpq_core.reporting import ListReporter

from test_train import TinyLoader, tiny_net  # same folder (pytest puts it on sys.path)

STEPS = 4          # TinyLoader(): 64 images in batches of 16


def run(fp, ckpt_dir, epochs: int, **kw):
    config = FinetuneConfig(epochs=epochs, lr=kw.pop("lr", 0.02))
    return finetune(fp, BitPolicy.uniform(fp, 4, 4), TinyLoader(), TinyLoader(seed=1), config=config, input_size=8,
                    in_channels=1, checkpoint_dir=ckpt_dir, **kw)


def cosine(lr: float, t: int, total: int) -> float:
    """lr_t = lr * (1 + cos(pi t / T)) / 2 (the module docstring's schedule), written out independently."""
    return lr * (1 + math.cos(math.pi * t / total)) / 2


def step_lrs(monkeypatch) -> list[float]:
    """The learning rate in force at every optimizer step of the fine-tunes that follow (read as the cosine
    scheduler steps; patched on the class, so that the scheduler's state_dict stays plain)."""
    lrs: list[float] = []
    cls = torch.optim.lr_scheduler.CosineAnnealingLR
    real = cls.step

    def recorded(self, *a, **k):
        if self.last_epoch >= 0:                    # not the constructor's initial step
            lrs.append(self.optimizer.param_groups[0]["lr"])
        return real(self, *a, **k)
    monkeypatch.setattr(cls, "step", recorded)
    return lrs


def test_more_epochs_continue_the_checkpoint_on_the_cosine_schedule_of_the_new_total(tmp_path, monkeypatch):
    """It was refused ("written with epochs=1 but this run has epochs=3"), so a longer fine-tune started over."""
    fp = tiny_net()
    first = run(fp, tmp_path, 1)
    lrs = step_lrs(monkeypatch)
    rep = ListReporter()
    longer = run(fp, tmp_path, 3, reporter=rep)
    assert [s for s, _ in rep.records] == [2, 3]                     # epoch 1 is not run again
    assert (longer.epochs_run, longer.resumed_from_epoch, first.resumed_from_epoch) == (3, 1, 0)
    assert [h["epoch"] for h in longer.history] == [1, 2, 3] and longer.history[0] == first.history[0]
    total = 3 * STEPS       # steps t = 4..11 of the 12-step schedule, entered where the 1-epoch run stopped
    assert lrs == pytest.approx([cosine(0.02, t, total) for t in range(STEPS, total)], rel=1e-9, abs=1e-12)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert (state["epoch"], state["config"]["epochs"], state["total_steps"]) == (3, 3, total)
    assert state["scheduler"]["T_max"] == total and state["scheduler"]["last_epoch"] == total


def test_a_checkpoint_from_before_the_schedule_length_was_recorded_continues_and_resumes_alike(tmp_path,
                                                                                                monkeypatch):
    """Old checkpoints have no ``total_steps``: their scheduler's T_max tells whether the schedule is the same."""
    fp = tiny_net()
    full = run(fp, None, 3)
    run(fp, tmp_path, 3, reporter=ListReporter(stop_after=1))       # interrupted after epoch 1 of 3
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    del state["total_steps"]
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    resumed = run(fp, tmp_path, 3)                                   # the same schedule: resumed exactly
    assert resumed.history == full.history
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()))
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    del state["total_steps"]
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    lrs = step_lrs(monkeypatch)
    assert run(fp, tmp_path, 4).epochs_run == 4
    assert lrs == pytest.approx([cosine(0.02, t, 4 * STEPS) for t in range(3 * STEPS, 4 * STEPS)], rel=1e-9)


def test_an_interrupted_fine_tune_continues_to_a_shorter_total_on_that_totals_cosine_schedule(tmp_path,
                                                                                          monkeypatch):
    """A 3-epoch fine-tune interrupted after epoch 1 and rerun for 2 epochs was refused ("cannot be shortened"),
    while the Ray Train final stage continues it on the 2-epoch schedule."""
    fp = tiny_net()
    first = run(fp, tmp_path, 3, reporter=ListReporter(stop_after=1))     # a 3-epoch fine-tune, 1 epoch done
    lrs = step_lrs(monkeypatch)
    rep = ListReporter()
    shorter = run(fp, tmp_path, 2, reporter=rep)
    assert [s for s, _ in rep.records] == [2]                          # epoch 1 is not run again
    assert (shorter.epochs_run, shorter.resumed_from_epoch) == (2, 1)
    assert [h["epoch"] for h in shorter.history] == [1, 2] and shorter.history[0] == first.history[0]
    total = 2 * STEPS       # steps t = 4..7 of the 8-step schedule: set_cosine_position_ at the steps done
    assert lrs == pytest.approx([cosine(0.02, t, total) for t in range(STEPS, total)], rel=1e-9, abs=1e-12)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert (state["epoch"], state["config"]["epochs"], state["total_steps"]) == (2, 2, total)
    assert run(fp, tmp_path, 2).resumed_from_epoch == 2                 # now a finished 2-epoch fine-tune: kept


def test_fewer_epochs_than_done_are_refused_and_other_settings_stay_refused_with_more(tmp_path):
    fp = tiny_net()
    run(fp, tmp_path, 3, reporter=ListReporter(stop_after=2))       # a 3-epoch fine-tune, 2 epochs done
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(CheckpointError, match=r"holds a fine-tune of epochs=3 \(2 done\), but this run has "
                                              r"epochs=1: it has already completed more epochs, and a fine-tune "
                                              r"continues from its checkpoint and cannot go back\. Resume with "
                                              r"epochs=2 to keep it as it is, epochs=3 or more to continue it "
                                              r"\(epochs=3 finishes it as started\)"):
        run(fp, tmp_path, 1)
    with pytest.raises(CheckpointError, match="written with lr=0.02 but this run has lr=0.05"):
        run(fp, tmp_path, 4, lr=0.05)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before


def test_check_resume_state_checks_only_what_it_is_given(tmp_path):
    """The command checks the recipe before a long FP training, and the policy once it is built."""
    from gmpq_core.finetune import check_resume_state, resume_epochs

    fp = tiny_net()
    run(fp, tmp_path, 2)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    path = tmp_path / CHECKPOINT_NAME
    assert resume_epochs(state) == (2, 2)
    check_resume_state(path, state)                                               # nothing given: nothing refused
    check_resume_state(path, state, config=FinetuneConfig(epochs=5, lr=0.02), precision="fp32")
    with pytest.raises(CheckpointError, match="epochs=2 \\(2 done\\)"):
        check_resume_state(path, state, config=FinetuneConfig(epochs=1, lr=0.02))
    with pytest.raises(CheckpointError, match="different bit policy"):
        check_resume_state(path, state, policy=BitPolicy.uniform(fp, 8, 8))
    with pytest.raises(CheckpointError, match="lacks the fine-tune state"):
        check_resume_state(path, {"epoch": 1})
    del state["config"]                                 # from before the record: the epochs it completed count
    assert resume_epochs(state) == (2, 2)


def test_as_many_epochs_as_an_interrupted_longer_run_did_keep_it_as_it_is(tmp_path):
    """It was refused ("it has already completed as many epochs"), while the Ray Train final stage trains nothing
    and reports the checkpoint's last epoch."""
    fp = tiny_net()
    run(fp, tmp_path, 3, reporter=ListReporter(stop_after=2))       # a 3-epoch fine-tune, 2 epochs done
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    rep = ListReporter()
    kept = run(fp, tmp_path, 2, reporter=rep)
    assert rep.records == [] and (kept.epochs_run, kept.resumed_from_epoch) == (2, 2)
    assert kept.history == state["history"] and kept.top1 == state["history"][-1]["top1"]
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before          # nothing trained, nothing rewritten
    assert run(fp, tmp_path, 3).epochs_run == 3                          # and it still finishes as started
