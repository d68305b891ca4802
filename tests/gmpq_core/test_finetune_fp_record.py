"""A fine-tune checkpoint records the FP model it started from (a digest of its weights, and where it came from);
a resume from an FP model with other weights is refused, and a caller that has read the checkpoint already can
hand it over instead of having it read again."""
from __future__ import annotations

import copy
import hashlib

import pytest
import torch

import gmpq_core.finetune as finetune_mod
from gmpq_core.errors import CheckpointError, ConfigError
from gmpq_core.fileio import load_checkpoint
from gmpq_core.finetune import CHECKPOINT_NAME, FinetuneConfig, finetune, recorded_fp, state_digest
from gmpq_core.policy import BitPolicy
from gmpq_core.reporting import ListReporter

from test_train import TinyLoader, tiny_net  # same folder (pytest puts it on sys.path)


def run(fp, ckpt_dir, *, source=None, epochs=2, **kw):
    return finetune(fp, BitPolicy.uniform(fp, 4, 4), TinyLoader(), TinyLoader(seed=1),
                    config=FinetuneConfig(epochs=epochs), input_size=8, in_channels=1, checkpoint_dir=ckpt_dir,
                    fp_source=source, **kw)


def test_state_digest_names_the_weights_not_their_copy_device_layout_or_order():
    fp = tiny_net()
    state = fp.state_dict()
    reference = hashlib.sha256()            # an independent spelling of the rule: name|dtype|shape, then the bytes
    for name in sorted(state):
        t = state[name]
        reference.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode() + t.contiguous().numpy().tobytes())
    assert state_digest(fp) == state_digest(state) == reference.hexdigest()
    assert state_digest(dict(reversed(list(state.items())))) == reference.hexdigest()
    assert state_digest(copy.deepcopy(fp).to(memory_format=torch.channels_last)) == reference.hexdigest()
    other = copy.deepcopy(fp)
    with torch.no_grad():
        other.conv1.weight.view(-1)[0] = torch.nextafter(other.conv1.weight.view(-1)[0], torch.tensor(1e9))
    assert state_digest(other) != reference.hexdigest()                    # one ulp of one weight
    assert state_digest(tiny_net(seed=1)) != reference.hexdigest()


def test_a_resume_from_an_fp_model_with_other_weights_is_refused_and_the_same_weights_elsewhere_resume(tmp_path):
    """The FP model (the quantized model's start, the distillation teacher) was not recorded: a resume from
    another one mixed two starts silently."""
    fp = tiny_net()
    run(fp, tmp_path, source="/runs/a/fp.pt", reporter=ListReporter(stop_after=1))
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["fp"] == {"sha256": state_digest(fp), "source": "/runs/a/fp.pt"} == recorded_fp(state)
    with pytest.raises(CheckpointError, match=(
            rf"was written by a fine-tune started from the FP model '/runs/a/fp.pt' \(weights sha256 "
            rf"{state_digest(fp)[:12]}\), but this run starts from the FP model '/runs/b/fp.pt' \(weights sha256 "
            rf"{state_digest(tiny_net(seed=1))[:12]}\).*Resume with the FP model it started from, or use another "
            r"checkpoint folder")):
        run(tiny_net(seed=1), tmp_path, source="/runs/b/fp.pt")
    rep = ListReporter()
    assert run(copy.deepcopy(fp), tmp_path, source="/copy/fp.pt", reporter=rep).epochs_run == 2    # same weights
    assert [s for s, _ in rep.records] == [2]
    assert recorded_fp(torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True))["source"] == "/copy/fp.pt"


def test_a_checkpoint_from_before_the_fp_record_resumes_from_any_fp_model_and_records_it(tmp_path):
    fp = tiny_net()
    run(fp, tmp_path, reporter=ListReporter(stop_after=1))
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["fp"] == {"sha256": state_digest(fp), "source": None}     # no fp_source: the digest alone
    del state["fp"]
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    assert recorded_fp(state) is None
    assert run(tiny_net(seed=1), tmp_path, source="b.pt").epochs_run == 2
    assert recorded_fp(torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)) == {
        "sha256": state_digest(tiny_net(seed=1)), "source": "b.pt"}


def test_a_checkpoint_handed_over_by_the_caller_is_resumed_from_without_reading_it_again(tmp_path, monkeypatch):
    fp = tiny_net()
    full = run(fp, tmp_path / "full")
    run(fp, tmp_path / "ck", reporter=ListReporter(stop_after=1))
    state = load_checkpoint(tmp_path / "ck" / CHECKPOINT_NAME)
    reads = []
    monkeypatch.setattr(finetune_mod, "load_checkpoint", lambda *a, **k: reads.append(a) or load_checkpoint(*a, **k))
    resumed = run(fp, tmp_path / "ck", resume_state=state)
    assert reads == [] and resumed.epochs_run == 2 and resumed.history == full.history
    with pytest.raises(CheckpointError, match="lr=0.01 but this run has lr=0.05"):     # checked as if read here
        finetune(fp, BitPolicy.uniform(fp, 4, 4), TinyLoader(), TinyLoader(seed=1),
                 config=FinetuneConfig(epochs=2, lr=0.05), input_size=8, in_channels=1,
                 checkpoint_dir=tmp_path / "ck", resume_state=state)
    with pytest.raises(ConfigError, match="resume_state is the content of checkpoint_dir/last.pt, but got "
                                          "checkpoint_dir=None"):
        run(fp, None, resume_state=state)
