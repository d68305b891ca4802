"""``gmpq pareto``: the Pareto front of a sweep and the K policies selected for the final fine-tune.

    gmpq pareto runs/demo --top-k 3            # K selected automatically (knee, best per budget bucket, spread)
    gmpq pareto runs/demo --max-gbitops 0.4    # the same, among the front's policies of at most 0.4 GBitOPs
    gmpq pareto runs/demo --pick 0f93,a1fa     # exactly the trials you picked from pareto.png (ids or prefixes)

GBitOPs is one quantity throughout: the quantized layers' BitOPs / 1e9 (sum of MACs * w_bits * a_bits), the
gbitops column of pareto.parquet, the GBitOPs column of the table and the x axis of pareto.png. --max-gbitops G
(default: the sweep config's finetune.max_gbitops; 'none': no limit) leaves the front whole and selects among its
policies within G only (a dashed line on pareto.png; the selection reasons say the limit); none within G: refused.
--pick ID[,ID...] selects exactly those trials (reason "picked by hand"), each a completed trial on the front
(otherwise refused, naming the front trial that dominates it); not with --top-k or --max-gbitops. A refused
selection writes nothing. 'gmpq finetune --sweep DIR' fine-tunes pareto.parquet's selection, so a pick or a limit
carries to it (its --top-k K selects again, within the config's finetune.max_gbitops, as 'gmpq run' does; its
--max-gbitops G|none selects again within G, or with no limit, for that call); 'gmpq pareto DIR' without --pick
selects automatically again.

Reads DIR/trials.parquet; writes DIR/pareto.parquet (non-dominated completed trials on transfer_top1
up / bitops down, with ``selected`` and ``selection_reason``), DIR/policies/<trial_id>.json (each policy of
the front as a file: the input of ``gmpq finetune --policy FILE``; the folder holds the current front only),
DIR/pareto.png and DIR/policies.png (the selected policies' bits, layer by layer), prints the table, and adds
them to the sweep's MLflow parent run (replacing the Pareto table an earlier run logged). While another command
still runs the sweep, it warns that the selection covers the trials ended so far (run it again once the sweep
ends), and a --pick of a trial still running is refused saying so (listed once it ends); a sweep that stopped
before its planned trials ended gets a note saying so (--resume runs the rest).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import (add_sweep_dir_arg, at_least, check_tracking_uri_arg, help_text, quiet_libraries,
               refuse_missing_sweep_dir)

__all__ = ["register", "run", "pareto_stage", "sweep_running_text", "sweep_stopped_text"]


def pareto_stage(sweep_dir: Path, top_k: int | None, tracking_uri: str | None, *, mlflow: bool = True,
                 cfg: dict | None = None, table: Any = None, max_gbitops: float | str | None = None,
                 picks: list[str] | None = None) -> Any:
    """write_pareto + MLflow logging; returns the Pareto DataFrame (shared with ``gmpq run``). ``cfg`` (the sweep
    config) and ``table`` (trials.parquet as Arrow) spare reading them again when already read; ``max_gbitops`` and
    ``picks``: ``write_pareto``'s (default: the config's limit, an automatic selection)."""
    from orchestrator.mlflow_stages import log_pareto
    from orchestrator.pareto import PARETO_PNG, write_pareto
    from orchestrator.results import load_resolved_config

    if cfg is None:
        cfg = load_resolved_config(sweep_dir)
    front = write_pareto(sweep_dir, top_k, cfg=cfg, table=table, max_gbitops=max_gbitops, picks=picks)
    if mlflow:
        uri = tracking_uri or cfg.get("tracking_uri")
        log_pareto(uri, sweep_dir, front, sweep_dir / PARETO_PNG)
    return front


def print_pareto(sweep_dir: Path, front: Any, top_k: int | None = None, *, cfg: dict | None = None,
                 trials: Any = None, max_gbitops: float | str | None = None) -> None:
    """The front's table; says so when fewer policies than ``top_k`` (default: the sweep config's) were selected.
    ``cfg`` (the sweep config) and ``trials`` (trials.parquet) spare reading them again when already read;
    ``max_gbitops``: the --max-gbitops given (default: the config's limit applied; none to a pick)."""
    from orchestrator.pareto import DEFAULT_TOP_K, PARETO_PNG, POLICIES_DIR, POLICIES_PNG, format_pareto_table
    from orchestrator.pareto_pick import limit_in_force, limit_text, only_text, within
    from orchestrator.results import PARETO_FILE, load_resolved_config, read_trials

    if cfg is None:
        cfg = load_resolved_config(sweep_dir)
    buckets = cfg.get("budget_buckets") or []
    if trials is None:
        trials = read_trials(sweep_dir)
    counts = trials["status"].value_counts().to_dict()
    chosen = int(front["selected"].sum()) if len(front) else 0
    picked = _picked(front)
    limit = None if picked else limit_in_force(max_gbitops, cfg)
    fit = f", {int(within(front, limit).sum())} {limit_text(limit)}" if limit is not None and len(front) else ""
    print(f"Pareto front of {len(trials)} trials ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}): "
          f"{len(front)} non-dominated{fit}, {chosen} {'picked by hand' if picked else 'selected'} (*)")
    print(format_pareto_table(front, buckets))
    want = top_k or int((cfg.get("finetune") or {}).get("top_k") or DEFAULT_TOP_K)
    if chosen < want and not picked:
        why = "" if limit is not None else (" A policy off the front is never selected: one on it is at least as "
                                            "accurate for at most its BitOPs.")
        print(f"({chosen} selected of the {want} asked for (top-k): {only_text(front, limit)}.{why})")
    print(f"Table: {sweep_dir / PARETO_FILE}\nPlot:  {sweep_dir / PARETO_PNG}")
    if (sweep_dir / POLICIES_PNG).is_file():
        print(f"Bits per layer: {sweep_dir / POLICIES_PNG}")
    if len(front):
        print(f"Policies: {sweep_dir / POLICIES_DIR}/<trial_id>.json (one fine-tune, from the sweep's FP target "
              "model: gmpq finetune --policy FILE)")


def _picked(front: Any) -> bool:
    """Whether ``front``'s selection was picked by hand (every selected row's reason says so)."""
    from orchestrator.pareto_pick import PICK_REASON

    sel = front[front["selected"]] if len(front) else front
    return bool(len(sel)) and bool((sel["selection_reason"] == PICK_REASON).all())


def next_text(sweep_dir: Path, front: Any, cfg: dict, max_gbitops: float | str | None) -> str:
    """The line saying what to run next: ``gmpq finetune --sweep DIR`` fine-tunes pareto.parquet's selection (a pick
    or a --max-gbitops carries to it; its --top-k selects again, with the config's limit unless given its own)."""
    from orchestrator.pareto_pick import limit_in_force

    n = int(front["selected"].sum()) if len(front) else 0
    what = "this selected policy" if n == 1 else f"these {n} selected policies"
    what += " (pareto.parquet's selection"
    if _picked(front):
        what += (f": your pick carries to it; 'gmpq pareto {sweep_dir}' without --pick selects automatically again, "
                 "as 'gmpq finetune --top-k K' does)")
    elif max_gbitops is not None and limit_in_force(max_gbitops, cfg) != limit_in_force(None, cfg):
        config = limit_in_force(None, cfg)
        what += (f"; 'gmpq finetune --top-k K' would select again with the sweep config's finetune.max_gbitops "
                 f"({'none' if config is None else f'{config:g}'}), not --max-gbitops {max_gbitops}, unless given "
                 f"--max-gbitops {max_gbitops} too)")
    else:
        what += ")"
    return f"Next: gmpq finetune --sweep {sweep_dir} fine-tunes {what}."


def sweep_running_text(sweep_dir: Path, command: str) -> str | None:
    """One warning line when another process still runs the sweep in ``sweep_dir`` (its driver.json, stage "sweep"
    or "run", with trials still to end): the selection ``command`` (``gmpq pareto``, ``gmpq finetune``) makes covers
    the trials ended so far. None otherwise; this process's own marker (``gmpq run``'s own stages) is none."""
    from gmpq_core.errors import GMPQError
    from orchestrator.driver_markers import DRIVER_FILE, driver_text
    from orchestrator.sweep_status import read_sweep_status

    if not (sweep_dir / DRIVER_FILE).is_file():
        return None
    try:
        st = read_sweep_status(sweep_dir, own_marker=False)
    except GMPQError:                            # (no sweep_config.yaml: the command's own checks say what is wrong)
        return None
    if not st.driver or st.driver_alive is False or st.driver.get("stage") not in ("sweep", "run"):
        return None
    if st.n_planned is not None and st.n_ended >= int(st.n_planned):
        return None                              # every planned trial has ended: the front is the sweep's
    runs = "is still running" if st.driver_alive else "may still be running (on another host: not checked)"
    have = "has" if st.n_ended == 1 else "have"
    ended = f"{st.n_ended} of its {st.n_planned} planned trials {have}" if st.n_planned is not None else \
        f"{st.n_ended} trial{'' if st.n_ended == 1 else 's'} {have}"
    later = f"run 'gmpq pareto {sweep_dir}' again once the sweep ends"
    if command == "gmpq finetune":
        later = f"a policy fine-tuned now may leave the front as more trials end ({later} to see the final front)"
    return (f"{command}: warning: the sweep in {sweep_dir} {runs} ({driver_text(st.driver)}): {ended} ended so far, "
            f"and this selection covers only those; {later}.")


def sweep_stopped_text(sweep_dir: Path, command: str, rerun: str | None = None) -> str | None:
    """One note line when no command runs the sweep in ``sweep_dir`` and it stopped (Ctrl-C, a crash) before all its
    planned trials ended: the selection covers only those that did, and ``--resume`` runs the rest. None otherwise
    (finished, running: ``sweep_running_text``, or not a sweep folder: the command's own checks say so). ``rerun``:
    the command to run again after the resume (default ``gmpq pareto DIR``)."""
    from gmpq_core.errors import GMPQError
    from orchestrator.sweep_status import STOPPED, read_sweep_status

    try:
        st = read_sweep_status(sweep_dir, own_marker=False)
    except GMPQError:
        return None
    if st.state != STOPPED or st.n_planned is None:
        return None
    midway, later = st.count(STOPPED), int(st.n_planned) - len(st.trials)
    rest = ", ".join(x for x in (f"{midway} stopped midway" if midway else "",
                                 f"{later} not started" if later > 0 else "") if x)
    return (f"{command}: note: the sweep in {sweep_dir} stopped with {st.n_ended} of its {st.n_planned} planned trials "
            f"ended{f' ({rest})' if rest else ''}, and this selection covers only those; to run the rest: "
            f"gmpq sweep --out {sweep_dir} --resume, then {rerun or f'gmpq pareto {sweep_dir}'} again.")


def check_picks_while_running(sweep_dir: Path, trials: Any, picks: list[str]) -> None:
    """``--pick`` checked while another process runs the sweep (``sweep_running_text``): a pick no row of
    ``trials`` (trials.parquet) matches, or whose trial failed, is refused adding that a running trial (the ones
    trial_events.jsonl says started, with no row) is listed once it ends (``pareto_pick.check_picks``)."""
    from gmpq_core.errors import GMPQError
    from orchestrator.pareto import pareto_front
    from orchestrator.pareto_pick import check_picks
    from orchestrator.sweep_status import RUNNING, read_sweep_status

    try:
        running = [t.trial_id for t in read_sweep_status(sweep_dir, own_marker=False).trials if t.status == RUNNING]
    except GMPQError:                        # (a damaged file: the general words still say the sweep runs)
        running = []
    check_picks(trials, pareto_front(trials), picks, sweep_dir, running=running)


def selection_args(args: argparse.Namespace) -> tuple[list[str] | None, float | str | None]:
    """``--pick`` (the ids typed) and ``--max-gbitops`` (a float, ``none`` or None) checked before any work:
    ConfigError for a bad value and for --pick beside --top-k or --max-gbitops."""
    from gmpq_core.errors import ConfigError
    from orchestrator.pareto_pick import limit_arg, parse_pick

    picks = parse_pick(args.pick)
    given = [f for f, v in (("--top-k", args.top_k), ("--max-gbitops", args.max_gbitops)) if v is not None]
    if picks is not None and given:
        value = args.top_k if given[0] == "--top-k" else args.max_gbitops
        raise ConfigError(f"--pick selects exactly the trials it names ({', '.join(picks)}), so {given[0]} {value} "
                          f"does not apply to it. Give one or the other: drop {' and '.join(given)} to select your "
                          f"pick, or drop --pick to select automatically.")
    return picks, limit_arg(args.max_gbitops)


def run(args: argparse.Namespace) -> int:
    picks, max_gbitops = selection_args(args)       # before any work
    if not args.no_mlflow:
        check_tracking_uri_arg(args.tracking_uri, "the sweep's own store", "log to the sweep's own store")  # before any work: a bad one used to end in MLflow's traceback
    sweep_dir = Path(args.sweep).expanduser().resolve()
    refuse_missing_sweep_dir(args.sweep, sweep_dir, "whose Pareto front you want")
    quiet_libraries(getattr(args, "verbose", False))
    from orchestrator.pareto import POLICIES_DIR, check_selectable
    from orchestrator.results import TRIALS_FILE, load_resolved_config, read_trials_table
    from orchestrator.sweep_checks import check_sweep_writable

    # a file, or a folder with neither sweep_config.yaml nor trials.parquet (no sweep): said first, as gmpq status does
    cfg = load_resolved_config(sweep_dir, missing_ok=(sweep_dir / TRIALS_FILE).is_file())
    table = read_trials_table(sweep_dir)            # CheckpointError naming the file if missing or damaged
    trials = check_selectable(sweep_dir, table.to_pandas())     # no completed trial: refused before anything is written
    check_sweep_writable(sweep_dir, "gmpq pareto", f"pareto.parquet, its plots and {POLICIES_DIR}/",
                         folders=(POLICIES_DIR,))
    running = sweep_running_text(sweep_dir, "gmpq pareto")
    warning = running or sweep_stopped_text(sweep_dir, "gmpq pareto")
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)         # an early look is allowed: warned, not refused
    if picks is not None and running is not None:           # a pick of a trial not ended yet: said so, nothing written
        check_picks_while_running(sweep_dir, trials, picks)
    front = pareto_stage(sweep_dir, args.top_k, args.tracking_uri, mlflow=not args.no_mlflow, cfg=cfg, table=table,
                         max_gbitops=max_gbitops, picks=picks)
    print_pareto(sweep_dir, front, args.top_k, cfg=cfg, trials=trials, max_gbitops=max_gbitops)
    print(next_text(sweep_dir, front, cfg, max_gbitops))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("pareto", help="Pareto front of a sweep + selection of K policies",
                              description=help_text(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_dir_arg(p, "sweep folder (the --out of gmpq sweep)")
    p.add_argument("--top-k", type=int, action=at_least(1), default=None, metavar="K",
                   help="policies to select (default: the sweep config's finetune.top_k)")
    p.add_argument("--max-gbitops", default=None, metavar="G",
                   help="select only among the front's policies of at most G GBitOPs (the quantized layers' BitOPs / "
                        "1e9: pareto.parquet's gbitops, pareto.png's x axis); 'none': no limit (default: the sweep "
                        "config's finetune.max_gbitops)")
    p.add_argument("--pick", action="append", default=None, metavar="ID[,ID...]",
                   help="select exactly these trials of the front (ids or unique prefixes, as pareto.png and the "
                        "table show them), not with --top-k or --max-gbitops")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default: the sweep's, from DIR/sweep_config.yaml)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the table and plot to MLflow")
    p.set_defaults(func=run)
