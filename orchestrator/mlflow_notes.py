"""MLflow helpers the sweep, study, run and sync commands share, without Ray Tune (``gmpq sync-mlflow`` imports
them; ``mlflow_callback`` imports Ray Tune):

- ``final_metrics``: a trial's final metrics by their MLflow keys (a completed trial's derived-policy proxy_top1 and
  ard under those names, as in trials.parquet; the supernet's per-epoch ones are ``supernet_proxy_top1`` /
  ``supernet_ard``; ``POLICY_KEYS``: the policy's keys in runs of earlier versions);
- ``noting_mlflow_off``: the MLflow sink's "logging disabled" warning, caught as it is shown, for a command's last
  lines.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Mapping

from .mlflow_keys import LEGACY_POLICY_KEYS, SUPERNET_KEYS
from .mlflow_sink import DISABLED, FINAL_METRICS

__all__ = ["POLICY_KEYS", "final_metrics", "noting_mlflow_off"]

# Where runs of earlier versions hold a completed trial's policy proxy_top1 / ard (``mlflow_keys.legacy_layout``).
POLICY_KEYS = LEGACY_POLICY_KEYS


def final_metrics(row: Mapping[str, Any], status: str, *, legacy: bool = False) -> dict[str, Any]:
    """A trial's final metrics (``FINAL_METRICS``) by their MLflow keys: a completed trial's proxy_top1 and ard (its
    derived policy's) under their own names, as trials.parquet has them; a pruned or failed trial's are its last
    epoch's report (the supernet's, already in the per-epoch series at that step) under ``SUPERNET_KEYS``. A
    ``legacy`` run (an earlier version's: ``mlflow_keys.legacy_layout``) keeps its names: the policy's under
    ``POLICY_KEYS``, the supernet's plain."""
    if legacy:
        keys = POLICY_KEYS if status == "completed" else {}
    else:
        keys = {} if status == "completed" else SUPERNET_KEYS
    return {keys.get(k, k): row.get(k) for k in FINAL_METRICS}


@contextlib.contextmanager
def noting_mlflow_off(*, once: bool = False) -> Iterator[list[str]]:
    """Yields a list that gets the MLflow sink's "logging disabled" warning once it is shown (shown as before, where
    and when it is raised: at a sweep's or study's start, or from the MLflow writer thread), for the command's last
    lines (a study of hours says at its start that MLflow is down). ``once``: a command whose stages each connect
    again (each tries: the store may answer again by then; ``gmpq run``, a ``finetune --sweep`` that selects again)
    shows the paragraph the first time only; the list still gets each one."""
    shown: list[str] = []
    show = warnings.showwarning

    def note(message: Any, category: Any, *rest: Any, **kw: Any) -> None:
        if str(message).startswith(DISABLED):
            shown.append(str(message))
            if once and len(shown) > 1:
                return
        show(message, category, *rest, **kw)

    warnings.showwarning = note
    try:
        yield shown
    finally:
        if warnings.showwarning is note:
            warnings.showwarning = show
