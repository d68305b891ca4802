"""What each selected policy's final fine-tune is built from (moved here from ``final_stage``, which imports them):
the sweep's FP target model (``target_fp_checkpoint``, prepared and cached when the sweep recorded none) and the
policy's ``FinalJob`` from the sweep config's ``finetune`` section and ``precision``, the values given overriding
them (``final_job``, ``_given``).
"""
from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from gmpq_core.fileio import read_json

from .moved_sweep import usable_cache_dir
from .results import load_resolved_config
from .train_stage import RECIPE_DEFAULTS, FinalJob


def target_fp_checkpoint(sweep_dir: str | Path, *, say: Callable[[str], None] | None = None) -> Path:
    """The sweep's FP target model (``shared.json`` written by the sweep); trained and cached if absent."""
    sweep_dir = Path(sweep_dir)
    shared = sweep_dir / "shared.json"
    if shared.is_file():
        path = Path(read_json(shared).get("target_model_path", ""))
        if path.is_file() and path.with_suffix(".json").is_file():
            return path
    from gmpq_core.transfer import prepare_target_model
    from .sweep_config import SweepConfig, saved_before_precision

    cfg = SweepConfig.from_dict(saved_before_precision(load_resolved_config(sweep_dir, missing_ok=False))).resolved()
    cfg = replace(cfg, cache_dir=usable_cache_dir(cfg.cache_dir, address=cfg.address, say=say))
    if say:
        say(f"no FP target model recorded in {shared}: preparing it ({cfg.model} on {cfg.target_dataset}; "
            f"read from {cfg.cache_dir} if trained before)")
    return prepare_target_model(model=cfg.model, dataset=cfg.target_dataset, check=cfg.transfer,
                                cache_dir=cfg.cache_dir, data_root=cfg.data_root, image_size=cfg.image_size,
                                small_input=cfg.small_input, precision=cfg.precision).path


def _given(stage: dict, value: Any, key: str, default: Any) -> Any:
    """An explicit value, else the sweep config's ``finetune.<key>``, else ``default``."""
    return value if value is not None else (stage.get(key) if stage.get(key) is not None else default)


def final_job(cfg: dict, row: dict, fp_path: str | Path, *, epochs: int, lr: float | None = None,
              batch_size: int | None = None, max_steps_per_epoch: int | None = None, train_size: int | None = None,
              test_size: int | None = None, progress_dir: Path | None = None, precision: str | None = None) -> FinalJob:
    """The ``FinalJob`` of one selected policy (a pareto.parquet row): the resolved sweep config ``cfg``'s
    ``finetune`` section and ``precision``, the values given here overriding them; rank 0's progress file in
    ``progress_dir``."""
    stage = dict(cfg.get("finetune") or {})
    given = functools.partial(_given, stage)
    tid = str(row["trial_id"])
    return FinalJob(trial_id=tid, policy_json=str(row["policy_json"]), fp_checkpoint=str(fp_path),
                    dataset=str(cfg.get("target_dataset")), data_root=cfg.get("data_root"),
                    image_size=cfg.get("image_size"), epochs=epochs, lr=float(given(lr, "lr", RECIPE_DEFAULTS.lr)),
                    batch_size=int(given(batch_size, "batch_size", RECIPE_DEFAULTS.batch_size)),
                    distill=bool(stage.get("distill", RECIPE_DEFAULTS.distill)),
                    nesterov=bool(stage.get("nesterov", RECIPE_DEFAULTS.nesterov)),
                    seed=int(cfg.get("seed") or 0),
                    max_steps_per_epoch=given(max_steps_per_epoch, "max_steps_per_epoch", None),
                    train_size=given(train_size, "train_size", None), test_size=given(test_size, "test_size", None),
                    precision=str(precision or cfg.get("precision") or "fp32"),  # none saved: an older, float32 sweep
                    progress_file=str(progress_dir / f"finetune-{tid}.progress.json") if progress_dir else None)
