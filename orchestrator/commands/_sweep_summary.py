"""``gmpq sweep``'s last words: the summary of the trials (``format_summary``: the table, the counts, the MLflow
line), and the line of a sweep stopped (``interrupted_note`` inside its trials, ``stopped_note`` outside them) with the
command that continues it (``continue_flag``). Shared with ``gmpq run`` through ``commands.sweep``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import mlflow_ui_hint
from orchestrator.text import PROXY_NOTE, fmt

__all__ = ["format_summary", "trial_table", "mlflow_line", "interrupted_note", "continue_flag", "stopped_note"]


def format_summary(summary: Any, tracking_uri: str | None = None, *, command: str = "gmpq sweep",
                   logging_off: str | None = None) -> str:
    """The sweep's trial table and counts; for an interrupted sweep, ``command`` is the one that continues it; with
    ``tracking_uri``, the MLflow line (``mlflow_line``; ``logging_off``: the sink's warning, if it warned)."""
    lines = trial_table(summary.rows)
    lines.append(f"{summary.n_completed} completed, {summary.n_pruned} pruned, {summary.n_failed} failed in "
                 f"{summary.wall_seconds / 60:.1f} min. {_results_text(summary.sweep_dir)}")
    if summary.interrupted:
        lines.append(interrupted_note(summary, command))
    lines += _selection_lines(summary, command)

    if tracking_uri:
        lines.append(mlflow_line(summary, tracking_uri, logging_off))
    return "\n".join(lines)


def trial_table(rows: list[dict]) -> list[str]:
    """The summary's table of trials (``rows``: dicts with trial_id, status, budget_avg_bits, proxy_top1,
    transfer_top1, gbitops), completed ones first, best transfer accuracy first; the proxy note under it."""
    lines = [f"{'trial':<14} {'status':<10} {'budget':>6} {'proxy%':>7} {'transfer%':>9} {'GBitOPs':>8}"]
    for r in sorted(rows, key=lambda r: (r["status"] != "completed", -(r["transfer_top1"] or 0))):
        lines.append(f"{r['trial_id']:<14} {r['status']:<10} {fmt(r['budget_avg_bits'], '.2f'):>6} "
                     f"{fmt(r['proxy_top1'], '.2f'):>7} {fmt(r['transfer_top1'], '.2f'):>9} "
                     f"{fmt(r['gbitops'], '.4f'):>8}")
    if rows:
        lines.append(PROXY_NOTE)
    return lines


def _selection_lines(summary: Any, command: str) -> list[str]:
    """What the sweep's trials now mean for its Pareto selection: ``gmpq run`` after a resume that grew the sweep
    selects again (``sweep_grow.reselect_text``); ``gmpq sweep``: one line when pareto.parquet was selected from
    other completed trials than there are now (``pareto_stale``: a grown sweep, however many commands it took)."""
    if command == "gmpq run":
        if getattr(summary, "grown_from", None) is None:
            return []
        from orchestrator.sweep_grow import reselect_text
        note = reselect_text(summary.sweep_dir, summary.grown_from, summary.n_planned)
        return [note[0].upper() + note[1:] + "."] if note else []
    from orchestrator.pareto_stale import stale_selection, stale_text

    stale = stale_selection(summary.sweep_dir)
    return [] if stale is None else [stale_text(stale, summary.sweep_dir) + "."]


def _results_text(sweep_dir: Path) -> str:
    """Where the summary's results are: trials.parquet, once a trial has ended (its first row writes it)."""
    from orchestrator.results import TRIALS_FILE

    path = Path(sweep_dir) / TRIALS_FILE
    if path.exists():
        return f"Results: {path}"
    return f"No trial has ended yet, so there are no results ({TRIALS_FILE} is written when the first one ends)."


def mlflow_line(summary: Any, tracking_uri: str, logging_off: str | None = None) -> str:
    """The summary's MLflow line: how to look at the runs; or, when the store lacks them (``logging_off``: the
    sink's "MLflow logging disabled" warning of this run; or ended trials the folder's id files have no run of),
    that, and the ``gmpq sync-mlflow`` command that uploads them."""
    from orchestrator.mlflow_sink import DISABLED
    from orchestrator.sweep_status import mlflow_gaps_text, mlflow_view

    ended = [str(r["trial_id"]) for r in summary.rows if r.get("status") in ("completed", "pruned", "failed")]
    view = mlflow_view(summary.sweep_dir, {"tracking_uri": tracking_uri}, ended)
    if logging_off:
        why = logging_off.removeprefix(f"{DISABLED}: ").split(". Work goes on", 1)[0]
        what = "some of this sweep's runs are missing there" if view.get("parent_run") else \
            "nothing of this sweep is there"
        return (f"MLflow: logging was off ({why}): {what}; the results are complete in the Parquet tables. Once the "
                f"store answers, upload them with: gmpq sync-mlflow --sweep {summary.sweep_dir}")
    gaps = mlflow_gaps_text(view, summary.sweep_dir)
    return f"MLflow: {mlflow_ui_hint(tracking_uri)}" if gaps is None else gaps


def interrupted_note(summary: Any, command: str = "gmpq sweep") -> str:
    """What an interrupted (or SIGTERM-terminated) sweep left undone, and the command that finishes it."""
    from orchestrator.ray_env import stop_word

    left = summary.n_planned - summary.n_trials if summary.n_planned else summary.n_unfinished
    return (f"The sweep was {stop_word(getattr(summary, 'terminated', False))}: {summary.n_trials} of "
            f"{summary.n_planned or '?'} trials finished; {left} still to run ({summary.n_unfinished} stopped midway: "
            f"{'it starts' if summary.n_unfinished == 1 else 'they start'} again). Finished trials are kept. Continue with: {command} --out {summary.sweep_dir} --resume")


def continue_flag(cfg: Any) -> str:
    """The ``--resume`` flag that continues ``cfg``'s stopped sweep: ``--resume`` once its Tune state exists (the
    trials started), else ``--resume auto`` (stopped while preparing: it starts the sweep from its saved config)."""
    from orchestrator.sweep import holds_sweep_state

    return "--resume" if holds_sweep_state(cfg) else "--resume auto"


def stopped_note(cfg: Any, by_sigterm: bool, command: str = "gmpq sweep") -> str | None:
    """The line of a sweep stopped outside its trials (while preparing, or in its last steps once they ended):
    what is kept and the command (``command``: ``gmpq sweep``, or ``gmpq run`` for its sweep stage) that continues
    it; None before it saved its config (nothing to continue)."""
    from orchestrator.ray_env import stop_word
    from orchestrator.results import CONFIG_FILE, TRIALS_FILE

    cfg = cfg.resolved()
    out = Path(cfg.out_dir)
    if not (out / CONFIG_FILE).exists():
        return None
    kept = (f"its finished trials are kept ({out / TRIALS_FILE})" if _any_trial_ended(out) else
            "no trial had finished yet, so nothing was lost")
    return f"the sweep was {stop_word(by_sigterm)}; {kept}. Continue with: {command} --out {out} {continue_flag(cfg)}"


def _any_trial_ended(sweep_dir: Path) -> bool:
    """Whether the sweep's trials.parquet holds a trial (a row is written as a trial ends); a damaged one: True
    (it is there to keep; the resumed sweep names what is wrong with it)."""
    from gmpq_core.errors import CheckpointError
    from orchestrator.results import TRIALS_FILE, read_trials

    if not (sweep_dir / TRIALS_FILE).is_file():
        return False
    try:
        return len(read_trials(sweep_dir)) > 0
    except (CheckpointError, OSError):
        return True
