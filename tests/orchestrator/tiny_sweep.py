"""The tiny sweep config the real-sweep tests run (one demo-preset trial of 2 steps on 100 proxy images)."""
from __future__ import annotations

from typing import Any


def tiny_sweep_config(name: str, *, n_trials: int = 1, proxy_eval_size: int = 100, train_size: int = 256,
                      **changes: Any) -> dict[str, Any]:
    """A sweep config dict for ``yaml.safe_dump``: ``n_trials`` trials at once, no pruner; ``changes`` replace keys."""
    return {
        "preset": "demo", "name": name, "n_trials": n_trials, "max_concurrent_trials": n_trials, "teacher_epochs": 1,
        "proxy_eval_size": proxy_eval_size, "pruner": {"name": "none"},
        "space": {"proxy_size": [100], "search_epochs": 1,
                  "budget_avg_bits": {"type": "float", "low": 2.5, "high": 5.0}},
        "search": {"batch_size": 32, "max_steps_per_epoch": 2, "recalibrate_bn_batches": 1},
        "transfer": {"train_size": train_size, "test_size": 200, "batch_size": 64, "fp_epochs": 1,
                     "fp_train_size": 1000, "fp_batch_size": 64},
        **changes,
    }
