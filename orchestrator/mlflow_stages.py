"""MLflow logging of the stages after the sweep, onto its parent run: the Pareto front (``log_pareto``)
and the final fine-tunes (``log_final``, one child run each). Both go through ``MLflowSink``, so a
tracking store that fails only warns once; ``gmpq sync-mlflow`` calls them again to fill gaps.

The parent's params are the sweep config at its start (its ``finetune.*`` params: the config's ``finetune:``
section), and MLflow params cannot change: the settings the final stage last ran with (a changed ``finetune:``
section, ``gmpq finetune --sweep DIR --lr ...``) are the parent's ``last_finetune.<setting>`` tags (``stage_tags``),
which each final stage rewrites (and drops the ``finetune.<setting>`` tags earlier versions wrote beside the params of
those names); its fine-tunes' own are their ``recipe.*`` params.

Each trial's run says where it went: tag ``pareto`` (``selected``, ``front`` or ``dominated``, set by ``log_pareto``
on every completed trial's run; a selected one's ``selection_reason``) and, once its policy is fine-tuned, metric
``final_top1`` and tag ``finetune_run_id`` (the fine-tune run's id, ``log_final``), whose tag ``trial_run_id`` names
it back. A fine-tune run's per-epoch test figures are final.parquet's ``final_top1`` / ``final_top5`` /
``final_loss`` (``mlflow_keys.finetune_epoch_metrics``). Both stages rewrite the runs' descriptions
(``mlflow_links``).
The Pareto front's logging lives in ``mlflow_pareto``, the fine-tune runs' keys, names and set-aside runs in
``mlflow_finetune_runs`` (both importable from here too).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Collection, Mapping

import pandas as pd

from .mlflow_finetune_runs import (_adopt_older_run, _older_key, _recipe_key, _restart_name, _run_name,  # noqa: F401
                                   _set_aside)
from .mlflow_keys import SET_ASIDE_TAG, _numeric, finetune_epoch_metrics
from .mlflow_links import link_finetune, note_sweep, note_trial, tag_trial
from .mlflow_pareto import PARETO_TABLE, _pareto_tags, _reasons, _replace_table, _trial_run, log_pareto  # noqa: F401
from .mlflow_sink import MLflowSink, flatten_config

__all__ = ["log_pareto", "log_final", "stage_tags", "STAGE_TAG_PREFIX", "PARETO_TABLE"]

log = logging.getLogger(__name__)

STAGE_TAG_PREFIX = "last_finetune."      # the parent's tags of the final stage's settings (``stage_tags``)
OLD_STAGE_TAG_PREFIX = "finetune."       # what earlier versions named them (as the sweep config's params)


def _point_trial_run(sink: MLflowSink, tid: str, finetune_rid: str | None, final_top1) -> bool:
    """The trial run of policy ``tid`` names its latest fine-tune: tag ``finetune_run_id``, metric ``final_top1``
    (step 0: the latest logged is the latest fine-tune's), unless it already does, and its description says so
    (``mlflow_links.note_trial``). Returns whether it changed."""
    rid = _trial_run(sink, tid) if finetune_rid else None
    if not rid:
        return False
    data = sink.call("reading a trial's run", lambda: sink.client.get_run(rid).data)
    if data is None:
        return False
    top1 = _numeric(final_top1)
    tags, metrics = dict(data.tags), dict(data.metrics)
    changed = not (tags.get("finetune_run_id") == finetune_rid and metrics.get("final_top1") == top1)
    if changed:
        if metrics.get("final_top1") != top1:          # (a fine-tune run made again: the same value, no new point)
            sink.log_metrics(rid, {"final_top1": top1})
        sink.call("tagging a trial's run", sink.client.set_tag, rid, "finetune_run_id", finetune_rid)
        tags["finetune_run_id"], metrics["final_top1"] = finetune_rid, top1
    return note_trial(sink, rid, tid, tags, metrics) or changed


def backfill_trial_tags(sink: MLflowSink, sweep_dir: str | Path, pareto_df: pd.DataFrame | None,
                        final_df: pd.DataFrame | None) -> int:
    """Give trial runs what ``gmpq pareto`` and the fine-tune now put on them, where they lack it (their tables were
    logged by an earlier version, or while MLflow was down): the ``pareto`` tag (and ``selection_reason``) from
    ``pareto_df``; for each fine-tuned policy of ``final_df`` the ``finetune_run_id`` tag and ``final_top1``, and on
    its fine-tune run the ``trial_run_id`` tag; the runs' descriptions (``mlflow_links``), the parent's included.
    Returns how many runs changed."""
    changed: set[str] = set()
    if pareto_df is not None:
        reasons = _reasons(pareto_df)
        for tid, tag in _pareto_tags(Path(sweep_dir), pareto_df).items():
            if tag_trial(sink, _trial_run(sink, tid), tid, tag, reasons.get(tid)):
                changed.add(tid)
    for row in ([] if final_df is None else final_df.to_dict("records")):
        tid = str(row["trial_id"])
        key, recipe_tag, _ = _recipe_key(row)
        frid = sink.runs["finetune"].get(key) if sink.has_child_run("finetune", key) else sink.call(
            "finding a fine-tune run", sink.find_run,
            {"mlflow.parentRunId": sink.parent_run_id, "trial_id": tid, "gmpq.role": "finetune", **recipe_tag})
        if _point_trial_run(sink, tid, frid, row.get("final_top1")):
            changed.add(tid)
        if link_finetune(sink, frid, _trial_run(sink, tid), row):
            changed.add(f"finetune {frid}")
    return len(changed) + note_sweep(sink, sweep_dir)


def stage_tags(final_df: pd.DataFrame) -> dict[str, str]:
    """The parent run's ``last_finetune.<setting>`` tags: the recipe, epochs and workers the fine-tunes of
    ``final_df`` ran with (the final stage's rows all share them; a setting they differ in, as rows of several
    stages in a sync may, lists each value). Values as the params write them (``flatten_config``)."""

    values: dict[str, list[str]] = {}
    for row in final_df.to_dict("records"):
        setting = {**_recipe_key(row)[2], **{k: int(row[k]) for k in ("epochs", "workers") if _whole(row.get(k))}}
        for k, v in flatten_config(setting, max_depth=1).items():
            seen = values.setdefault(f"{STAGE_TAG_PREFIX}{k}", [])
            if v not in seen:
                seen.append(v)
    return {k: ", ".join(v) for k, v in values.items()}


def _drop_old_stage_tags(sink: MLflowSink) -> None:
    """The parent's ``finetune.<setting>`` tags an earlier version wrote (the final stage's settings under the names
    of the sweep config's params, with other values) are deleted: ``last_finetune.*`` say it now."""
    data = sink.call("reading the parent run", lambda: sink.client.get_run(sink.parent_run_id).data)
    for k in sorted(data.tags if data is not None else ()):
        if k.startswith(OLD_STAGE_TAG_PREFIX):
            sink.call("untagging the parent run", sink.client.delete_tag, sink.parent_run_id, k)


def _whole(v) -> bool:
    return v is not None and v == v and not isinstance(v, bool)      # (NaN != NaN: a missing number)


def _log_model(sink: MLflowSink, rid: str | None, sweep_dir: str | Path, row: Mapping) -> None:
    """The fine-tuned model file of a final.parquet row (gmpq_core.load_quantized_model) under ``model/``."""
    from .final_results import resolve_model_path

    path = resolve_model_path(sweep_dir, row.get("model_path"))
    if rid and path is not None and path.is_file():
        sink.call(f"logging {path.name}", sink.client.log_artifact, rid, str(path), "model")


def log_final(tracking_uri: str | None, sweep_dir: str | Path, final_df: pd.DataFrame, *,
              histories: Mapping[str, list[dict]] | None = None, png_path: str | Path | None = None,
              fresh: Collection[str] | None = None, kept: Collection[Mapping] = (),
              restored: Collection[Mapping] = ()) -> bool:
    """One child run per policy and fine-tune recipe (its settings but the epochs: a rerun with more epochs
    continues the run, one with another lr or precision gets its own, so both can be compared) with its
    metrics, recipe as params, policy and model file; final.parquet + plot on the parent. A policy's first
    recipe's run is ``finetune-<trial_id>``, another's names what differs (``_run_name``). ``fresh``
    (the policies fine-tuned in this call) given: the rows of other policies are logged only when their run
    is missing (a stage stopped by Ctrl-C before it logged what had finished), and a fresh row that started
    from epoch 0 gets a new run even when its recipe had one (that earlier run is kept, with its history, tagged
    ``gmpq.replaced_by``; the new one is named ``... (restart <n>)`` and tagged ``gmpq.restarted_from``). The
    parent run's ``last_finetune.*`` tags become the settings of ``final_df``'s rows (``stage_tags``; an earlier
    version's ``finetune.*`` tags are dropped), and each policy's trial run points to its fine-tune run
    (``_point_trial_run``). The runs of the rows ``kept`` (recipes this stage kept aside) get tag ``gmpq.kept``, those
    of ``restored`` (kept recipes it brought back) lose it, first (a restored run restarted below keeps none)."""
    sink = MLflowSink(tracking_uri, sweep_dir)
    if not sink.connect():
        return False
    if kept or restored:
        from .sync_kept import retag_kept          # (it imports this module)

        retag_kept(sink, kept, restored)
    for row in final_df.to_dict("records"):
        tid = str(row["trial_id"])
        key, recipe_tag, recipe = _recipe_key(row)
        params = {**{k: row.get(k) for k in ("trial_id", "policy_source")},
                  **{f"recipe.{k}": v for k, v in recipe.items()}}
        just_trained = fresh is not None and tid in fresh and bool((histories or {}).get(tid))   # not a refill
        old = _older_key(sink, row, key, recipe, just_trained)
        if old is not None:
            _adopt_older_run(sink, old, key, recipe_tag, params)
        if fresh is not None and tid not in fresh and sink.has_child_run("finetune", key):
            continue
        earlier = _set_aside(sink, key, {"mlflow.parentRunId": sink.parent_run_id, "trial_id": tid,
                                         "gmpq.role": "finetune", **recipe_tag}) \
            if just_trained and not row.get("resumed_from_epoch") else None
        name = f"finetune-{tid}" if sink.has_child_run("finetune", key) else \
            _run_name(sink, tid, recipe, recipe_tag.get("gmpq.recipe"))
        restart = {} if earlier is None else {"gmpq.restarted_from": earlier}   # started afresh: name and tags say so
        rid = sink.child_run("finetune", key, run_name=_restart_name(sink, key, name) if restart else name,
                             params=params, tags={"trial_id": tid, "gmpq.role": "finetune", "status": "running",
                                                  **recipe_tag, **restart})
        if earlier is not None and rid is not None:
            sink.call("tagging a replaced fine-tune run", sink.client.set_tag, earlier, SET_ASIDE_TAG, rid)
        _log_final_metrics(sink, rid, row, (histories or {}).get(tid, []))
        if row.get("policy_json"):
            sink.call("logging policy.json", sink.client.log_text, rid, str(row["policy_json"]), "policy.json")
        _log_model(sink, rid, sweep_dir, row)
        sink.finish(rid, "FINISHED", {"status": "completed"})
        _point_trial_run(sink, tid, rid, row.get("final_top1"))
        link_finetune(sink, rid, _trial_run(sink, tid), row)
    from mlflow.entities import RunTag

    settings = [RunTag(k, v) for k, v in stage_tags(final_df).items()]     # params cannot change; tags can
    if settings:
        sink.call("tagging the parent run", sink.client.log_batch, sink.parent_run_id, tags=settings, synchronous=True)
        _drop_old_stage_tags(sink)
    d = Path(sweep_dir)
    for f in [d / "final.parquet", png_path]:
        if f is not None and Path(f).is_file():
            sink.call(f"logging {Path(f).name}", sink.client.log_artifact, sink.parent_run_id, str(f), "results")
    note_sweep(sink, d)
    return sink.enabled


FINAL_ROW_METRICS = ("final_top1", "final_top5", "final_loss", "bitops", "gbitops", "bitops_total", "seconds",
                     "transfer_top1", "epochs", "workers")     # a fine-tune run's, from its final.parquet row


def _log_final_metrics(sink: MLflowSink, rid: str | None, row: Mapping, history: list[dict]) -> None:
    """A fine-tune's per-epoch reports (``step=epoch``) by final.parquet's names (``finetune_epoch_metrics``: the
    test top-1 per epoch is ``final_top1``, as the trial run's and final.parquet's; a run of an earlier version keeps
    its ``top1`` ...), then its final.parquet row's ``FINAL_ROW_METRICS`` at its last epoch, less what the last
    report logged there with the same value, or, with no ``history`` (nothing trained in this call), less what the
    run holds already with the same value (no point twice in one series)."""
    if not rid:
        return
    data = None if rid in sink.made_runs else sink.call("reading a fine-tune run", lambda: sink.client.get_run(rid).data)
    logged = dict(data.metrics) if data is not None else {}       # (a run this sink just made holds nothing)
    step, last = int(row.get("epochs") or 0), {}
    for h in history:
        report = finetune_epoch_metrics(h, logged)
        sink.log_metrics(rid, report, step=int(h.get("epoch", 0)))
        if int(h.get("epoch", 0)) == step:
            last = report
    final = {k: row.get(k) for k in FINAL_ROW_METRICS}
    if not history:          # nothing trained now (a model file refilled, a sync): not what the run holds already
        last = {k: v for k, v in logged.items() if k in final}
    sink.log_metrics(rid, {k: v for k, v in final.items() if not (k in last and _numeric(last[k]) == _numeric(v))},
                     step=step)
