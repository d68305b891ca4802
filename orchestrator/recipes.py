"""A final fine-tune's recipe: the settings its result depends on but its epochs (``RECIPE_FIELDS``), kept as
sorted JSON text (``recipe_json``) in Ray Train checkpoints and ``final.parquet`` rows, and compared here.

Plain JSON, no torch or Ray: ``gmpq status`` and the Parquet readers use it without starting either.
The training precision is part of the recipe as the workers resolved it (``fp32``/``bf16``; ``auto`` only in
what a job asks for). A recipe recorded before the precision was part of it has none: its precision is unknown
and matches any (``recipe_changes``), and so does ``auto``.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ["RECIPE_FIELDS", "recipe_dict", "recipe_precision", "with_precision", "recipe_changes", "same_recipe",
           "last_epoch_precision"]

RECIPE_FIELDS = ("dataset", "image_size", "lr", "momentum", "nesterov", "weight_decay", "batch_size", "distill",
                 "seed", "max_steps_per_epoch", "train_size", "test_size",
                 "precision")   # what a fine-tune's result depends on, but epochs


def recipe_dict(text: str | None) -> dict | None:
    """``text`` (a ``recipe_json``) as a dict; None when it is missing or not a JSON object."""
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def recipe_precision(text: str | None) -> str | None:
    """The precision a recipe records; None when it records none (before the precision was part of recipes) or
    is not a recipe."""
    value = (recipe_dict(text) or {}).get("precision")
    return value if isinstance(value, str) else None


def with_precision(recipe_json: str, precision: str | None) -> str:
    """``recipe_json`` with the precision a fine-tune ran in (``fp32``/``bf16``, what ``auto`` resolved to on
    its workers): what a checkpoint and a final.parquet row record. Unchanged when ``precision`` is None or the
    text is not a recipe."""
    recipe = recipe_dict(recipe_json)
    if precision is None or recipe is None:
        return recipe_json
    return json.dumps({**recipe, "precision": precision}, sort_keys=True)


def recipe_changes(recorded: str | None, current: str) -> list[str]:
    """What differs between the recipe a fine-tune was recorded with (a checkpoint's or a final.parquet row's
    ``recipe_json``) and ``current``, as ``"lr 0.01 -> 0.05"``; empty when it is the same recipe. None (a
    fine-tune from before recipes) matches any; so does a missing precision (recorded before the precision was
    part of the recipe: callers fill it in where they can, ``final_results.recorded_recipe``) or ``auto`` (what
    it resolves to is known on the workers only, and they do not continue a checkpoint of another precision)."""
    if recorded is None:
        return []
    old, new = recipe_dict(recorded), recipe_dict(current)
    if old is None or new is None:
        return [] if recorded == current else ["recipe"]
    p_old, p_new = old.pop("precision", None), new.pop("precision", None)
    changes = [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
    if None not in (p_old, p_new) and "auto" not in (p_old, p_new) and p_old != p_new:
        changes.append(f"precision {p_old} -> {p_new}")
    return changes


def same_recipe(recorded: str | None, current: str) -> bool:
    """Whether a fine-tune recorded with ``recorded`` is one of ``current`` (``recipe_changes`` is empty)."""
    return not recipe_changes(recorded, current)


def last_epoch_precision(state: Mapping[str, Any]) -> str | None:
    """The precision a Ray Train checkpoint's last epoch reports (its ``history``), None when it says none."""
    return ((state.get("history") or [{}])[-1] or {}).get("precision")
