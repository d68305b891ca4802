"""What the final fine-tune leaves in the sweep folder: ``final.parquet`` (one row per fine-tuned policy)
and ``models/<trial_id>.pt``, each fine-tuned quantized model as one self-contained file
(``gmpq_core.export``: ``load_quantized_model(path).model`` is ready for inference)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import pyarrow as pa

from gmpq_core.errors import CheckpointError
from gmpq_core.fileio import load_checkpoint, read_json

from .results import FINAL_FILE, read_table, utc_now_iso

__all__ = ["FINAL_SCHEMA", "MODELS_DIR", "read_final", "final_row", "final_model_path", "model_results",
           "export_final_model", "saved_final_state", "export_saved_final"]

log = logging.getLogger(__name__)

MODELS_DIR = "models"
FINAL_SCHEMA = pa.schema([
    pa.field("trial_id", pa.string(), nullable=False), pa.field("policy_source", pa.string()),
    pa.field("final_top1", pa.float64()), pa.field("final_top5", pa.float64()), pa.field("final_loss", pa.float64()),
    pa.field("transfer_top1", pa.float64()), pa.field("bitops", pa.int64()), pa.field("bitops_total", pa.int64()),
    pa.field("gbitops", pa.float64()), pa.field("epochs", pa.int64()), pa.field("seconds", pa.float64()),
    pa.field("workers", pa.int64()), pa.field("resumed_from_epoch", pa.int64()), pa.field("train_images", pa.int64()),
    pa.field("test_images", pa.int64()), pa.field("finished_at", pa.string()), pa.field("policy_json", pa.string()),
    pa.field("recipe_json", pa.string()), pa.field("model_path", pa.string()),
])


def read_final(sweep_dir: str | Path, *, missing_ok: bool = False) -> pd.DataFrame:
    path = Path(sweep_dir) / FINAL_FILE
    if missing_ok and not path.exists():
        return FINAL_SCHEMA.empty_table().to_pandas()
    return read_table(path).to_pandas()


def final_row(pareto_row: Mapping[str, Any], run: Any, recipe_json: str, model_path: Path | None) -> dict:
    """The final.parquet row of one fine-tuned policy (``run``: the stage's ``FinalRun``)."""
    m = run.metrics
    tid = run.trial_id
    return {"trial_id": tid, "policy_source": f"sweep trial {tid} ({pareto_row.get('selection_reason') or 'selected'})",
            "final_top1": m.get("top1"), "final_top5": m.get("top5"), "final_loss": m.get("loss"),
            "transfer_top1": pareto_row.get("transfer_top1"), "bitops": pareto_row.get("bitops"),
            "bitops_total": pareto_row.get("bitops_total"), "gbitops": float(pareto_row["bitops"]) / 1e9,
            "epochs": int(m["epoch"]), "seconds": run.seconds, "workers": run.workers,
            "resumed_from_epoch": m.get("resumed_from_epoch"), "train_images": m.get("train_images"),
            "test_images": m.get("test_images"), "finished_at": utc_now_iso(),
            "policy_json": str(pareto_row["policy_json"]), "recipe_json": recipe_json,
            "model_path": str(model_path) if model_path is not None else None}


def final_model_path(sweep_dir: str | Path, trial_id: str) -> Path:
    return Path(sweep_dir) / MODELS_DIR / f"{trial_id}.pt"


def export_final_model(sweep_dir: str | Path, trial_id: str, state_dict: Mapping[str, Any], policy_json: str,
                       fp_checkpoint: str | Path, results: Mapping[str, Any]) -> Path:
    """Write ``models/<trial_id>.pt`` from the fine-tune's weights; the architecture is the FP target model's."""
    from gmpq_core.export import save_quantized_state
    from gmpq_core.policy import BitPolicy

    arch = read_json(Path(fp_checkpoint).with_suffix(".json"))["meta"]
    return save_quantized_state(final_model_path(sweep_dir, trial_id), state_dict, BitPolicy.from_json(policy_json),
                                arch=arch, results={k: v for k, v in results.items() if v is not None})


def saved_final_state(storage: str | Path, trial_id: str, state_file: str) -> dict | None:
    """The newest Ray Train checkpoint of ``finetune-<trial_id>`` under ``storage`` (its ``state_file``
    contents), or None: how a policy fine-tuned before models were exported gets its file without training."""
    found = sorted(Path(storage, f"finetune-{trial_id}").glob(f"checkpoint_*/{state_file}"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    try:
        return load_checkpoint(found[-1])
    except CheckpointError as e:
        log.warning("%s", e)
        return None


def model_results(row: Mapping[str, Any], metrics: Mapping[str, Any], dataset: str) -> dict:
    """What a final model file keeps beside its weights (``gmpq_core.load_quantized_model(...).results``):
    ``row`` is the policy's pareto.parquet (or final.parquet) row, ``metrics`` the fine-tune's last epoch."""
    return {"trial_id": str(row["trial_id"]), "dataset": dataset, "final_top1": metrics.get("top1"),
            "final_top5": metrics.get("top5"), "transfer_top1": row.get("transfer_top1"),
            "bitops": int(row["bitops"]), "gbitops": float(row["bitops"]) / 1e9, "epochs": metrics.get("epoch")}


def export_saved_final(sweep_dir: str | Path, storage: str | Path, prev: Mapping[str, Any], job: Any, state_file: str,
                       say: Callable[[str], None]) -> dict:
    """``prev`` (a final.parquet row fine-tuned before models were exported) with its model written from the
    Ray Train checkpoint of ``job`` (a ``FinalJob``); unchanged, with a note, when that checkpoint is gone."""
    state = saved_final_state(storage, job.trial_id, state_file)
    if state is None or state.get("policy_json") != job.policy_json:
        say(f"{job.trial_id}: no Ray Train checkpoint of this fine-tune under {storage}, so no model file (rerun with "
            "more --epochs, or delete its row in final.parquet, to fine-tune it again)")
        return dict(prev)
    metrics = {"top1": prev.get("final_top1"), "top5": prev.get("final_top5"), "epoch": prev.get("epochs")}
    path = export_final_model(sweep_dir, job.trial_id, state["model"], job.policy_json, job.fp_checkpoint,
                              model_results(prev, metrics, job.dataset))
    say(f"{job.trial_id}: model written to {path} (from its Ray Train checkpoint)")
    return {**prev, "model_path": str(path)}
