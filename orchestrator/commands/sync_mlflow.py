"""``gmpq sync-mlflow``: upload to MLflow what a sweep folder holds but the tracking store lacks.

    gmpq sync-mlflow --sweep runs/demo
    gmpq sync-mlflow --sweep runs/demo --tracking-uri http://127.0.0.1:5000

For a sweep whose MLflow server was down at the start or went down mid-sweep (the sweep warned and
kept going: its results are complete in DIR/trials.parquet). Creates the missing parent and trial
runs, completes the partial ones, and reuses runs it finds by their saved ids or their trial_id tags:
running it twice creates nothing new. A fine-tune run deleted from the store (in the MLflow UI, or by
mlflow gc) is made again from final.parquet. A deleted parent run is restored, with the runs deleted with
it (a run deleted on its own before stays deleted and is made again); one that mlflow gc removed
gets a new parent run, and the runs that were under it are moved under the new one. A fine-tune run that
lacks its per-epoch series gets them from the fine-tune's Ray Train checkpoint (none left: it keeps its
final row, and the sync says so in one line).
Default tracking URI: the sweep's own. A sweep folder with no trial results yet has nothing to sync: it
says so and exits 0, creating no run. A --tracking-uri that cannot work (an unknown scheme, a
sqlite:///PATH under a file) is refused before anything is read. While a gmpq command
still runs the sweep (its own MLflow logging writes the same runs), the sync is refused: run it after that
command ends, or with --while-running while it logs nothing to MLflow.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from . import add_sweep_dir_arg, help_text

__all__ = ["register", "run", "format_report"]


def format_report(rep: Any) -> str:
    if rep.nothing_to_sync:
        from orchestrator.results import TRIALS_FILE

        why = "its trials.parquet has no rows" if (rep.sweep_dir / TRIALS_FILE).exists() else "no trials.parquet"
        return (f"nothing to sync: '{rep.sweep_dir}' holds no trial results yet ({why}: no trial of the sweep has "
                f"finished). No MLflow run was created in {rep.tracking_uri}; rerun 'gmpq sync-mlflow --sweep "
                f"{rep.sweep_dir}' once trials have finished.")
    parent = "created" if rep.parent_created else "reused"
    lines = [f"MLflow {rep.tracking_uri}, experiment '{rep.experiment_name}': parent run {rep.parent_run_id} "
             f"({parent})",
             f"{rep.trials} trials in trials.parquet: {rep.runs_created} runs created, {rep.runs_updated} completed, "
             f"{rep.runs_unchanged} already complete; {rep.duplicates} duplicate runs"]
    if getattr(rep, "parent_restored", False):
        k = getattr(rep, "runs_restored", 0)
        runs = f", with the {k} run{'' if k == 1 else 's'} under it deleted with it" if k else ""
        if k and getattr(rep, "runs_restored_unsorted", False):         # (every deleted run under it)
            runs = f", with the {k} deleted run{'' if k == 1 else 's'} under it (the store does not say which were " \
                "deleted with it)"
        lines.append(f"parent run {rep.parent_run_id} was deleted (not yet removed by mlflow gc): restored{runs}")
    removed, n = getattr(rep, "removed_parent_run_id", None), getattr(rep, "runs_reattached", 0)
    if removed:
        lines.append(f"parent run {removed} was removed from the store (mlflow gc): {n} run{'' if n == 1 else 's'} "
                     f"moved under the new one")
    if rep.tables_logged:
        lines.append(f"tables added to the parent run: {', '.join(rep.tables_logged)}")
    if getattr(rep, "runs_tagged", 0):
        lines.append(f"{rep.runs_tagged} run{'' if rep.runs_tagged == 1 else 's'} given their Pareto / fine-tune "
                     "links (pareto, selection_reason, finetune_run_id, final_top1, trial_run_id) or descriptions")
    n = getattr(rep, "finetune_runs_recreated", 0)
    if n:
        lines.append(f"{n} fine-tune run{'' if n == 1 else 's'} made again from final.parquet (the tracking store "
                     f"had lost {'it' if n == 1 else 'them'}: deleted, or the store replaced)")
    n = getattr(rep, "finetune_runs_completed", 0)
    if n:
        lines.append(f"{n} fine-tune run{'' if n == 1 else 's'} that a stopped final stage left unfinished given "
                     "the final.parquet row they lacked and ended FINISHED")
    n, tagged = getattr(rep, "kept_runs_made", 0), getattr(rep, "kept_runs_tagged", 0)
    if n or tagged:
        lines.append(f"fine-tunes kept aside (models/kept/): {n} run{'' if n == 1 else 's'} made, {tagged} "
                     f"run{'' if tagged == 1 else 's'} tagged or untagged gmpq.kept")
    n = getattr(rep, "finetune_series_logged", 0)
    if n:
        its = "its" if n == 1 else "their"
        lines.append(f"{n} fine-tune run{'' if n == 1 else 's'} given {its} per-epoch series (final_top1, final_top5, "
                     f"final_loss, ...) from {its} Ray Train checkpoint{'' if n == 1 else 's'}")
    without = getattr(rep, "finetunes_without_history", ())
    if without:
        one, where = len(without) == 1, rep.checkpoint_storage
        why = "a remote storage is not searched" if "://" in where and not where.startswith("file://") else \
            "deleted, or replaced by a later fine-tune"
        lines.append(f"fine-tune run{'' if one else 's'} of {', '.join(without)} keep{'s' if one else ''} the final "
                     f"row only: no Ray Train checkpoint under {where} holds {'its' if one else 'their'} per-epoch "
                     f"series ({why})")
    if rep.changed:
        lines.append("the tracking store now matches the sweep folder")
    else:         # a run that keeps its final row only is said above: "nothing was missing" would contradict it
        lines.append("nothing else to upload" if without else "nothing was missing")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from orchestrator.sync import sync_mlflow

    from pathlib import Path

    from gmpq_core.errors import CheckpointError

    from . import quiet_libraries, refuse_empty, refuse_missing_sweep_dir

    refuse_empty("--tracking-uri", args.tracking_uri, "give an MLflow tracking URI, or leave --tracking-uri out to "
                 "sync to the sweep's own store.")
    quiet_libraries(getattr(args, "verbose", False))  # no "View run ..." lines per run on an http store
    with contextlib.redirect_stdout(sys.stderr):      # anything else MLflow prints stays out of --json's stdout
        try:
            rep = sync_mlflow(args.sweep, tracking_uri=args.tracking_uri, while_running=args.while_running)
        except CheckpointError:         # (after its --tracking-uri check) no folder at all: said as gmpq status says it
            refuse_missing_sweep_dir(args.sweep, Path(args.sweep).expanduser().resolve(), "you want to sync")
            raise
    print(json.dumps(rep.to_dict()) if args.json else format_report(rep))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("sync-mlflow", help="upload what a sweep folder has and MLflow lacks (idempotent)",
                              description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_dir_arg(p, "sweep folder (the --out of gmpq sweep)")
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="MLflow tracking URI (default: the sweep's)")
    p.add_argument("--while-running", action="store_true",
                   help="sync while a gmpq command still runs the sweep (refused otherwise): only while it logs "
                        "nothing to MLflow (a gmpq sweep that warned 'MLflow logging disabled'), or when it ended "
                        "on another host")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    p.set_defaults(func=run)
