"""gmpq_core.temp_files through fileio.atomic_write: a writer killed between writing its temp file and the rename
left that file in the folder for good; the next write of the same file now removes it (never a live writer's), and
the folder is fsynced after the rename. Real processes, killed with SIGKILL."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gmpq_core.fileio import atomic_write_text, read_json

ROOT = Path(__file__).resolve().parents[2]
# a writer that stops inside its write (the temp file made and partly written), says so, and waits to be killed
_STUCK_WRITER = """
import sys, time
from gmpq_core.fileio import atomic_write
def write(f):
    f.write(b'{"half": ')
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
atomic_write(sys.argv[1], write)
"""

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def _stuck_writer(target: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _temps(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))


def test_a_killed_writers_temp_file_is_removed_by_the_next_write_and_a_live_writers_is_kept(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, '{"v": 1}\n')
    dead = _stuck_writer(target)
    dead.send_signal(signal.SIGKILL)
    dead.wait(30)
    left = _temps(tmp_path, "state.json")
    assert len(left) == 1 and f"-{dead.pid}." in left[0]          # the temp file names its writer
    live = _stuck_writer(target)                      # the next write of the file (in another process)
    try:
        kept = _temps(tmp_path, "state.json")
        assert len(kept) == 1 and f"-{live.pid}." in kept[0]           # the dead writer's removed: only its own
        atomic_write_text(target, '{"v": 2}\n')
        assert _temps(tmp_path, "state.json") == kept                 # a live writer's temp file is never removed
        assert read_json(target) == {"v": 2}
        atomic_write_text(tmp_path / "other.json", "{}\n")          # another file's write leaves these alone
        assert _temps(tmp_path, "state.json") == kept
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(30)


def test_temp_files_of_another_host_or_of_the_old_naming_are_left_alone(tmp_path):
    from gmpq_core.temp_files import temp_prefix

    target = tmp_path / "t.json"
    here = temp_prefix(target).rsplit("-", 1)[0]                  # '.t.json.<this host's tag>'
    if here.endswith(".00000000"):
        pytest.skip("this host's tag is the one this test uses for another host")
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()          # a process that has ended
    others = (tmp_path / f".t.json.00000000-{dead_pid}.abc_12xy.tmp",      # another machine's writer
              tmp_path / ".t.json.k3j_9x2a.tmp")                           # the old names: no writer named
    this_host = tmp_path / f"{here}-{dead_pid}.zz9_abcd.tmp"
    for p in (*others, this_host):
        p.write_text("x")
    atomic_write_text(target, "{}\n")
    assert not this_host.exists() and all(p.exists() for p in others)


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    if getattr(os, "O_DIRECTORY", None) is None:
        pytest.skip("no os.O_DIRECTORY on this system")
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert synced == [False, True]                  # the temp file, then the folder holding the new name
