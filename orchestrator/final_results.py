"""What the final fine-tune leaves in the sweep folder: ``final.parquet`` (one row per fine-tuned policy)
and ``models/<trial_id>.pt``, each fine-tuned quantized model as one self-contained file
(``gmpq_core.export``: ``load_quantized_model(path).model`` is ready for inference). A policy's fine-tunes with
earlier recipes are kept aside under ``models/kept/`` (``orchestrator.kept_finetunes``)."""
from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import pyarrow as pa

from gmpq_core.errors import CheckpointError, ConfigError, GMPQError
from gmpq_core.fileio import drop_integer_file, load_checkpoint, read_json

from .kept_finetunes import KEPT_DIR, KeptFinetune, find_kept, stopped_in_place_epochs, unfinished_epochs
from .recipes import last_epoch_precision, recipe_dict, same_recipe, with_precision
from .results import FINAL_FILE, MODELS_DIR, read_table, rows_to_table, utc_now_iso, write_table

__all__ = ["FINAL_SCHEMA", "MODELS_DIR", "read_final", "write_final", "final_row", "final_model_path",
           "finetune_storage", "finetune_progress_dir", "local_storage",
           "resolve_model_path", "model_results", "export_final_model", "saved_final_state", "export_saved_final",
           "record_final_run", "check_not_shorter", "row_recipe", "recorded_recipe", "drop_stale_integer",
           "refuse_beside_other_finetune", "trained_on_text", "final_table_heading"]

log = logging.getLogger(__name__)

FINAL_SCHEMA = pa.schema([
    pa.field("trial_id", pa.string(), nullable=False), pa.field("policy_source", pa.string()),
    pa.field("final_top1", pa.float64()), pa.field("final_top5", pa.float64()), pa.field("final_loss", pa.float64()),
    pa.field("transfer_top1", pa.float64()), pa.field("bitops", pa.int64()), pa.field("bitops_total", pa.int64()),
    pa.field("gbitops", pa.float64()), pa.field("epochs", pa.int64()), pa.field("seconds", pa.float64()),
    pa.field("workers", pa.int64()), pa.field("resumed_from_epoch", pa.int64()), pa.field("train_images", pa.int64()),
    pa.field("images_per_epoch", pa.int64()),
    pa.field("test_images", pa.int64()), pa.field("finished_at", pa.string()), pa.field("policy_json", pa.string()),
    pa.field("recipe_json", pa.string()), pa.field("model_path", pa.string()),
])


def read_final(sweep_dir: str | Path, *, missing_ok: bool = False) -> pd.DataFrame:
    path = Path(sweep_dir) / FINAL_FILE
    if missing_ok and not path.exists():
        return FINAL_SCHEMA.empty_table().to_pandas()
    return read_table(path).to_pandas()


def write_final(sweep_dir: str | Path, rows: Mapping[str, Mapping[str, Any]]) -> None:
    """Rewrite final.parquet (atomically) from ``rows`` ({trial_id: row})."""
    write_table(Path(sweep_dir) / FINAL_FILE,
                rows_to_table(sorted(rows.values(), key=lambda r: r["trial_id"]), FINAL_SCHEMA))


def final_row(pareto_row: Mapping[str, Any], run: Any, recipe_json: str, model_path: str | None) -> dict:
    """The final.parquet row of one fine-tuned policy (``run``: the stage's ``FinalRun``; ``model_path``
    relative to the sweep folder, so the folder can move)."""
    m = run.metrics
    tid = run.trial_id
    return {"trial_id": tid, "policy_source": f"sweep trial {tid} ({pareto_row.get('selection_reason') or 'selected'})",
            "final_top1": m.get("top1"), "final_top5": m.get("top5"), "final_loss": m.get("loss"),
            "transfer_top1": pareto_row.get("transfer_top1"), "bitops": pareto_row.get("bitops"),
            "bitops_total": pareto_row.get("bitops_total"), "gbitops": float(pareto_row["bitops"]) / 1e9,
            "epochs": int(m["epoch"]), "seconds": run.seconds, "workers": run.workers,
            "resumed_from_epoch": m.get("resumed_from_epoch"), "train_images": m.get("train_images"),
            "images_per_epoch": m.get("images_per_epoch"),
            "test_images": m.get("test_images"), "finished_at": utc_now_iso(),
            "policy_json": str(pareto_row["policy_json"]), "recipe_json": recipe_json,
            "model_path": model_path}


def _count(value: Any) -> int | None:
    """A final.parquet count (pandas may read a missing one as NaN) as an int, or None."""
    try:
        return None if value is None or value != value else int(value)
    except (TypeError, ValueError):
        return None


def trained_on_text(row: Mapping[str, Any]) -> str:
    """What a final.parquet row's fine-tune trained on, in words: "full target data" only when it saw the whole
    training split every epoch; else the ``--train-size`` subset and the cap on steps per epoch (with its images
    per epoch). The cap counts only where it cut the epoch short: ``images_per_epoch`` reached cap x the global
    batch (batch // workers per worker) and stayed under ``train_images`` (an uncapped epoch drops a last partial
    batch, so it can be a batch under)."""
    recipe = recipe_dict(row_recipe(row)) or {}
    subset, cap = _count(recipe.get("train_size")), _count(recipe.get("max_steps_per_epoch"))
    images, per_epoch = _count(row.get("train_images")), _count(row.get("images_per_epoch"))
    batch, workers = _count(recipe.get("batch_size")), _count(row.get("workers")) or 1
    if cap is not None and images is not None and per_epoch is not None:
        step = max(1, batch // workers) * workers if batch else None
        cap = cap if per_epoch < images and (step is None or per_epoch >= cap * step) else None
    pool = (f"a stratified subset of {images or subset} target training images" if subset is not None else
            f"the {images} target training images" if images is not None else "the target training images")
    if cap is None:
        return pool if subset is not None else "full target data"
    if per_epoch is None:                       # (a row from before images_per_epoch was recorded)
        return f"at most {cap} steps per epoch of {pool}"
    return f"at most {cap} steps per epoch: {per_epoch} of {pool} per epoch"


def final_table_heading(final: pd.DataFrame) -> str:
    """The line over the final stage's table (``gmpq run``, ``gmpq finetune --sweep``): what its fine-tunes trained
    on (``trained_on_text``; rows of other settings each named once)."""
    said = list(dict.fromkeys(trained_on_text(r) for r in final.to_dict("records")))
    return f"Final fine-tune ({'; '.join(said)}):" if said else "Final fine-tune:"


def final_model_path(sweep_dir: str | Path, trial_id: str) -> Path:
    return Path(sweep_dir) / MODELS_DIR / f"{trial_id}.pt"


def _relative(trial_id: str) -> str:
    return f"{MODELS_DIR}/{trial_id}.pt"


def resolve_model_path(sweep_dir: str | Path, value: Any) -> Path | None:
    """A final.parquet ``model_path`` as a path (stored relative to the sweep folder; None when there is none)."""
    if not isinstance(value, str) or not value:
        return None
    return Path(value) if Path(value).is_absolute() else Path(sweep_dir) / value


def export_final_model(sweep_dir: str | Path, state_dict: Mapping[str, Any], job: Any,
                       results: Mapping[str, Any]) -> Path:
    """Write ``models/<trial_id>.pt`` from the fine-tune's weights (``job``: the ``FinalJob``); the architecture
    is the FP target model's, the input normalisation the target dataset's."""
    from gmpq_core.data import load_dataset
    from gmpq_core.export import preprocess_of, save_quantized_state
    from gmpq_core.policy import BitPolicy

    arch = read_json(Path(job.fp_checkpoint).with_suffix(".json"))["meta"]
    info = load_dataset(job.dataset, root=job.data_root, image_size=job.image_size).info
    return save_quantized_state(final_model_path(sweep_dir, job.trial_id), state_dict,
                                BitPolicy.from_json(job.policy_json), arch=arch, preprocess=preprocess_of(info),
                                results={k: v for k, v in results.items() if v is not None})


def finetune_storage(cfg: Mapping[str, Any], sweep_dir: str | Path) -> str | Path:
    """Where Ray Train keeps the fine-tunes' runs: the sweep's ``storage_path`` (a URI such as
    ``s3://bucket/ray_results`` stays text: ``Path`` would make it a local folder named ``s3:``), else
    ``<sweep_dir>/ray_results``."""
    value = str(cfg.get("storage_path") or Path(sweep_dir) / "ray_results")
    return value if "://" in value else Path(value).expanduser().resolve()


def local_storage(storage: str | Path) -> Path | None:
    """A storage path or ``file://`` URI as a local folder; None for remote storage (``s3://``, ...)."""
    text = str(storage)
    if text.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(text).path))
    return None if "://" in text else Path(text)


def finetune_progress_dir(cfg: Mapping[str, Any], sweep_dir: str | Path) -> Path:
    """Where rank 0 of each fine-tune writes its progress file (read by the stage and ``gmpq status``): the
    Ray Train storage when it is a folder, else the sweep folder's ``ray_results``."""
    storage = finetune_storage(cfg, sweep_dir)
    return storage if isinstance(storage, Path) else Path(sweep_dir).expanduser().resolve() / "ray_results"


def saved_final_state(storage: str | Path, trial_id: str, state_file: str, *, mmap: bool = False) -> dict | None:
    """The newest Ray Train checkpoint of ``finetune-<trial_id>`` under ``storage`` (its ``state_file``
    contents), or None: how a policy fine-tuned before models were exported gets its file without training, and
    where ``gmpq sync-mlflow`` reads a fine-tune's epochs (``mmap``: its tensors left on disk).
    A remote storage (``s3://``) is not searched: None."""
    folder = local_storage(storage)
    if folder is None:
        return None
    found = sorted(Path(folder, f"finetune-{trial_id}").glob(f"checkpoint_*/{state_file}"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    try:
        return load_checkpoint(found[-1], mmap=mmap)
    except CheckpointError as e:
        log.warning("%s", e)
        return None


def model_results(row: Mapping[str, Any], metrics: Mapping[str, Any], dataset: str) -> dict:
    """What a final model file keeps beside its weights (``gmpq_core.load_quantized_model(...).results``):
    ``row`` is the policy's pareto.parquet (or final.parquet) row, ``metrics`` the fine-tune's last epoch."""
    return {"trial_id": str(row["trial_id"]), "dataset": dataset, "top1": metrics.get("top1"),
            "top5": metrics.get("top5"), "transfer_top1": row.get("transfer_top1"),
            "bitops": int(row["bitops"]), "gbitops": float(row["bitops"]) / 1e9, "epochs": metrics.get("epoch"),
            "precision": metrics.get("precision"), "test_images": metrics.get("test_images") or row.get("test_images")}


def row_recipe(row: Mapping[str, Any]) -> str | None:
    """A final.parquet row's ``recipe_json``; None for rows from before recipes (pandas may read them as NaN)."""
    value = row.get("recipe_json")
    return value if isinstance(value, str) else None


def _model_file_precision(sweep_dir: str | Path, row: Mapping[str, Any]) -> str | None:
    """The precision a final.parquet row's model file says its fine-tune ran in (``results["precision"]``);
    None when the row has no model file, or the file does not say or cannot be read."""
    path = resolve_model_path(sweep_dir, row.get("model_path"))
    if path is None or not path.is_file():
        return None
    try:
        blob = load_checkpoint(path)        # the blob only: the model is not built
    except CheckpointError as e:
        log.warning("%s", e)
        return None
    results = blob.get("results") if isinstance(blob, dict) else None
    value = results.get("precision") if isinstance(results, dict) else None
    return value if value in ("fp32", "bf16") else None


def recorded_recipe(sweep_dir: str | Path, row: Mapping[str, Any]) -> str | None:
    """A final.parquet row's recipe with the precision its fine-tune ran in: a row written before the precision
    was part of the recipe takes it from its model file; where that does not say either, the recipe stays
    without one (the precision unknown: ``recipes.recipe_changes`` matches it with any)."""
    text = row_recipe(row)
    recipe = recipe_dict(text)
    if recipe is None or "precision" in recipe:
        return text
    return with_precision(text, _model_file_precision(sweep_dir, row))


def _same_run(state: Mapping[str, Any], prev: Mapping[str, Any], policy_json: str) -> bool:
    """Whether a Ray Train checkpoint holds the weights ``prev`` (a final.parquet row) reports: the same
    policy, recipe (when the row has one) and epoch, and the same last test top-1."""
    history = state.get("history") or [{}]
    return (state.get("policy_json") == policy_json
            and (row_recipe(prev) is None
                 or (state.get("recipe_json") is not None and same_recipe(row_recipe(prev), state["recipe_json"])))
            and int(state.get("epoch") or -1) == int(prev.get("epochs") or -2)
            and history[-1].get("top1") is not None and abs(float(history[-1]["top1"]) - float(prev["final_top1"])) < 1e-6)


def export_saved_final(sweep_dir: str | Path, storage: str | Path, prev: Mapping[str, Any], job: Any, state_file: str,
                       say: Callable[[str], None]) -> dict:
    """``prev`` (a final.parquet row fine-tuned before models were exported) with its model written from the
    Ray Train checkpoint of ``job`` (a ``FinalJob``), if that checkpoint holds the weights the row reports;
    else unchanged, with a note."""
    state = saved_final_state(storage, job.trial_id, state_file)
    if state is None or not _same_run(state, prev, job.policy_json):
        say(f"{job.trial_id}: no Ray Train checkpoint under {storage} holds the fine-tune that final.parquet reports "
            "(gone, or from a later run with other settings), so no model file; delete its row in final.parquet, or "
            "rerun with more --epochs, to fine-tune it again")
        return dict(prev)
    metrics = {"top1": prev.get("final_top1"), "top5": prev.get("final_top5"), "epoch": prev.get("epochs"),
               "precision": last_epoch_precision(state)}   # if its workers said
    path = _export_or_say(sweep_dir, state["model"], job, model_results(prev, metrics, job.dataset), say)
    if path is None:
        return dict(prev)
    say(f"{job.trial_id}: model written to {path} (from its Ray Train checkpoint)")
    return {**prev, "model_path": _relative(job.trial_id)}


def _export_or_say(sweep_dir: str | Path, state_dict: Mapping[str, Any], job: Any, results: Mapping[str, Any],
                   say: Callable[[str], None]) -> Path | None:
    """``export_final_model``, or None with a note when the file cannot be written (full disk, ...)."""
    try:
        path = export_final_model(sweep_dir, state_dict, job, results)
    except (OSError, GMPQError) as e:
        say(f"{job.trial_id}: cannot write its model file ({e}); its row in final.parquet is kept without one "
            "(rerun 'gmpq finetune --sweep' to write it from the Ray Train checkpoint)")
        return None
    drop_stale_integer(sweep_dir, job.trial_id, say)
    return path


def drop_stale_integer(sweep_dir: str | Path, trial_id: str, say: Callable[[str], None]) -> None:
    """``models/<trial_id>.int.pt`` (``gmpq export``'s) holds the model that ``models/<trial_id>.pt`` replaced:
    removed, so that no file beside the new model silently holds the old one, and said so."""
    stale = drop_integer_file(final_model_path(sweep_dir, trial_id))
    if stale is not None:
        say(f"{trial_id}: removed {stale}, gmpq export's integer file of the model just replaced (it held the old "
            f"weights); run 'gmpq export {Path(sweep_dir)}' again to write the new model's")


def record_final_run(sweep_dir: str | Path, rows: dict[str, dict], pareto_row: Mapping[str, Any], run: Any, job: Any,
                     say: Callable[[str], None]) -> Path | None:
    """After one policy's fine-tune: write its model file (``run.model_state``) and its row in final.parquet.
    A model that cannot be written is reported and the row kept without one (the weights stay in the Ray
    Train checkpoint; rerunning ``gmpq finetune --sweep`` writes the file then). Returns the model path."""
    path = _export_or_say(sweep_dir, run.model_state, job, model_results(pareto_row, run.metrics, job.dataset),
                          say) if run.model_state else None
    recipe = with_precision(job.recipe_json(), run.metrics.get("precision"))   # the precision it ran in
    rows[job.trial_id] = final_row(pareto_row, run, recipe, _relative(job.trial_id) if path else None)
    write_final(sweep_dir, rows)
    return path


def check_not_shorter(jobs: list, existing: Mapping[str, Mapping[str, Any]], epochs: int,
                      sweep_dir: Path, storage: Path | None = None) -> dict[str, KeptFinetune | None]:
    """A fine-tune continues from its checkpoint and cannot go back: fewer --epochs than a policy already ran
    with the same settings (``recorded_recipe``) is refused before anything runs (it trained nothing and
    reported the longer run). So is fewer than an unfinished one of those settings did (stopped before its row
    was written: kept aside, or still under the usual names of the local ``storage``; its checkpoint's epochs):
    its workers would start afresh and the fresh run replace that checkpoint. Returns the kept fine-tune of its
    recipe (``find_kept``: None when there is none) of each policy whose row is of another recipe or missing, so
    that the stage does not read the kept manifests again."""
    longer: dict[str, tuple[int, str]] = {}
    found: dict[str, KeptFinetune | None] = {}
    for _, job in jobs:
        prev = existing.get(job.trial_id)
        if prev is not None and same_recipe(recorded_recipe(sweep_dir, prev), job.recipe_json()):
            if int(prev.get("epochs") or 0) > epochs:
                longer[job.trial_id] = (int(prev["epochs"]), "")
            continue
        kept = found[job.trial_id] = find_kept(sweep_dir, job.trial_id, job.recipe_json())
        if kept is not None:                   # going back to a recipe kept aside
            done = unfinished_epochs(kept, storage) if kept.unfinished else int(kept.row.get("epochs") or 0)
            if done is not None and done > epochs:
                longer[job.trial_id] = (done, f", {'unfinished, ' if kept.unfinished else ''}kept aside in "
                                              f"{kept.manifest.parent}")
        elif prev is None and (done := stopped_in_place_epochs(sweep_dir, storage, job.trial_id,
                                                                job.recipe_json())) is not None and done > epochs:
            longer[job.trial_id] = (done, f", unfinished, in {storage / f'finetune-{job.trial_id}'}")
    if longer:
        done_text = ", ".join(f"{t} ({n} epochs{where})" for t, (n, where) in longer.items())
        raise ConfigError(f"--epochs {epochs} is fewer than these policies were already fine-tuned for with the same "
                          f"settings: {done_text}. A fine-tune continues from its checkpoint and cannot go back. Pass "
                          f"--epochs {max(n for n, _ in longer.values())} (or more) to keep or continue them, or, to "
                          f"fine-tune one afresh, delete its row in {sweep_dir / FINAL_FILE} (or its "
                          f"{MODELS_DIR}/{KEPT_DIR}/<trial_id>.<recipe>.* files) and its folder "
                          f"ray_results/finetune-<trial_id> (or ray_results/finetune-<trial_id>.<recipe>).")
    return found


def refuse_beside_other_finetune(sweep_dir: Path) -> None:
    """GMPQError, before any work, when another process runs this sweep's final stage (``gmpq finetune --sweep``,
    or ``gmpq run``, whose last stage it is; ``driver_markers.live_driver``: ``driver.finetune.json``, which a final
    stage writes also while a sweep of another process holds ``driver.json``, then ``driver.json``): a fine-tune it runs has a started
    manifest and no row yet, as a stopped one does, so a final stage beside it would move its live Ray Train run
    aside (another recipe) or train in the same one, and both write final.parquet. A sweep of another process
    (``gmpq sweep``) is no reason: the final stage selects from its ended trials only, as before. (``gmpq run``'s
    own final stage: its marker names this process, so it is not refused; nor is a process on another host, which
    cannot be checked: a retried batch job finds its killed predecessor's marker there, and only a warning is said.)"""
    from .driver_markers import FINETUNE_DRIVER_FILE, driver_text, ended_marker_text, live_driver

    marked = [d for d in (live_driver(sweep_dir, FINETUNE_DRIVER_FILE), live_driver(sweep_dir))   # the first: also
              if d is not None and (d.get("stage") in ("finetune", "run") or d.get("command") == "run")]  # beside a sweep
    if not marked:
        return
    driver = next((d for d in marked if d["alive"]), marked[0])    # one checked on this host first
    if driver["alive"] is None:   # another host's: maybe a retried batch job's own earlier pod, killed; not refused
        log.warning("%s is marked as running this sweep's final stage from another host (cannot be checked from "
                    "here); if it still runs, stop this command: two final stages would move each other's Ray Train "
                    "runs", driver_text(driver))
        return
    ended = ended_marker_text(sweep_dir, driver["file"])
    what = "will be fine-tuned by" if driver.get("stage") == "sweep" else "is being fine-tuned by"  # (gmpq run)
    raise GMPQError(f"'{sweep_dir}' {what} {driver_text(driver)}: a second final stage beside it would move or "
                    "replace the Ray Train run of a fine-tune that process is running (it has no "
                    "final.parquet row yet, like a stopped one) and write the same final.parquet, so this one did "
                    f"not start (nothing was changed). Wait for it to end ('gmpq status --sweep {sweep_dir}' shows "
                    f"whether it runs) and run this again; {ended}.")
