"""Pareto front of a sweep on (transfer_top1 up, bitops down) and a spread-out selection of K policies.

A completed trial ``i`` is dominated when some completed trial ``j`` is at least as accurate and at
most as costly, and strictly better in one of the two:
``acc_j >= acc_i and bitops_j <= bitops_i and (acc_j > acc_i or bitops_j < bitops_i)``.
Identical points do not dominate each other (both stay on the front).

Selection of K policies along the front (deterministic; ties broken by lower BitOPs, then trial_id):
1. the knee: in coordinates normalised to [0, 1] over the front, the point farthest from the straight
   line through the front's two end points (needs 3+ points and a nonzero distance);
2. the most accurate point of every budget bucket (buckets are avg-bit edges, e.g. [2.75, 3.5, 4.5]);
3. if fewer than K were chosen, further front points.
Within steps 2 and 3, the next point is the one farthest (in normalised coordinates) from the points
already chosen (greedy max-min spread), so K smaller than the number of buckets still spreads out.

A BitOPs limit G (GBitOPs = bitops / 1e9, the ``gbitops`` column) runs steps 1-3 among the front's points with
GBitOPs <= G only, as if they were the whole front; the front itself stays whole. Trials picked by hand replace
steps 1-3 (``pareto_pick``: the checks of both).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from gmpq_core.errors import ConfigError, GMPQError
from search_spaces.space import bucket_label

from .results import PARETO_FILE, load_resolved_config, read_table, read_trials_table, rows_to_table, write_table
from .text import fmt, text_table

__all__ = ["DEFAULT_TOP_K", "PARETO_PNG", "dominated_mask", "completed_trials", "pareto_front", "bucket_index",
           "bucket_label", "select_policies", "write_pareto", "read_pareto", "format_pareto_table", "export_policies",
           "POLICIES_DIR", "POLICIES_PNG", "check_selectable", "no_completed_text"]

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 3
PARETO_PNG = "pareto.png"
POLICIES_PNG = "policies.png"     # the selected policies' per-layer bits
ACC, COST = "transfer_top1", "bitops"


def dominated_mask(acc: Sequence[float], cost: Sequence[float]) -> np.ndarray:
    """Boolean mask: True where a point is dominated (accuracy up, cost down). O(n^2) memory, n <= ~5k."""
    a = np.asarray(acc, dtype=float)[:, None]
    c = np.asarray(cost, dtype=float)[:, None]
    no_worse = (a.T >= a) & (c.T <= c)             # [i, j]: j is at least as good as i on both axes
    better = (a.T > a) | (c.T < c)
    return (no_worse & better).any(axis=1)


def completed_trials(df: pd.DataFrame) -> pd.DataFrame:
    """Completed trials with both objectives present."""
    if df.empty or ACC not in df or COST not in df:
        return df.iloc[0:0]
    ok = (df["status"] == "completed") & df[ACC].notna() & df[COST].notna()
    return df[ok]


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values([COST, ACC, "trial_id"], ascending=[True, False, True], kind="mergesort")


def pareto_front(df: pd.DataFrame) -> pd.DataFrame:
    """Non-dominated completed trials, sorted by BitOPs ascending (then accuracy descending, trial_id)."""
    done = completed_trials(df)
    if done.empty:
        return done.copy()
    front = done[~dominated_mask(done[ACC].to_numpy(), done[COST].to_numpy())]
    return _sorted(front).reset_index(drop=True)


def bucket_index(df: pd.DataFrame, buckets: Sequence[float]) -> np.ndarray:
    """Budget bucket per row: the trial's ``budget_bucket`` if reported, else from ``budget_avg_bits``.

    With edges ``e`` (ascending), bucket 0 is ``avg_bits < e[0]``, bucket i is ``e[i-1] <= avg_bits < e[i]``,
    the last is ``avg_bits >= e[-1]``. Rows with neither value get bucket 0.
    """
    n = len(df)
    out = np.zeros(n, dtype=np.int64)
    given = df["budget_bucket"].to_numpy(dtype=float) if "budget_bucket" in df else np.full(n, np.nan)
    bits = df["budget_avg_bits"].to_numpy(dtype=float) if "budget_avg_bits" in df else np.full(n, np.nan)
    edges = np.asarray(sorted(float(b) for b in buckets), dtype=float)
    for i in range(n):
        if not math.isnan(given[i]):
            out[i] = int(given[i])
        elif not math.isnan(bits[i]) and len(edges):
            out[i] = int(np.searchsorted(edges, bits[i], side="right"))   # = search_spaces.space.bucket_of
    return out


def _normalised(front: pd.DataFrame) -> np.ndarray:
    pts = np.stack([front[COST].to_numpy(dtype=float), front[ACC].to_numpy(dtype=float)], axis=1)
    lo, span = pts.min(axis=0), np.ptp(pts, axis=0)
    return (pts - lo) / np.where(span > 0, span, 1.0)


def _knee(xy: np.ndarray) -> int | None:
    """Index of the point farthest from the line through the first and last point (None if all on it)."""
    if len(xy) < 3:
        return None
    p, q = xy[0], xy[-1]
    d = q - p
    norm = float(np.hypot(*d))
    if norm == 0:
        return None
    dist = np.abs(d[0] * (p[1] - xy[:, 1]) - d[1] * (p[0] - xy[:, 0])) / norm
    i = int(np.argmax(dist))            # argmax returns the first maximum: lowest BitOPs wins ties
    return i if dist[i] > 1e-12 else None


def _spread_pick(candidates: list[int], chosen: list[int], xy: np.ndarray, acc: np.ndarray) -> int:
    """Candidate farthest from the chosen ones (first chosen: the most accurate); ties: lowest position."""
    if not chosen:
        return max(candidates, key=lambda i: (acc[i], -i))
    def gap(i: int) -> float:
        return min(float(np.hypot(*(xy[i] - xy[j]))) for j in chosen)
    return max(candidates, key=lambda i: (round(gap(i), 12), -i))


def _choose(front: pd.DataFrame, top_k: int, buckets: Sequence[float]) -> dict[int, str]:
    """Positions in ``front`` (sorted as ``pareto_front`` sorts it) of the policies selected -> their reasons."""
    if front.empty:
        return {}
    reasons: dict[int, list[str]] = {}
    chosen: list[int] = []
    xy, acc = _normalised(front), front[ACC].to_numpy(dtype=float)
    bucket = bucket_index(front, buckets)
    knee = _knee(xy)
    best_of: dict[int, int] = {}
    for i in range(len(front)):     # front is sorted by BitOPs up, accuracy down: first max wins ties
        b = int(bucket[i])
        if b not in best_of or acc[i] > acc[best_of[b]]:
            best_of[b] = i
    for b, i in best_of.items():
        reasons.setdefault(i, []).append(f"best in bucket {b} ({bucket_label(b, buckets)} avg bits)")
    if knee is not None:
        reasons.setdefault(knee, []).insert(0, "knee of the front")
        chosen.append(knee)
    for step in ("buckets", "spread"):
        pool = sorted(set(best_of.values()) - set(chosen)) if step == "buckets" else \
            [i for i in range(len(front)) if i not in chosen]
        while pool and len(chosen) < top_k:
            i = _spread_pick(pool, chosen, xy, acc)
            pool.remove(i)
            chosen.append(i)
            if step == "spread":
                reasons.setdefault(i, []).append("spread along the front")
    return {i: "; ".join(dict.fromkeys(reasons[i])) for i in chosen[:top_k]}


def select_policies(df: pd.DataFrame, top_k: int, buckets: Sequence[float] = (), *, max_gbitops: float | None = None,
                    picks: Sequence[str] | None = None, sweep_dir: str | Path | None = None) -> pd.DataFrame:
    """The Pareto front of ``df`` with columns ``selected`` (bool) and ``selection_reason`` (str) added.

    ``max_gbitops`` (GBitOPs = ``bitops / 1e9``, pareto.parquet's ``gbitops``): the selection runs among the front's
    policies that cost at most that, as if they were the whole front; the others stay on the front, unselected
    (reason ``over the G GBitOPs limit``), and the selected ones' reasons end ``within the G GBitOPs limit``. None on
    the front fits: ConfigError (``pareto_pick.no_fit_text``). ``picks`` (trial ids or unique prefixes): exactly
    those are selected (reason ``picked by hand``), ``top_k`` and ``buckets`` unused; each must be a completed trial
    on the front (ConfigError otherwise, ``pareto_pick.check_picks``); not with ``max_gbitops``. ``sweep_dir``: named
    in those refusals.
    """
    from .pareto_pick import PICK_REASON, check_max_gbitops, check_picks, limit_text, no_fit_text, within

    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ConfigError(f"top_k must be a positive integer (how many policies to fine-tune), "
                          f"but got top_k={top_k!r}.")
    limit = check_max_gbitops(max_gbitops, "max_gbitops")
    front = pareto_front(df)
    over: dict[int, str] = {}           # front policies over the limit: why they were not selectable
    if picks is not None:
        if limit is not None:
            raise ConfigError(f"Hand-picked trials are selected as they are: a limit (max_gbitops={limit:g}) does not "
                              "apply to them. Give either the picks or the limit.")
        chosen = set(check_picks(df, front, picks, sweep_dir))
        reason = {i: PICK_REASON for i, t in enumerate(front["trial_id"].astype(str)) if t in chosen}
    elif limit is None:
        reason = _choose(front, top_k, buckets)
    else:
        fits = np.flatnonzero(within(front, limit)) if len(front) else np.zeros(0, dtype=np.int64)
        if len(front) and not len(fits):
            raise ConfigError(no_fit_text(front, limit, sweep_dir))
        within = _choose(front.iloc[fits].reset_index(drop=True), top_k, buckets)
        reason = {int(fits[j]): f"{r}; {limit_text(limit)}" for j, r in within.items()}
        over = {i: f"over the {limit:g} GBitOPs limit" for i in range(len(front)) if i not in set(fits.tolist())}
    front = front.copy()
    front["selected"] = [i in reason for i in range(len(front))]
    front["selection_reason"] = [reason.get(i, over.get(i, "")) for i in range(len(front))]
    return front


def no_completed_text(sweep_dir: str | Path, trials_df: pd.DataFrame) -> str | None:
    """None when some trial of ``trials_df`` (trials.parquet) is selectable (``completed_trials``: completed, with
    transfer_top1 and bitops); else the one paragraph saying why there is nothing to select and what to do (shared by
    ``gmpq pareto``, ``gmpq status`` and ``gmpq run``). A trial stored as completed without transfer_top1 or bitops
    (non-finite results are stored as null) is named as such: ``--resume`` does not run it again."""
    if not completed_trials(trials_df).empty:
        return None
    sweep_dir = Path(sweep_dir)
    status = trials_df["status"] if len(trials_df) and "status" in trials_df else pd.Series([], dtype=object)
    counts = status.value_counts().to_dict()
    seen = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trial yet"
    n_bad = int(counts.get("completed", 0))          # completed, yet not selectable: a result is missing
    text = (f"No trial of the sweep {sweep_dir} completed{' with transfer_top1 and BitOPs' if n_bad else ''} "
            f"({seen}), so there is no Pareto front and nothing to select.")
    if n_bad:
        text += (f" {n_bad} completed without transfer_top1/BitOPs (non-finite results): 'gmpq sweep --resume' does "
                 f"not run a completed trial again; see their rows in {sweep_dir / 'trials.parquet'} and their Ray "
                 "trial folders, fix the cause (e.g. a diverging search) and run a new sweep.")
    if n_bad < len(trials_df) or not len(trials_df):
        text += (f" See {sweep_dir / 'trials.parquet'} and 'gmpq status --sweep {sweep_dir}'; fix the cause and "
                 f"continue the sweep with: gmpq sweep --out {sweep_dir} --resume (failed trials run again).")
    return text


def check_selectable(sweep_dir: str | Path, trials: pd.DataFrame | None = None) -> pd.DataFrame:
    """``<sweep_dir>/trials.parquet`` (``trials`` when given: already read), or GMPQError (exit 2) when no trial
    completed with transfer_top1 and bitops (``no_completed_text``): then there is nothing to select, and ``gmpq
    pareto`` says so before it writes anything (it used to draw empty plots first)."""
    from .results import read_trials

    if trials is None:
        trials = read_trials(sweep_dir)           # CheckpointError naming the file if missing or damaged
    text = no_completed_text(sweep_dir, trials)
    if text is not None:
        raise GMPQError(f"{text} gmpq pareto wrote nothing.")
    return trials


def write_pareto(sweep_dir: str | Path, top_k: int | None = None, *, buckets: Sequence[float] | None = None,
                 plot: bool = True, cfg: dict | None = None, table: pa.Table | None = None,
                 max_gbitops: float | str | None = None, picks: Sequence[str] | None = None) -> pd.DataFrame:
    """Select from ``<sweep_dir>/trials.parquet``; write ``pareto.parquet`` (atomic), ``pareto.png`` and
    ``policies.png`` (the selected policies' per-layer bits). A refused selection writes nothing.

    ``top_k``, ``buckets`` and ``max_gbitops`` default to the sweep config's ``finetune.top_k``, ``budget_buckets``
    and ``finetune.max_gbitops`` (``max_gbitops="none"``: no limit). ``picks``: exactly those trials are selected
    (``select_policies``); the config's limit does not apply to them, a ``max_gbitops`` given is refused.
    pareto.parquet has the trials.parquet columns (same types) plus ``selected`` and ``selection_reason``; its schema
    metadata records the completed trials selected from and the settings used (``pareto_stale.selection_meta``).
    ``cfg`` (the sweep config) and ``table`` (trials.parquet as Arrow) spare reading them again when already read.
    """
    sweep_dir = Path(sweep_dir)
    if cfg is None:
        cfg = load_resolved_config(sweep_dir)
    if top_k is None:
        top_k = int((cfg.get("finetune") or {}).get("top_k") or DEFAULT_TOP_K)
    if buckets is None:
        buckets = [float(b) for b in cfg.get("budget_buckets") or []]
    if table is None:
        table = read_trials_table(sweep_dir)     # CheckpointError naming the file if not gmpq's table
    from .pareto_pick import limit_in_force

    limit = limit_in_force(max_gbitops, {} if picks is not None else cfg, sweep_dir)
    trials = table.to_pandas()
    sel = select_policies(trials, top_k, buckets, max_gbitops=limit, picks=picks, sweep_dir=sweep_dir)
    by_id = {str(r["trial_id"]): r for r in table.to_pylist()}
    rows = [dict(by_id[str(t)], selected=bool(s), selection_reason=str(r))
            for t, s, r in zip(sel["trial_id"], sel["selected"], sel["selection_reason"])]
    schema = table.schema.append(pa.field("selected", pa.bool_())).append(pa.field("selection_reason", pa.string()))
    from .pareto_stale import selection_meta     # the trials it selected from, and how: a later look says if stale
    picked = None if picks is None else [str(t) for t in sel.loc[sel["selected"], "trial_id"]]
    meta = selection_meta(trials, top_k=top_k, buckets=buckets, max_gbitops=limit, picked=picked)
    out = rows_to_table(rows, schema.with_metadata({**(schema.metadata or {}), **meta}))
    write_table(sweep_dir / PARETO_FILE, out)
    export_policies(sweep_dir, rows, cfg.get("name"))
    result = out.to_pandas()
    if plot:
        from .plots import plot_pareto, plot_policies
        plot_pareto(trials, result, sweep_dir / PARETO_PNG, buckets=buckets, max_gbitops=limit)
        plot_policies(result, sweep_dir / POLICIES_PNG)
    return result


POLICIES_DIR = "policies"


def export_policies(sweep_dir: Path, front_rows: Sequence[dict], sweep_name: str | None = None) -> Path:
    """``<sweep_dir>/policies/<trial_id>.json``: each Pareto policy as a file ``gmpq finetune --policy``
    takes, its meta naming the sweep, the trial and its results. The folder holds the current front only."""
    from gmpq_core.errors import PolicyMismatchError
    from gmpq_core.fileio import atomic_write_text
    from gmpq_core.policy import BitPolicy

    folder = sweep_dir / POLICIES_DIR
    folder.mkdir(exist_ok=True)
    keep = set()
    for r in front_rows:
        if not r.get("policy_json"):
            continue
        try:
            policy = BitPolicy.from_json(str(r["policy_json"]))
        except PolicyMismatchError as e:      # a damaged row: the table still has it, the folder does not
            log.warning("trial %s: its policy_json is not a bit policy (%s); not exported", r["trial_id"], e)
            continue
        meta = {**policy.meta, "sweep": sweep_name, "sweep_dir": str(sweep_dir), "trial_id": str(r["trial_id"]),
                "transfer_top1": r.get("transfer_top1"), "gbitops": r.get("gbitops"), "selected": bool(r.get("selected"))}
        name = f"{r['trial_id']}.json"
        atomic_write_text(folder / name, BitPolicy(layers=policy.layers, fingerprint=policy.fingerprint,
                                                   meta=meta).to_json() + "\n")
        keep.add(name)
    for stale in folder.glob("*.json"):
        if stale.name not in keep:
            stale.unlink()
    return folder


def read_pareto(sweep_dir: str | Path) -> pd.DataFrame:
    """``<sweep_dir>/pareto.parquet`` (CheckpointError naming the file if missing or damaged)."""
    return read_table(Path(sweep_dir) / PARETO_FILE).to_pandas()


def format_pareto_table(df: pd.DataFrame, buckets: Sequence[float] = ()) -> str:
    """Plain-text aligned table of a Pareto DataFrame (``*`` marks the selected policies)."""
    # budget_bits: the budget the trial searched under (its bucket); GBitOPs: what its policy costs
    head = ["sel", "trial_id", "transfer_top1", "proxy_top1", "GBitOPs", "budget_bits", "bucket", "reason"]
    lines = []
    bucket = bucket_index(df, buckets) if len(df) else []
    for k, (_, r) in enumerate(df.iterrows()):
        lines.append(["*" if r.get("selected") else "", str(r["trial_id"]), fmt(r.get(ACC), ".2f"),
                      fmt(r.get("proxy_top1"), ".2f"), fmt(float(r[COST]) / 1e9, ".4f"),
                      fmt(r.get("budget_avg_bits"), ".2f"), str(int(bucket[k])), str(r.get("selection_reason") or "")])
    return text_table(head, lines, right={2, 3, 4, 5, 6})
