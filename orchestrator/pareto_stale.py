"""Whether pareto.parquet's selection is of the sweep's trials as they are now: ``gmpq pareto`` records the completed
trials it selected from (``SELECTED_FROM``, in the file's schema metadata); a sweep that ran on since (resumed, grown
with ``--resume --n-trials``, a trial that ended after ``gmpq pareto`` ran) leaves it stale. ``stale_selection`` says
so (an older pareto.parquet, without the record: when trials now on the front are not on its front); ``gmpq sweep``'s summary,
``gmpq status`` and ``gmpq finetune --sweep`` say ``stale_text``, and ``gmpq finetune --sweep`` selects again itself
when the selection was made with the sweep config's settings (``config_made``), never over one made by hand.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

__all__ = ["SELECTED_FROM", "StaleSelection", "stale_selection", "stale_text", "config_made", "selected_from_meta"]

SELECTED_FROM = b"gmpq.selected_from"     # pareto.parquet's schema metadata: JSON list of the completed trial ids


def selected_from_meta(trials: pd.DataFrame) -> dict[bytes, bytes]:
    """The schema metadata ``write_pareto`` gives pareto.parquet: the completed trials (``pareto.completed_trials``)
    of ``trials`` it selected from."""
    from .pareto import completed_trials

    return {SELECTED_FROM: json.dumps(sorted(str(t) for t in completed_trials(trials)["trial_id"])).encode()}


@dataclass(frozen=True)
class StaleSelection:
    """pareto.parquet's selection against trials.parquet now: ``made_from`` completed trials then (None: an older
    file that does not say), ``completed`` now, ``late``: those on the front now that its front lacks."""
    made_from: int | None
    completed: int
    late: list[str] = field(default_factory=list)


def stale_selection(sweep_dir: str | Path, trials: pd.DataFrame | None = None) -> StaleSelection | None:
    """A ``StaleSelection`` when the sweep folder's pareto.parquet was selected from other completed trials than
    trials.parquet holds now (``trials``, when already read; an older pareto.parquet without ``SELECTED_FROM``: when
    trials now on the Pareto front are not on its front); None when it is current, or either file is missing or
    cannot be read (nothing is claimed)."""
    import pyarrow.parquet as pq

    from gmpq_core.errors import CheckpointError

    from .pareto import completed_trials, pareto_front
    from .results import PARETO_FILE, read_table, read_trials

    path = Path(sweep_dir) / PARETO_FILE
    if not path.is_file():
        return None
    try:
        meta = pq.read_schema(path).metadata or {}
        front_then = [str(t) for t in read_table(path).column("trial_id").to_pylist()]
        trials = read_trials(sweep_dir) if trials is None else trials
        done = sorted(str(t) for t in completed_trials(trials)["trial_id"])
        front_now = [str(t) for t in pareto_front(trials)["trial_id"]]
        made = json.loads(meta[SELECTED_FROM]) if SELECTED_FROM in meta else None
    except (CheckpointError, OSError, KeyError, ValueError):
        return None
    late = [t for t in front_now if t not in front_then]
    if made is not None:
        return None if sorted(map(str, made)) == done else StaleSelection(len(made), len(done), late)
    return StaleSelection(None, len(done), late) if late else None      # (its front alone: the selection stands)


def stale_text(stale: StaleSelection, sweep_dir: str | Path, *, running: bool = False) -> str:
    """The one line of a stale selection, naming ``gmpq pareto DIR`` (``running``: the sweep still runs: once it
    ends)."""
    late = stale.late
    ids = f" ({', '.join(late[:5])}{f' and {len(late) - 5} more' if len(late) > 5 else ''})" if late else ""
    front = f"; {len(late)} trial(s) now on the Pareto front are not in it{ids}" if late else ""
    if stale.made_from is None:                     # (an older pareto.parquet: by its front)
        made, front = f"made before {len(late)} trial(s) now on the front ended{ids}", ""
    else:
        made = f"made from {stale.made_from} completed trial(s), and {stale.completed} have completed now"
    when = " once the sweep ends" if running else ""
    return f"The Pareto selection (pareto.parquet) was {made}{front}: select again{when} with: gmpq pareto {sweep_dir}"


def config_made(sweep_dir: str | Path, cfg: dict) -> bool:
    """Whether pareto.parquet's selection is the one the sweep config's settings make of its front (finetune.top_k,
    budget_buckets, finetune.max_gbitops): not picked by hand (``gmpq pareto --pick``), nor made with another
    ``--top-k`` or ``--max-gbitops``. False when it cannot be told."""
    from gmpq_core.errors import GMPQError

    from .pareto import DEFAULT_TOP_K, read_pareto, select_policies
    from .pareto_pick import PICK_REASON, limit_in_force

    try:
        pareto = read_pareto(sweep_dir)
        if not len(pareto) or (pareto["selection_reason"] == PICK_REASON).any():
            return False
        top_k = int((cfg.get("finetune") or {}).get("top_k") or DEFAULT_TOP_K)
        buckets = [float(b) for b in cfg.get("budget_buckets") or []]
        again = select_policies(pareto.drop(columns=["selected", "selection_reason"]), top_k, buckets,
                                max_gbitops=limit_in_force(None, cfg, sweep_dir))
    except (GMPQError, OSError, KeyError, ValueError):
        return False
    chosen = lambda df: sorted(str(t) for t in df.loc[df["selected"].astype(bool), "trial_id"])  # noqa: E731
    return chosen(again) == chosen(pareto)
