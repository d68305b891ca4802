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
- ``<storage>/finetune-<tid>.<digest>``: its Ray Train run (a local storage only: a remote one is not moved);
- ``models/kept/<tid>.started.json``: the recipe of the fine-tune that started under the usual names and has no
  final.parquet row yet (written as it starts, removed once its row is written): a run stopped part way (Ctrl-C)
  is still known by its recipe. When another recipe takes the usual names, its Ray Train run is kept aside as
  that recipe's *unfinished* fine-tune (a manifest with ``"unfinished": true``, a row of its recipe only, no
  model file, and ``"epochs_done"``: the epoch its checkpoint holds); asking for the recipe again (with at least
  those epochs: ``final_results.check_not_shorter``) puts the run back and the fine-tune continues from its
  checkpoint.

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

from .recipes import recipe_changes, same_recipe
from .results import MODELS_DIR

__all__ = ["KEPT_DIR", "KeptFinetune", "recipe_digest", "kept_finetunes", "find_kept", "set_aside", "restore_kept",
           "restore_unfinished", "park_leftovers", "mark_started", "clear_started", "keep_unfinished",
           "checkpoint_epochs", "unfinished_epochs", "stopped_in_place_epochs"]

KEPT_DIR = "kept"          # models/kept/
STATE_FILE = "state.pt"    # what the workers write in each Ray Train checkpoint (train_stage.STATE_FILE: torch-free)
REMOTE_RUN_TEXT = "its Ray Train checkpoint is not kept (remote storage: the new fine-tune replaces it)"


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
    unfinished: bool = False   # stopped before its row was written: ``row`` has its recipe only; no model file
    epochs_done: int | None = None   # unfinished: the epoch its checkpoint holds (None: not recorded)

    @property
    def stem(self) -> str:
        return self.manifest.name.removesuffix(".json")

    def model(self, sweep_dir: Path) -> Path:
        return Path(sweep_dir) / MODELS_DIR / KEPT_DIR / f"{self.stem}.pt"


def _kept_dir(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / MODELS_DIR / KEPT_DIR


def _started_path(sweep_dir: str | Path, trial_id: str) -> Path:
    return _kept_dir(sweep_dir) / f"{trial_id}.started.json"


def _plain(value: Any) -> Any:
    """A final.parquet value as JSON (numpy scalars as Python ones, NaN as None)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def kept_finetunes(sweep_dir: str | Path, trial_id: str) -> list[KeptFinetune]:
    """The fine-tunes of ``trial_id`` kept aside, newest first (an unreadable manifest is skipped)."""
    out = []
    for path in _kept_dir(sweep_dir).glob(f"{trial_id}.*.json"):
        if path == _started_path(sweep_dir, trial_id):
            continue
        try:
            data = read_json(path)
        except (CheckpointError, OSError):
            continue
        if isinstance(data, dict) and isinstance(data.get("row"), dict):
            done = data.get("epochs_done")
            out.append(KeptFinetune(trial_id, path, data["row"], data.get("checkpoint"),
                                    unfinished=data.get("unfinished") is True,
                                    epochs_done=done if isinstance(done, int) and not isinstance(done, bool) else None))
    return sorted(out, key=lambda k: str(k.row.get("finished_at") or ""), reverse=True)


def find_kept(sweep_dir: str | Path, trial_id: str, recipe_json: str) -> KeptFinetune | None:
    """The newest kept fine-tune of ``trial_id`` with the recipe ``recipe_json`` (``recipes.same_recipe``); an
    unfinished one (no ``finished_at``) after the finished ones."""
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
    clear_started(sweep_dir, tid)          # what started under the usual names went with the row
    where = [f"row {manifest}"]
    if has_model:
        where.append(f"model {kept / f'{stem}.pt'}" + (f" (and its {INT_SUFFIX})" if moved_int else ""))
    if moved_ckpt:
        where.append(f"Ray Train checkpoint {ckpt_kept}")
    elif storage is None:
        where.append(REMOTE_RUN_TEXT)
    say(f"{tag} its {int(row.get('epochs') or 0)}-epoch fine-tune (top1 {float(row.get('final_top1') or 0):.2f}%) is "
        f"kept aside: {'; '.join(where)}. Rerun with its settings to restore it without retraining")
    return KeptFinetune(tid, manifest, entry, ckpt_kept.name if moved_ckpt else None)


def mark_started(sweep_dir: str | Path, trial_id: str, recipe_json: str | None, epochs: int | None) -> None:
    """As a fine-tune of ``recipe_json`` starts under the usual names (``<storage>/finetune-<tid>``): its recipe,
    so that a run stopped before its row is written is still known by it (``keep_unfinished``)."""
    path = _started_path(sweep_dir, trial_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"trial_id": trial_id, "recipe_json": recipe_json, "epochs": epochs,
                             "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def clear_started(sweep_dir: str | Path, trial_id: str) -> None:
    """Once the fine-tune under the usual names has its final.parquet row (or went aside with it)."""
    _started_path(sweep_dir, trial_id).unlink(missing_ok=True)


def started_manifest(sweep_dir: str | Path, trial_id: str) -> dict | None:
    """The manifest ``mark_started`` wrote for a fine-tune that has no final.parquet row yet (None: none)."""
    return _started(sweep_dir, trial_id)


def _started(sweep_dir: str | Path, trial_id: str) -> dict | None:
    try:
        data = read_json(_started_path(sweep_dir, trial_id))
    except (CheckpointError, OSError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("recipe_json"), str) else None


def _has_checkpoint(run: Path) -> bool:
    """Whether a Ray Train run folder holds a checkpoint (``checkpoint_<time>/``; not only Ray's own files)."""
    return run.is_dir() and any(p.is_dir() for p in run.glob("checkpoint*"))


def checkpoint_epochs(run: Path | None) -> int | None:
    """The epoch the Ray Train checkpoint in the run folder ``run`` holds: the ``epoch`` the workers write in its
    ``state.pt`` (what they compare with ``--epochs`` to continue it or start afresh), of the newest checkpoint
    (``num_to_keep=1``: the only one); None when there is none or it cannot be read."""
    found = sorted(run.glob(f"checkpoint*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime) \
        if run is not None and run.is_dir() else []
    if not found:
        return None
    from gmpq_core.fileio import load_checkpoint      # (torch: imported where a checkpoint is read)

    try:
        epoch = load_checkpoint(found[-1], mmap=True).get("epoch")     # the weights stay on disk
    except (CheckpointError, AttributeError):
        return None
    return int(epoch) if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def unfinished_epochs(kept: KeptFinetune, storage: Path | None) -> int | None:
    """How many epochs an unfinished kept fine-tune has done: as recorded when it was kept aside, else (a manifest
    from before that was recorded) its kept checkpoint's; None when neither says."""
    if kept.epochs_done is not None or not kept.checkpoint or storage is None:
        return kept.epochs_done
    return checkpoint_epochs(storage / kept.checkpoint)


def stopped_in_place_epochs(sweep_dir: str | Path, storage: Path | None, trial_id: str, recipe_json: str) -> int | None:
    """The epochs a fine-tune of ``recipe_json`` that stopped under the usual names before its row was written
    (``mark_started``) has done: its checkpoint's under the local ``storage``; None when there is none."""
    started = _started(sweep_dir, trial_id)
    if started is None or storage is None or not same_recipe(started["recipe_json"], recipe_json):
        return None
    return checkpoint_epochs(storage / f"finetune-{trial_id}")


def _unfinished_text(started: Mapping[str, Any], recipe: str | None, done: int | None) -> str:
    """``its unfinished fine-tune with other settings (lr 0.05 -> 0.1), stopped after epoch 3 of 5 before its row
    was written``: the started run ``started`` (its manifest), said against the ``recipe`` about to run."""
    changes = recipe_changes(started["recipe_json"], recipe) if recipe is not None else []
    how = f" with other settings ({', '.join(changes)})" if changes else ""
    target = started.get("epochs")
    when = "" if done is None else f" after epoch {done}" + (f" of {target}" if isinstance(target, int) else "")
    return f"its unfinished fine-tune{how}, stopped{when} before its row was written"


def keep_unfinished(sweep_dir: str | Path, storage: Path | None, trial_id: str, say: Callable[[str], None], tag: str,
                    *, recipe: str | None = None, continue_same: bool = True) -> KeptFinetune | None:
    """The usual names hold no final.parquet row: the Ray Train run of the fine-tune that started there and
    stopped before its row was written (``mark_started``), when it has a checkpoint under the local ``storage``, is
    kept aside as its recipe's unfinished fine-tune, with the epochs its checkpoint holds (asking for the recipe
    again continues it); says so, naming what differs from ``recipe`` (the one about to run or be restored).
    Not when its recipe is ``recipe`` and ``continue_same`` (the recipe about to run continues the run in place).
    With a remote storage (None) the run is not moved: said, and the new fine-tune replaces it. The model files
    are left where they are (``park_leftovers``: a model file without a row is not known to be this run's)."""
    started = _started(sweep_dir, trial_id)
    if started is None or (continue_same and recipe is not None and same_recipe(started["recipe_json"], recipe)):
        return None
    if storage is None:                               # a remote run: not moved
        clear_started(sweep_dir, trial_id)
        say(f"{tag} {_unfinished_text(started, recipe, None)}: {REMOTE_RUN_TEXT}")
        return None
    run = storage / f"finetune-{trial_id}"
    if not _has_checkpoint(run):                      # nothing to continue
        clear_started(sweep_dir, trial_id)
        return None
    done = checkpoint_epochs(run)
    kept = _kept_dir(sweep_dir)
    stem = _free_stem(kept, f"{trial_id}.{recipe_digest(started['recipe_json'])}")
    manifest = kept / f"{stem}.json"
    dst = _free(storage / f"finetune-{trial_id}.{stem.removeprefix(trial_id + '.')}")
    row = {"trial_id": trial_id, "recipe_json": started["recipe_json"], "model_path": None}
    atomic_write_json(manifest, {"row": row, "unfinished": True, "epochs": started.get("epochs"),
                                 "epochs_done": done, "started_at": started.get("started_at"),
                                 "kept_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "checkpoint": dst.name})
    _move(run, dst)
    clear_started(sweep_dir, trial_id)
    say(f"{tag} {_unfinished_text(started, recipe, done)}, is kept aside: record {manifest}; Ray Train checkpoint "
        f"{dst}. Rerun with its settings to continue it from that checkpoint")
    return KeptFinetune(trial_id, manifest, row, dst.name, unfinished=True, epochs_done=done)


def park_leftovers(sweep_dir: str | Path, storage: Path | None, trial_id: str, say: Callable[[str], None],
                   tag: str, recipe: str | None = None) -> None:
    """Before a kept fine-tune of ``recipe`` takes the usual names: what holds them without a final.parquet row is
    moved aside, not overwritten: a fine-tune stopped before it finished as its recipe's unfinished fine-tune
    (``keep_unfinished``) when its recipe is known, else (and a model file whose row was deleted) as unrecorded."""
    keep_unfinished(sweep_dir, storage, trial_id, say, tag, recipe=recipe, continue_same=False)
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


def restore_unfinished(sweep_dir: str | Path, storage: Path | None, kept: KeptFinetune, say: Callable[[str], None],
                       tag: str) -> bool:
    """Put an unfinished kept fine-tune's Ray Train run back under the usual names, marked as started
    (``mark_started``), so that the fine-tune run next continues its checkpoint; the manifest is removed. Returns
    whether its checkpoint came back (else the fine-tune starts afresh: said here, once)."""
    tid = kept.trial_id
    run = storage / f"finetune-{tid}" if storage is not None else None
    moved = bool(kept.checkpoint) and run is not None and _move(storage / kept.checkpoint, run)
    mark_started(sweep_dir, tid, kept.row.get("recipe_json"), None)    # (its epochs: the run's, as it starts)
    kept.manifest.unlink(missing_ok=True)
    done = f" ({kept.epochs_done} epoch(s) done)" if kept.epochs_done is not None else ""
    say(f"{tag} restored its unfinished fine-tune with these settings: "
        + (f"Ray Train checkpoint {run}{done}; it continues from there" if moved
           else "no Ray Train checkpoint of it was kept; it is fine-tuned afresh from epoch 1"))
    return moved


def restore_kept(sweep_dir: str | Path, storage: Path | None, kept: KeptFinetune, say: Callable[[str], None],
                 tag: str) -> dict | None:
    """Give a kept fine-tune the usual names again (model files, Ray Train run) and return its final.parquet row
    (``model_path`` back to ``models/<tid>.pt``); the manifest is removed last. The caller has kept the current
    recipe aside (``set_aside``) and moved leftovers (``park_leftovers``) first. An unfinished one has no row
    (None): ``restore_unfinished``."""
    sweep_dir = Path(sweep_dir)
    tid = kept.trial_id
    if kept.unfinished:
        restore_unfinished(sweep_dir, storage, kept, say, tag)
        return None
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
