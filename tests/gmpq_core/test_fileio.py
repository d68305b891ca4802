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
