"""MLflow helpers the sweep, study, run and sync commands share, without Ray Tune (``gmpq sync-mlflow`` imports
them; ``mlflow_callback`` imports Ray Tune):

- ``POLICY_KEYS`` / ``final_metrics``: a trial's final metrics by their MLflow keys (a completed trial's derived-policy
  proxy_top1 and ard as ``policy_proxy_top1`` / ``policy_ard``);
- ``noting_mlflow_off``: the MLflow sink's "logging disabled" warning, caught as it is shown, for a command's last
  lines.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Mapping

from .mlflow_sink import DISABLED, FINAL_METRICS

__all__ = ["POLICY_KEYS", "final_metrics", "noting_mlflow_off"]

# A completed trial's final proxy_top1 and ard are its derived policy's (measured once the search ended;
# trials.parquet's columns), while each search epoch reports the supernet's under the same names: logged under those
# names at the last epoch's step, one metric's history would mix both quantities. The policy's go under these keys.
POLICY_KEYS = {"proxy_top1": "policy_proxy_top1", "ard": "policy_ard"}


def final_metrics(row: Mapping[str, Any], status: str) -> dict[str, Any]:
    """A trial's final metrics (``FINAL_METRICS``) by their MLflow keys: a completed trial's proxy_top1 and ard under
    ``POLICY_KEYS``; a pruned or failed trial's are its last epoch's report (the supernet's, already in the per-epoch
    series at that step), under their own names."""
    keys = POLICY_KEYS if status == "completed" else {}
    return {keys.get(k, k): row.get(k) for k in FINAL_METRICS}


@contextlib.contextmanager
def noting_mlflow_off() -> Iterator[list[str]]:
    """Yields a list that gets the MLflow sink's "logging disabled" warning once it is shown (shown as before, where
    and when it is raised: at a sweep's or study's start, or from the MLflow writer thread), for the command's last
    lines (a study of hours says at its start that MLflow is down)."""
    shown: list[str] = []
    show = warnings.showwarning

    def note(message: Any, category: Any, *rest: Any, **kw: Any) -> None:
        if str(message).startswith(DISABLED):
            shown.append(str(message))
        show(message, category, *rest, **kw)

    warnings.showwarning = note
    try:
        yield shown
    finally:
        if warnings.showwarning is note:
            warnings.showwarning = show
