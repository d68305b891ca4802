"""Which MLflow run a final fine-tune is logged into (moved here from ``mlflow_stages``, which imports them): its key
``<trial_id>:<recipe hash>`` (``_recipe_key``), a run an earlier version kept under an older key adopted
(``_older_key``, ``_adopt_older_run``), a new run's name (``_run_name``: ``finetune-<tid>``, or what its recipe
changes; ``_restart_name``), and a run whose recipe restarts from scratch set aside with its history (``_set_aside``).
"""
from __future__ import annotations

import json
from typing import Mapping

from .kept_finetunes import recipe_digest
from .mlflow_sink import MLflowSink, flatten_config

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
