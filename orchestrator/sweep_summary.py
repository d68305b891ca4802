"""A sweep's summary: ``SweepSummary`` (what ``run_sweep`` returns), its rows read from Tune's ResultGrid
(``_summary_rows``), and the summary of a sweep whose planned trials all ended, read from trials.parquet
(``_finished_summary``: a resume with nothing left to run). ``orchestrator.sweep`` re-exports all three."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .results import has_ended
from .sweep_config import SweepConfig
from .trial_status import UNFINISHED, TrialStatusBook

__all__ = ["SweepSummary"]


@dataclass(frozen=True)
class SweepSummary:
    sweep_dir: Path
    n_completed: int
    n_pruned: int
    n_failed: int
    wall_seconds: float
    resumed: bool = False
    rows: list[dict] = field(default_factory=list)   # one per trial: id, status, key metrics
    n_unfinished: int = 0        # trials stopped midway (the sweep interrupted): a resume runs them again
    n_planned: int | None = None   # the sweep's n_trials
    terminated: bool = False     # stopped by SIGTERM (exit 143), not Ctrl-C (130)
    grown_from: int | None = None  # a resume that raised n_trials: the count before (``sweep_grow``)

    @property
    def n_trials(self) -> int:
        """Trials that ended: completed, pruned or failed."""
        return self.n_completed + self.n_pruned + self.n_failed

    @property
    def interrupted(self) -> bool:
        """Whether the sweep stopped before all its trials ended (Ctrl-C, a stopped driver)."""
        return self.n_unfinished > 0 or (self.n_planned is not None and self.n_trials < self.n_planned)


def _summary_rows(grid: Any, book: TrialStatusBook, sweep_dir: Path) -> list[dict]:
    """The summary's rows; a stopped trial's proxy_top1 as ``gmpq status`` shows it (its last epoch in
    trial_events.jsonl, which the trial writes itself: Tune may not have passed that report on before the stop)."""
    from .sweep_status import last_epoch_proxy_top1

    events = last_epoch_proxy_top1(sweep_dir)
    rows = []
    for r in grid:
        m = r.metrics or {}
        tid = m.get("trial_id") or (r.path and Path(r.path).name)
        ended = r.error is not None or has_ended(str(tid), m, book)
        status = book.status_of(tid, errored=r.error is not None) if ended else UNFINISHED
        seen = status == UNFINISHED and m.get("proxy_top1") is None
        rows.append({"trial_id": tid, "status": status, "budget_avg_bits": (r.config or {}).get("budget_avg_bits"),
                     "proxy_top1": events.get(str(tid)) if seen else m.get("proxy_top1"), "transfer_top1": m.get("transfer_top1"),
                     "gbitops": m.get("gbitops"), "epoch": m.get("epoch")})
    return rows


def _finished_summary(cfg: SweepConfig, t0: float) -> SweepSummary | None:
    """The summary of a sweep whose planned trials all ended, none failed (a resume would do nothing), read from
    trials.parquet; None otherwise."""
    from .results import read_trials

    df = read_trials(cfg.out_dir, missing_ok=True)
    if len(df) < cfg.n_trials or (df["status"] == "failed").any():
        return None
    rows = [{"trial_id": r["trial_id"], "status": r["status"], "budget_avg_bits": r.get("param_budget_avg_bits"),
             **{k: r.get(k) for k in ("proxy_top1", "transfer_top1", "gbitops")}, "epoch": r.get("last_epoch")}
            for r in df.to_dict("records")]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "pruned")}
    return SweepSummary(sweep_dir=Path(cfg.out_dir), n_completed=counts["completed"], n_pruned=counts["pruned"],
                        n_failed=0, wall_seconds=time.perf_counter() - t0, resumed=True, rows=rows,
                        n_planned=cfg.n_trials)
