"""The temp files of ``fileio.atomic_write``, named for the process writing them, so that one a writer left (killed
between writing it and the rename) is removed by the next write of the same file; and the folder fsync that makes
the rename itself durable.

A temp file of ``DIR/name`` is ``DIR/.name.<host>-<pid>.<random>.tmp``: ``<host>`` is 8 hex digits of where a pid
names one process: this machine's name and, on Linux, its kernel's boot id and the writer's process-id namespace (a
sweep folder may be shared by the nodes of a cluster, or by containers on one machine that share its name, as with
host networking, but not its pids: a pid says nothing about their processes), ``<pid>`` its writer's process id.
``remove_stale_temps`` removes only the temp files of that name from this scope whose pid is not a running process;
a live writer's (another process's, or another thread's of this one) is never touched. Older temp names (no
``<host>-<pid>``) name no writer and are left alone, and so are those a machine left before it rebooted.
"""
from __future__ import annotations

import os
import re
import socket
import zlib
from pathlib import Path

__all__ = ["temp_prefix", "TEMP_SUFFIX", "remove_stale_temps", "fsync_dir"]

TEMP_SUFFIX = ".tmp"
_SCOPE_FILES = ("/proc/sys/kernel/random/boot_id",)     # read where they exist (Linux)
_PID_NAMESPACE = "/proc/self/ns/pid"
_tags: dict[int, str] = {}          # this process's tag, by pid (a forked child computes its own)


def _host_tag() -> str:
    """8 hex digits of this machine's name, its boot id and this process's pid namespace (see the module doc)."""
    pid = os.getpid()
    tag = _tags.get(pid)
    if tag is None:
        parts = [socket.gethostname()]
        for name in _SCOPE_FILES:
            try:
                parts.append(Path(name).read_text().strip())
            except OSError:
                pass
        try:
            ns = os.stat(_PID_NAMESPACE)
            parts.append(f"{ns.st_dev}:{ns.st_ino}")
        except OSError:
            pass
        tag = _tags[pid] = f"{zlib.crc32(chr(0).join(parts).encode()):08x}"
    return tag


def temp_prefix(path: Path) -> str:
    """The name start of this process's temp files of ``path`` (``tempfile.mkstemp`` adds a random part and
    ``TEMP_SUFFIX``)."""
    return f".{path.name}.{_host_tag()}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one of another user's counts: it may be a writer)."""
    if pid <= 0 or os.name == "nt":
        return True                  # not a process id a writer had; on Windows os.kill(pid, 0) sends a CTRL_C_EVENT
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):   # PermissionError: another user's process; a number no pid can be
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temp files of ``path`` that writers on this machine left when they died mid-write (their pid runs
    no process); returns those removed. Best effort: a folder that cannot be listed, or a file another process
    removed first, is passed over."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_host_tag()}-(\d+)\.[^.]+{re.escape(TEMP_SUFFIX)}")
    removed = []
    try:
        entries = [e.name for e in os.scandir(path.parent)]
    except OSError:
        return removed
    for name in entries:
        m = pattern.fullmatch(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(path.parent / name)
        except OSError:
            continue
        removed.append(path.parent / name)
    return removed


def fsync_dir(folder: Path) -> None:
    """fsync ``folder`` so that a rename into it survives a power loss (POSIX); a no-op where the system has no
    ``os.O_DIRECTORY`` (Windows) or the filesystem refuses to sync a folder."""
    flag = getattr(os, "O_DIRECTORY", None)
    if flag is None:
        return
    try:
        fd = os.open(folder, os.O_RDONLY | flag)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
