"""Whether pareto.parquet's selection is of the sweep's trials as they are now: ``gmpq pareto`` records the completed
trials it selected from (``SELECTED_FROM``) and how it selected (``SELECTED_WITH``: top_k, budget buckets, GBitOPs
limit, or the trials picked by hand), in the file's schema metadata (``selection_meta``); a sweep that ran on since
(resumed, grown with ``--resume --n-trials``, a trial that ended after ``gmpq pareto`` ran) leaves it stale.
``stale_selection`` says so (an older pareto.parquet, without the record: when trials now on the front are not on its
front); ``gmpq sweep``'s summary, ``gmpq status`` and ``gmpq finetune --sweep`` say ``stale_text``, and ``gmpq
finetune --sweep`` selects again itself when the selection was made with the sweep config's settings as they are now
(``made_with``: ``CONFIG``), never over one made otherwise (a pick, another --top-k or --max-gbitops, a config
changed since) nor where that cannot be told (an older file).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

__all__ = ["SELECTED_FROM", "SELECTED_WITH", "StaleSelection", "stale_selection", "stale_text", "config_made",
           "selection_meta", "MadeWith", "made_with", "CONFIG", "HAND", "PICKED", "UNKNOWN"]

SELECTED_FROM = b"gmpq.selected_from"     # pareto.parquet's schema metadata: JSON list of the completed trial ids
SELECTED_WITH = b"gmpq.selected_with"     # ... and JSON {top_k, buckets, max_gbitops, picked}: how it selected

CONFIG, HAND, PICKED, UNKNOWN = "config", "hand", "picked", "unknown"      # MadeWith.how


def selection_meta(trials: pd.DataFrame, *, top_k: int, buckets: Sequence[float], max_gbitops: float | None,
                   picked: Sequence[str] | None) -> dict[bytes, bytes]:
    """The schema metadata ``write_pareto`` gives pareto.parquet: the completed trials (``pareto.completed_trials``)
    of ``trials`` it selected from, and the settings it selected with: ``top_k``, ``buckets``, the GBitOPs limit in
    force (None: none) and the full ids of the trials picked by hand (None: selected automatically; then top_k
    and the limit are not used: recorded as None)."""
    from .pareto import completed_trials

    done = sorted(str(t) for t in completed_trials(trials)["trial_id"])
    how = {"top_k": None if picked is not None else int(top_k), "buckets": sorted(float(b) for b in buckets),
           "max_gbitops": None if picked is not None or max_gbitops is None else float(max_gbitops),
           "picked": None if picked is None else sorted(str(t) for t in picked)}
    return {SELECTED_FROM: json.dumps(done).encode(), SELECTED_WITH: json.dumps(how).encode()}


@dataclass(frozen=True)
class MadeWith:
    """How pareto.parquet's selection was made, against the sweep config now: ``how`` is ``CONFIG`` (its settings),
    ``PICKED`` (``gmpq pareto --pick``), ``HAND`` (another --top-k or --max-gbitops, or a config changed since) or
    ``UNKNOWN`` (an older file that does not record it, whose front is too small to tell); ``flags``: the ``gmpq
    pareto`` flags that make it again (`` --pick t2``, `` --top-k 6``; "" where none would)."""
    how: str
    flags: str = ""


@dataclass(frozen=True)
class StaleSelection:
    """pareto.parquet's selection against trials.parquet now: ``made_from`` completed trials then (None: an older
    file that does not say), ``completed`` now, ``late``: those on the front now that its front lacks; ``made``: how
    it was made (``made_with``; None: not known here)."""
    made_from: int | None
    completed: int
    late: list[str] = field(default_factory=list)
    made: MadeWith | None = None


def _read(sweep_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """pareto.parquet as a DataFrame, and its schema metadata."""
    import pyarrow.parquet as pq

    from .results import PARETO_FILE, read_table

    path = Path(sweep_dir) / PARETO_FILE
    return read_table(path).to_pandas(), pq.read_schema(path).metadata or {}


def stale_selection(sweep_dir: str | Path, trials: pd.DataFrame | None = None,
                    cfg: dict | None = None) -> StaleSelection | None:
    """A ``StaleSelection`` when the sweep folder's pareto.parquet was selected from other completed trials than
    trials.parquet holds now (``trials``, when already read; an older pareto.parquet without ``SELECTED_FROM``: when
    trials now on the Pareto front are not on its front), with how it was made (``made_with`` against ``cfg``, the
    sweep config: read when not given); None when it is current, or either file is missing or cannot be read
    (nothing is claimed)."""
    from gmpq_core.errors import CheckpointError, GMPQError

    from .pareto import completed_trials, pareto_front
    from .results import PARETO_FILE, load_resolved_config, read_trials

    if not (Path(sweep_dir) / PARETO_FILE).is_file():
        return None
    try:
        pareto, meta = _read(sweep_dir)
        front_then = [str(t) for t in pareto["trial_id"]]
        trials = read_trials(sweep_dir) if trials is None else trials
        done = sorted(str(t) for t in completed_trials(trials)["trial_id"])
        front_now = [str(t) for t in pareto_front(trials)["trial_id"]]
        made = json.loads(meta[SELECTED_FROM]) if SELECTED_FROM in meta else None
    except (CheckpointError, OSError, KeyError, ValueError):
        return None
    late = [t for t in front_now if t not in front_then]
    if made is not None and sorted(map(str, made)) == done or made is None and not late:
        return None                                 # (an older file, its front alone: the selection stands)
    try:
        how = made_with(sweep_dir, load_resolved_config(sweep_dir) if cfg is None else cfg, pareto, meta)
    except (GMPQError, OSError, KeyError, ValueError):
        how = None
    return StaleSelection(None if made is None else len(made), len(done), late, how)


def _trials(n: int, what: str = "trial") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def stale_text(stale: StaleSelection, sweep_dir: str | Path, *, running: bool = False) -> str:
    """The one line of a stale selection, naming the ``gmpq pareto DIR`` that selects again (``running``: the sweep
    still runs: once it ends): with ``--pick`` for a pick (without it, gmpq pareto would select automatically), with
    the flags it was made with for another --top-k or --max-gbitops."""
    late = stale.late
    ids = f" ({', '.join(late[:5])}{f' and {len(late) - 5} more' if len(late) > 5 else ''})" if late else ""
    front = f"; {len(late)} trial(s) now on the Pareto front are not in it{ids}" if late else ""
    if stale.made_from is None:                     # (an older pareto.parquet: by its front)
        made, front = f"made before {len(late)} trial(s) now on the front ended{ids}", ""
    else:
        made = (f"made from {_trials(stale.made_from, 'completed trial')}, and {_trials(stale.completed)} "
                f"{'has' if stale.completed == 1 else 'have'} completed now")
    when = " once the sweep ends" if running else ""
    how = stale.made or MadeWith(UNKNOWN)
    if how.how == PICKED:
        command = (f"pick again{when} with: gmpq pareto {sweep_dir} --pick ID[,ID...] (it was picked by hand:"
                   f"{how.flags.removeprefix(' --pick')}; without --pick, gmpq pareto selects automatically)")
    elif how.flags:
        command = (f"select again{when} as it was made with: gmpq pareto {sweep_dir}{how.flags} (or without "
                   f"{' and '.join(re.findall(r'--[a-z-]+', how.flags))} for the sweep config's settings)")
    else:
        command = f"select again{when} with: gmpq pareto {sweep_dir}"
    return f"The Pareto selection (pareto.parquet) was {made}{front}: {command}"


def _config_settings(cfg: dict, sweep_dir: str | Path) -> tuple[int, list[float], float | None]:
    """The sweep config's finetune.top_k, budget_buckets (sorted) and finetune.max_gbitops (checked)."""
    from .pareto import DEFAULT_TOP_K
    from .pareto_pick import limit_in_force

    top_k = int((cfg.get("finetune") or {}).get("top_k") or DEFAULT_TOP_K)
    return top_k, sorted(float(b) for b in cfg.get("budget_buckets") or []), limit_in_force(None, cfg, sweep_dir)


def _same_limit(a: float | None, b: float | None) -> bool:
    return a is None and b is None or a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)


def _limit_flag(limit: float | None) -> str:
    return f" --max-gbitops {'none' if limit is None else f'{limit:g}'}"


def made_with(sweep_dir: str | Path, cfg: dict, pareto: pd.DataFrame | None = None,
              meta: dict | None = None) -> MadeWith:
    """How pareto.parquet's selection (``pareto`` and its schema ``meta`` when already read) was made, against the
    sweep config ``cfg`` as it is now: by its ``SELECTED_WITH`` record, the same top_k, budget buckets and GBitOPs
    limit as the config's (a flag given with the config's own value counts as the config's: selecting again with
    the config makes the same) is ``CONFIG``. An older file without the record: a pick by its reasons; a limit by
    the reasons' ``within the G GBitOPs limit``; a front (within the config's limit) no larger than the config's
    top_k cannot tell another --top-k (``UNKNOWN``); else the selection the config's settings make of its front
    compared. GMPQError/OSError: the file or the config cannot be read."""
    from .pareto import select_policies
    from .pareto_pick import PICK_REASON, limit_text, within

    if pareto is None or meta is None:
        pareto, meta = _read(sweep_dir)
    top_k, buckets, limit = _config_settings(cfg, sweep_dir)
    if SELECTED_WITH in meta:
        rec = json.loads(meta[SELECTED_WITH])
        if rec.get("picked") is not None:
            return MadeWith(PICKED, f" --pick {','.join(rec['picked'])}")
        flags = (f" --top-k {rec['top_k']}" if rec.get("top_k") != top_k else "") + \
            (_limit_flag(rec.get("max_gbitops")) if not _same_limit(rec.get("max_gbitops"), limit) else "")
        same = not flags and sorted(float(b) for b in rec.get("buckets") or []) == buckets
        return MadeWith(CONFIG if same else HAND, flags)
    if not len(pareto):
        return MadeWith(UNKNOWN)
    chosen = pareto[pareto["selected"].astype(bool)]
    reasons = [str(r) for r in chosen["selection_reason"]]
    if (pareto["selection_reason"] == PICK_REASON).any():
        return MadeWith(PICKED, f" --pick {','.join(sorted(map(str, chosen['trial_id'])))}")
    found = {float(g) for r in reasons for g in re.findall(r"within the (\S+) GBitOPs limit", r)}
    other = bool(found) if limit is None else not all(r.endswith(limit_text(limit)) for r in reasons)
    if other:                                       # another limit (or none where the config has one)
        return MadeWith(HAND, _limit_flag(next(iter(found), None)) if len(found) <= 1 else "")
    pool = int(within(pareto, limit).sum()) if limit is not None else len(pareto)
    if pool <= top_k:                               # any --top-k from pool up selects the same: cannot tell
        return MadeWith(UNKNOWN)
    again = select_policies(pareto.drop(columns=["selected", "selection_reason"]), top_k, buckets,
                            max_gbitops=limit)
    ids = lambda df: sorted(str(t) for t in df.loc[df["selected"].astype(bool), "trial_id"])  # noqa: E731
    if ids(again) == ids(pareto):
        return MadeWith(CONFIG)
    return MadeWith(HAND, f" --top-k {len(chosen)}" if len(chosen) != top_k else "")


def config_made(sweep_dir: str | Path, cfg: dict) -> bool:
    """Whether pareto.parquet's selection is the one the sweep config's settings make (``made_with``: ``CONFIG``):
    not picked by hand (``gmpq pareto --pick``), nor made with another ``--top-k`` or ``--max-gbitops``, nor with a
    config changed since. False when it cannot be told."""
    from gmpq_core.errors import GMPQError

    try:
        return made_with(sweep_dir, cfg).how == CONFIG
    except (GMPQError, OSError, KeyError, ValueError):
        return False
