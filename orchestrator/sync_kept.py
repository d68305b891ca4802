"""Kept fine-tunes in MLflow, for ``gmpq sync-mlflow``: a policy's earlier recipes kept aside
(``models/kept/<tid>.<digest>.json``, ``kept_finetunes``) whose fine-tune run the store lacks.

Live, a recipe's run is made while it is the current one (``mlflow_stages.log_final``: run ``finetune-<tid>``, or one
naming what differs from the policy's first recipe; key ``<tid>:<digest>`` in ``mlflow_runs.json``; tag
``gmpq.recipe`` = the digest; its recipe as ``recipe.*`` params; its epochs, final row, ``policy.json`` and model
file; tag ``trial_run_id`` and a description); when another recipe replaces it, the stage tags it ``KEPT_TAG``
and takes the tag off a recipe it restores (``retag_kept``, from ``log_final``). A recipe that ran
while MLflow was down, or whose run was deleted (in the UI, by ``mlflow gc``), has no run once it is kept aside, and
the sync's final stage step reads final.parquet only (the current recipes). ``sync_kept`` makes those runs as
``log_final`` makes a current recipe's (its epochs from its kept Ray Train checkpoint, ``finetune_history``; none
kept: its row only) but leaves the trial run pointing to the current recipe's (``finetune_run_id``, ``final_top1``):
a kept one is not the policy's result. Kept runs, those made here and the live ones, carry tag ``KEPT_TAG``; a
current recipe's run that has it (a kept recipe restored since) loses it. A second sync changes nothing. An
unfinished kept fine-tune (stopped before its row was written) has no result to log; a kept row from before recipes
were recorded cannot be told from the current one: both are left alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from .final_results import finetune_storage
from .finetune_history import checkpoint_history, finetune_run
from .kept_finetunes import KEPT_DIR, KeptFinetune, kept_finetunes
from .mlflow_links import link_finetune
from .mlflow_sink import MLflowSink
from .mlflow_stages import _log_final_metrics, _log_model, _recipe_key, _run_name, _trial_run
from .results import MODELS_DIR

__all__ = ["KEPT_TAG", "KeptSync", "kept_rows", "retag_kept", "sync_kept"]

KEPT_TAG = "gmpq.kept"      # "true" on the run of a recipe kept aside (not the policy's current fine-tune)


@dataclass(frozen=True)
class KeptSync:
    """What ``sync_kept`` did: ``made`` kept recipes' runs made; ``tagged``: runs given or relieved of ``KEPT_TAG``."""
    made: int = 0
    tagged: int = 0


def kept_rows(sweep_dir: Path) -> list[KeptFinetune]:
    """The finished fine-tunes kept aside in ``sweep_dir`` (all policies), those with a recorded recipe."""
    folder = Path(sweep_dir) / MODELS_DIR / KEPT_DIR
    tids = sorted({p.name.split(".")[0] for p in folder.glob("*.json")}) if folder.is_dir() else []
    return [k for tid in tids for k in kept_finetunes(sweep_dir, tid)
            if not k.unfinished and k.row.get("recipe_json") is not None]


def _tag(sink: MLflowSink, rid: str, kept: bool) -> bool:
    """Give run ``rid`` ``KEPT_TAG`` (``kept``) or take it away; whether it changed."""
    data = sink.call("reading a fine-tune run", lambda: sink.client.get_run(rid).data)
    if data is None or (KEPT_TAG in data.tags) == kept:
        return False
    if kept:
        sink.call("tagging a kept fine-tune run", sink.client.set_tag, rid, KEPT_TAG, "true")
    else:
        sink.call("untagging a restored fine-tune run", sink.client.delete_tag, rid, KEPT_TAG)
    return True


def retag_kept(sink: MLflowSink, kept: Iterable[Mapping[str, Any]], current: Iterable[Mapping[str, Any]]) -> int:
    """``KEPT_TAG`` on the fine-tune runs of the final.parquet rows ``kept`` (recipes kept aside), off those of
    ``current`` (a policy's current recipe: one restored); how many runs changed. A row without a run is left alone
    (``sync_kept`` makes a kept recipe's). No rows: no MLflow call. Saves the run ids it found by their tags."""
    known, changed = dict(sink.runs["finetune"]), 0
    for rows, flag in ((kept, True), (current, False)):
        for row in rows:
            rid = finetune_run(sink, row)
            changed += rid is not None and _tag(sink, rid, flag)
    if sink.runs["finetune"] != known:
        sink._save_ids()
    return changed


def _make(sink: MLflowSink, sweep_dir: Path, storage: Any, kept: KeptFinetune, row: Mapping[str, Any]) -> str | None:
    """The run of kept fine-tune ``kept`` as ``log_final`` makes a current recipe's, tagged ``KEPT_TAG``."""
    tid = str(row["trial_id"])
    key, recipe_tag, recipe = _recipe_key(row)
    params = {**{k: row.get(k) for k in ("trial_id", "policy_source")}, **{f"recipe.{k}": v for k, v in recipe.items()}}
    rid = sink.child_run("finetune", key, run_name=_run_name(sink, tid, recipe, recipe_tag.get("gmpq.recipe")),
                         params=params, tags={"trial_id": tid, "gmpq.role": "finetune", "status": "running",
                                              **recipe_tag, KEPT_TAG: "true"})
    if rid is None:
        return None
    history = checkpoint_history(storage, row, run=kept.checkpoint) if kept.checkpoint else None
    _log_final_metrics(sink, rid, row, history or [])
    if row.get("policy_json"):
        sink.call("logging policy.json", sink.client.log_text, rid, str(row["policy_json"]), "policy.json")
    _log_model(sink, rid, sweep_dir, row)
    sink.finish(rid, "FINISHED", {"status": "completed"})
    link_finetune(sink, rid, _trial_run(sink, tid), row)
    return rid


def sync_kept(sink: MLflowSink, cfg: Mapping[str, Any], sweep_dir: Path, final_df: pd.DataFrame | None) -> KeptSync:
    """Make the runs of the kept fine-tunes the store lacks, tag the kept ones ``KEPT_TAG`` and untag the current
    recipes' runs (``final_df``: final.parquet, None: no such file). Saves the run ids it made or found."""
    current = {_recipe_key(row)[0]: row for row in ([] if final_df is None else final_df.to_dict("records"))}
    storage = finetune_storage(cfg, sweep_dir)
    made = tagged = 0
    known = dict(sink.runs["finetune"])
    for kept in kept_rows(sweep_dir):
        row = dict(kept.row)
        if _recipe_key(row)[0] in current:        # restored since: final.parquet's row is that recipe's
            continue
        rid = finetune_run(sink, row)
        if rid is None:
            made += _make(sink, sweep_dir, storage, kept, row) is not None
        else:
            tagged += _tag(sink, rid, True)
    tagged += retag_kept(sink, (), current.values())
    if sink.runs["finetune"] != known:
        sink._save_ids()
    return KeptSync(made, tagged)
