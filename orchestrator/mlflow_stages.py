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
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Collection, Mapping

import pandas as pd

from gmpq_core.errors import CheckpointError

from .kept_finetunes import recipe_digest
from .mlflow_keys import SET_ASIDE_TAG, _numeric, finetune_epoch_metrics
from .mlflow_links import link_finetune, note_sweep, note_trial, tag_trial
from .mlflow_sink import MLflowSink, flatten_config
from .pareto import POLICIES_PNG
from .results import LAYERS_FILE, TRIALS_FILE

__all__ = ["log_pareto", "log_final", "stage_tags", "STAGE_TAG_PREFIX", "PARETO_TABLE"]

log = logging.getLogger(__name__)

STAGE_TAG_PREFIX = "last_finetune."      # the parent's tags of the final stage's settings (``stage_tags``)
OLD_STAGE_TAG_PREFIX = "finetune."       # what earlier versions named them (as the sweep config's params)
PARETO_TABLE = "pareto/pareto_table.json"   # the parent run's Pareto table (mlflow.load_table), the front as it is now


def log_pareto(tracking_uri: str | None, sweep_dir: str | Path, pareto_df: pd.DataFrame,
               png_path: str | Path | None) -> bool:
    """Add the Pareto table (JSON table + Parquet), the plots (``png_path``, and ``policies.png`` when the sweep
    folder has it) and trials/layers Parquet to the parent run.

    Every completed trial's child run gets tag ``pareto`` (``_pareto_tags``): ``selected``, ``front`` or
    ``dominated``. Returns False when MLflow could not be written (after one warning).
    """
    sink = MLflowSink(tracking_uri, sweep_dir)
    if not sink.connect():
        return False
    c, pid, d = sink.client, sink.parent_run_id, Path(sweep_dir)
    table = pareto_df.drop(columns=[x for x in ("policy_json", "layers_json") if x in pareto_df])
    _replace_table(sink, pid, table, PARETO_TABLE)
    for f in [d / "pareto.parquet", png_path, d / POLICIES_PNG, d / TRIALS_FILE, d / LAYERS_FILE]:
        if f is not None and Path(f).is_file():
            sink.call(f"logging {Path(f).name}", c.log_artifact, pid, str(f), "results")
    sizes = {"pareto_size": len(pareto_df),
             "n_selected": int(pareto_df["selected"].sum()) if "selected" in pareto_df else 0}
    held = sink.call("reading the parent run", lambda: sink.client.get_run(pid).data.metrics) or {}
    sink.log_metrics(pid, {k: v for k, v in sizes.items() if held.get(k) != v})     # (a rerun: no point again)
    reasons = _reasons(pareto_df)
    for tid, tag in _pareto_tags(d, pareto_df).items():
        tag_trial(sink, _trial_run(sink, tid), tid, tag, reasons.get(tid))
    note_sweep(sink, d)
    return sink.enabled


def _reasons(pareto_df: pd.DataFrame) -> dict[str, str]:
    """``trial_id -> selection_reason`` of the selected rows of ``pareto_df``."""
    rows = pareto_df.to_dict("records")
    return {str(r["trial_id"]): str(r.get("selection_reason") or "") for r in rows if r.get("selected")}


def _replace_table(sink: MLflowSink, rid: str, table: pd.DataFrame, artifact_file: str) -> None:
    """``table`` as run ``rid``'s table ``artifact_file``, replacing the one there: ``MlflowClient.log_table`` appends
    to an existing table (each rerun of ``gmpq pareto`` added the front again), so only a first one goes through it
    (which also marks the file as a table for the UI); later ones overwrite the file, in the format it writes."""
    folder, name = artifact_file.rsplit("/", 1)
    have = sink.call("listing the parent run's artifacts",
                     lambda: {a.path for a in sink.client.list_artifacts(rid, folder)})
    if have is None or artifact_file not in have:
        sink.call("logging the Pareto table", sink.client.log_table, rid, table, artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        table.to_json(path, orient="split", index=False, date_format="iso")
        sink.call("logging the Pareto table", sink.client.log_artifact, rid, str(path), folder)


def _pareto_tags(sweep_dir: Path, pareto_df: pd.DataFrame) -> dict[str, str]:
    """``trial_id -> pareto tag``: ``selected`` / ``front`` for the rows of ``pareto_df``, ``dominated`` for the other
    completed trials of trials.parquet a front row dominates (``pareto``'s rule; a trial that ended after the front
    was computed, which none dominates, gets none); pruned and failed trials none."""
    from .pareto import ACC, COST, completed_trials
    from .results import read_trials

    tags = {str(t): "selected" if s else "front"
            for t, s in zip(pareto_df.get("trial_id", []), pareto_df.get("selected", [False] * len(pareto_df)))}
    try:
        done = completed_trials(read_trials(sweep_dir, missing_ok=True))
    except CheckpointError as e:         # the front's tags still go on
        log.warning("no MLflow tag for the dominated trials: %s", e)
        return tags
    if done.empty:
        return tags
    front = [(float(a), float(b)) for a, b in zip(pareto_df.get(ACC, []), pareto_df.get(COST, []))]
    for tid, acc, cost in zip(done["trial_id"].astype(str), done[ACC].astype(float), done[COST].astype(float)):
        if tid not in tags and any(a >= acc and b <= cost and (a > acc or b < cost) for a, b in front):
            tags[tid] = "dominated"
    return tags


def _trial_run(sink: MLflowSink, tid: str) -> str | None:
    """The id of trial ``tid``'s run (persisted, else found by its tags; None: it has none)."""
    rid = sink.runs["trials"].get(tid)
    if rid:
        return rid
    return sink.call("finding a trial's run", sink.find_run,
                     {"mlflow.parentRunId": sink.parent_run_id, "trial_id": tid, "gmpq.role": "trial"})


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


def _recipe_key(row: Mapping) -> tuple[str, dict, dict]:
    """(child-run key, tags, recipe) of a final.parquet row: ``<trial_id>:<recipe hash>`` (the trial id alone
    for a row from before recipes were recorded)."""
    from .final_results import row_recipe

    tid, text = str(row["trial_id"]), row_recipe(row)
    if text is None:
        return tid, {}, {}
    digest = recipe_digest(text)
    return f"{tid}:{digest}", {"gmpq.recipe": digest}, json.loads(text)


def _older_key(sink: MLflowSink, row: Mapping, key: str, recipe: Mapping, just_trained: bool) -> str | None:
    """The key an earlier version kept this row's fine-tune run under, when only that key is there: the trial
    id alone (before recipes; not for a row retrained in this call, which may have other settings), or the
    recipe without its precision (before the precision was part of it; for a row that continued a checkpoint,
    which the workers do only in the same precision)."""
    tid, runs = str(row["trial_id"]), sink.runs["finetune"]
    if key == tid or key in runs:
        return None
    if tid in runs and not just_trained:
        return tid
    resumed = row.get("resumed_from_epoch")
    if "precision" in recipe and resumed is not None and resumed > 0:   # (NaN > 0 is False: unknown)
        old = f"{tid}:{recipe_digest(json.dumps({k: v for k, v in recipe.items() if k != 'precision'}, sort_keys=True))}"
        return old if old in runs else None
    return None


def _adopt_older_run(sink: MLflowSink, old: str, key: str, recipe_tag: Mapping[str, str], params: Mapping) -> None:
    """A fine-tune run kept under an older key (``_older_key``) is this recipe's (the one final.parquet reports),
    so it gets the recipe's key, tag and the params it lacks rather than a twin."""

    rid = sink.rekey_child("finetune", old, key)
    for k, v in recipe_tag.items():
        sink.call("tagging a fine-tune run", sink.client.set_tag, rid, k, v)
    sink.call("logging a fine-tune's recipe", sink.log_params, rid, flatten_config(dict(params)))


def _run_name(sink: MLflowSink, tid: str, recipe: Mapping, digest: str | None) -> str:
    """The name of a new fine-tune run of policy ``tid``: ``finetune-<tid>`` for its first recipe (the run most
    searches and the Ray Train folder ``ray_results/finetune-<tid>`` go by, as before recipes had runs of their
    own) and for another run of that recipe; another recipe's run adds what differs from the first, e.g.
    ``finetune-t1 (lr=0.05)``, or its hash (tag ``gmpq.recipe``) when that is more than three settings or the
    first run's recipe is unknown. Only the settings the first run logged are compared (one from before the
    precision was in recipes has no ``recipe.precision``: that is unknown, not different); when they are all
    the same but the recipe is not the first's, the settings it did not log are named."""

    plain = f"finetune-{tid}"
    first = digest and sink.call("finding a policy's first fine-tune run", sink.find_run,
                                 {"mlflow.parentRunId": sink.parent_run_id, "trial_id": tid, "gmpq.role": "finetune"},
                                 set_aside=True)
    if not first:
        return plain
    data = sink.call("reading a fine-tune run", lambda: sink.client.get_run(first).data)
    logged, tags = (dict(data.params), dict(data.tags)) if data is not None else ({}, {})
    if not any(k.startswith("recipe.") for k in logged):
        return f"{plain} (recipe {digest})"
    mine = flatten_config({f"recipe.{k}": v for k, v in recipe.items()})
    diff = [f"{k.removeprefix('recipe.')}={v}" for k, v in sorted(mine.items()) if k in logged and logged[k] != v]
    if not diff and tags.get("gmpq.recipe") not in (None, digest):     # differs in what the first did not log
        diff = [f"{k.removeprefix('recipe.')}={v}" for k, v in sorted(mine.items()) if k not in logged]
    if not diff:
        return plain
    return f"{plain} ({', '.join(diff)})" if len(diff) <= 3 else f"{plain} (recipe {digest})"


def _set_aside(sink: MLflowSink, key: str, tags: Mapping[str, str]) -> str | None:
    """A fine-tune trained afresh in a recipe that has a run: that run (persisted, else found by ``tags`` when the
    id file lost it) is kept, with its history, under ``<key>#<its id>``, so the new one gets a run of its own
    rather than its epochs logged again into the old series; returns the old run's id (None: there is none)."""
    runs = sink.runs["finetune"]
    rid = runs[key] if sink.has_child_run("finetune", key) else None      # (a deleted run is no history to keep)
    if rid is None and "gmpq.recipe" in tags:
        rid = sink.call("finding a fine-tune run", sink.find_run, tags, exclude=set(runs.values()))
        if rid is not None:
            runs[key] = rid
    return sink.rekey_child("finetune", key, f"{key}#{rid[:8]}") if rid is not None else None


def _restart_name(sink: MLflowSink, key: str, name: str) -> str:
    """``name`` of a run that restarts its recipe from scratch, with how many runs of it came before:
    ``finetune-t1 (restart 1)``, ``finetune-t1 (lr=0.05, restart 2)``."""
    n = sum(k.startswith(f"{key}#") for k in sink.runs["finetune"])
    return f"{name[:-1]}, restart {n})" if name.endswith(")") else f"{name} (restart {n})"


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
