"""The budget buckets of a sweep config, checked before Ray starts (``check_sweep_config``): ``budget_buckets: []``
refused for a new sweep (``check_budget_buckets``), and edges that put every sampled budget into one bucket by
accident warned about (``warn_single_bucket``). Both name the same fixes: edges inside the budget range
(``suggested_edges``, each strictly inside it), or, for one bucket on purpose, a single edge above the highest bit
candidate (``one_bucket_edge``), which no average bitwidth reaches and which is therefore never warned about.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gmpq_core.errors import ConfigError

if TYPE_CHECKING:
    from .sweep_config import SweepConfig

log = logging.getLogger("orchestrator.sweep_checks")    # the config checks' warnings, under the name they had

__all__ = ["check_budget_buckets", "warn_single_bucket", "suggested_edges", "one_bucket_edge", "one_bucket_on_purpose"]

_STEPS = (0.25, 0.1, 0.05, 0.01)     # the roundings tried for the suggested edges, coarsest (most readable) first


def suggested_edges(low: float, high: float) -> list[float]:
    """Edges splitting the budget range ``low < high`` in about three, each strictly inside it: the thirds rounded
    to a quarter bit, or more finely where the range is too narrow for that, or else its midpoint."""
    low, high = float(low), float(high)
    for step in _STEPS:
        thirds = (low + (high - low) * k / 3 for k in (1, 2))
        edges = sorted({round(round(x / step) * step, 2) for x in thirds})
        edges = [e for e in edges if low < e < high]
        if edges:
            return edges
    return [(low + high) / 2]


def _top_bits(cfg: SweepConfig) -> int:
    """The highest bit candidate: no average bitwidth (so no budget) goes above it."""
    return max(*cfg.candidates.w_bits, *cfg.candidates.a_bits)


def one_bucket_edge(cfg: SweepConfig) -> int:
    """The edge to write for one bucket on purpose: one above the highest bit candidate."""
    return _top_bits(cfg) + 1


def one_bucket_on_purpose(cfg: SweepConfig) -> bool:
    """``budget_buckets`` is a single edge above the highest bit candidate: one bucket by construction, whatever the
    budget range (an edge merely above this range's budgets, or several edges, more likely are a mistake)."""
    edges = cfg.budget_buckets
    return len(edges) == 1 and edges[0] > _top_bits(cfg)


def _fixes(cfg: SweepConfig, low: float, high: float) -> str:
    """The two fixes, worded alike in the refusal and the warning."""
    return (f"Give edges inside your budget range {low:g}..{high:g}, such as budget_buckets: "
            f"{suggested_edges(low, high)}, so that trials are pruned and selected within their part of it; or, for "
            f"one bucket on purpose, a single edge above the highest bit candidate ({_top_bits(cfg)}), which no "
            f"budget reaches: budget_buckets: [{one_bucket_edge(cfg)}].")


def _sampled_range(cfg: SweepConfig) -> tuple[float, float] | None:
    """The budget range the sweep samples, or None for one budget (one bucket whatever the edges)."""
    low, high = cfg.space.bounds("budget_avg_bits")
    if low is None or high is None or low == high:
        return None
    return low, high


def check_budget_buckets(cfg: SweepConfig) -> None:
    """``budget_buckets: []`` (no edge) put every trial in one bucket without saying so: the pruner compared low-budget
    trials with high-budget ones (whose accuracy is higher anyway) and the Pareto selection had one bucket. Refused
    when a sweep starts (``check_sweep_config``), not as a config loads: a sweep begun with it keeps its resume. A
    sweep of one budget (a fixed ``budget_avg_bits``) has one bucket whatever the edges: [] is fine there."""
    sampled = _sampled_range(cfg)
    if cfg.budget_buckets or sampled is None:
        return
    raise ConfigError(
        "budget_buckets is empty ([]), which puts every trial in one budget bucket: the pruner would compare trials "
        "of every budget with each other (a low budget's lower accuracy gets it pruned) and the Pareto selection "
        f"would pick from one bucket. {_fixes(cfg, *sampled)} Nothing has been trained yet.")


def warn_single_bucket(cfg: SweepConfig) -> None:
    """Edges that put every budget the sweep can sample (more than one) into one bucket by accident (all below the
    range, all above it but not the single edge of ``one_bucket_on_purpose``, or none between the sampled values)
    are worth a warning: the pruner then compares all trials and the selection sees one bucket."""
    from search_spaces.space import FloatDim, bucket_of

    edges = cfg.budget_buckets
    sampled = _sampled_range(cfg)
    if not edges or sampled is None or one_bucket_on_purpose(cfg):
        return
    low, high = sampled
    values = cfg.space.possible_values("budget_avg_bits")
    if values is not None:
        buckets = {bucket_of(v, edges) for v in values}
    else:
        top = bucket_of(high, edges)
        if isinstance(cfg.space.dims.get("budget_avg_bits"), FloatDim) and float(high) in edges:
            top -= 1                                   # a float range's high end is (practically) never drawn
        buckets = set(range(bucket_of(low, edges), top + 1))
    if len(buckets) == 1:
        log.warning("budget_buckets %s put every sampled budget (%s..%s average bits) in one bucket, so the pruner "
                    "compares all trials and the Pareto selection has one bucket. %s",
                    list(edges), f"{low:g}", f"{high:g}", _fixes(cfg, low, high))
