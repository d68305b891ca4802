"""Run a few blocking jobs side by side in driver threads (the final stage's fine-tunes).

Each job is a call that blocks while Ray does the work elsewhere (``TorchTrainer.fit()``), so threads
are enough: the driver only waits. ``run_side_by_side(items, fn, slots)`` calls ``fn(item)`` for
every item, at most ``slots`` at once, in order of the items. With ``slots == 1`` every call runs in
the calling thread, one after the other, and the first error stops the rest (Ray Train's Ctrl-C
handler is installed only in the main thread). With more slots:

- a failing job does not stop the others: every job runs, and the first error (in item order) is
  raised once all have ended, so the results of the others are kept (their ``fn`` has recorded them);
- the threads are daemons and the caller waits in short joins, so Ctrl-C reaches the caller at once;
  leaving the Ray session then ends the jobs (a driver's Ray Train controllers die with it).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterable, TypeVar

__all__ = ["run_side_by_side", "side_by_side_slots"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def side_by_side_slots(n_jobs: int, per_job: int, available: int, cap: int | None = None) -> int:
    """How many jobs of ``per_job`` devices (CPUs or GPUs) fit at once in ``available``, at least 1."""
    fit = max(1, int(available) // max(1, int(per_job)))
    return max(1, min(int(n_jobs), fit, int(cap) if cap is not None else fit))


def run_side_by_side(items: Iterable[T], fn: Callable[[T], None], slots: int) -> None:
    items = list(items)
    if slots <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    todo: queue.Queue = queue.Queue()
    for i, item in enumerate(items):
        todo.put((i, item))
    errors: dict[int, BaseException] = {}

    def worker() -> None:
        while True:
            try:
                i, item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                fn(item)
            except BaseException as e:      # noqa: BLE001 - kept and re-raised in the caller's thread
                errors[i] = e

    threads = [threading.Thread(target=worker, name=f"side-by-side-{k}", daemon=True)
               for k in range(min(slots, len(items)))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)
    if errors:
        first = min(errors)
        for i in sorted(errors)[1:]:
            log.error("side-by-side job %d also failed: %s", i + 1, errors[i])
        raise errors[first]
