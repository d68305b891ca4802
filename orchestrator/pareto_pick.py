"""What narrows the Pareto selection: trials picked by hand (``gmpq pareto DIR --pick ID[,ID...]``) and a BitOPs
limit (``gmpq pareto DIR --max-gbitops G``, the sweep config's ``finetune.max_gbitops``), with the checks and the
refusals' words (each one paragraph naming the value and the fix; raised before anything is written).

GBitOPs here is the one quantity ``pareto.parquet``'s ``gbitops`` column, ``gmpq pareto``'s table and the x axis of
``pareto.png`` show: the BitOPs of the quantized layers (``bitops``, sum over layers of MACs * w_bits * a_bits) / 1e9.
A trial id may be given by a unique prefix (ids are short hex strings, compared case-insensitively).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from gmpq_core.errors import ConfigError

from .pareto import ACC, COST, completed_trials, pareto_front
from .sweep_sections import check_max_gbitops

log = logging.getLogger(__name__)

__all__ = ["check_limit_reachable", "check_front_fits", "PICK_REASON", "NO_LIMIT", "gbitops", "within", "limit_arg",
           "check_max_gbitops", "limit_in_force", "parse_pick", "check_picks", "no_fit_text", "limit_text",
           "only_text", "fewer_text"]

PICK_REASON = "picked by hand"      # pareto.parquet's selection_reason of a hand-picked row
NO_LIMIT = "none"                   # --max-gbitops none: no limit, whatever the sweep config says


def gbitops(df: pd.DataFrame) -> np.ndarray:
    """GBitOPs per row: ``bitops / 1e9`` (= trials.parquet's ``gbitops``, pareto.png's x axis)."""
    return df[COST].to_numpy(dtype=float) / 1e9


def within(df: pd.DataFrame, limit: float) -> np.ndarray:
    """Which rows fit ``limit``: their GBitOPs as the table shows them (4 decimals) at most ``limit``, so a limit
    typed from the table (0.4603) takes the policy shown at it (0.460315)."""
    return np.round(gbitops(df), 4) <= limit + 1e-12


def limit_arg(text: str | None, flag: str = "--max-gbitops") -> float | str | None:
    """A ``--max-gbitops`` flag's text as a selection takes it: a float > 0, ``NO_LIMIT`` or None (not given);
    ConfigError naming the flag otherwise."""
    if text is None or text.strip().lower() == NO_LIMIT:
        return text if text is None else NO_LIMIT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{flag} takes the most GBitOPs a selected policy may cost, a number > 0 such as "
                          f"{flag} 0.4 (the quantized layers' BitOPs / 1e9: pareto.parquet's gbitops column, "
                          f"pareto.png's x axis), or 'none' for no limit, but got {flag} {text}.")
    return value


def limit_in_force(given: float | str | None, cfg: dict, sweep_dir: str | Path | None = None) -> float | None:
    """The limit a selection uses: ``given`` (``--max-gbitops``; ``NO_LIMIT``: none), else the sweep config's
    ``finetune.max_gbitops`` (checked: the saved file may have been edited by hand)."""
    if isinstance(given, str):
        given = limit_arg(given)                   # the flag's text: a float, or NO_LIMIT
        if given == NO_LIMIT:
            return None
    if given is not None:
        return check_max_gbitops(given, "--max-gbitops")
    where = str(Path(sweep_dir) / "sweep_config.yaml") if sweep_dir else ""
    return check_max_gbitops((cfg.get("finetune") or {}).get("max_gbitops"), "finetune.max_gbitops", where)


def parse_pick(values: Sequence[str] | None) -> list[str] | None:
    """``--pick`` (given once or more, each ``ID[,ID...]``) as the ids typed, in order; ConfigError for an empty id
    or one typed twice. None when not given."""
    if values is None:
        return None
    typed = ",".join(values)
    ids = [v.strip() for v in typed.split(",")]
    if not typed.strip() or any(not v for v in ids):
        raise ConfigError(f"--pick takes trial ids separated by commas, e.g. --pick 0f93,a1fa, but got --pick "
                          f"{typed!r}, {'which is empty' if not typed.strip() else 'with an empty id in it'}. Give the "
                          "ids (or unique prefixes) 'gmpq pareto DIR' lists, or leave --pick out to select "
                          "automatically.")
    twice = sorted({v for v in ids if [w.lower() for w in ids].count(v.lower()) > 1})
    if twice:
        raise ConfigError(f"--pick names {', '.join(twice)} more than once (--pick {typed}): give each trial once.")
    return ids


def _point(r: Any) -> str:
    return f"{r['trial_id']} ({float(r[ACC]):.2f}%, {float(r[COST]) / 1e9:.4f} GBitOPs)"


def _front_list(front: pd.DataFrame) -> str:
    return ", ".join(_point(r) for r in front.to_dict("records"))


def _still_running(p: str, picks: Sequence[str], sweep_dir: Any, running: Sequence[str], status: str | None) -> str:
    """What a refused pick ``p`` adds while the sweep runs (``running``: its trials started and not ended): a running
    trial has no row in trials.parquet yet (a retried one: its failed row, ``status``); it is listed once it ends."""
    d = sweep_dir or "DIR"
    again = f"run 'gmpq pareto {d} --pick {','.join(picks)}' again then"
    ids = [t for t in running if t.lower().startswith(p.lower())]
    if status is None and len(ids) == 1:
        return (f" The sweep in {d} is still running, and so is trial {ids[0]}: it is listed once it ends (and can "
                f"be picked if it completes on the front); {again}.")
    if status is None:
        return (f" The sweep in {d} is still running: a running trial is listed once it ends; if {p!r} names one, "
                f"{again}.")
    if status == "failed":
        return (f" The sweep in {d} is still running: a failed trial that Ray Tune retries keeps its failed row until "
                f"the retry ends; if this one is retried, {again}.")
    return ""


def check_picks(trials: pd.DataFrame, front: pd.DataFrame, picks: Sequence[str], sweep_dir: Any = None,
                running: Sequence[str] | None = None) -> list[str]:
    """The full trial ids of ``picks`` (ids or unique prefixes, as ``parse_pick`` returns them), each a completed
    trial on ``front`` (the Pareto front of ``trials``, trials.parquet); else ConfigError saying which and why.
    ``running``: the sweep is still running, these trials started and not ended (trial_events.jsonl); a pick no
    row matches, or whose trial failed (maybe retried), adds that a running trial is listed once it ends."""
    where = f"the sweep {sweep_dir}" if sweep_dir else "the sweep"
    fix = (f"The front, by GBitOPs: {_front_list(front)}. Pick among those (their ids, or unique prefixes), or leave "
           "--pick out to select automatically. Nothing was written.")
    if not picks:
        raise ConfigError(f"--pick names no trial: give the ids (or unique prefixes) of the front's trials to select. "
                          f"{fix}")
    ids = [str(t) for t in trials["trial_id"]]
    done = set(completed_trials(trials)["trial_id"].astype(str))
    on_front = set(front["trial_id"].astype(str))
    full: list[str] = []
    for p in picks:
        matches = [t for t in ids if t.lower() == p.lower()] or [t for t in ids if t.lower().startswith(p.lower())]
        if not matches:
            now = _still_running(p, picks, sweep_dir, running, None) if running is not None else ""
            raise ConfigError(f"--pick {p}: no trial of {where} has an id starting with {p!r} ({len(ids)} trials"
                              f"{' ended so far' if running is not None else ''}).{now} {fix}")
        if len(matches) > 1:
            raise ConfigError(f"--pick {p}: the prefix {p!r} matches {len(matches)} trials of {where}: "
                              f"{', '.join(sorted(matches))}. Give more of the id to name one. {fix}")
        tid = matches[0]
        if tid in full:
            same = ", ".join(q for q in picks if tid.lower().startswith(q.lower()))
            raise ConfigError(f"--pick names trial {tid} twice ({same}): give each trial once.")
        full.append(tid)
    for p, tid in zip(picks, full):
        row = trials[trials["trial_id"].astype(str) == tid].iloc[-1]
        if tid not in done:
            status = str(row.get("status"))
            why = "completed without transfer_top1 or BitOPs (non-finite results)" if status == "completed" else \
                f"did not complete (status {status})"
            now = _still_running(p, picks, sweep_dir, running, status) if running is not None else ""
            raise ConfigError(f"--pick {p}: trial {tid} {why}, so it has no place on the Pareto front and no policy "
                              f"to fine-tune.{now} {fix}")
        if tid not in on_front:
            acc, cost = float(row[ACC]), float(row[COST])
            better = front[(front[ACC] >= acc) & (front[COST] <= cost)]
            raise ConfigError(f"--pick {p}: trial {_point(row)} is not on the Pareto front: "
                              f"{', '.join(_point(r) for r in better.to_dict('records'))} "
                              f"{'is' if len(better) == 1 else 'are'} at least as accurate for at most its BitOPs. "
                              f"{fix}")
    return full


def no_fit_text(front: pd.DataFrame, limit: float, sweep_dir: Any = None) -> str:
    """The refusal when no policy of the (non-empty) ``front`` costs at most ``limit`` GBitOPs."""
    g = gbitops(front)
    low = front.iloc[int(np.argmin(g))]
    d = sweep_dir or "DIR"
    least = _up4(float(g.min()))                                  # 4 decimals, rounded up: that limit fits it
    return (f"No policy of the Pareto front fits the limit of {limit:g} GBitOPs: the cheapest on it is trial "
            f"{_point(low)}. Raise the limit to {least:.4f} or more, or lift it ('none'): gmpq pareto {d} "
            f"--max-gbitops G, or gmpq finetune --sweep {d} --max-gbitops G (for that call); for gmpq run, and gmpq "
            f"finetune --top-k without --max-gbitops: gmpq run --out {d} --resume --max-gbitops G (or "
            f"finetune.max_gbitops in {d}/sweep_config.yaml). Or sweep lower budgets (a lower "
            "space.budget_avg_bits range) so that cheaper policies reach the front. Nothing was written.")


def limit_text(limit: float) -> str:
    """How a selection reason and the table say the limit: ``within the 0.4 GBitOPs limit``."""
    return f"within the {limit:g} GBitOPs limit"


def only_text(front: pd.DataFrame, limit: float | None, name: str = "front") -> str:
    """Why fewer policies than top-k were selected: ``only 2 on the front``, or with a limit ``only 1 of the 2 on
    the front within the 0.4 GBitOPs limit`` (``name``: how the caller calls the front)."""
    if limit is None:
        return f"only {len(front)} on the {name}"
    fit = int(within(front, limit).sum()) if len(front) else 0
    return f"only {fit} of the {len(front)} on the {name} {limit_text(limit)}"


def fewer_text(n_chosen: int, top_k: int, front: pd.DataFrame, cfg: dict, *, given: float | str | None = None,
               asked: str = "--top-k") -> str:
    """``gmpq finetune --sweep DIR --top-k K``'s line when fewer than K were selected, naming the limit in force
    (``given``: its ``--max-gbitops``, else the sweep config's, ``cfg``: the front's part within it); ``asked``:
    where K came from (``--top-k``, or ``finetune.top_k`` when only --max-gbitops was given)."""
    return (f"{n_chosen} selected of the {top_k} asked for ({asked}): "
            f"{only_text(front, limit_in_force(given, cfg), 'Pareto front')} (a policy off the front is never "
            "selected: one on it is at least as accurate for at most its BitOPs)")


def _up4(g: float) -> float:
    """``g`` rounded up at 4 decimals (as the table shows GBitOPs): a limit of that value fits it."""
    return math.ceil(round(g * 1e4, 6)) / 1e4


def check_limit_reachable(limit: float | None, model: str, cheapest: float, lowest_budget: float | None,
                          low_bits: float | None) -> None:
    """Before a sweep: a limit below the cheapest policy ``model`` can have (``cheapest`` BitOPs, every layer at its
    fewest bits) would select nothing after the sweep: ConfigError now. Below the lowest budget the sweep samples
    (``lowest_budget`` BitOPs, ``low_bits`` average bits), a warning: policies land near their budgets."""
    if limit is None:
        return
    if limit * 1e9 < cheapest * (1 - 1e-9):
        least = _up4(cheapest / 1e9)
        raise ConfigError(f"finetune.max_gbitops {limit:g} is below the cheapest policy {model} can have "
                          f"({cheapest / 1e9:.6g} GBitOPs, every layer at its fewest bits), so the final stage would "
                          f"select nothing after the sweep. Raise it to {least:.4f} or more (gmpq run --max-gbitops G, "
                          "or finetune.max_gbitops in the config), or lift it (--max-gbitops none, or null). Nothing "
                          "has been trained yet.")
    if lowest_budget is not None and limit * 1e9 < lowest_budget:
        log.warning("finetune.max_gbitops %g is below the cost of the lowest budget the sweep samples (%s average bits "
                    "= %.4g GBitOPs): searched policies land near their budgets, so few or none may fit it and the "
                    "final stage may have nothing to select. Lower the budget_avg_bits range, or raise the limit.",
                    limit, low_bits, lowest_budget / 1e9)


def check_front_fits(sweep_dir: str | Path, limit: float | None) -> None:
    """A finished sweep's Pareto front against the limit a resume brings (``gmpq run --out DIR --resume --max-gbitops
    G``), before the config holding it is saved: none on the front fits -> the refusal the selection would give."""
    if limit is None:
        return
    from .results import read_trials

    front = pareto_front(read_trials(sweep_dir))
    if len(front) and not within(front, limit).any():
        raise ConfigError(no_fit_text(front, limit, sweep_dir))
