"""What a sweep folder's commands do when their Ray cluster is lost (``cluster_watch``): one paragraph saying what
happened, what is kept and the command that continues; the MLflow writes queued so far (a sweep's stopped trials'
runs and its parent run ended KILLED, as after a Ctrl-C); then the process ends with ``cluster_watch.LOST_STATUS``.

``sweep_lost_handler``: the sweep (``gmpq sweep``, ``gmpq run``'s sweep stage); ``final_lost_handler``: the final
fine-tune (``gmpq finetune --sweep``, ``gmpq run``'s last stage). What the paragraph reads from the folder is
``bounded``: the folder may sit on storage that went with the cluster."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from .cluster_watch import bounded, exit_lost, join_hint, lost_text

__all__ = ["sweep_lost_handler", "sweep_lost_text", "final_lost_handler", "final_lost_text"]

log = logging.getLogger(__name__)


def sweep_lost_text(cfg: Any, address: str, seconds: float, command: str = "sweep") -> str:
    """The paragraph of a sweep whose cluster was lost (``command``: "sweep", or "run" for ``gmpq run``'s sweep
    stage)."""
    from .commands.sweep import continue_flag

    out = Path(cfg.out_dir)
    local = cfg.address in (None, "local")
    kept = bounded(lambda: _kept_text(out), f"Every trial that ended is kept in {out}.")
    flag = bounded(lambda: continue_flag(cfg), "--resume auto")    # (auto: continues it, or starts it if need be)
    return lost_text(command, address, seconds, local=local, work="the sweep",
                     rest=f"{kept} Continue with: gmpq {command} --out {out} {flag}{join_hint(local)}; trials stopped "
                          "midway, and failed ones, run again.")


def _kept_text(out: Path) -> str:
    """What the sweep folder holds of the trials, from its files (``read_sweep_status``)."""
    from .sweep_status import COMPLETED, FAILED, PRUNED, RUNNING, read_sweep_status

    st = read_sweep_status(out)
    if not st.trials:
        return "No trial had started, so nothing is lost."
    ended = ", ".join(f"{st.count(s)} {s}" for s in (COMPLETED, PRUNED, FAILED) if st.count(s))
    running = st.count(RUNNING)
    parts = [f"{st.n_ended} trial(s) had ended ({ended}), kept in {out / 'trials.parquet'} and MLflow"
             if st.n_ended else "No trial had ended"]
    if running:
        parts.append(f"{running} {'was running and stops' if running == 1 else 'were running and stop'} here")
    return "; ".join(parts) + "."


def sweep_lost_handler(cfg: Any, callbacks: list, command: str = "sweep") -> Callable[[str, float], None]:
    """``cluster_watch``'s ``on_lost`` for a sweep: the paragraph, the MLflow runs ended as after a Ctrl-C, the exit."""

    def lost(address: str, seconds: float) -> None:
        exit_lost(sweep_lost_text(cfg, address, seconds, command), cleanup=lambda: _end_mlflow(callbacks))

    return lost


def _end_mlflow(callbacks: list) -> None:
    from .mlflow_callback import MLflowCallback

    for cb in callbacks:
        if isinstance(cb, MLflowCallback):
            cb.end_interrupted()


def final_lost_text(sweep_dir: Path, address: str, seconds: float, *, local: bool, command: str = "finetune") -> str:
    """The paragraph of a final fine-tune whose cluster was lost (``command``: "finetune", or "run" for ``gmpq
    run``'s last stage): the policies in final.parquet are kept, running fine-tunes continue from their last epoch."""
    from .final_results import read_final
    from .results import FINAL_FILE

    n_done = bounded(lambda: len(read_final(sweep_dir, missing_ok=True)), None)
    kept = ("No policy had finished its fine-tune" if not n_done else
            f"{n_done} fine-tuned polic{'y is' if n_done == 1 else 'ies are'} kept in {sweep_dir / FINAL_FILE}")
    again = (f"gmpq run --out {sweep_dir} --resume{join_hint(local)}" if command == "run" else
             f"gmpq finetune --sweep {sweep_dir}{join_hint(local)}, with the same flags")
    return lost_text(command, address, seconds, local=local, work="the final fine-tune",
                     rest=f"{kept}; the fine-tunes that were running continue from their last finished epoch. Continue "
                          f"with: {again}. The kept policies' MLflow runs are written when it continues (or now: "
                          f"gmpq sync-mlflow --sweep {sweep_dir}).")


def final_lost_handler(sweep_dir: Path, *, local: bool, command: str = "finetune") -> Callable[[str, float], None]:
    """``cluster_watch``'s ``on_lost`` for the final fine-tune (its MLflow runs are written as the stage ends)."""

    def lost(address: str, seconds: float) -> None:
        exit_lost(final_lost_text(Path(sweep_dir), address, seconds, local=local, command=command))

    return lost
