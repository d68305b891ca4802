"""MLflow logging of the stages after the sweep, onto its parent run: the Pareto front (``log_pareto``)
and the final fine-tunes (``log_final``, one child run each). Both go through ``MLflowSink``, so a
tracking store that fails only warns once; ``gmpq sync-mlflow`` calls them again to fill gaps.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Collection, Mapping

import pandas as pd

from .mlflow_sink import MLflowSink
from .results import LAYERS_FILE, TRIALS_FILE

__all__ = ["log_pareto", "log_final"]


def log_pareto(tracking_uri: str | None, sweep_dir: str | Path, pareto_df: pd.DataFrame,
               png_path: str | Path | None) -> bool:
    """Add the Pareto table (JSON table + Parquet), the plot and trials/layers Parquet to the parent run.

    Child runs of front trials get tag ``pareto`` = ``selected`` or ``front``. Returns False when
    MLflow could not be written (after one warning).
    """
    sink = MLflowSink(tracking_uri, sweep_dir)
    if not sink.connect():
        return False
    c, pid, d = sink.client, sink.parent_run_id, Path(sweep_dir)
    table = pareto_df.drop(columns=[x for x in ("policy_json", "layers_json") if x in pareto_df])
    sink.call("logging the Pareto table", c.log_table, pid, table, "pareto/pareto_table.json")
    for f in [d / "pareto.parquet", png_path, d / TRIALS_FILE, d / LAYERS_FILE]:
        if f is not None and Path(f).is_file():
            sink.call(f"logging {Path(f).name}", c.log_artifact, pid, str(f), "results")
    sink.log_metrics(pid, {"pareto_size": len(pareto_df),
                           "n_selected": int(pareto_df["selected"].sum()) if "selected" in pareto_df else 0})
    for tid, sel in zip(pareto_df.get("trial_id", []), pareto_df.get("selected", [False] * len(pareto_df))):
        rid = sink.runs["trials"].get(str(tid))
        if rid:
            sink.call("tagging a Pareto trial", c.set_tag, rid, "pareto", "selected" if sel else "front")
    return sink.enabled


def _recipe_key(row: Mapping) -> tuple[str, dict, dict]:
    """(child-run key, tags, recipe) of a final.parquet row: ``<trial_id>:<recipe hash>`` (the trial id alone
    for a row from before recipes were recorded)."""
    from .final_results import row_recipe

    tid, text = str(row["trial_id"]), row_recipe(row)
    if text is None:
        return tid, {}, {}
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    return f"{tid}:{digest}", {"gmpq.recipe": digest}, json.loads(text)


def _adopt_run_before_recipes(sink: MLflowSink, tid: str, key: str, recipe_tag: Mapping[str, str],
                              params: Mapping) -> None:
    """A sweep whose fine-tune runs were keyed by trial id alone (before recipes): the run of ``tid`` is this
    recipe's (the one final.parquet reports), so it gets the recipe's tag and params rather than a twin."""
    from .mlflow_sink import flatten_config

    rid = sink.rekey_child("finetune", tid, key)
    for k, v in recipe_tag.items():
        sink.call("tagging a fine-tune run", sink.client.set_tag, rid, k, v)
    logged = sink.call("reading a fine-tune run", lambda: sink.client.get_run(rid).data.params) or {}
    sink.call("logging a fine-tune's recipe", sink.log_params, rid,
              {k: v for k, v in flatten_config(dict(params)).items() if k not in logged})


def _log_model(sink: MLflowSink, rid: str | None, sweep_dir: str | Path, row: Mapping) -> None:
    """The fine-tuned model file of a final.parquet row (gmpq_core.load_quantized_model) under ``model/``."""
    from .final_results import resolve_model_path

    path = resolve_model_path(sweep_dir, row.get("model_path"))
    if rid and path is not None and path.is_file():
        sink.call(f"logging {path.name}", sink.client.log_artifact, rid, str(path), "model")


def log_final(tracking_uri: str | None, sweep_dir: str | Path, final_df: pd.DataFrame, *,
              histories: Mapping[str, list[dict]] | None = None, png_path: str | Path | None = None,
              fresh: Collection[str] | None = None) -> bool:
    """One child run ``finetune-<trial_id>`` per policy and fine-tune recipe (its settings but the epochs: a
    rerun with more epochs continues the run, one with another lr gets its own, so both can be compared)
    with its metrics, recipe as params, policy and model file; final.parquet + plot on the parent. ``fresh``
    (the policies fine-tuned in this call) given: the rows of other policies are logged only when their run
    is missing (a stage stopped by Ctrl-C before it logged what had finished), and a fresh row that started
    from epoch 0 gets a new run even when its recipe had one (that earlier run is kept, with its history)."""
    sink = MLflowSink(tracking_uri, sweep_dir)
    if not sink.connect():
        return False
    for row in final_df.to_dict("records"):
        tid = str(row["trial_id"])
        key, recipe_tag, recipe = _recipe_key(row)
        params = {**{k: row.get(k) for k in ("trial_id", "policy_source")},
                  **{f"recipe.{k}": v for k, v in recipe.items()}}
        just_trained = fresh is not None and tid in fresh and bool((histories or {}).get(tid))   # not a refill
        if key != tid and key not in sink.runs["finetune"] and tid in sink.runs["finetune"] and not just_trained:
            _adopt_run_before_recipes(sink, tid, key, recipe_tag, params)   # (a retrained row: not its run)
        if fresh is not None and tid not in fresh and sink.has_child_run("finetune", key):
            continue
        if just_trained and not row.get("resumed_from_epoch") and key in sink.runs["finetune"]:
            sink.rekey_child("finetune", key, f"{key}#{sink.runs['finetune'][key][:8]}")   # started afresh
        rid = sink.child_run("finetune", key, run_name=f"finetune-{tid}", params=params,
                             tags={"trial_id": tid, "gmpq.role": "finetune", "status": "running", **recipe_tag})
        for h in (histories or {}).get(tid, []):
            sink.log_metrics(rid, {k: v for k, v in h.items() if k != "epoch"}, step=int(h.get("epoch", 0)))
        sink.log_metrics(rid, {k: row.get(k) for k in ("final_top1", "final_top5", "bitops", "bitops_total",
                                                         "seconds", "transfer_top1", "epochs", "workers")},
                         step=int(row.get("epochs") or 0))
        if row.get("policy_json"):
            sink.call("logging policy.json", sink.client.log_text, rid, str(row["policy_json"]), "policy.json")
        _log_model(sink, rid, sweep_dir, row)
        sink.finish(rid, "FINISHED", {"status": "completed"})
    d = Path(sweep_dir)
    for f in [d / "final.parquet", png_path]:
        if f is not None and Path(f).is_file():
            sink.call(f"logging {Path(f).name}", sink.client.log_artifact, sink.parent_run_id, str(f), "results")
    return sink.enabled
