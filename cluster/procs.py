"""Process-group bookkeeping shared by the local Ray cluster and the MLflow server helpers.

Every long-lived process the tool starts (``ray start --block`` per node, ``mlflow server``) is
started in a new session (``start_new_session=True``): its pid is the session id, and all the
processes it spawns stay in that session (GCS, raylet, agents; Ray's task/actor workers move to
process groups of their own with ``setpgid`` but keep the session). Stopping "exactly what we
started" is then: signal the members of the recorded sessions, never a name pattern and never
``ray stop`` (which stops every Ray node of this user on the machine, the ones tests start too).

A recorded session is identified by its leader's pid plus the leader's start time (clock ticks
since boot, field 22 of ``/proc/<pid>/stat``), so a recycled pid is never signalled.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

__all__ = ["ProcessGroup", "check_bind_host", "check_timeout", "make_state_dir", "record_problem", "free_port",
           "port_in_use", "group_members", "group_alive", "stop_groups", "start_time_of"]

log = logging.getLogger(__name__)
_PROC = Path("/proc")


@dataclass(frozen=True, kw_only=True)
class ProcessGroup:
    """A session we started: ``pgid`` is the leader's pid, which is also the session id."""

    name: str
    pgid: int
    start_time: int | None  # leader start time in clock ticks since boot; None where /proc is absent

    def to_dict(self) -> dict:
        return {"name": self.name, "pgid": self.pgid, "start_time": self.start_time}

    @classmethod
    def from_dict(cls, d: dict) -> "ProcessGroup":
        return cls(name=str(d["name"]), pgid=int(d["pgid"]), start_time=d.get("start_time"))


def check_bind_host(host: str, flag: str = "--host") -> None:
    """ConfigError unless ``host`` is an address (or name) of this machine that a server can bind to: no DNS
    lookup failure or bind error surfaces later as a traceback, and nothing is started for a bad one."""
    hint = ("give an address of this machine: 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or the "
            "IP of one of its network interfaces.")
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM) if host else []
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise ConfigError(f"{flag} {host!r} is not an address or a host name that resolves ({e}); {hint}") from None
    if not infos:
        raise ConfigError(f"{flag} {host!r} is empty; {hint}")
    errors = []
    for family, _, _, _, addr in infos:        # localhost may list ::1 first on a machine without IPv6
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr[0], 0) + tuple(addr[2:]))
            return
        except OSError as e:
            errors.append(e.strerror or str(e))
    raise ConfigError(f"{flag} {host!r} cannot be bound on this machine ({'; '.join(dict.fromkeys(errors))}); "
                      f"{hint}")


def check_timeout(timeout_s: object, waits_for: str, example: int) -> None:
    """ConfigError unless ``timeout_s`` (``--timeout``) is a finite number of seconds > 0."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ConfigError(f"timeout (--timeout) must be a number of seconds > 0 (how long to wait {waits_for}, e.g. "
                          f"{example}), but got {timeout_s!r}.")


def make_state_dir(path: Path, holds: str) -> Path:
    """``path`` created if needed (``--dir``): ConfigError naming it when it is a file, lies under one, or cannot
    be created (no permission, a read-only disk)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--dir '{path}' is a file, not a folder: give the folder that holds (or is to hold) "
                          f"{holds}.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--dir '{path}': cannot create the folder ({e.strerror or e}); give a folder you can "
                          "write to.") from None
    return path


def record_problem(err: Exception) -> str:
    """Why a JSON record file could not be read, in words (a KeyError alone prints as just the key)."""
    if isinstance(err, KeyError):
        return f"it lacks the key {err.args[0]!r}"
    return f"{type(err).__name__}: {err}"


def _family(host: str) -> int:
    """AF_INET6 for an IPv6 address such as ::1, else AF_INET."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS says is free now (bind to port 0); a race with other programs is possible."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after its closing ')'.
    rest = raw[raw.rfind(")") + 2:].split()
    return rest  # rest[0]: field 3 (state), rest[2]: 5 (pgrp), rest[3]: 6 (session), rest[19]: 22 (starttime)


def start_time_of(pid: int) -> int | None:
    """The process start time in clock ticks since boot, or None (no such process / no /proc)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes in the session (or process group) ``pgid``."""
    if not _PROC.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
        except PermissionError:
            return [pgid]
    members = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and fields[0] != "Z" and pgid in (int(fields[2]), int(fields[3])):
            members.append(int(entry.name))
    return members


def _is_ours(group: ProcessGroup) -> bool:
    """False when the leader pid now belongs to another process (recycled pid)."""
    if group.start_time is None:
        return True
    now = start_time_of(group.pgid)
    return now is None or now == group.start_time


def group_alive(group: ProcessGroup) -> bool:
    """True while any process of the recorded group still runs (and the group is still ours)."""
    return _is_ours(group) and bool(group_members(group.pgid))


def _signal_group(group: ProcessGroup, sig: int) -> None:
    """Signal every live member of the session, one pid at a time (no killpg: Ray workers sit in
    process groups of their own inside the session)."""
    for pid in group_members(group.pgid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except OSError as e:  # EPERM: not ours to signal
            if e.errno != errno.EPERM:
                raise
            log.warning("not allowed to signal pid %d of %s", pid, group.name)


def stop_groups(groups: list[ProcessGroup], *, grace_s: float = 10.0, poll_s: float = 0.2,
                kill_wait_s: float = 10.0) -> dict[str, str]:
    """SIGTERM each live group, wait up to ``grace_s`` seconds, then SIGKILL what is left
    (``grace_s <= 0``: SIGKILL at once, no chance to shut down cleanly, like a machine dying).

    Returns ``{name: "stopped" | "killed" | "not running" | "survived"}`` ("survived" only if a
    process ignores SIGKILL for ``kill_wait_s`` seconds, e.g. stuck in uninterruptible I/O).
    """
    outcome: dict[str, str] = {}
    live = []
    for g in groups:
        if group_alive(g):
            if grace_s > 0:
                _signal_group(g, signal.SIGTERM)
            live.append(g)
        else:
            outcome[g.name] = "not running"
    deadline = time.monotonic() + grace_s
    while live and time.monotonic() < deadline:
        time.sleep(poll_s)
        for g in [g for g in live if not group_members(g.pgid)]:
            outcome[g.name] = "stopped"
            live.remove(g)
    for g in live:
        if grace_s > 0:
            log.info("process group %d (%s) still alive after %.0f s: SIGKILL", g.pgid, g.name, grace_s)
        _signal_group(g, signal.SIGKILL)
    deadline = time.monotonic() + kill_wait_s
    while live and time.monotonic() < deadline:
        time.sleep(poll_s)
        for g in list(live):
            if group_members(g.pgid):
                _signal_group(g, signal.SIGKILL)  # members spawned since the last round
            else:
                outcome[g.name] = "killed"
                live.remove(g)
    for g in live:
        outcome[g.name] = "survived"
    return outcome
