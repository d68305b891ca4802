"""Sweep folders for the stale-selection tests (``test_pareto_stale*.py``): the demo config saved and trials completed
at the given (transfer top-1, BitOPs) points, written as the sweep writes them. Real Parquet files."""
from __future__ import annotations

from typing import Mapping

import pandas as pd

from orchestrator.results import PARETO_FILE, trial_row, write_results
from orchestrator.sweep_config import load_sweep_config, save_resolved_config


def sweep_with(d, ids, points: Mapping[str, tuple[float, float]], *, n_trials: int,
               finetune: dict | None = None) -> None:
    """The demo config (``finetune`` merged over its section) saved in ``d`` and the trials ``ids`` completed, each at
    its ``points`` entry."""
    over = {"out_dir": str(d), "n_trials": n_trials, **({"finetune": finetune} if finetune else {})}
    save_resolved_config(load_sweep_config(preset="demo", overrides=over))
    write_results(d, [trial_row(trial_id=t, config={"budget_avg_bits": 3.0}, status="completed",
                                last_result={"transfer_top1": points[t][0], "bitops": int(points[t][1]),
                                             "gbitops": points[t][1] / 1e9}) for t in ids], [])


def selected(d) -> list[str]:
    """The trial ids pareto.parquet in ``d`` selects, sorted."""
    df = pd.read_parquet(d / PARETO_FILE)
    return sorted(df.loc[df["selected"], "trial_id"])
