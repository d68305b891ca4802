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
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from gmpq_core.errors import CheckpointError, ConfigError
from gmpq_core.fileio import read_json

from .final_results import (check_not_shorter, export_saved_final, final_model_path, finetune_progress_dir,
                            finetune_storage, local_storage, read_final, record_final_run, recorded_recipe,
                            refuse_beside_other_finetune, write_final)
from .kept_finetunes import (clear_started, keep_unfinished, mark_started, park_leftovers, restore_kept,
                             restore_unfinished, set_aside)
from .moved_sweep import usable_cache_dir
from .cluster_watch import lost_after_s, watching_cluster
from .ray_env import ray_session
from .recipes import recipe_changes, recipe_precision, same_recipe
from .results import FINAL_FILE, load_resolved_config
from .side_by_side import run_side_by_side, side_by_side_slots
from .sweep_join import say_recorded_sweep_join
from .sweep_lost import final_lost_handler
from .train_stage import RECIPE_DEFAULTS, STATE_FILE, FinalJob, run_final_job

__all__ = ["FINAL_PNG", "finetune_selected", "final_job", "target_fp_checkpoint", "check_final_workers", "final_slots", "auto_workers",
           "read_final"]

log = logging.getLogger(__name__)

FINAL_PNG = "final.png"


class _ProgressWatcher:
    """Driver thread printing the rank-0 progress file while ``trainer.fit()`` blocks (every ``every_s``); what
    an earlier run left in the file (there when this watcher started) is not this run's progress: the file is
    removed as the watcher starts, and its content is not printed if it shows up again (compared by content,
    not by clock: rank 0 may run on another node)."""

    def __init__(self, path: Path, say: Callable[[str], None], prefix: str, epochs: int, every_s: float = 20.0):
        self.path, self.say, self.prefix, self.epochs, self.every_s = path, say, prefix, epochs, every_s
        try:
            self.stale = read_json(path)
        except (CheckpointError, OSError):
            self.stale = None
        path.unlink(missing_ok=True)   # nor does gmpq status show it while this run starts (rank 0 writes anew)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="finetune-progress", daemon=True)

    def _run(self) -> None:
        seen = None
        while not self._stop.wait(self.every_s):
            try:
                p = read_json(self.path)
            except CheckpointError:
                continue
            key = (p.get("epoch"), p.get("step"))
            if key != seen and p != self.stale:
                seen = key
                self.say(f"{self.prefix} epoch {p['epoch']}/{self.epochs}: step {p['step']}/{p['steps']}")

    def __enter__(self) -> "_ProgressWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def target_fp_checkpoint(sweep_dir: str | Path, *, say: Callable[[str], None] | None = None) -> Path:
    """The sweep's FP target model (``shared.json`` written by the sweep); trained and cached if absent."""
    sweep_dir = Path(sweep_dir)
    shared = sweep_dir / "shared.json"
    if shared.is_file():
        path = Path(read_json(shared).get("target_model_path", ""))
        if path.is_file() and path.with_suffix(".json").is_file():
            return path
    from gmpq_core.transfer import prepare_target_model
    from .sweep_config import SweepConfig, saved_before_precision

    cfg = SweepConfig.from_dict(saved_before_precision(load_resolved_config(sweep_dir, missing_ok=False))).resolved()
    cfg = replace(cfg, cache_dir=usable_cache_dir(cfg.cache_dir, address=cfg.address, say=say))
    if say:
        say(f"no FP target model recorded in {shared}: preparing it ({cfg.model} on {cfg.target_dataset}; "
            f"read from {cfg.cache_dir} if trained before)")
    return prepare_target_model(model=cfg.model, dataset=cfg.target_dataset, check=cfg.transfer,
                                cache_dir=cfg.cache_dir, data_root=cfg.data_root, image_size=cfg.image_size,
                                small_input=cfg.small_input, precision=cfg.precision).path


def final_slots(n_jobs: int, workers: int, use_gpu: bool, cap: int | None) -> int:
    """How many fine-tunes of ``workers`` workers the Ray cluster holds at once (a Ray Train worker takes
    1 CPU, or 1 GPU and no CPU with ``use_gpu``), at most ``cap``, at least 1."""
    import ray
    res = ray.cluster_resources()
    return side_by_side_slots(n_jobs, workers, int(res.get("GPU" if use_gpu else "CPU", 0)), cap)


AUTO_MIN_IMAGES_PER_WORKER = 16       # workers: auto never splits a global batch finer (BatchNorm per worker)


def auto_workers(n_jobs: int, use_gpu: bool, cap: int | None, batch_size: int) -> int:
    """``finetune.workers: auto``: the cluster's GPUs (CPUs without ``use_gpu``) divided by the policies that
    run at once (all of them, at most ``cap``), at least 1, and at most ``batch_size // 16`` (each worker
    gets ``batch_size // workers`` images per step)."""
    import ray
    devices = int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 0))
    at_once = max(1, min(int(n_jobs), int(cap) if cap is not None else int(n_jobs)))
    return max(1, min(devices // at_once, int(batch_size) // AUTO_MIN_IMAGES_PER_WORKER))


def check_final_workers(workers: int) -> None:
    """Before a sweep that ends with the final stage (``gmpq run``): its workers fit the running Ray cluster
    (a ConfigError naming ``--workers`` now, not after the sweep)."""
    _ray_devices(int(workers), None, lambda _msg: None)


def _ray_devices(workers: int, use_gpu: bool | None, say: Callable[[str], None]) -> tuple[int, bool]:
    import ray
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
    if use_gpu is None:
        use_gpu = gpus >= 1
    if use_gpu and gpus < workers:
        if gpus < 1:
            raise ConfigError("use_gpu=True but the Ray cluster has no GPU; drop the GPU request.")
        say(f"only {gpus} GPU(s) in the Ray cluster: using {gpus} workers instead of {workers}")
        workers = gpus
    if not use_gpu and workers > cpus:
        raise ConfigError(f"workers={workers} needs {workers} CPUs but the Ray cluster has {cpus}; "
                          f"use --workers {max(cpus, 1)} or fewer.")
    return workers, use_gpu


def _given(stage: dict, value: Any, key: str, default: Any) -> Any:
    """An explicit value, else the sweep config's ``finetune.<key>``, else ``default``."""
    return value if value is not None else (stage.get(key) if stage.get(key) is not None else default)


def final_job(cfg: dict, row: dict, fp_path: str | Path, *, epochs: int, lr: float | None = None,
              batch_size: int | None = None, max_steps_per_epoch: int | None = None, train_size: int | None = None,
              test_size: int | None = None, progress_dir: Path | None = None, precision: str | None = None) -> FinalJob:
    """The ``FinalJob`` of one selected policy (a pareto.parquet row): the resolved sweep config ``cfg``'s
    ``finetune`` section and ``precision``, the values given here overriding them; rank 0's progress file in
    ``progress_dir``."""
    stage = dict(cfg.get("finetune") or {})
    given = functools.partial(_given, stage)
    tid = str(row["trial_id"])
    return FinalJob(trial_id=tid, policy_json=str(row["policy_json"]), fp_checkpoint=str(fp_path),
                    dataset=str(cfg.get("target_dataset")), data_root=cfg.get("data_root"),
                    image_size=cfg.get("image_size"), epochs=epochs, lr=float(given(lr, "lr", RECIPE_DEFAULTS.lr)),
                    batch_size=int(given(batch_size, "batch_size", RECIPE_DEFAULTS.batch_size)),
                    distill=bool(stage.get("distill", RECIPE_DEFAULTS.distill)),
                    nesterov=bool(stage.get("nesterov", RECIPE_DEFAULTS.nesterov)),
                    seed=int(cfg.get("seed") or 0),
                    max_steps_per_epoch=given(max_steps_per_epoch, "max_steps_per_epoch", None),
                    train_size=given(train_size, "train_size", None), test_size=given(test_size, "test_size", None),
                    precision=str(precision or cfg.get("precision") or "fp32"),  # none saved: an older, float32 sweep
                    progress_file=str(progress_dir / f"finetune-{tid}.progress.json") if progress_dir else None)


def _at_once_text(n: int, slots: int, workers: int, use_gpu: bool, cap: int | None, auto: bool) -> str:
    """What the stage will run at once, and what limits it."""
    devices = "GPUs" if use_gpu else "CPUs"
    if n == 1:                                   # nothing to queue or share with
        return f"fine-tuning 1 policy on {workers} worker(s)" + (
            f" (finetune.workers: auto: the cluster's {devices})" if auto else "")
    how = "one after the other" if slots == 1 else f"{slots} at a time"
    text = f"fine-tuning {n} policies {how}, {workers} worker(s) each"
    if auto:
        text += f" (finetune.workers: auto: the cluster's {devices} shared by the policies at once)"
    if slots < n:
        text += (f"; max_concurrent {cap} caps it" if cap is not None and slots == cap
                 else f"; the cluster's {devices} hold {slots} at a time with {workers} worker(s) each")
    return text


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

