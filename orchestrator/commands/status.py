"""``gmpq status``: where a sweep stands, from another terminal, while it runs or after it stopped.

    gmpq status --sweep runs/demo
    watch -n 10 gmpq status --sweep runs/demo

Reads the sweep folder only (no Ray session, no MLflow): each trial's status, budget, proxy size, accuracies,
BitOPs and time, where a running trial got to (search epoch, transfer check), whether the command
running the sweep is alive, which policies the Pareto stage selected (the note column: selected, or Pareto front
for the others on pareto.parquet's front), the final fine-tune's progress, the
runs its MLflow store lacks (its logging was off: ``gmpq sync-mlflow`` uploads them), and the command to run
next. ``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import add_sweep_dir_arg, help_text

__all__ = ["register", "run", "format_status"]


def _duration(s: float | None) -> str:
    if s is None or s != s:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _headline(st: Any) -> str:
    ended = f"{st.n_ended} of {st.n_planned or '?'} trials ended"
    counts = ", ".join(f"{st.count(s)} {s}" for s in ("completed", "pruned", "failed", "running", "stopped")
                       if st.count(s) or s in ("completed", "pruned", "failed"))
    from orchestrator.driver_markers import driver_text

    d = st.active_driver or {}
    who = f"pid {d.get('pid')} on {d.get('host')}"
    state = st.state
    f = st.finetune_driver if st.finetune_driver is not d else None
    beside = "" if not f else f"; a final stage runs beside it: {driver_text(f)}"
    if state == "running" and not st.trials:
        return f"running ({who}): preparing the shared models; no trial has started yet{beside}."
    if state == "running":
        return f"running ({who}): {ended} ({counts}){beside}."
    if state == "fine-tuning":
        doing = "fine-tuning the selected policies" if d.get("stage") == "finetune" else \
            "selecting and fine-tuning the Pareto policies (gmpq run)"
        return f"{doing} ({who}); the sweep: {ended} ({counts})."
    if state == "unknown":
        beat = _beat_age(d)
        return (f"driven from another host ({who}): whether it still runs cannot be checked from here"
                f"{f' (its marker was last refreshed {beat} ago)' if beat else ''}; {ended} ({counts}).")
    gone = st.driver if st.driver and st.driver_alive is False and _beat_age(st.driver) else None
    dead = "" if gone is None else f"; its driver (pid {gone.get('pid')} on {gone.get('host')}) stopped refreshing " \
                                   f"its marker {_beat_age(gone)} ago, so it is taken as ended"
    if state == "not started":
        return ("no trial has started, and no command is running it: it stopped before its first trial (its "
                f"output says why){dead}. Run the sweep again.")
    return f"{state}: {ended} ({counts}){dead}."


def _beat_age(driver: dict) -> str | None:
    """How long ago another host's driver refreshed its marker (``driver_markers``' heartbeat); None on this host
    (its pid is checked instead) or for a marker without a heartbeat."""
    import socket

    beat = driver.get("heartbeat")
    if driver.get("host") == socket.gethostname() or not isinstance(beat, (int, float)):
        return None
    return _duration(max(time.time() - beat, 0.0))


def _next_step(st: Any) -> str | None:
    d = st.sweep_dir
    if st.state == "stopped":
        from orchestrator.sweep_status import continue_text

        again = "failed trials and those stopped midway run again" if st.count("failed") else \
            "trials stopped midway run again"
        return f"{continue_text(d)} Completed and pruned trials are kept; {again}."
    if st.state != "finished":
        return None
    from orchestrator.pareto import no_completed_text
    from orchestrator.results import read_trials

    nothing = no_completed_text(d, read_trials(d, missing_ok=True))    # gmpq pareto would refuse: say why instead
    if nothing is not None:
        return nothing
    if not (d / "pareto.parquet").exists():
        return f"Next: gmpq pareto --sweep {d}   (then gmpq finetune --sweep {d})"
    if _stale(st) is not None:
        return None                                 # the line above says to select again first
    if any(t not in st.final for t in st.selected):
        return f"Next: gmpq finetune --sweep {d}"
    return None


def _stale(st: Any) -> Any:
    """pareto.parquet's selection made from other completed trials than the sweep holds now
    (``pareto_stale.StaleSelection``; from its front when the status was made without reading it), else None."""
    if st.stale_selection is not None or not st.unselected_since:
        return st.stale_selection
    from orchestrator.pareto_stale import StaleSelection
    return StaleSelection(None, 0, list(st.unselected_since))


def _final_lines(st: Any) -> list[str]:
    from orchestrator.final_results import resolve_model_path
    from orchestrator.text import fmt

    if not st.selected and not st.final:
        return []

    def done_line(tid: str, note: str = "") -> str:
        r = st.final[tid]
        path = resolve_model_path(st.sweep_dir, r.get("model_path"))
        model = f"; model {path}" if path is not None else ""
        return (f"  {tid}: top1 {fmt(r.get('final_top1'), '.2f')}% at {fmt(r.get('gbitops'), '.4f')} GBitOPs "
                f"({r.get('epochs')} epoch(s), {_duration(r.get('seconds'))}){model}{note}")

    done = [t for t in st.selected if t in st.final]
    earlier = [t for t in st.final if t not in st.selected]     # selected by an earlier --top-k: still on disk
    more = f"; {len(earlier)} more fine-tuned earlier, not selected now" if earlier else ""
    lines = [f"Final fine-tune: {len(done)} of {len(st.selected)} selected policies done{more}."]
    for tid in st.selected:
        if tid in st.final:
            lines.append(done_line(tid))
        elif tid in st.finetune_progress:
            p = st.finetune_progress[tid]
            running = st.finetune_driver is not None or st.state in ("fine-tuning", "unknown")   # (beside a sweep too)
            stopped = "" if running or not p.get("started") else \
                f"; stopped: gmpq finetune --sweep {st.sweep_dir} continues it (from its last finished epoch's " \
                "checkpoint, if any)"
            if "epoch" in p:
                lines.append(f"  {tid}: epoch {p.get('epoch')}, step {p.get('step')}/{p.get('steps')} "
                             f"(updated {_duration(p.get('age_s'))} ago){stopped}")
            else:
                at = f" at {p['started_at']}" if p.get("started_at") else ""
                lines.append(f"  {tid}: fine-tune started{at}{', no epoch reported yet' if running else ''}{stopped}")
        else:
            lines.append(f"  {tid}: not fine-tuned yet")
    lines += [done_line(tid, " (not selected now)") for tid in earlier]
    return lines


def _shared_line(shared: dict) -> str | None:
    """One line on the models every trial shares: the FP teachers' and the FP target model's top-1."""
    from orchestrator.text import fmt

    teachers = shared.get("teacher_top1") or {}
    parts = [f"{fmt(v, '.2f')}% (proxy {k})" for k, v in teachers.items()]
    if not parts and shared.get("target_fp_top1") is None:
        return None
    text = f"FP teachers' held-out top-1: {', '.join(parts)}; " if parts else ""
    return f"Shared models: {text}FP target model top-1 {fmt(shared.get('target_fp_top1'), '.2f')}%."


def _note(st: Any, t: Any) -> str:
    """A trial's note: where a running or stopped one got to; else what gmpq pareto made of it (``selected``, or
    ``Pareto front``: on pareto.parquet's front, not selected) beside its pruning reason or error."""
    if t.status in ("running", "stopped"):
        return t.phase
    mark = "selected" if t.trial_id in st.selected else "Pareto front" if t.trial_id in (st.selected_from or ()) else ""
    return "; ".join(x for x in (mark, t.note[:70]) if x)


def format_status(st: Any) -> str:
    from orchestrator.text import PROXY_NOTE, fmt, text_table

    head = ["#", "trial", "status", "budget", "proxy", "proxy%", "transfer%", "GBitOPs", "time", "note"]
    rows = [[fmt(t.number, "d"), t.trial_id, t.status, fmt(t.budget_avg_bits, ".2f"), fmt(t.proxy_size, "d"),
             fmt(t.proxy_top1, ".2f"), fmt(t.transfer_top1, ".2f"), fmt(t.gbitops, ".4f"),
             _duration(t.seconds) + (" so far" if t.status == "running" else ""), _note(st, t)] for t in st.trials]
    lines = [f"Sweep '{st.name}' in {st.sweep_dir}: {_headline(st)}"]
    shared = _shared_line(st.shared)
    if shared:
        lines.append(shared)
    if rows:
        lines.append(text_table(head, rows, right={0, 3, 4, 5, 6, 7, 8}))
        lines.append(PROXY_NOTE)
    not_started = (st.n_planned or 0) - len(st.trials)
    if not_started > 0 and st.trials:
        lines.append(f"{not_started} trial(s) not started yet.")
    from orchestrator.sweep_status import mlflow_gaps_text

    gaps = mlflow_gaps_text(st.mlflow, st.sweep_dir, running=st.active_driver is not None)
    if gaps:
        lines.append(gaps)
    lines += _final_lines(st)
    stale = _stale(st)
    if stale is not None:                           # selected from other trials than have completed now
        from orchestrator.pareto_stale import stale_text
        lines.append(stale_text(stale, st.sweep_dir, running=st.state == "running") + ".")
    step = _next_step(st)
    if step:
        lines.append(step)
    return "\n".join(lines)


def _as_json(st: Any) -> str:
    d = asdict(st)
    d.update(sweep_dir=str(st.sweep_dir), state=st.state, n_ended=st.n_ended)
    return json.dumps(d, default=str, indent=2)


def run(args: argparse.Namespace) -> int:
    from gmpq_core.errors import ConfigError
    from orchestrator.sweep_status import read_sweep_status

    sweep_dir = Path(args.sweep).expanduser().resolve()
    if not sweep_dir.exists():
        raise ConfigError(f"--sweep {args.sweep}: no such folder ({sweep_dir}). Pass the --out of the gmpq sweep or "
                          "gmpq run you want to see.")
    st = read_sweep_status(sweep_dir)
    print(_as_json(st) if args.json else format_status(st))
    if not args.json:
        from orchestrator.mlflow_sink import sweep_experiment_name
        from orchestrator.moved_sweep import store_not_yet_moved
        from orchestrator.results import load_resolved_config

        cfg = load_resolved_config(sweep_dir)
        old = store_not_yet_moved(sweep_dir, cfg, sweep_experiment_name(sweep_dir, cfg))
        if old is not None:
            print(f"This folder was copied or moved from {old}: its MLflow store still keeps artifacts there. Run "
                  f"'gmpq sync-mlflow --sweep {sweep_dir}' once before 'mlflow ui' on its mlflow.db.")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("status", help="where a sweep stands (trials, running ones, final fine-tune)",
                              description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_dir_arg(p, "sweep folder (the --out of gmpq sweep / gmpq run)")
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    p.set_defaults(func=run)
