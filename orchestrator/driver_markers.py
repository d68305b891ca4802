"""Which process runs a stage of a sweep folder: the marker files that ``gmpq status``, ``gmpq sync-mlflow`` and
the final stage read.

- ``driver.json`` (``driver_marker``): the command running the sweep or its fine-tune (``gmpq sweep``, ``gmpq
  finetune --sweep``, ``gmpq run`` and its current stage). One process holds it: a second command started beside a
  live one leaves it alone.
- ``driver.finetune.json`` (``final_stage_marker``): the process running the sweep's final stage, also when
  ``driver.json`` is a sweep of another process's, so that two final stages started during a sweep still see
  each other.

Each marker names its host, pid and the pid's start time (Linux's /proc), so a pid reused by another program, or
another host's process with the same pid, is not taken for it; and its heartbeat, the time its process last
rewrote it (every ``HEARTBEAT_S``), so that another host's process that died without removing it is taken as ended
once the heartbeat is older than ``STALE_AFTER_S``.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gmpq_core.errors import CheckpointError
from gmpq_core.fileio import atomic_write_json, read_json

__all__ = ["DRIVER_FILE", "FINETUNE_DRIVER_FILE", "driver_marker", "final_stage_marker", "live_driver", "release_all",
           "stage_command",
           "driver_text", "ended_marker_text", "read_marker",
           "is_this_process", "pid_start", "driver_alive"]

DRIVER_FILE = "driver.json"
FINETUNE_DRIVER_FILE = "driver.finetune.json"


@contextmanager
def driver_marker(sweep_dir: str | Path, stage: str, *, command: str | None = None) -> Iterator[None]:
    """While the block runs, ``<sweep_dir>/driver.json`` names this process and ``stage`` (and ``command``, the gmpq
    command running it, when not the one the stage is named for: ``gmpq run``'s sweep stage).

    Nested in this process (``gmpq run``: stage "run" around "sweep" and "finetune"), the inner stage
    shows while it runs (``command``: the outer one) and the outer one again after it. A live marker of another
    process (a sweep still running while ``gmpq finetune --sweep`` starts) is left alone: that process is the one
    running it; once it has ended, the heartbeat writes this one's (``_claim``)."""
    with _marker(Path(sweep_dir) / DRIVER_FILE, stage, command=command):
        yield


@contextmanager
def final_stage_marker(sweep_dir: str | Path) -> Iterator[None]:
    """``driver_marker(sweep_dir, "finetune")`` and, inside it, ``driver.finetune.json`` naming this process (its
    ``command``: ``gmpq run`` when it runs the stage), which another process's final stage checks
    (``final_results.refuse_beside_other_finetune``) even while ``driver.json`` names a sweep of a third one."""
    main = Path(sweep_dir).resolve() / DRIVER_FILE
    with driver_marker(sweep_dir, "finetune"):
        with _LOCK:
            command = _STAGES[main][-1]["command"]
        with _marker(Path(sweep_dir) / FINETUNE_DRIVER_FILE, "finetune", command=command):
            yield


@contextmanager
def _marker(path: Path, stage: str, *, command: str | None = None) -> Iterator[None]:
    """Push ``stage`` on this process's stages of ``path`` and show the innermost one there (``_claim``); pop it at
    the end, showing the outer one again, or removing the file after the outermost."""
    path = path.resolve()                       # one stack per file, however the folder is spelled
    with _LOCK:
        stack = _STAGES.setdefault(path, [])
        mine = {"stage": stage, "command": command or (stack[-1]["command"] if stack else stage),
                "host": socket.gethostname(), "pid": os.getpid(), "pid_start": pid_start(os.getpid()),
                "started": time.time()}
        stack.append(mine)
        try:
            _claim(path)
        except OSError:
            pass
        _keep_beating()
    try:
        yield
    finally:
        with _LOCK:
            if mine in stack:
                stack.remove(mine)
            if not stack:
                _STAGES.pop(path, None)
            try:
                if is_this_process(read_marker(path) or {}):
                    if stack:
                        _claim(path)                # back to the outer stage of this process
                    else:
                        path.unlink()
            except OSError:
                pass


def _claim(path: Path) -> bool:
    """Write this process's innermost stage of ``path`` there with the time as its heartbeat, unless the marker of
    another process that may still run is there: that one is left alone (the heartbeat takes over once that
    process has ended: a ``gmpq finetune --sweep`` started during a sweep shows once the sweep is over). Under
    ``_LOCK``."""
    current = read_marker(path)
    if current is not None and not is_this_process(current) and driver_alive(current) is not False:
        return False
    atomic_write_json(path, {**_STAGES[path][-1], "heartbeat": time.time()})
    return True


# The heartbeat: every HEARTBEAT_S a thread rewrites the markers this process holds with the time, so that a
# marker of another host's process that died without removing it (SIGKILL, a lost node, a killed pod) is taken as
# ended once its heartbeat is older than STALE_AFTER_S (generous: the hosts' clocks may differ by minutes); a
# process on this host is checked by its pid instead. The same step writes a marker this process left alone
# once the process named there has ended (a retried batch job on a new node, after its killed predecessor's).
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
_LOCK = threading.Lock()             # marker writes of this process: its blocks and the heartbeat
_STAGES: dict[Path, list[dict]] = {}     # this process's stages per marker file, the innermost last
_beating: list[threading.Thread] = []


def _keep_beating() -> None:
    """Start the heartbeat thread unless it runs (under ``_LOCK``); it ends once this process marks nothing."""
    if _beating and _beating[0].is_alive():
        return
    _beating[:] = [threading.Thread(target=_beat, name="gmpq-marker-heartbeat", daemon=True)]
    _beating[0].start()


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _LOCK:
            if not _STAGES:
                _beating.clear()
                return
            beat_once()


def beat_once() -> None:
    """The heartbeat thread's step (under ``_LOCK``): each marker file this process has a stage in gets its
    innermost stage with the time, where it holds the file or the process there has ended (``_claim``)."""
    for path in list(_STAGES):
        try:
            _claim(path)
        except OSError:                  # the folder went away or the disk is full: the sweep says so itself
            pass


def stage_command(sweep_dir: str | Path) -> str | None:
    """The gmpq command running this process's innermost stage of ``sweep_dir`` ("run", "finetune", "sweep"); None
    when this process marks none there."""
    with _LOCK:
        stack = _STAGES.get((Path(sweep_dir) / DRIVER_FILE).resolve())
        return stack[-1]["command"] if stack else None


def release_all() -> None:
    """Remove every marker this process holds, whatever its stages (a process about to end at once: ``os._exit``
    after its Ray cluster was lost, where no block's ``finally`` runs); markers of other processes stay."""
    if not _LOCK.acquire(timeout=5.0):      # a heartbeat stuck in file I/O: its markers name a process about to end,
        return                              # which status then reads as ended
    try:
        for path in list(_STAGES):
            _STAGES.pop(path, None)
            try:
                if is_this_process(read_marker(path) or {}):
                    path.unlink()
            except OSError:
                pass
    finally:
        _LOCK.release()


def live_driver(sweep_dir: str | Path, name: str = DRIVER_FILE) -> dict | None:
    """The marker ``name`` (``driver.json`` or ``driver.finetune.json``) of another process still running a stage
    in ``sweep_dir``, with ``alive``: True (checked on this host) or None (it runs on another host, which cannot be
    checked from here); None when no other process is marked or the marked one has ended."""
    driver = read_marker(Path(sweep_dir) / name)
    if not driver or is_this_process(driver):
        return None
    alive = driver_alive(driver)
    return None if alive is False else {**driver, "alive": alive, "file": name}


_COMMANDS = {"run": "gmpq run", "sweep": "gmpq sweep", "finetune": "gmpq finetune --sweep"}


def driver_text(driver: dict) -> str:
    """``'gmpq run' (its sweep stage; pid 123 on host-a, started 2026-11-28 14:02:11)``: a marked process, as
    messages name it."""
    try:
        started = time.strftime(", started %Y-%m-%d %H:%M:%S", time.localtime(float(driver["started"])))
    except (KeyError, TypeError, ValueError, OverflowError):
        started = ""
    stage, command = str(driver.get("stage")), str(driver.get("command") or driver.get("stage"))
    inner = f"its {stage} stage; " if command != stage else ""
    return f"'{_COMMANDS.get(command, f'gmpq {command}')}' ({inner}pid {driver.get('pid')} on {driver.get('host')}" \
           f"{started})"


def ended_marker_text(sweep_dir: str | Path, name: str = DRIVER_FILE) -> str:
    """How to clear the marker ``name`` of a process that has ended (the refusals that name a live driver say it)."""
    return f"if it has ended (the pid is another program's now), delete {Path(sweep_dir) / name}"


def read_marker(path: Path) -> dict | None:
    """A marker file's content; None when missing, unreadable or not a JSON object."""
    try:
        data = read_json(path) if path.is_file() else None
    except CheckpointError:
        return None
    return data if isinstance(data, dict) else None


def is_this_process(marker: dict) -> bool:
    return marker.get("pid") == os.getpid() and marker.get("host") == socket.gethostname()


def pid_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux's /proc/PID/stat field 22); None elsewhere."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])   # fields after "pid (comm)" start at field 3
    except (OSError, ValueError, IndexError):
        return None


def driver_alive(driver: dict | None) -> bool | None:
    """True / False for a driver on this host; None when it runs elsewhere (cannot be checked from here). A pid
    alive but started at another time than the marker says (its driver ended, the pid was reused): False. Another
    host's driver whose heartbeat is older than ``STALE_AFTER_S``: False (it died without removing its marker)."""
    if not driver:
        return False
    if driver.get("host") != socket.gethostname():
        beat = driver.get("heartbeat")           # None in markers written before heartbeats
        stale = isinstance(beat, (int, float)) and time.time() - beat > STALE_AFTER_S
        return False if stale else None
    try:
        pid = int(driver["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                 # exists, another user's: its start time still tells
    except (OSError, ValueError, KeyError, TypeError):
        return True          # unreadable: assume it runs
    recorded, now = driver.get("pid_start"), pid_start(pid)
    return not (isinstance(recorded, int) and now is not None and now != recorded)
