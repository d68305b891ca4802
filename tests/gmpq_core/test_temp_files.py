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


# a writer that stops inside its write and finishes it when told (a line on stdin): it exits 0 once its rename is done
_PAUSED_WRITER = """
import sys
from gmpq_core.fileio import atomic_write
def write(f):
    f.write(b'{"from": "the other namespace"}')
    f.flush()
    print("writing", flush=True)
    sys.stdin.readline()
atomic_write(sys.argv[1], write)
"""


def _pid_free_here(start: int = 30_000) -> int:
    """A pid no process of this namespace has (the one a writer in another pid namespace will get)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(min(start, pid_max - 100), pid_max):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            continue
    pytest.skip("no free pid found")


def test_a_live_writer_in_another_pid_namespace_of_this_host_keeps_its_temp_file(tmp_path):
    # containers on one machine (host networking) share its name, not its pids: the writer's pid names no process
    # here, yet it runs; its temp file was removed by this write, and its rename then failed
    if not (Path("/proc/sys/kernel/ns_last_pid").exists() and Path("/usr/bin/unshare").exists()):
        pytest.skip("needs Linux pid namespaces and unshare")
    probe = subprocess.run(["unshare", "-Urpf", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged pid namespaces are not allowed here: {probe.stderr.decode().strip()}")
    target, pid = tmp_path / "trials.json", _pid_free_here()
    atomic_write_text(target, '{"v": 1}\n')
    start = f'echo {pid - 1} > /proc/sys/kernel/ns_last_pid && "$0" -c "$1" "$2"; exit $?'
    writer = subprocess.Popen(["unshare", "-Urpf", "--mount-proc", "sh", "-c", start, sys.executable, _PAUSED_WRITER,
                               str(target)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        theirs = _temps(tmp_path, "trials.json")
        assert len(theirs) == 1 and f"-{pid}." in theirs[0]              # its pid: none of this namespace's
        atomic_write_text(target, '{"v": 2}\n')
        assert _temps(tmp_path, "trials.json") == theirs                  # a live writer's temp file is kept
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.wait(30) == 0                                         # its rename succeeds
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(30)
    assert read_json(target) == {"from": "the other namespace"} and _temps(tmp_path, "trials.json") == []


def test_a_temp_name_whose_pid_no_process_can_have_is_left_alone_and_the_write_succeeds(tmp_path):
    from gmpq_core.temp_files import temp_prefix

    target = tmp_path / "t.json"
    odd = tmp_path / f"{temp_prefix(target).rsplit('-', 1)[0]}-99999999999999999999.abcd1234.tmp"
    odd.write_text("x")
    atomic_write_text(target, "{}\n")                       # os.kill of that number raised OverflowError
    assert odd.exists() and read_json(target) == {}
