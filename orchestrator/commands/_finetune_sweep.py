"""The ``--sweep DIR`` mode of ``gmpq finetune``: Ray Train fine-tune of a sweep's selected policies.

    gmpq finetune --sweep runs/demo --top-k 2 --workers 2 --epochs 1
    gmpq finetune --sweep runs/demo --max-gbitops 0.4     # select again among the front's policies of <= 0.4 GBitOPs

Not a subcommand of its own (the leading underscore keeps `gmpq` from listing it): ``orchestrator/commands/finetune.py`` adds these options with
``add_sweep_args(parser)`` and calls ``run_sweep_finetune(args)`` when ``--sweep`` is given.
Options that parser already defines (``--epochs``, ``--lr``, ``--batch-size``, ``--train-size``,
``--test-size``, ``--max-steps-per-epoch``, ...) are reused, not redefined. Values left unset (None)
come from the sweep config's ``finetune`` section.

Without --top-k or --max-gbitops it fine-tunes pareto.parquet's selection (a ``gmpq pareto`` pick or limit carries).
--top-k K selects K again, within the config's finetune.max_gbitops. --max-gbitops G selects again (K: --top-k, else
finetune.top_k) among the front's policies of at most G GBitOPs (the quantized layers' BitOPs / 1e9, pareto.parquet's
gbitops, pareto.png's x axis); 'none' lifts the config's limit. Either is for this call: sweep_config.yaml is left as
it is (gmpq run --out DIR --resume --max-gbitops G changes it). None of the front within G: refused, nothing written.
A selection made from fewer trials than have completed since (a grown sweep) is made again when it was made with the
sweep config's settings, and kept when made by hand (--pick, another --top-k / --max-gbitops, a config changed since).
A selection made again is logged to the sweep's MLflow parent run and trial runs, as gmpq pareto logs it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gmpq_core.errors import ConfigError

from . import address_help, at_least, check_tracking_uri_arg, int_or_auto

__all__ = ["add_sweep_args", "add_target_arg", "resolve_target", "run_sweep_finetune", "format_final_table", "finetune_stage", "check_sweep_folder"]


def _add(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """Add an option unless the parser already has one of these flags (then the existing one serves)."""
    try:
        parser.add_argument(*flags, **kwargs)
    except argparse.ArgumentError:
        pass


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sweep mode (Ray Train fine-tune of a sweep's selected policies)")
    g.add_argument("--sweep", default=None, metavar="DIR",
                   help="sweep folder: fine-tune its selected Pareto policies on the target data (all of it, unless "
                        "--train-size or --max-steps-per-epoch, or the sweep's finetune section, say less)")
    _add(g, "--top-k", type=int, action=at_least(1), default=None, metavar="K",
                   help="select K policies again first, within --max-gbitops, else the sweep config's "
                        "finetune.max_gbitops (default: pareto.parquet's selection; with --max-gbitops or no "
                        "pareto.parquet, finetune.top_k)")
    _add(g, "--max-gbitops", default=None, metavar="G",
         help="select again, only among the front's policies of at most G GBitOPs (the quantized layers' BitOPs / 1e9: "
              "pareto.parquet's gbitops, pareto.png's x axis), for this call; 'none': no limit (default: "
              "pareto.parquet's selection; with --top-k, the sweep config's finetune.max_gbitops)")
    _add(g, "--workers", type=int_or_auto, action=at_least(1), default=None, metavar="N",
                   help="Ray Train data-parallel workers per policy, or 'auto': the cluster's CPUs (GPUs) shared by "
                        "the policies fine-tuned at once (default: the sweep's finetune.workers)")
    _add(g, "--max-concurrent", type=int, action=at_least(1), default=None, metavar="N",
                   help="fine-tune at most N policies side by side (default: the sweep's finetune.max_concurrent, "
                        "else as many as the cluster's CPUs/GPUs hold with --workers each)")
    _add(g, "--test-size", type=int, action=at_least(1), default=None, metavar="N",
                   help="evaluate on a stratified slice of N test images (default: the full test split)")
    _add(g, "--address", default=None, metavar="ADDR", help=address_help("the sweep's, else local"))
    _add(g, "--tracking-uri", default=None, metavar="URI", help="MLflow tracking URI (default: the sweep's)")
    _add(g, "--epochs", type=int, action=at_least(1), default=None, metavar="E", help="fine-tune epochs")
    _add(g, "--lr", type=float, default=None, metavar="LR", help="peak learning rate")
    _add(g, "--batch-size", type=int, action=at_least(1), default=None, metavar="B", help="global batch size")
    _add(g, "--train-size", type=int, action=at_least(1), default=None, metavar="N", help="train on a stratified slice of N images")
    _add(g, "--max-steps-per-epoch", type=int, default=None, metavar="N", help="cap the steps per epoch")


def add_target_arg(parser: argparse.ArgumentParser) -> None:
    """``gmpq finetune DIR`` / ``gmpq finetune FILE``: the one positional argument, a sweep folder (as ``--sweep``)
    or a policy file (as ``--policy``), as ``gmpq status DIR`` and ``gmpq pareto DIR`` take theirs."""
    parser.add_argument("target", nargs="?", default=None, metavar="DIR|FILE",
                        help="a sweep folder (the same as --sweep DIR) or a bit policy file (the same as --policy FILE)")


def resolve_target(args: argparse.Namespace) -> None:
    """Moves ``args.target`` to ``args.sweep`` (a folder) or ``args.policy`` (a file); ConfigError, naming it, when it
    does not exist or another --sweep / --policy was given too."""
    target = getattr(args, "target", None)
    if target is None:
        return
    path = Path(target).expanduser()
    if not path.exists():
        raise ConfigError(f"gmpq finetune {target}: no such file or folder ({path.absolute()}). Pass a sweep folder "
                          "(the --out of gmpq sweep or gmpq run) or a bit policy file (e.g. DIR/policies/<trial>.json, "
                          "a gmpq search's policy.json).")
    flag, dest = ("--sweep", "sweep") if path.is_dir() else ("--policy", "policy")
    given = getattr(args, dest, None)
    if given is not None and Path(given).expanduser().resolve() != path.resolve():
        raise ConfigError(f"Two {'sweep folders' if dest == 'sweep' else 'policy files'} were given: {flag} {given} "
                          f"and {target}. Give it once: gmpq finetune {flag} {target} (or gmpq finetune {target}).")
    setattr(args, dest, target)


def kept_on_interrupt_text(sweep_dir: Path) -> str:
    """What an interrupted final stage keeps (``gmpq finetune --sweep`` and ``gmpq run`` say it)."""
    from orchestrator.results import FINAL_FILE

    return (f"the policies fine-tuned before ({Path(sweep_dir) / FINAL_FILE}) and each finished epoch (its Ray Train "
            "checkpoint) are kept")


def final_files_text(sweep_dir: Path) -> str:
    """Where the final stage's outputs are, and how to load a model."""
    from orchestrator.final_results import MODELS_DIR
    from orchestrator.kept_finetunes import KEPT_DIR
    from orchestrator.results import FINAL_FILE
    from orchestrator.final_stage import FINAL_PNG

    return (f"Table:  {sweep_dir / FINAL_FILE}\nPlot:   {sweep_dir / FINAL_PNG}\n"
            f"Models: {sweep_dir / MODELS_DIR}/<trial_id>.pt (for inference: "
            "gmpq_core.load_quantized_model(path).model)\n"
            + (f"Kept:   {kept}/ (fine-tunes with other settings; asking for theirs again restores one)\n"
               if (kept := sweep_dir / MODELS_DIR / KEPT_DIR).is_dir()
               and any(not p.name.endswith(".started.json") for p in kept.iterdir()) else "")   # (a run's recipe)
            + f"Packed integer weights (their real size): gmpq export {sweep_dir}; accuracy of any model file: "
            f"gmpq evaluate {sweep_dir}")


def format_final_table(final: Any) -> str:
    """Plain aligned table of final.parquet rows."""
    head = ["trial_id", "transfer_top1", "final_top1", "final_top5", "GBitOPs", "epochs", "workers", "seconds"]
    rows = [[str(r["trial_id"]), f"{r['transfer_top1']:.2f}", f"{r['final_top1']:.2f}", f"{r['final_top5']:.2f}",
             f"{r['gbitops']:.4f}", str(int(r["epochs"])), str(int(r["workers"])), f"{r['seconds']:.0f}"]
            for r in final.sort_values("gbitops").to_dict("records")]
    from orchestrator.text import text_table

    return text_table(head, rows, right=range(1, len(head)))


def _precision_arg(args: argparse.Namespace) -> str | None:
    """``--precision`` for the sweep's fine-tunes (a recipe setting: another precision is another recipe), None
    (not given; ``gmpq run``'s stage) to use the sweep config's ``precision``."""
    return getattr(args, "precision", None)


def finetune_stage(sweep_dir: Path, args: argparse.Namespace, *, say=None) -> Any:
    from orchestrator.final_stage import finetune_selected

    return finetune_selected(
        sweep_dir, top_k=getattr(args, "top_k", None), workers=getattr(args, "workers", None),
        epochs=getattr(args, "epochs", None), batch_size=getattr(args, "batch_size", None),
        lr=getattr(args, "lr", None), max_steps_per_epoch=getattr(args, "max_steps_per_epoch", None),
        train_size=getattr(args, "train_size", None), test_size=getattr(args, "test_size", None),
        tracking_uri=getattr(args, "tracking_uri", None), address=getattr(args, "address", None),
        max_concurrent=getattr(args, "max_concurrent", None), precision=_precision_arg(args),
        max_gbitops=getattr(args, "max_gbitops", None), say=say)


def check_sweep_folder(sweep_dir: Path) -> None:
    """Before Ray starts: ``sweep_dir`` is a sweep (its ``sweep_config.yaml``), and it, its ``models/`` and the
    Ray Train storage when a local folder can be written (a read-only sweep used to end in a traceback)."""
    from gmpq_core.fileio import check_writable_dir
    from orchestrator.final_results import MODELS_DIR, finetune_storage, local_storage
    from orchestrator.results import load_resolved_config
    from orchestrator.sweep_checks import check_sweep_writable

    cfg = load_resolved_config(sweep_dir, missing_ok=False)
    check_sweep_writable(sweep_dir, "gmpq finetune --sweep", f"final.parquet, final.png and {MODELS_DIR}/",
                         folders=(MODELS_DIR,))
    storage = local_storage(finetune_storage(cfg, sweep_dir))
    if storage is not None and storage.is_dir():    # (one not made yet: Ray Train makes it, maybe on another node)
        inside = storage.resolve().is_relative_to(sweep_dir.resolve())
        other = (f"copy the sweep to a folder you can write (cp -r {sweep_dir} NEW_DIR) and pass that" if inside else
                 f"set storage_path in {sweep_dir / 'sweep_config.yaml'} (what gmpq sweep --storage wrote) to a "
                 "folder you can write")
        check_writable_dir(storage, what="Ray Train storage of the sweep (its storage_path)",
                           hint=f"the fine-tunes keep their checkpoints there: make it writable, or {other}")


def run_sweep_finetune(args: argparse.Namespace) -> int:
    from orchestrator.pareto_pick import limit_arg
    from . import quiet_libraries, refuse_missing_sweep_dir
    from .sweep import check_address_arg

    args.max_gbitops = limit_arg(getattr(args, "max_gbitops", None))    # a float, "none" or None: before any work
    check_tracking_uri_arg(getattr(args, "tracking_uri", None), "where the sweep logged", "log where the sweep logged")
    check_address_arg(getattr(args, "address", None))
    refuse_missing_sweep_dir(args.sweep, Path(args.sweep).expanduser().resolve(), "whose policies you want to "
                             "fine-tune")
    quiet_libraries(getattr(args, "verbose", False))
    sweep_dir = Path(args.sweep).expanduser().resolve()
    check_sweep_folder(sweep_dir)
    from .pareto import sweep_running_text, sweep_stopped_text

    warning = sweep_running_text(sweep_dir, "gmpq finetune") or \
        sweep_stopped_text(sweep_dir, "gmpq finetune", f"gmpq finetune --sweep {sweep_dir}")
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)         # an early look is allowed: warned, not refused
    from orchestrator.mlflow_notes import noting_mlflow_off

    # a selection made again is logged before the fine-tunes and they after them, each through a connection of its
    # own (each tries): with the store down, its paragraph once
    with noting_mlflow_off(once=True):
        final = finetune_stage(sweep_dir, args,
                               say=lambda msg: print(f"gmpq finetune: {msg}", file=sys.stderr, flush=True))
    from orchestrator.final_results import final_table_heading

    print(final_table_heading(final))        # what was trained, as gmpq run says it
    print(format_final_table(final))
    print(final_files_text(sweep_dir))
    return 0
