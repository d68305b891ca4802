"""A policy's fine-tunes with other recipes, kept aside: nothing a fine-tune computed is lost when the policy is
fine-tuned again with other settings, and going back to a recipe trained before restores it without retraining.

Layout in the sweep folder (the current recipe's files keep the names they always had, so an older sweep
resumes and continues as before):

- ``final.parquet`` row, ``models/<tid>.pt`` (and ``gmpq export``'s ``models/<tid>.int.pt``), Ray Train run
  ``<storage>/finetune-<tid>``: the policy's current recipe (the latest one fine-tuned or restored);
- ``models/kept/<tid>.<digest>.json``: an earlier recipe's final.parquet row (``model_path`` naming where its
  file is kept) and the name of its kept Ray Train run; ``<digest>`` is the recipe's hash, the ``gmpq.recipe``
  tag of its MLflow run;
- ``models/kept/<tid>.<digest>.pt`` (``.int.pt``): its model files (``gmpq export DIR`` and ``gmpq evaluate
  DIR`` read ``models/*.pt`` only; pass a kept file to either by its path);
- ``<storage>/finetune-<tid>.<digest>``: its Ray Train run (a local storage only: a remote one is not moved).

Restoring swaps the other way: the current recipe is kept aside, the kept one takes the usual names again (and
``--epochs`` more then continue its checkpoint, as for any current recipe).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from gmpq_core.errors import CheckpointError
from gmpq_core.fileio import INT_SUFFIX, atomic_write_json, integer_path, read_json

from .recipes import same_recipe
from .results import MODELS_DIR

__all__ = ["KEPT_DIR", "KeptFinetune", "recipe_digest", "kept_finetunes", "find_kept",
           "set_aside", "restore_kept", "park_leftovers"]

KEPT_DIR = "kept"          # models/kept/


def recipe_digest(recipe_json: str | None) -> str:
    """The recipe's hash, as MLflow tags its fine-tune run (``gmpq.recipe``): sha1 of the text, 10 hex digits."""
    return hashlib.sha1(str(recipe_json or "no recipe").encode()).hexdigest()[:10]


@dataclass(frozen=True)
class KeptFinetune:
    """One earlier recipe's fine-tune of a policy, kept aside (``manifest``: its ``.json`` file)."""
    trial_id: str
    manifest: Path
    row: dict                  # its final.parquet row, ``model_path`` naming the kept file
    checkpoint: str | None     # its kept Ray Train run's folder name under the storage, None when not kept

    @property
    def stem(self) -> str:
        return self.manifest.name.removesuffix(".json")

    def model(self, sweep_dir: Path) -> Path:
        return Path(sweep_dir) / MODELS_DIR / KEPT_DIR / f"{self.stem}.pt"


def _kept_dir(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / MODELS_DIR / KEPT_DIR


def _plain(value: Any) -> Any:
    """A final.parquet value as JSON (numpy scalars as Python ones, NaN as None)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def kept_finetunes(sweep_dir: str | Path, trial_id: str) -> list[KeptFinetune]:
    """The fine-tunes of ``trial_id`` kept aside, newest first (an unreadable manifest is skipped)."""
    out = []
    for path in _kept_dir(sweep_dir).glob(f"{trial_id}.*.json"):
        try:
            data = read_json(path)
        except (CheckpointError, OSError):
            continue
        if isinstance(data, dict) and isinstance(data.get("row"), dict):
            out.append(KeptFinetune(trial_id, path, data["row"], data.get("checkpoint")))
    return sorted(out, key=lambda k: str(k.row.get("finished_at") or ""), reverse=True)


def find_kept(sweep_dir: str | Path, trial_id: str, recipe_json: str) -> KeptFinetune | None:
    """The newest kept fine-tune of ``trial_id`` with the recipe ``recipe_json`` (``recipes.same_recipe``)."""
    return next((k for k in kept_finetunes(sweep_dir, trial_id)
                 if k.row.get("recipe_json") is not None and same_recipe(k.row["recipe_json"], recipe_json)), None)


def _free(path: Path) -> Path:
    """``path``, or ``<path>-2``, ``-3``, ... when it is taken (a name is never reused over another file)."""
    n, out = 1, path
    while out.exists() or out.is_symlink():
        n += 1
        out = path.with_name(f"{path.name}-{n}")
    return out


def _free_stem(kept: Path, stem: str) -> str:
    """``stem``, or ``<stem>-2``, ``-3``, ... when a kept file of that stem exists: the manifest keeps its ``.json``
    (``kept_finetunes`` finds it by that), the model files their ``.pt`` / ``.int.pt``."""
    n, out = 1, stem
    while any((kept / f"{out}{ext}").exists() for ext in (".json", ".pt", INT_SUFFIX)):
        n += 1
        out = f"{stem}-{n}"
    return out


def _move(src: Path, dst: Path) -> bool:
    if not src.exists():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    return True


def set_aside(sweep_dir: str | Path, storage: Path | None, row: Mapping[str, Any],
              say: Callable[[str], None], tag: str) -> KeptFinetune:
    """Keep a policy's current fine-tune aside (its final.parquet ``row`` with its recorded recipe, model files,
    Ray Train run under the local ``storage``; None: remote, not moved) before another recipe replaces it; says
    what went where. The caller removes the row from final.parquet."""
    sweep_dir = Path(sweep_dir)
    tid = str(row["trial_id"])
    digest = recipe_digest(row.get("recipe_json"))
    kept = _kept_dir(sweep_dir)
    kept.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(kept, f"{tid}.{digest}")
    manifest = kept / f"{stem}.json"
    model = sweep_dir / MODELS_DIR / f"{tid}.pt"
    integer = integer_path(model)
    ckpt = storage / f"finetune-{tid}" if storage is not None else None
    ckpt_kept = _free(storage / f"finetune-{tid}.{stem.removeprefix(tid + '.')}") if storage is not None else None
    has_model = model.is_file()
    entry = {**{k: _plain(v) for k, v in row.items()},
             "model_path": f"{MODELS_DIR}/{KEPT_DIR}/{stem}.pt" if has_model else None}
    # the manifest first: a stage stopped half way keeps a record of where the files were going
    atomic_write_json(manifest, {"row": entry, "kept_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "checkpoint": ckpt_kept.name if ckpt is not None and ckpt.is_dir() else None})
    _move(model, kept / f"{stem}.pt")
    moved_int = _move(integer, kept / f"{stem}{INT_SUFFIX}")
    moved_ckpt = ckpt is not None and ckpt.is_dir() and _move(ckpt, ckpt_kept)
    where = [f"row {manifest}"]
    if has_model:
        where.append(f"model {kept / f'{stem}.pt'}" + (f" (and its {INT_SUFFIX})" if moved_int else ""))
    if moved_ckpt:
        where.append(f"Ray Train checkpoint {ckpt_kept}")
    elif storage is None:
        where.append("its Ray Train checkpoint is not kept (remote storage: the new fine-tune replaces it)")
    say(f"{tag} its {int(row.get('epochs') or 0)}-epoch fine-tune (top1 {float(row.get('final_top1') or 0):.2f}%) is "
        f"kept aside: {'; '.join(where)}. Rerun with its settings to restore it without retraining")
    return KeptFinetune(tid, manifest, entry, ckpt_kept.name if moved_ckpt else None)


def park_leftovers(sweep_dir: str | Path, storage: Path | None, trial_id: str, say: Callable[[str], None],
                   tag: str) -> None:
    """Before a kept fine-tune takes the usual names: what holds them without a final.parquet row (a fine-tune
    stopped before it finished, a model file whose row was deleted) is moved aside, not overwritten."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    models = Path(sweep_dir) / MODELS_DIR
    paths = [models / f"{trial_id}.pt", integer_path(models / f"{trial_id}.pt")]
    paths += [storage / f"finetune-{trial_id}"] if storage is not None else []
    for path in paths:
        if path.exists():
            if path.parent == models:
                dst = _free(_kept_dir(sweep_dir) / f"{trial_id}.unrecorded-{stamp}{path.name.removeprefix(trial_id)}")
            else:
                dst = _free(path.with_name(f"{path.name}.unrecorded-{stamp}"))
            _move(path, dst)
            say(f"{tag} {path} has no row in final.parquet (a fine-tune that did not finish?): moved to {dst}; delete "
                "it if it is not needed")


def restore_kept(sweep_dir: str | Path, storage: Path | None, kept: KeptFinetune, say: Callable[[str], None],
                 tag: str) -> dict:
    """Give a kept fine-tune the usual names again (model files, Ray Train run) and return its final.parquet row
    (``model_path`` back to ``models/<tid>.pt``); the manifest is removed last. The caller has kept the current
    recipe aside (``set_aside``) and moved leftovers (``park_leftovers``) first."""
    sweep_dir = Path(sweep_dir)
    tid = kept.trial_id
    models = sweep_dir / MODELS_DIR
    has_model = _move(kept.model(sweep_dir), models / f"{tid}.pt")
    _move(integer_path(kept.model(sweep_dir)), integer_path(models / f"{tid}.pt"))
    ckpt = False
    if kept.checkpoint and storage is not None:
        ckpt = _move(storage / kept.checkpoint, storage / f"finetune-{tid}")
    row = {**kept.row, "model_path": f"{MODELS_DIR}/{tid}.pt" if has_model else None}
    kept.manifest.unlink(missing_ok=True)
    say(f"{tag} restored its earlier fine-tune with these settings ({int(row.get('epochs') or 0)} epoch(s), top1 "
        f"{float(row.get('final_top1') or 0):.2f}%, no retraining): "
        + (f"model {models / f'{tid}.pt'}" if has_model else "no model file was kept")
        + (f", Ray Train checkpoint {storage / f'finetune-{tid}'}" if ckpt else ", no Ray Train checkpoint was kept"))
    return row
