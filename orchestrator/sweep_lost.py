"""What a sweep's driver does when its Ray cluster is lost mid-sweep (``cluster_watch``): one paragraph saying what
happened, what is kept and the command that continues; the MLflow writes queued so far, with the stopped trials'
runs ended KILLED as after a Ctrl-C; then the process ends with ``cluster_watch.LOST_STATUS`` (75)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from .cluster_watch import LOST_STATUS, exit_lost

__all__ = ["sweep_lost_handler", "sweep_lost_text"]

log = logging.getLogger(__name__)


def sweep_lost_text(cfg: Any, address: str, seconds: float, command: str = "sweep") -> str:
    """The paragraph: which cluster stopped answering, what the folder keeps, how to continue (``command``: "sweep",
    or "run" for ``gmpq run``'s sweep stage)."""
    from .commands.sweep import continue_flag

    out = Path(cfg.out_dir)
    local = cfg.address in (None, "local")
    what = (f"the Ray instance this sweep started on this machine (GCS {address}) stopped answering {seconds:.0f} s "
            "ago (stopped by 'ray stop', or killed, e.g. by the out-of-memory killer)" if local else
            f"the Ray cluster at {address} stopped answering {seconds:.0f} s ago (its head node's GCS: the cluster was "
            "stopped, or its head node or the network to it was lost)")
    flag = continue_flag(cfg)
    join = "" if local else (" --address ADDRESS (the cluster's address once it runs again: 'gmpq cluster up' "
                             "prints a new one; --address auto finds the one it recorded)")
    return (f"gmpq {command}: {what}, so the sweep stops here instead of waiting for Ray to give up. "
            f"{_kept_text(out)} Continue with: gmpq {command} --out {out} {flag}{join}; trials stopped midway, and "
            f"failed ones, run again. Exit status {LOST_STATUS}.")


def _kept_text(out: Path) -> str:
    """What the sweep folder holds of the trials, from its files (``read_sweep_status``)."""
    from .sweep_status import COMPLETED, FAILED, PRUNED, RUNNING, read_sweep_status

    try:
        st = read_sweep_status(out)
    except Exception as e:  # noqa: BLE001 - the paragraph goes out anyway
        log.warning("could not read the sweep's status: %s", e)
        return f"Every trial that ended is kept in {out}."
    if not st.trials:
        return "No trial had started, so nothing is lost."
    ended = ", ".join(f"{st.count(s)} {s}" for s in (COMPLETED, PRUNED, FAILED) if st.count(s))
    running = st.count(RUNNING)
    parts = [f"{st.n_ended} trial(s) had ended ({ended}), kept in {out / 'trials.parquet'} and MLflow"
             if st.n_ended else "No trial had ended"]
    if running:
        parts.append(f"{running} {'was' if running == 1 else 'were'} running and stop here")
    return "; ".join(parts) + "."


def sweep_lost_handler(cfg: Any, callbacks: list, command: str = "sweep") -> Callable[[str, float], None]:
    """``cluster_watch``'s ``on_lost`` for a sweep: the paragraph, the MLflow runs ended as after a Ctrl-C, the exit."""

    def lost(address: str, seconds: float) -> None:
        text = sweep_lost_text(cfg, address, seconds, command)
        exit_lost(text, cleanup=lambda: _end_mlflow(callbacks))

    return lost


def _end_mlflow(callbacks: list) -> None:
    from .mlflow_callback import MLflowCallback

    for cb in callbacks:
        if isinstance(cb, MLflowCallback):
            cb.end_interrupted()
