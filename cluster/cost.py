"""GPU-hour estimate of a sweep + fine-tune from image throughputs (the formulas in cluster/README.md).

    GPU-h(sweep)    = N * (E * S / r_search + (check_train / r_qat + check_test / r_fp)) / 3600
    GPU-h(shared)   = (teacher_epochs * sum(proxy_sizes) + fp_epochs * target_train) / r_fp / 3600
    GPU-h(finetune) = top_k * finetune_epochs * target_train / r_qat / 3600

Throughputs are images/s on one GPU (ANCHORS.md). Packing several trials on one GPU splits its
throughput, so GPU-hours do not depend on the GPU fraction; wall time ~ GPU-hours / GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["CostInputs", "CostEstimate", "estimate_gpu_hours"]


@dataclass(frozen=True, kw_only=True)
class CostInputs:
    n_trials: int
    search_epochs: int
    proxy_sizes: tuple[int, ...]          # drawn evenly by the sampler: the mean is used per trial
    check_train: int                      # transfer-check training images (one epoch)
    check_test: int
    teacher_epochs: int
    fp_epochs: int
    target_train: int                     # full target train split (e.g. ImageNet 1,281,167)
    top_k: int
    finetune_epochs: int
    r_search: float                       # search-step images/s per GPU
    r_fp: float                           # FP training images/s per GPU
    r_qat: float                          # fixed-policy QAT images/s per GPU

    def __post_init__(self) -> None:
        for name in ("r_search", "r_fp", "r_qat"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 images/s, but got {name}={getattr(self, name)!r}.")
        if not self.proxy_sizes:
            raise ConfigError("proxy_sizes must list at least one proxy size.")


@dataclass(frozen=True, kw_only=True)
class CostEstimate:
    per_search: float       # GPU-hours of one search
    searches: float         # all N searches
    checks: float           # all N transfer checks
    shared: float           # FP teachers + FP target model
    finetune: float
    total: float

    def wall_hours(self, n_gpus: int) -> float:
        """Wall time when GPU-bound on ``n_gpus`` GPUs."""
        return self.total / max(1, n_gpus)


def estimate_gpu_hours(c: CostInputs) -> CostEstimate:
    mean_proxy = sum(c.proxy_sizes) / len(c.proxy_sizes)
    per_search = c.search_epochs * mean_proxy / c.r_search / 3600
    checks = c.n_trials * (c.check_train / c.r_qat + c.check_test / c.r_fp) / 3600
    shared = (c.teacher_epochs * sum(c.proxy_sizes) + c.fp_epochs * c.target_train) / c.r_fp / 3600
    finetune = c.top_k * c.finetune_epochs * c.target_train / c.r_qat / 3600
    searches = c.n_trials * per_search
    return CostEstimate(per_search=per_search, searches=searches, checks=checks, shared=shared,
                        finetune=finetune, total=searches + checks + shared + finetune)
