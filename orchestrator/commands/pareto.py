"""``gmpq pareto``: the Pareto front of a sweep and the K policies selected for the final fine-tune.

    gmpq pareto --sweep runs/demo --top-k 3

Reads DIR/trials.parquet; writes DIR/pareto.parquet (non-dominated completed trials on transfer_top1
up / bitops down, with ``selected`` and ``selection_reason``), DIR/policies/<trial_id>.json (each policy of
the front as a file: the input of ``gmpq finetune --policy FILE``; the folder holds the current front only),
DIR/pareto.png and DIR/policies.png (the selected policies' bits, layer by layer), prints the table, and adds
them to the sweep's MLflow parent run.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import add_sweep_dir_arg, at_least, help_text, quiet_libraries

__all__ = ["register", "run", "pareto_stage"]


def pareto_stage(sweep_dir: Path, top_k: int | None, tracking_uri: str | None, *, mlflow: bool = True,
                 cfg: dict | None = None, table: Any = None) -> Any:
    """write_pareto + MLflow logging; returns the Pareto DataFrame (shared with ``gmpq run``). ``cfg`` (the sweep
    config) and ``table`` (trials.parquet as Arrow) spare reading them again when already read."""
    from orchestrator.mlflow_stages import log_pareto
    from orchestrator.pareto import PARETO_PNG, write_pareto
    from orchestrator.results import load_resolved_config

    if cfg is None:
        cfg = load_resolved_config(sweep_dir)
    front = write_pareto(sweep_dir, top_k, cfg=cfg, table=table)
    if mlflow:
        uri = tracking_uri or cfg.get("tracking_uri")
        log_pareto(uri, sweep_dir, front, sweep_dir / PARETO_PNG)
    return front


def print_pareto(sweep_dir: Path, front: Any, top_k: int | None = None, *, cfg: dict | None = None,
                 trials: Any = None) -> None:
    """The front's table; says so when fewer policies than ``top_k`` (default: the sweep config's) were selected.
    ``cfg`` (the sweep config) and ``trials`` (trials.parquet) spare reading them again when already read."""
    from orchestrator.pareto import DEFAULT_TOP_K, PARETO_PNG, POLICIES_DIR, POLICIES_PNG, format_pareto_table
    from orchestrator.results import PARETO_FILE, load_resolved_config, read_trials

    if cfg is None:
        cfg = load_resolved_config(sweep_dir)
    buckets = cfg.get("budget_buckets") or []
    if trials is None:
        trials = read_trials(sweep_dir)
    counts = trials["status"].value_counts().to_dict()
    print(f"Pareto front of {len(trials)} trials ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}): "
          f"{len(front)} non-dominated, {int(front['selected'].sum()) if len(front) else 0} selected (*)")
    print(format_pareto_table(front, buckets))
    want = top_k or int((cfg.get("finetune") or {}).get("top_k") or DEFAULT_TOP_K)
    chosen = int(front["selected"].sum()) if len(front) else 0
    if chosen < want:
        print(f"({chosen} selected of the {want} asked for (top-k): only {len(front)} on the front. A policy off "
              "the front is never selected: one on it is at least as accurate for at most its BitOPs.)")
    print(f"Table: {sweep_dir / PARETO_FILE}\nPlot:  {sweep_dir / PARETO_PNG}")
    if (sweep_dir / POLICIES_PNG).is_file():
        print(f"Bits per layer: {sweep_dir / POLICIES_PNG}")
    if len(front):
        print(f"Policies: {sweep_dir / POLICIES_DIR}/<trial_id>.json (one fine-tune, from the sweep's FP target "
              "model: gmpq finetune --policy FILE)")


def run(args: argparse.Namespace) -> int:
    quiet_libraries(getattr(args, "verbose", False))
    from orchestrator.pareto import POLICIES_DIR, check_selectable
    from orchestrator.results import load_resolved_config, read_trials_table
    from orchestrator.sweep_checks import check_sweep_writable

    sweep_dir = Path(args.sweep).expanduser().resolve()
    cfg = load_resolved_config(sweep_dir)           # a file given: said first
    table = read_trials_table(sweep_dir)            # CheckpointError naming the file if missing or damaged
    trials = check_selectable(sweep_dir, table.to_pandas())     # no completed trial: refused before anything is written
    check_sweep_writable(sweep_dir, "gmpq pareto", f"pareto.parquet, its plots and {POLICIES_DIR}/",
                         folders=(POLICIES_DIR,))
    front = pareto_stage(sweep_dir, args.top_k, args.tracking_uri, mlflow=not args.no_mlflow, cfg=cfg, table=table)
    print_pareto(sweep_dir, front, args.top_k, cfg=cfg, trials=trials)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("pareto", help="Pareto front of a sweep + selection of K policies",
                              description=help_text(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_dir_arg(p, "sweep folder (the --out of gmpq sweep)")
    p.add_argument("--top-k", type=int, action=at_least(1), default=None, metavar="K",
                   help="policies to select (default: the sweep config's finetune.top_k)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default: the sweep's, from DIR/sweep_config.yaml)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the table and plot to MLflow")
    p.set_defaults(func=run)
