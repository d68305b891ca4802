"""The sweep's Tune searcher: Ray's ``OptunaSearch`` with the sweep's two changes (``SweepOptunaSearch``)."""
from __future__ import annotations

import warnings

from ray.tune.search.optuna import OptunaSearch

__all__ = ["SweepOptunaSearch"]


class SweepOptunaSearch(OptunaSearch):
    """OptunaSearch that tells a pruned trial (final metrics missing) as PRUNED, not as a bad tell, and whose
    suggestions do not warn that the define-by-run space "took N seconds": that time is the sampler's own model
    (a GP's fit), not training in the driver."""

    def suggest(self, trial_id: str) -> dict | None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument took")
            return super().suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if result is not None and any(result.get(m) is None for m in metrics):
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)
