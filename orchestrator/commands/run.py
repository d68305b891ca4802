"""``gmpq run``: the whole job in one command: sweep -> Pareto selection -> Ray Train fine-tune.

    gmpq run --preset demo --out runs/demo
    gmpq run --config my_sweep.yaml --n-trials 12 --top-k 3 --workers 2

Same sweep flags as ``gmpq sweep`` (they override the preset / config file) plus the fine-tune
stage's ``--top-k``, ``--max-gbitops`` (select only among the front's policies within a device's GBitOPs),
``--workers``, ``--finetune-epochs``, ``--finetune-max-concurrent`` (the selected
policies fine-tune side by side as far as the cluster holds ``--workers`` each) and its data caps for a quick
run: ``--finetune-train-size``, ``--finetune-test-size``, ``--finetune-max-steps-per-epoch`` (all saved in the
folder's ``sweep_config.yaml``, its ``finetune:`` section, so ``--resume`` keeps them). ``--resume`` continues
every stage of an interrupted run in the same folder (finished trials and fine-tune epochs are not redone);
``gmpq run --out DIR --resume`` alone reads the folder's saved config; with ``--n-trials N`` (more than the sweep's)
the sweep runs more trials, then the Pareto front and its selection are made again from all of them and the final
stage fine-tunes that selection (policies fine-tuned before keep their rows). ``--resume auto`` continues the run when the folder
holds its sweep, else starts it (a batch job retried with the same command: cluster/kuberay/rayjob.yaml).
An interrupted stage (Ctrl-C, or SIGTERM: a preempted batch job) stops the run there (exit 130; 143 for
SIGTERM) with that command; what finished is kept. Ends with
the final Pareto table, the plot paths and the command that opens the results in MLflow.
"""
from __future__ import annotations

import argparse
import dataclasses
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from gmpq_core.errors import GMPQError

from . import at_least, help_text, int_or_auto, quiet_libraries

__all__ = ["register", "run"]


@contextlib.contextmanager
def _ray_session_said(address: str | None):
    """``ray_session(address)``, after the line naming a cluster whose address was read from the sweep's config (a
    ``--resume``; ``sweep_join.say_recorded_join``: the sweep stage cannot say it, Ray runs by then)."""
    from orchestrator.ray_env import ray_session
    from orchestrator.sweep_join import say_recorded_join

    say_recorded_join(address)
    with ray_session(address) as started:
        yield started


def _say(msg: str) -> None:
    print(f"gmpq run: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    quiet_libraries(getattr(args, "verbose", False))
    from orchestrator.commands._finetune_sweep import final_files_text, finetune_stage, format_final_table
    from orchestrator.commands.pareto import pareto_stage, print_pareto
    from orchestrator.final_results import final_table_heading
    from orchestrator.commands.sweep import (address_named, config_from_args, format_summary, mlflow_line,
                                             say_env_tracking_uri, stopped_note)
    from orchestrator.mlflow_notes import noting_mlflow_off
    from orchestrator.ray_env import Terminated, ctrl_c_signals, stop_status, terminated
    from orchestrator.pareto_pick import NO_LIMIT, limit_arg
    limit = limit_arg(args.max_gbitops)                   # a float, "none" or None: ConfigError -> exit 2
    finetune = {"finetune.top_k": args.top_k, "finetune.max_gbitops": None if limit == NO_LIMIT else limit,
                "finetune.workers": args.workers,
                "finetune.epochs": args.finetune_epochs, "finetune.max_steps_per_epoch": args.finetune_max_steps,
                "finetune.max_concurrent": args.finetune_max_concurrent,
                "finetune.train_size": args.finetune_train_size, "finetune.test_size": args.finetune_test_size}
    cfg = config_from_args(args, finetune)               # --resume alone: the folder's saved config; ConfigError -> exit 2
    if limit == NO_LIMIT:                                # (an override of None means "not given")
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, max_gbitops=None))
    if args.check:                                       # gmpq sweep --check's checks and lines; nothing runs
        from orchestrator.commands.sweep import check_only

        with address_named(args, cfg):
            print(check_only(cfg, args.resume))
        return 0
    from orchestrator.sweep import check_sweep, run_sweep                     # lazy: Ray/Optuna imports

    t0 = time.perf_counter()
    # every check of the sweep stage (the folder, --resume auto's choice said, the saved stores a resume keeps, the
    # address, model, data and budgets) before Ray starts, as gmpq sweep does; run_sweep takes them as checked
    with address_named(args, cfg):                      # an address from the config, not --address: named if dead
        checked = check_sweep(cfg, args.resume, say=_say, t0=t0)
    resume, resolved = checked.resume, checked.cfg
    sweep_dir = Path(resolved.out_dir)
    say_env_tracking_uri(cfg, resume, _say)
    stage = "the sweep"
    try:
        with noting_mlflow_off(once=True) as mlflow_off, address_named(args, cfg), \
                _ray_session_said(resolved.address):     # one Ray for the sweep and the fine-tune
            from orchestrator.final_stage import check_final_workers

            if resolved.finetune.workers != "auto":       # 'auto' fits whatever the cluster has
                check_final_workers(resolved.finetune.workers)    # stage 3 must fit the cluster: say so before stage 1
            new = f" ({cfg.n_trials - checked.grown_from} new)" if checked.grown_from is not None else ""
            _say(f"1/3 sweep: {cfg.n_trials} trial{'' if cfg.n_trials == 1 else 's'}{new} -> {sweep_dir}")
            summary = run_sweep(cfg, resume=resume, progress=not args.quiet,   # the later stages resume on their own
                                command="run", checked=checked)   # driver.json: 'gmpq run' (its sweep stage)
            print(format_summary(summary, command="gmpq run"), flush=True)
            if summary.interrupted:                      # no Pareto front of half a sweep
                return stop_status(summary.terminated)
            from orchestrator.pareto import no_completed_text
            from orchestrator.results import read_trials

            trials = read_trials(sweep_dir, missing_ok=True)
            nothing = no_completed_text(sweep_dir, trials) if summary.n_completed == 0 or len(trials) else None
            if nothing is not None:                      # no Pareto front: the same words as gmpq pareto / status
                raise GMPQError(nothing)
            from orchestrator.driver_markers import driver_marker

            stage = "the Pareto selection"
            # Python's Ctrl-C, whatever handler the process had; gmpq status: still running between the stages
            with ctrl_c_signals(python_sigint=True), driver_marker(sweep_dir, "run"):
                _say("2/3 Pareto front and selection")
                front = pareto_stage(sweep_dir, None, resolved.tracking_uri)
                n = int(front["selected"].sum())
                _say(f"3/3 final fine-tune of {n} polic{'y' if n == 1 else 'ies'} with Ray Train")
                stage = "the final fine-tune"
                ft_args = argparse.Namespace(top_k=None, workers=None, epochs=None,
                                             tracking_uri=resolved.tracking_uri, address=None)
                final = finetune_stage(sweep_dir, ft_args, say=_say)
    except KeyboardInterrupt as e:                       # (stopped in its trials, the sweep returns: said above)
        by_sigterm = isinstance(e, Terminated) or terminated()    # (SIGTERM handed to a handler raising ^C's)
        note = (stopped_note(resolved, by_sigterm, command="gmpq run") if stage == "the sweep" else
                interrupted_note(sweep_dir, stage, by_sigterm=by_sigterm))
        if note is None:
            raise                                        # before the sweep saved its config: nothing to continue
        _say(note)
        return stop_status(by_sigterm)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n== gmpq run finished in {minutes:.1f} min: {summary.n_completed} completed, {summary.n_pruned} pruned, "
          f"{summary.n_failed} failed trials ==")
    print_pareto(sweep_dir, front)
    print("\n" + final_table_heading(final))        # what was trained: full data, or the cap / subset
    print(format_final_table(final))
    print(final_files_text(sweep_dir))
    print("\n" + mlflow_line(summary, resolved.tracking_uri, mlflow_off[0] if mlflow_off else None))
    if resolved.optuna_storage:
        print(f"Optuna study (optuna-dashboard is a separate package: pip install optuna-dashboard):\n"
              f"  optuna-dashboard {resolved.optuna_storage}")
    return 0


def interrupted_note(sweep_dir: Path, stage: str, *, by_sigterm: bool = False) -> str:
    """What a run stopped by Ctrl-C (or SIGTERM) in ``stage``, after its sweep, keeps, and the command that
    continues it (stopped in the sweep: ``commands.sweep.stopped_note``)."""
    from orchestrator.commands._finetune_sweep import kept_on_interrupt_text
    from orchestrator.ray_env import stop_word

    if stage == "the final fine-tune":
        kept = f"the sweep, its Pareto selection, {kept_on_interrupt_text(sweep_dir)}"
    else:
        kept = "the sweep is kept"
    return f"{stage} was {stop_word(by_sigterm)}; {kept}. Continue with: gmpq run --out {sweep_dir} --resume"


def register(subparsers: Any) -> None:
    from orchestrator.commands.sweep import add_sweep_args

    p = subparsers.add_parser("run", help="sweep -> Pareto -> Ray Train fine-tune, in one command",
                              description=help_text(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(p)
    p.add_argument("--check", action="store_true",
                   help="only validate the config as gmpq sweep --check does (model, data, budget range, search "
                        "settings, stores, folders) and say what the sweep would run; nothing trains")
    g = p.add_argument_group("final fine-tune")
    g.add_argument("--top-k", type=int, action=at_least(1), default=None, metavar="K", help="policies to fine-tune (finetune.top_k)")
    g.add_argument("--max-gbitops", default=None, metavar="G",
                   help="select the K only among the Pareto front's policies of at most G GBitOPs (a device's limit: "
                        "the quantized layers' BitOPs / 1e9, pareto.png's x axis; finetune.max_gbitops); 'none' "
                        "lifts the config's")
    g.add_argument("--workers", type=int_or_auto, action=at_least(1), default=None, metavar="N",
                   help="Ray Train workers per policy, or 'auto': the cluster's CPUs (GPUs) shared by the policies "
                        "fine-tuned at once (finetune.workers)")
    g.add_argument("--finetune-epochs", type=int, action=at_least(1), default=None, metavar="E", help="fine-tune epochs (finetune.epochs)")
    g.add_argument("--finetune-max-steps-per-epoch", "--finetune-max-steps", dest="finetune_max_steps", type=int,
                   action=at_least(1), default=None, metavar="N",
                   help="cap the fine-tune steps per epoch (quick checks; finetune.max_steps_per_epoch)")
    g.add_argument("--finetune-train-size", type=int, action=at_least(1), default=None, metavar="N",
                   help="fine-tune on a stratified subset of N target training images (quick checks; "
                        "finetune.train_size; default: the full split)")
    g.add_argument("--finetune-test-size", type=int, action=at_least(1), default=None, metavar="N",
                   help="test the fine-tuned models on a stratified subset of N target test images (quick checks; "
                        "finetune.test_size; default: the full split)")
    g.add_argument("--finetune-max-concurrent", type=int, action=at_least(1), default=None, metavar="N",
                   help="fine-tune at most N policies side by side (finetune.max_concurrent; default: as many as "
                        "the cluster's CPUs/GPUs hold with --workers each)")
    p.set_defaults(func=run)
