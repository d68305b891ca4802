"""The final stage's progress lines while a policy's Ray Train fit blocks (``_ProgressWatcher``; moved here from
``final_stage``, which imports it): a driver thread printing rank 0's progress file, never what an earlier run left.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from gmpq_core.errors import CheckpointError
from gmpq_core.fileio import read_json


class _ProgressWatcher:
    """Driver thread printing the rank-0 progress file while ``trainer.fit()`` blocks (every ``every_s``); what
    an earlier run left in the file (there when this watcher started) is not this run's progress: the file is
    removed as the watcher starts, and its content is not printed if it shows up again (compared by content,
    not by clock: rank 0 may run on another node)."""

    def __init__(self, path: Path, say: Callable[[str], None], prefix: str, epochs: int, every_s: float = 20.0):
        self.path, self.say, self.prefix, self.epochs, self.every_s = path, say, prefix, epochs, every_s
        try:
            self.stale = read_json(path)
        except (CheckpointError, OSError):
            self.stale = None
        path.unlink(missing_ok=True)   # nor does gmpq status show it while this run starts (rank 0 writes anew)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="finetune-progress", daemon=True)

    def _run(self) -> None:
        seen = None
        while not self._stop.wait(self.every_s):
            try:
                p = read_json(self.path)
            except CheckpointError:
                continue
            key = (p.get("epoch"), p.get("step"))
            if key != seen and p != self.stale:
                seen = key
                self.say(f"{self.prefix} epoch {p['epoch']}/{self.epochs}: step {p['step']}/{p['steps']}")

    def __enter__(self) -> "_ProgressWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
