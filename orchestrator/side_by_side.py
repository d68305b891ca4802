"""Run a few blocking jobs side by side in driver threads (the final stage's fine-tunes).

Each job is a call that blocks while Ray does the work elsewhere (``TorchTrainer.fit()``), so threads
are enough: the driver only waits. ``run_side_by_side(items, fn, slots)`` calls ``fn(item)`` for
every item, at most ``slots`` at once, in order of the items:

- a failing job (an ``Exception``) does not stop the others: every job runs, and the first error in
  item order is raised once all have ended, so the others' results are kept (their ``fn`` recorded
  them). ``KeyboardInterrupt`` and other ``BaseException`` s (in any job) stop the rest and come back first;
- every job runs in a daemon thread (one slot: one thread, the items in order) while the caller waits
  in short joins with Python's own Ctrl-C handler in place, so Ctrl-C reaches the caller at once as
  ``KeyboardInterrupt``; no queued job starts after it, and leaving the Ray session ends the running
  ones (a driver's Ray Train controllers die with it). Not in the calling thread, even with one slot:
  ``TorchTrainer.fit()`` in the main thread installs Ray Train's own SIGINT handler, whose
  ``sys.exit(0)`` surfaces from ``ray.get`` as ``SystemExit(1)`` (the command ended with status 1 and
  no word); nor under a handler a Ray Tune run earlier in the process left installed, which only
  logs the first Ctrl-C (``ray_env.ctrl_c_signals(python_sigint=True)``, the handler before put back after).
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, TypeVar

from .ray_env import ctrl_c_signals

__all__ = ["run_side_by_side", "side_by_side_slots"]

T = TypeVar("T")


def side_by_side_slots(n_jobs: int, per_job: int, available: int, cap: int | None = None) -> int:
    """How many jobs of ``per_job`` devices (CPUs or GPUs) fit at once in ``available``, at least 1."""
    fit = max(1, int(available) // max(1, int(per_job)))
    return max(1, min(int(n_jobs), fit, int(cap) if cap is not None else fit))


def run_side_by_side(items: Iterable[T], fn: Callable[[T], None], slots: int) -> None:
    items = list(items)
    errors: dict[int, Exception] = {}
    todo: queue.Queue = queue.Queue()
    for i, item in enumerate(items):
        todo.put((i, item))
    stop = threading.Event()
    aborted: list[BaseException] = []

    def worker() -> None:
        while not stop.is_set():
            try:
                i, item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                fn(item)
            except Exception as e:      # noqa: BLE001 - the next jobs still run; raised in the caller's thread
                errors[i] = e
            except BaseException as e:  # KeyboardInterrupt, SystemExit: nothing more starts, raised first
                aborted.append(e)
                stop.set()
                return

    threads = [threading.Thread(target=worker, name=f"side-by-side-{k}", daemon=True)
               for k in range(max(1, min(slots, len(items))))]
    try:
        with ctrl_c_signals(sigterm=False, python_sigint=True):   # SIGTERM: as the caller has it
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
    finally:
        stop.set()                      # after Ctrl-C no queued job starts
    if aborted:
        raise aborted[0]
    if errors:
        raise errors[min(errors)]
