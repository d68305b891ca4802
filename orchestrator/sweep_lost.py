"""What a sweep folder's commands do when their Ray cluster is lost (``cluster_watch``): one paragraph saying what
happened, what is kept and the command that continues (stderr), and a summary where the command's summary goes
(stdout: the table of what is kept, the command that continues); the MLflow writes queued so far (a sweep's stopped trials'
runs and its parent run ended KILLED, as after a Ctrl-C); then the process ends with ``cluster_watch.LOST_STATUS``.

``sweep_lost_handler``: the sweep (``gmpq sweep``, ``gmpq run``'s sweep stage); ``final_lost_handler``: the final
fine-tune (``gmpq finetune --sweep``, ``gmpq run``'s last stage). What the paragraph reads from the folder is
``bounded``: the folder may sit on storage that went with the cluster."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from .cluster_watch import bounded, exit_lost, join_hint, lost_text

__all__ = ["sweep_lost_handler", "sweep_lost_text", "sweep_lost_summary", "final_lost_handler", "final_lost_text",
           "final_lost_summary"]

log = logging.getLogger(__name__)


def _folder_facts(cfg: Any) -> tuple[Any, str]:
    """What the lost sweep's words read from its folder, each read ``bounded``: its status (``read_sweep_status``;
    None when it cannot be read in time) and the ``--resume`` flag that continues it."""
    from .commands.sweep import continue_flag
    from .sweep_status import read_sweep_status

    status = bounded(lambda: read_sweep_status(Path(cfg.out_dir)), None)
    return status, bounded(lambda: continue_flag(cfg), "--resume auto")   # (auto: continues it, or starts it)


def _continue_text(cfg: Any, command: str, flag: str) -> str:
    local = cfg.address in (None, "local")
    return f"gmpq {command} --out {Path(cfg.out_dir)} {flag}{join_hint(local)}"


def sweep_lost_text(cfg: Any, address: str, seconds: float, command: str = "sweep",
                    facts: tuple[Any, str] | None = None) -> str:
    """The paragraph of a sweep whose cluster was lost (``command``: "sweep", or "run" for ``gmpq run``'s sweep
    stage), for stderr; ``facts``: ``_folder_facts`` (read here when not given)."""
    out = Path(cfg.out_dir)
    status, flag = facts or _folder_facts(cfg)
    kept = f"Every trial that ended is kept in {out}." if status is None else _kept_text(out, status)
    return lost_text(command, address, seconds, local=cfg.address in (None, "local"), work="the sweep",
                     rest=f"{kept} Continue with: {_continue_text(cfg, command, flag)}; trials stopped midway, and "
                          "failed ones, run again.")


def sweep_lost_summary(cfg: Any, command: str = "sweep", facts: tuple[Any, str] | None = None) -> str:
    """What a sweep whose cluster was lost prints where its summary goes (stdout, as every other end of it does: a
    log of ``gmpq sweep ... > log`` holds it): the trials its folder holds as the summary's table, their counts, and
    the command that continues it. The paragraph saying what happened goes to stderr (``sweep_lost_text``)."""
    from .commands._sweep_summary import trial_table
    from .results import TRIALS_FILE
    from .sweep_status import COMPLETED, FAILED, PRUNED, RUNNING, STOPPED

    out = Path(cfg.out_dir)
    status, flag = facts or _folder_facts(cfg)
    lines = []
    if status is not None and status.trials:        # (a trial running as the cluster went: stopped with it)
        lines += trial_table([{"trial_id": t.trial_id, "status": STOPPED if t.status == RUNNING else t.status,
                               "budget_avg_bits": t.budget_avg_bits,
                               "proxy_top1": t.proxy_top1, "transfer_top1": t.transfer_top1, "gbitops": t.gbitops}
                              for t in status.trials])
        midway = status.count(RUNNING) + status.count(STOPPED)     # as the table (and a sweep's own summary) has them
        results = f" Results: {out / TRIALS_FILE}" if status.n_ended else ""
        lines.append(f"{status.count(COMPLETED)} completed, {status.count(PRUNED)} pruned, {status.count(FAILED)} "
                     f"failed{f'; {midway} stopped midway' if midway else ''}.{results}")
    lines.append(f"The sweep stopped: its Ray cluster was lost (stderr says how). Continue with: "
                 f"{_continue_text(cfg, command, flag)}")
    return "\n".join(lines)


def _kept_text(out: Path, st: Any) -> str:
    """What the sweep folder holds of the trials (``st``: its ``read_sweep_status``)."""
    from .sweep_status import COMPLETED, FAILED, PRUNED, RUNNING, STOPPED

    if not st.trials:
        return "No trial had started, so nothing is lost."
    ended = ", ".join(f"{st.count(s)} {s}" for s in (COMPLETED, PRUNED, FAILED) if st.count(s))
    running, earlier = st.count(RUNNING), st.count(STOPPED)
    parts = [f"{st.n_ended} trial(s) had ended ({ended}), kept in {out / 'trials.parquet'} and MLflow"
             if st.n_ended else "No trial had ended"]
    if running:
        parts.append(f"{running} {'was running and stops' if running == 1 else 'were running and stop'} here")
    if earlier:             # started by an earlier run that stopped before they ended (no live driver recorded)
        parts.append(f"{earlier} {'was' if earlier == 1 else 'were'} stopped midway before")
    return "; ".join(parts) + "."


def sweep_lost_handler(cfg: Any, callbacks: list, command: str = "sweep") -> Callable[[str, float], None]:
    """``cluster_watch``'s ``on_lost`` for a sweep: the paragraph, the MLflow runs ended as after a Ctrl-C, the exit."""

    def lost(address: str, seconds: float) -> None:
        facts = _folder_facts(cfg)
        exit_lost(sweep_lost_text(cfg, address, seconds, command, facts), cleanup=lambda: _end_mlflow(callbacks),
                  summary=sweep_lost_summary(cfg, command, facts))

    return lost


def _end_mlflow(callbacks: list) -> None:
    from .mlflow_callback import MLflowCallback

    for cb in callbacks:
        if isinstance(cb, MLflowCallback):
            cb.end_interrupted()


def _final_rows(sweep_dir: Path) -> Any:
    """final.parquet's rows (``bounded``: None when they cannot be read in time)."""
    from .final_results import read_final

    return bounded(lambda: read_final(sweep_dir, missing_ok=True), None)


def _final_again(sweep_dir: Path, local: bool, command: str) -> str:
    return (f"gmpq run --out {sweep_dir} --resume{join_hint(local)}" if command == "run" else
            f"gmpq finetune --sweep {sweep_dir}{join_hint(local)}, with the same flags")


def final_lost_text(sweep_dir: Path, address: str, seconds: float, *, local: bool, command: str = "finetune",
                    final: Any = False) -> str:
    """The paragraph of a final fine-tune whose cluster was lost (``command``: "finetune", or "run" for ``gmpq
    run``'s last stage), for stderr: the policies in final.parquet are kept, running fine-tunes continue from their
    last epoch. ``final``: its rows (``_final_rows``, read here when not given)."""
    from .results import FINAL_FILE

    final = _final_rows(sweep_dir) if final is False else final
    n_done = None if final is None else len(final)
    kept = ("No policy had finished its fine-tune" if not n_done else
            f"{n_done} fine-tuned polic{'y is' if n_done == 1 else 'ies are'} kept in {sweep_dir / FINAL_FILE}")
    again = _final_again(sweep_dir, local, command)
    return lost_text(command, address, seconds, local=local, work="the final fine-tune",
                     rest=f"{kept}; the fine-tunes that were running continue from their last finished epoch. Continue "
                          f"with: {again}. The kept policies' MLflow runs are written when it continues (or now: "
                          f"gmpq sync-mlflow --sweep {sweep_dir}).")


def final_lost_summary(sweep_dir: Path, *, local: bool, command: str = "finetune", final: Any = False) -> str:
    """What a final fine-tune whose cluster was lost prints where its summary goes (stdout): the table of the
    fine-tuned policies final.parquet holds, and the command that continues it (``final_lost_text``: stderr's)."""
    from .commands._finetune_sweep import format_final_table

    final = _final_rows(sweep_dir) if final is False else final
    table = bounded(lambda: format_final_table(final), None) if final is not None and len(final) else None
    stop = (f"The final fine-tune stopped: its Ray cluster was lost (stderr says how). Continue with: "
            f"{_final_again(sweep_dir, local, command)}")
    return stop if table is None else f"{table}\n{stop}"


def final_lost_handler(sweep_dir: Path, *, local: bool, command: str = "finetune") -> Callable[[str, float], None]:
    """``cluster_watch``'s ``on_lost`` for the final fine-tune (its MLflow runs are written as the stage ends)."""

    def lost(address: str, seconds: float) -> None:
        final = _final_rows(Path(sweep_dir))
        exit_lost(final_lost_text(Path(sweep_dir), address, seconds, local=local, command=command, final=final),
                  summary=final_lost_summary(Path(sweep_dir), local=local, command=command, final=final))

    return lost
