"""scripts/check_disk.sh: a new venv on a disk too small for it is refused before pip starts."""
from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_disk.sh"


def run(venv: Path, need_gb: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(venv), str(need_gb)], capture_output=True, text=True)


def test_refuses_a_new_venv_that_does_not_fit(tmp_path):
    out = run(tmp_path / ".venv", 10**6)  # a million GB: no disk has that free
    assert out.returncode == 1
    assert str(tmp_path / ".venv") in out.stderr
    assert "GB are free" in out.stderr and "VENV=" in out.stderr
    assert not (tmp_path / ".venv").exists()


def test_accepts_a_new_venv_that_fits(tmp_path):
    assert run(tmp_path / ".venv", 0).returncode == 0


def test_an_existing_venv_is_not_checked(tmp_path):
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    assert run(tmp_path / ".venv", 10**6).returncode == 0
