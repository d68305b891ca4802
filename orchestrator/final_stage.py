"""The final stage, driver side: fine-tune a sweep's selected policies on the target data (all of it, unless
``train_size`` or ``max_steps_per_epoch`` say less).

``finetune_selected(sweep_dir)`` reads ``pareto.parquet``'s selection (or selects again: ``final_inputs``, with
the checks of its arguments), builds each policy's
``FinalJob`` from the sweep config's ``finetune`` section (flags override it) and ``precision``, skips
policies already fine-tuned with the same recipe and epochs, and runs the rest with
``train_stage.run_final_job``: side by side as far as the Ray cluster's CPUs (GPUs) hold ``workers`` each
(``max_concurrent`` caps it; ``orchestrator.side_by_side``). After each policy: its ``final.parquet`` row and model file
(``final_results``); at the end ``final.png`` and the MLflow child runs. A policy that fails does not
lose the others' results: they are written, plotted and logged before the error is raised.
The policies' jobs are built in ``final_jobs``, the cluster's room for them is counted in ``final_devices``, the
progress lines come from ``final_progress``; their names are importable from here too.
"""
from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Callable

import pandas as pd

from .final_devices import (AUTO_MIN_IMAGES_PER_WORKER, _at_once_text, _ray_devices, auto_workers,  # noqa: F401
                            check_final_workers, final_slots)
from .final_jobs import _given, final_job, target_fp_checkpoint
from .final_progress import _ProgressWatcher
from .final_results import (check_not_shorter, export_saved_final, final_model_path, finetune_progress_dir,
                            finetune_storage, local_storage, read_final, record_final_run, recorded_recipe,
                            refuse_beside_other_finetune, write_final)
from .kept_finetunes import (clear_started, keep_unfinished, mark_started, park_leftovers, restore_kept,
                             restore_unfinished, set_aside)
from .cluster_watch import lost_after_s, watching_cluster
from .ray_env import ray_session
from .recipes import recipe_changes, recipe_precision, same_recipe
from .results import FINAL_FILE, load_resolved_config
from .side_by_side import run_side_by_side
from .sweep_join import say_recorded_sweep_join
from .sweep_lost import final_lost_handler
from .train_stage import STATE_FILE, FinalJob, run_final_job

__all__ = ["FINAL_PNG", "finetune_selected", "final_job", "target_fp_checkpoint", "check_final_workers", "final_slots", "auto_workers",
           "read_final"]

log = logging.getLogger(__name__)

FINAL_PNG = "final.png"


def _one_line_at_a_time(say: Callable[[str], None]) -> Callable[[str], None]:
    lock = threading.Lock()

    def locked(msg: str) -> None:
        with lock:
            say(msg)
    return locked


def finetune_selected(sweep_dir: str | Path, *, top_k: int | None = None, workers: int | None = None,
                      epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                      max_steps_per_epoch: int | None = None, train_size: int | None = None,
                      test_size: int | None = None, tracking_uri: str | None = None, use_gpu: bool | None = None,
                      address: str | None = None, max_concurrent: int | None = None, precision: str | None = None,
                      max_gbitops: float | str | None = None, say: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Fine-tune every selected policy of ``<sweep_dir>/pareto.parquet`` on the target data (all of it, unless
    ``train_size`` or ``max_steps_per_epoch`` say less: ``final_results.trained_on_text`` words a row's).

    The policies train side by side as far as the Ray cluster's CPUs (GPUs) hold ``workers`` each
    (``max_concurrent`` caps it; 1 = one after the other). ``workers="auto"`` (or the config's
    ``finetune.workers: auto``) shares the cluster's devices among the policies that run at once.

    Unset arguments come from the sweep config's ``finetune`` section (``precision``: its ``precision``).
    ``top_k`` or ``max_gbitops`` given (or no pareto.parquet yet) selects again with ``write_pareto``
    (``final_inputs.selected_policies``): ``max_gbitops`` (GBitOPs; ``"none"``: no limit) in place of the config's
    ``finetune.max_gbitops`` for this call, the config file unchanged; none of the front within it: refused before
    anything is written. Writes ``final.parquet`` (atomic, merged by trial_id) after each policy, ``final.png``, and
    an MLflow child run per policy and recipe (``finetune-<trial_id>``, a later recipe's naming what differs:
    ``mlflow_stages.log_final``). The precision
    is part of the recipe: ``fp32`` -> ``bf16`` is other settings (afresh); ``auto`` is what the workers
    resolve it to, and they do not continue a checkpoint of another precision (this says so). A row written
    before the precision was part of the recipe ran in the precision its model file records (none: unknown,
    and the row counts as done in any precision; this says so).

    A policy fine-tuned before with other settings keeps that fine-tune aside (its row, model files and Ray Train
    run: ``orchestrator.kept_finetunes``) before the new recipe trains; a recipe kept aside comes back when it
    is asked for again (no retraining; more epochs continue it). A fine-tune stopped before its row was written
    is known by its recipe: another recipe keeps its Ray Train run aside too, and asking for its recipe again
    continues its checkpoint (fewer epochs than it did: refused). Refused while another process runs this
    sweep's final stage (``final_results.refuse_beside_other_finetune``). A model file written here removes the
    stale ``gmpq export`` integer file beside it. Everything moved or removed is said.
    Returns the final.parquet rows of this call's policies.
    """
    from .final_inputs import check_final_args, selected_policies
    from .mlflow_stages import log_final
    from .plots import plot_final
    from .driver_markers import final_stage_marker, stage_command
    from .results import read_trials

    sweep_dir = Path(sweep_dir)
    say = _one_line_at_a_time(say or (lambda msg: None))        # fine-tunes side by side report from threads
    cfg = load_resolved_config(sweep_dir, missing_ok=False)
    stage = dict(cfg.get("finetune") or {})
    limit = check_final_args(sweep_dir, cfg, counts={
        "--top-k": top_k, "--workers": None if workers == "auto" else workers, "--epochs": epochs,
        "--batch-size": batch_size, "--max-steps-per-epoch": max_steps_per_epoch, "--train-size": train_size,
        "--test-size": test_size, "--max-concurrent": max_concurrent}, lr=lr, precision=precision, top_k=top_k,
        max_gbitops=max_gbitops)
    lost_after_s()                        # a bad $GMPQ_CLUSTER_LOST_AFTER_S: before any work
    with final_stage_marker(sweep_dir):   # to the last MLflow write: a sync or another final stage waits for it
        refuse_beside_other_finetune(sweep_dir)     # marked first: of two final stages started at once, one runs
        given = functools.partial(_given, stage)
        chosen = selected_policies(sweep_dir, cfg, top_k, limit, say,     # pareto.parquet's selected rows
                                   tracking_uri=tracking_uri, mlflow=True)   # (made again: logged as gmpq pareto does)
        workers = given(workers, "workers", 1)
        workers = workers if workers == "auto" else int(workers)
        epochs = int(given(epochs, "epochs", 1))
        fp_path = target_fp_checkpoint(sweep_dir, say=say)
        existing = {r["trial_id"]: r for r in read_final(sweep_dir, missing_ok=True).to_dict("records")}
        final_rows = {t: r for t, r in existing.items()}
        histories: dict[str, list[dict]] = {}
        storage = finetune_storage(cfg, sweep_dir)
        local = local_storage(storage)             # where kept-aside Ray Train runs go (None: remote, not moved)
        done_ids: list[str] = []
        refilled: list[str] = []           # rows that got their model file from a Ray Train checkpoint in this call
        jobs = [(row, final_job(cfg, row, fp_path, epochs=epochs, lr=lr, batch_size=batch_size,
                                 max_steps_per_epoch=max_steps_per_epoch, train_size=train_size, test_size=test_size,
                                 progress_dir=finetune_progress_dir(cfg, sweep_dir), precision=precision))
                for row in chosen.to_dict("records")]
        kept_of = check_not_shorter(jobs, existing, epochs, sweep_dir, local)   # each recipe's kept fine-tune, read once
        todo: list[tuple[int, dict, FinalJob, int]] = []        # (number, pareto row, job, first epoch to run)
        resuming: set[str] = set()         # restored unfinished fine-tunes: their workers continue the checkpoint
        aside, restored = [], []           # rows of the recipes set aside / restored here: their runs' gmpq.kept
        where = cfg.get("address") if address is None else address
        command = stage_command(sweep_dir) or "finetune"              # "run" when gmpq run runs this stage
        lost = final_lost_handler(sweep_dir, local=where in (None, "local"), command=command)
        say_recorded_sweep_join(sweep_dir, where if address is None else None)
        with ray_session(where), watching_cluster(lost) as watch:
            auto = workers == "auto"
            workers, use_gpu = _ray_devices(1 if auto else workers, use_gpu, say)
            for i, (row, job) in enumerate(jobs, start=1):
                tid = job.trial_id
                recipe, prev = job.recipe_json(), existing.get(tid)
                # a row from before recipes (None) counts as the same recipe; precision "auto" as the one it ran in; a
                # row from before the precision was in recipes, as its model file says (unknown: as any precision)
                recorded = recorded_recipe(sweep_dir, prev) if prev is not None else None
                same = prev is not None and same_recipe(recorded, recipe)
                tag = f"[{i}/{len(chosen)}] {tid}:"
                earlier = None if same else kept_of.get(tid)
                if prev is not None and not same:     # the current recipe's row, files and checkpoint: kept aside
                    say(f"{tag} fine-tuned before with other settings ({', '.join(recipe_changes(recorded, recipe))})"
                        + ("; starting afresh" if earlier is None else
                           "; continuing its unfinished fine-tune with these settings, kept earlier" if earlier.unfinished
                           else "; going back to its fine-tune with these settings, kept earlier"))
                    aside.append(set_aside(sweep_dir, local, {**prev, "recipe_json": recorded}, say, tag).row)
                    del final_rows[tid]
                    write_final(sweep_dir, final_rows)
                elif prev is None and earlier is None:   # a run of another recipe stopped here: kept aside, not replaced
                    keep_unfinished(sweep_dir, local, tid, say, tag, recipe=recipe)
                if earlier is not None:               # this recipe was fine-tuned before: its result comes back
                    park_leftovers(sweep_dir, local, tid, say, tag, recipe)
                    if earlier.unfinished:            # no row: its checkpoint (if kept) is continued
                        if restore_unfinished(sweep_dir, local, earlier, say, tag):
                            resuming.add(tid)
                    else:
                        prev = final_rows[tid] = existing[tid] = restore_kept(sweep_dir, local, earlier, say, tag)
                        restored.append(prev)
                        write_final(sweep_dir, final_rows)
                        recorded, same = recorded_recipe(sweep_dir, prev), True
                if not same:
                    prev = None
                if same and int(prev.get("epochs") or 0) == epochs:
                    how = " with these settings" if recorded is None or recipe_precision(recorded) else (
                        ", precision unknown (the other settings are these; its row was written before the precision "
                        "was part of a recipe and has no model file that says; delete its row in "
                        f"{sweep_dir / FINAL_FILE} to fine-tune it again)")
                    say(f"[{i}/{len(chosen)}] {tid}: already fine-tuned for {epochs} epoch(s){how}: "
                        f"top1 {prev['final_top1']:.2f}%")
                    if not final_model_path(sweep_dir, tid).is_file():    # fine-tuned before models were exported
                        final_rows[tid] = export_saved_final(sweep_dir, storage, prev, job, STATE_FILE, say)
                        write_final(sweep_dir, final_rows)
                        refilled.append(tid)
                    done_ids.append(tid)
                    continue
                if prev is not None:
                    say(f"{tag} continuing its {int(prev.get('epochs') or 0)}-epoch fine-tune to "
                        f"{epochs} epochs (the cosine schedule is stretched; its row and model file will be replaced)")
                todo.append((i, row, job, int(prev.get("epochs") or 0) + 1 if prev is not None else 1))
            cap = given(max_concurrent, "max_concurrent", None)
            if auto:                      # the devices shared by the policies that run at once
                workers = auto_workers(len(todo), use_gpu, cap, jobs[0][1].batch_size if jobs else 128)
            slots = final_slots(len(todo), workers, use_gpu, cap)
            if len(todo) > 1 or (todo and auto):
                say(_at_once_text(len(todo), slots, workers, use_gpu, cap, auto))
            lock = threading.Lock()

            def fine_tune(item: tuple[int, dict, FinalJob, int]) -> None:
                i, row, job, first = item
                tid, tag = job.trial_id, f"[{i}/{len(chosen)}] {job.trial_id}:"
                span = f"epochs {first}-{epochs}" if first > 1 else f"{epochs} epoch(s)"
                say(f"{tag} fine-tuning {span} on {workers} worker(s) ({'GPU' if use_gpu else 'CPU'}), "
                    f"{row.get('selection_reason')}")
                mark_started(sweep_dir, tid, job.recipe_json(), epochs)   # a run stopped before its row: known by it
                with _ProgressWatcher(Path(job.progress_file), say, tag, epochs):
                    run = run_final_job(job, storage_path=storage, workers=workers, use_gpu=use_gpu)
                if (first > 1 or tid in resuming) and not run.metrics.get("resumed_from_epoch"):   # not continued
                    why = run.metrics.get("restarted_because") or f"no checkpoint of it under {storage}"
                    say(f"{tag} fine-tuned afresh from epoch 1, not continued: {why}")
                with lock:                   # final.parquet is rewritten whole: one writer at a time
                    model_path = record_final_run(sweep_dir, final_rows, row, run, job, say)
                    clear_started(sweep_dir, tid)
                    histories[tid] = run.history
                    done_ids.append(tid)
                say(f"{tag} final top1 {run.metrics.get('top1', float('nan')):.2f}% "
                    f"(transfer check {row.get('transfer_top1', float('nan')):.2f}%), {run.seconds:.0f}s"
                    + (f"; model {model_path}" if model_path else ""))
            failed: BaseException | None = None
            try:
                run_side_by_side(todo, fine_tune, slots)
            except (Exception, KeyboardInterrupt) as e:   # the finished policies keep their rows: plot, log, then raise
                failed = e
                if watch is not None and not isinstance(e, KeyboardInterrupt):
                    watch.settle()                 # the cluster lost: its paragraph and exit 75, not Ray's error
        # after Ctrl-C a fine-tune thread may still be recording its policy: final.parquet, the policies done and
        # their histories are read together, under the lock it records under (one recorded later: the next run logs it)
        with lock:
            done, fresh_histories = list(done_ids), dict(histories)
            final = read_final(sweep_dir) if failed is None or done else None
        if failed is not None and not isinstance(failed, KeyboardInterrupt):    # (Ctrl-C: the command says it)
            kept = [job.trial_id for _, _, job, _ in todo if job.trial_id in fresh_histories]
            say(f"{len(todo) - len(kept)} of {len(todo)} fine-tune(s) failed"
                + (f"; the finished ones ({', '.join(kept)}) are kept in {sweep_dir / FINAL_FILE} and MLflow"
                   if kept else "")
                + ". Rerun the same command after fixing the cause: finished policies are not run again.")
        if failed is not None and not done:
            raise failed
        plot_final(final, read_trials(sweep_dir, missing_ok=True), sweep_dir / FINAL_PNG)
        ours = final[final["trial_id"].isin(done)].reset_index(drop=True)
        # this call's fine-tunes and refilled model files are logged; an earlier one only if its run is missing
        log_final(tracking_uri or cfg.get("tracking_uri"), sweep_dir, ours, histories=fresh_histories,
                  png_path=sweep_dir / FINAL_PNG, fresh={*fresh_histories, *refilled}, kept=aside, restored=restored)
        if failed is not None:
            raise failed
        return ours

