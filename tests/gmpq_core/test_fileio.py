"""gmpq_core.fileio: atomic writes keep the permissions a plain open() would give."""
from __future__ import annotations

import os
import stat

import pytest

from gmpq_core.fileio import atomic_write_json, atomic_write_text, read_json


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_umask_permissions_not_the_temp_files_private_ones(tmp_path, umask):
    before = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        atomic_write_json(tmp_path / "a.json", {"k": 1})
        atomic_write_text(tmp_path / "b.txt", "y")
    finally:
        os.umask(before)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == want == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode)
    assert read_json(tmp_path / "a.json") == {"k": 1} and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_without_proc_the_umask_is_read_once_and_remembered(tmp_path, monkeypatch):
    import gmpq_core.fileio as fileio

    def no_proc(*a, **k):
        raise OSError("no /proc here")
    monkeypatch.setattr(fileio, "open", no_proc, raising=False)
    monkeypatch.setattr(fileio, "_umask_seen", [])
    before = os.umask(0o027)
    try:
        assert fileio._umask() == 0o027 and os.umask(0o027) == 0o027      # read, and left as it was
        os.umask(0o002)
        assert fileio._umask() == 0o027                                  # remembered (no set-and-restore race)
    finally:
        os.umask(before)


def test_a_folder_given_as_a_checkpoint_is_named_with_its_pt_files(tmp_path):
    from gmpq_core.errors import CheckpointError
    from gmpq_core.fileio import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "fp.pt", {"state_dict": {}})
    folder = r"is a folder, not a checkpoint file: give the \.pt file itself \(it holds fp\.pt\)"
    with pytest.raises(CheckpointError, match=folder):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="Checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("head, kind", [(b"PAR1\x15\x04", "a Parquet table"), (b"\x89PNG\r\n\x1a\n\x00", "a PNG image"),
                                        (b"SQLite format 3\x00", "an SQLite database")])
def test_another_tools_file_is_named_as_such_without_advice_to_delete_it(tmp_path, head, kind):
    from gmpq_core.errors import CheckpointError
    from gmpq_core.fileio import load_checkpoint
    path = tmp_path / "trials.parquet"
    path.write_bytes(head + bytes(200))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert f"is {kind}, not a PyTorch checkpoint" in str(err.value) and "delete" not in str(err.value)


def test_a_mapped_load_gives_the_same_checkpoint(tmp_path):
    import torch

    from gmpq_core.fileio import load_checkpoint, save_checkpoint

    state = {"epoch": 3, "model": {"w": torch.arange(12.0).reshape(3, 4)}}
    save_checkpoint(tmp_path / "state.pt", state)
    mapped = load_checkpoint(tmp_path / "state.pt", mmap=True)
    assert mapped["epoch"] == 3 and torch.equal(mapped["model"]["w"], state["model"]["w"])


# -- load_model_state: a state dict of another model is named in one paragraph, not PyTorch's list of every key --
def _state(name: str, **kw) -> dict:
    import torch

    from gmpq_core.models import build_model
    torch.manual_seed(0)
    return build_model(name, **kw).state_dict()


def test_a_checkpoint_of_another_model_names_both_models_and_a_few_keys(tmp_path):
    from gmpq_core.errors import CheckpointError
    from gmpq_core.fileio import load_model_state
    from gmpq_core.models import build_model

    model = build_model("resnet18", num_classes=10, in_channels=1, small_input=True)
    with pytest.raises(CheckpointError) as e:
        load_model_state(model, _state("resnet20", in_channels=1), tmp_path / "fp.pt", what="FP checkpoint",
                         fix="Pass the right --model.")
    msg = str(e.value)
    assert msg.startswith(f"The FP checkpoint '{tmp_path / 'fp.pt'}' holds a resnet20 (in_channels=1, num_classes=10), "
                          "but a resnet18 (in_channels=1, num_classes=10, small_input=True) is built here: ")
    assert "missing keys ['layer4.0.conv1.weight', " in msg and "(30 in all)" in msg and "(36 in all)" in msg
    assert "fc.weight [10, 64] in the file vs [10, 512] here" in msg and msg.endswith("Pass the right --model.")
    assert len(msg) < 900 and "\n" not in msg and "Missing key(s)" not in msg


def test_a_checkpoint_with_another_number_of_classes_names_the_classifier_shapes(tmp_path):
    from gmpq_core.errors import CheckpointError
    from gmpq_core.fileio import load_model_state
    from gmpq_core.models import build_model

    model = build_model("resnet20", num_classes=10, in_channels=1)
    with pytest.raises(CheckpointError, match=r"holds a resnet20 \(in_channels=1, num_classes=100\), but a resnet20 "
                                              r"\(in_channels=1, num_classes=10\) is built here: other shapes: "
                                              r"fc\.weight \[100, 64\] in the file vs \[10, 64\] here; fc\.bias "
                                              r"\[100\] in the file vs \[10\] here\. Give a checkpoint"):
        load_model_state(model, _state("resnet20", num_classes=100, in_channels=1), "c.pt")
    torch_before = {k: v.clone() for k, v in model.state_dict().items()}
    good = _state("resnet20", num_classes=10, in_channels=1)
    load_model_state(model, good, "c.pt")                             # a fitting one loads as load_state_dict does
    assert all((model.state_dict()[k] == good[k]).all() for k in good) and torch_before.keys() == good.keys()


@pytest.mark.parametrize("state, needle", [
    ({"state_dict": {}, "meta": {}}, "it holds a dict of 2 entries ('state_dict', 'meta'), not tensors"),
    ({"format": "gmpq-quantized-model/1", "arch": {}, "state_dict": {}, "policy_json": "", "quantized": {}},
     "it holds a 'gmpq-quantized-model/1' file: a dict of 5 entries ('format', 'arch', 'state_dict', 'policy_json', "
     "...), not tensors"),
    ([1, 2], "it holds a list"),
    ({}, "it holds an empty dict"),
])
def test_a_file_that_is_not_a_state_dict_says_what_it_holds(state, needle):
    from gmpq_core.errors import CheckpointError
    from gmpq_core.fileio import load_model_state
    from gmpq_core.models import build_model

    with pytest.raises(CheckpointError, match=r"The checkpoint 'x\.pt' does not hold a model's state dict") as e:
        load_model_state(build_model("resnet20"), state, "x.pt")
    assert needle in str(e.value) and str(e.value).endswith("as torch.save(model.state_dict(), path) writes it.")


def test_keys_of_a_ddp_wrapper_are_recognised():
    from gmpq_core.errors import CheckpointError
    from gmpq_core.fileio import load_model_state
    from gmpq_core.models import build_model

    state = {f"module.{k}": v for k, v in _state("resnet20").items()}
    with pytest.raises(CheckpointError, match=r"'ddp\.pt' \(128 tensors\) does not fit the model built here, a "
                                              r"resnet20 \(in_channels=3, num_classes=10\): missing keys .* carry the "
                                              r"'module\.' prefix of a DistributedDataParallel wrapper"):
        load_model_state(build_model("resnet20"), state, "ddp.pt")


def test_the_fp_target_cache_and_the_teacher_cache_load_through_it(tmp_path, caplog):
    """load_target_model raised PyTorch's RuntimeError; the teacher cache logged its 2 KB text before retraining."""
    import logging
    from types import SimpleNamespace

    from gmpq_core.errors import CheckpointError
    from gmpq_core.fileio import atomic_write_json, save_checkpoint
    from gmpq_core.jobs import SearchJob, _cached_teacher
    from gmpq_core.transfer import load_target_model

    save_checkpoint(tmp_path / "target_fp_x.pt", _state("resnet20", num_classes=10, in_channels=1))
    atomic_write_json(tmp_path / "target_fp_x.json", {"meta": {"model": "resnet20", "num_classes": 100,
                                                               "in_channels": 1, "small_input": True}})
    with pytest.raises(CheckpointError, match=r"The FP target model '.*target_fp_x\.pt' holds a resnet20 \("
                                              r"in_channels=1, num_classes=10\), but .*num_classes=100.*delete both"):
        load_target_model(tmp_path / "target_fp_x.pt")

    save_checkpoint(tmp_path / "teacher.pt", {"state_dict": _state("resnet20", num_classes=100, in_channels=1)})
    job = SearchJob(model="resnet20", dataset="digits")
    with caplog.at_level(logging.WARNING, logger="gmpq_core.jobs"):
        assert _cached_teacher(job, SimpleNamespace(info=SimpleNamespace(num_classes=10, in_channels=1)),
                               tmp_path / "teacher.pt") is None                     # retrained, as before
    (record,) = [r for r in caplog.records if "unusable" in r.getMessage()]
    assert "The cached FP teacher" in record.getMessage() and len(record.getMessage()) < 900
