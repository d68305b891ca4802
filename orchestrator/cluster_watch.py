"""Watching the Ray cluster a driver runs on, so that losing it ends the command cleanly.

When a cluster stops under a running sweep (``gmpq cluster down``, ``ray stop``, a lost head node), Ray's
driver keeps waiting: Tune's loop blocks on the dead GCS (a Ctrl-C cannot stop it either), and after 60 s
Ray's core worker ends the process with one C++ log line, skipping every ``finally``: no summary, no
``--resume`` command, the driver marker left behind.

``watching_cluster(on_lost)``: inside a Ray session, a daemon thread connects to the cluster's GCS (its
head node's port) every second; once it has not answered for ``lost_after_s()`` seconds (10 by default,
``$GMPQ_CLUSTER_LOST_AFTER_S`` up to 30: a cluster whose GCS restarts, e.g. KubeRay's GCS fault tolerance,
may need longer), it calls ``on_lost(address, seconds)``, which says what happened and ends the process
with ``exit_lost``: status ``LOST_STATUS`` (75, EX_TEMPFAIL: try again later). A Ray Client connection
(``ray://``) is not watched (its own reconnect raises in the driver).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
import threading
import time
from typing import Callable, Iterator, NoReturn, TypeVar

from gmpq_core.errors import ConfigError

from .ray_env import stop_status, terminated

__all__ = ["LOST_STATUS", "LOST_AFTER_ENV", "ClusterWatch", "watching_cluster", "lost_after_s", "gcs_answers",
           "exit_lost", "split_address", "lost_text", "join_hint", "bounded"]

log = logging.getLogger(__name__)
T = TypeVar("T")

LOST_STATUS = 75                     # sysexits' EX_TEMPFAIL: the work can go on later (a batch job retries it)
LOST_AFTER_ENV = "GMPQ_CLUSTER_LOST_AFTER_S"
DEFAULT_LOST_AFTER_S = 10.0
MAX_LOST_AFTER_S = 30.0              # Ray's core worker ends the driver once its GCS is gone 60 s: the verdict,
TEXT_S = 5.0                         # the paragraph (read from the folder: ``bounded``) and
CLEANUP_S = 15.0                     # the caller's cleanup (MLflow writes) all fit before it


def lost_after_s() -> float:
    """Seconds the GCS may not answer before the cluster counts as lost: ``$GMPQ_CLUSTER_LOST_AFTER_S`` or 10."""
    raw = os.environ.get(LOST_AFTER_ENV, "").strip()
    if not raw:
        return DEFAULT_LOST_AFTER_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 1.0 <= value <= MAX_LOST_AFTER_S:
        raise ConfigError(f"${LOST_AFTER_ENV}={raw!r} is not a number of seconds from 1 to {MAX_LOST_AFTER_S:g}: it "
                          "is how long the Ray cluster's head may not answer before a gmpq command stops (Ray itself "
                          f"gives up after 60 s). Set it to e.g. 30, or unset it for the default "
                          f"({DEFAULT_LOST_AFTER_S:g}).")
    return value


def split_address(address: str) -> tuple[str, int] | None:
    """``"host:port"`` (``"[v6]:port"``) as ``(host, port)``; None if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


_SILENT = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN,
           errno.ENETDOWN, errno.ECONNABORTED}


def gcs_answers(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to the GCS opens within ``timeout`` seconds. Only a refused, reset, timed-out or
    unreachable connection counts as silence; an error of this process (out of file handles or ports, a name
    lookup that failed) says nothing about the cluster and counts as an answer."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (socket.timeout, TimeoutError):
        return False
    except OSError as e:
        if e.errno in _SILENT:
            return False
        log.debug("cannot probe the Ray GCS at %s:%s (%s): not counted as silence", host, port, e)
        return True


class ClusterWatch:
    """A daemon thread probing ``address`` every ``interval_s``; calls ``on_lost(address, seconds)`` once, when the
    probe has failed for ``lost_after`` seconds since it last answered (or since the watch started). ``on_lost``
    is meant to end the process (``exit_lost``); one that raises gets a short paragraph and the exit instead."""

    def __init__(self, address: str, on_lost: Callable[[str, float], None], *, lost_after: float,
                 interval_s: float = 1.0, probe: Callable[[str, int, float], bool] = gcs_answers) -> None:
        where = split_address(address)
        if where is None:
            raise ValueError(f"not a HOST:PORT address: {address!r}")
        self.address, self._where = address, where
        self.on_lost, self.lost_after, self.interval_s, self.probe = on_lost, lost_after, interval_s, probe
        self._stop = threading.Event()
        self._handled = threading.Event()      # on_lost has returned (in a driver it never does: the process ends)
        self._thread: threading.Thread | None = None
        self.lost = False

    def start(self) -> "ClusterWatch":
        self._thread = threading.Thread(target=self._run, name="gmpq-cluster-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the watch; once the cluster counted as lost, wait for ``on_lost`` (the process ends there)."""
        self._stop.set()
        if self.lost:
            self._handled.wait()
        elif self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def settle(self) -> None:
        """Called as the watched work fails (a Ray error surfaces in the driver before the watch's verdict: Ray
        Train's actors on a dead head): while the GCS does not answer, wait for the verdict (``on_lost`` ends the
        process); return at once when it answers, or once it answers again (the error was the work's own)."""
        deadline = time.monotonic() + self.lost_after + 5.0
        while not self._stop.is_set() and not self.lost and time.monotonic() < deadline:
            if self.probe(*self._where, 1.0):
                return
            time.sleep(0.2)
        if self.lost:
            self._handled.wait()

    def _run(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.interval_s):
            if self.probe(*self._where, min(2.0, max(self.interval_s, 0.2))):
                last_ok = time.monotonic()
                continue
            silent = time.monotonic() - last_ok
            if silent >= self.lost_after and not self._stop.is_set():
                self.lost = True
                try:
                    self.on_lost(self.address, silent)
                except Exception as e:  # noqa: BLE001 - the command must still end with a word and the status
                    exit_lost(f"gmpq: the Ray cluster at {self.address} stopped answering {silent:.0f} s ago; the "
                              f"command stops here (what it kept could not be read: {e}). Continue it with its "
                              f"--resume once a cluster runs again. Exit status {LOST_STATUS}.")
                finally:
                    self._handled.set()
                return


def _gcs_address() -> str | None:
    """The running Ray session's GCS address; None under Ray Client or when it cannot be read."""
    import ray

    try:
        from ray.util.client import ray as client

        if client.is_connected() or not ray.is_initialized():     # (get_runtime_context would start a Ray)
            return None
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - no watch is better than a failed command
        return None
    return address if isinstance(address, str) and split_address(address) else None


@contextlib.contextmanager
def watching_cluster(on_lost: Callable[[str, float], None]) -> Iterator[ClusterWatch | None]:
    """Inside a Ray session: watch its cluster (``ClusterWatch``) while the block runs; None when not watched. An
    exception leaving the block waits for the watch's verdict first (``settle``): a lost cluster ends the process
    with its paragraph, not with the error Ray raised for it."""
    after = lost_after_s()
    address = _gcs_address()
    if address is None:
        yield None
        return
    watch = ClusterWatch(address, on_lost, lost_after=after).start()
    try:
        yield watch
    except Exception:
        watch.settle()
        raise
    finally:
        watch.stop()


def lost_text(command: str, address: str, seconds: float, *, local: bool, work: str, rest: str) -> str:
    """The paragraph a command ends with once its cluster is lost: ``gmpq <command>: <which Ray stopped answering>,
    so <work> stops here ... <rest> Exit status 75.`` (``local``: the Ray this process started on this machine). After
    a SIGTERM (``ray_env.terminated``: sent to the whole process group, as systemd and Slurm do, it stops the local
    Ray too) the stop is the SIGTERM's: said so, status 143."""
    if local and terminated():
        what = (f"the command got SIGTERM, and so did the Ray instance it started on this machine (GCS {address}, "
                "silent since: the signal went to the whole process group, as systemd and Slurm send it)")
        return f"gmpq {command}: {what}, so {work} was terminated (SIGTERM). {rest} Exit status {lost_status()}."
    what = (f"the Ray instance this process started on this machine (GCS {address}) stopped answering {seconds:.0f} s "
            "ago (stopped by 'ray stop', or killed, e.g. by the out-of-memory killer)" if local else
            f"the Ray cluster at {address} stopped answering {seconds:.0f} s ago (its head node's GCS: the cluster was "
            "stopped, or its head node or the network to it was lost)")
    return (f"gmpq {command}: {what}, so {work} stops here instead of waiting for Ray to give up. {rest} "
            f"Exit status {lost_status()}.")


def lost_status() -> int:
    """``LOST_STATUS``, or 143 when the command got SIGTERM first (it was asked to stop: a batch system's status)."""
    return stop_status(True) if terminated() else LOST_STATUS


def join_hint(local: bool) -> str:
    """What a command that continues the work adds to join a cluster again ("" for a local Ray)."""
    return "" if local else (" --address ADDRESS (the cluster's address once it runs again: 'gmpq cluster up' prints "
                             "a new one; --address auto finds the one it recorded)")


def bounded(fn: Callable[[], T], default: T, timeout: float = TEXT_S) -> T:
    """``fn()`` if it returns within ``timeout`` seconds without raising, else ``default``: a lost cluster's
    paragraph reads the folder, which may sit on storage that went with the cluster (NFS served by the head, S3)."""
    box: list = []

    def run() -> None:
        try:
            box.append(fn())
        except Exception as e:  # noqa: BLE001 - the default stands in
            log.debug("while wording the lost cluster's paragraph: %s", e)

    worker = threading.Thread(target=run, name="gmpq-lost-text", daemon=True)
    worker.start()
    worker.join(timeout)
    return box[0] if box else default


def exit_lost(text: str, cleanup: Callable[[], None] | None = None, *, summary: str | None = None) -> NoReturn:
    """Print ``summary`` where the command's summary goes (stdout: what is kept, the command that continues; as every
    other end of the command prints it, so ``gmpq sweep ... > log`` keeps it) and ``text``, the paragraph of what
    happened, on stderr; run ``cleanup`` for at most ``CLEANUP_S`` seconds (never raising), remove this process's
    driver markers, and end the process with ``lost_status()``. Called from the watch thread while the main thread
    is stuck in Ray: ``os._exit``, since nothing would reach the main thread's handlers."""
    if summary:
        _quietly(lambda: print(summary, flush=True))       # (a closed stdout must not cost the paragraph)
    print(text, file=sys.stderr, flush=True)
    if cleanup is not None:
        worker = threading.Thread(target=_quietly, args=(cleanup,), name="gmpq-lost-cleanup", daemon=True)
        worker.start()
        worker.join(CLEANUP_S)
    from .driver_markers import release_all

    _quietly(release_all)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(lost_status())


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the process ends next: a failed cleanup step only logs
        log.warning("while stopping after the Ray cluster was lost: %s", e)
