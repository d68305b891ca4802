"""``gmpq sweep``: run (or resume) a Ray Tune + Optuna sweep of GMPQ searches.

    gmpq sweep --preset demo --n-trials 4 --epochs 1 --out runs/demo
    gmpq sweep --config my_sweep.yaml --name try2
    gmpq sweep --config my_sweep.yaml --check  (validate it: model, data, budget range, stores; nothing runs)
    gmpq sweep --out runs/demo --resume        (continues from runs/demo/sweep_config.yaml)
    gmpq sweep --out runs/demo --resume --n-trials 40   (a finished or stopped sweep runs more trials, in the
                                                        same Optuna study)
    gmpq sweep --preset demo --out runs/demo --resume auto   (continues it if there is one, else starts it:
                                                             a batch job retried with the same command)

Flags override the preset / config file; the resolved config is saved as DIR/sweep_config.yaml.
Ctrl-C (or SIGTERM: a preempted batch job) stops the sweep with the command that continues it (exit 130, or 143
for SIGTERM); finished trials are kept.
"""
# add_sweep_args and config_from_args are shared with `gmpq run`.
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from . import add_precision_arg, address_help, at_least, help_text, mlflow_ui_hint, quiet_libraries, refuse_empty
from orchestrator.text import PROXY_NOTE, fmt

__all__ = ["register", "add_sweep_args", "check_address_arg", "config_from_args", "overrides_from_args",
           "format_summary", "mlflow_line", "address_origin_text", "address_named",
           "continue_flag", "run", "quiet_libraries"]


class ResumeArg(argparse.Action):
    """``--resume`` alone: True (continue the sweep; there must be one); ``--resume auto``: "auto" (continue it
    when the folder holds it, else start it). Any other value is a ConfigError naming it."""
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        if values is not True and str(values).strip().lower() != "auto":
            from gmpq_core.errors import ConfigError
            raise ConfigError(f"{option_string} takes no value (continue the sweep in --out; there must be one) or "
                              f"'auto' (continue it when the folder holds it, else start it), but got "
                              f"{option_string} {values!r}. Give the sweep folder with --out, not after "
                              f"{option_string}.")
        setattr(namespace, self.dest, values if values is True else "auto")


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    from search_spaces.presets import list_presets

    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="sweep config YAML (may name a 'preset:' to start from)")
    src.add_argument("--preset", metavar="NAME", help=f"bundled preset: {', '.join(list_presets())}")
    p.add_argument("--n-trials", type=int, action=at_least(1), default=None, metavar="N",
                   help="number of trials; with --resume: a larger count runs more trials (never fewer)")
    p.add_argument("--epochs", type=int, action=at_least(1), default=None, metavar="E",
                   help="search epochs per trial (fixed)")
    p.add_argument("--max-concurrent", type=int, action=at_least(1), default=None, metavar="K",
                   help="trials running at once")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="the model searched (a registered one, or your own as MODULE:FUNCTION or PATH.py:FUNCTION; "
                        "README: 'Your own model')")
    p.add_argument("--out", default=None, metavar="DIR", help="sweep folder (default runs/<name>)")
    p.add_argument("--name", default=None, help="sweep name (Tune experiment, Optuna study, MLflow experiment)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler, data slices and teachers")
    p.add_argument("--resume", nargs="?", const=True, default=False, action=ResumeArg, metavar="auto",
                   help="continue an interrupted sweep in the same folder; with 'auto': continue it when the folder "
                        "holds it, else start it (a batch job retried with the same command)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI if set, else sqlite:///<DIR>/mlflow.db; "
                        "http://host:5000 for a server)")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="Optuna storage URL (default sqlite:///<DIR>/optuna.db)")
    p.add_argument("--address", default=None, metavar="ADDR", help=address_help("start a local one"))
    p.add_argument("--storage", default=None, metavar="PATH",
                   help="Ray Tune storage path (shared by every node; default <DIR>/ray_results)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="FP teacher / target model cache, reused by later sweeps (default $GMPQ_CACHE_DIR, else "
                        "~/.cache/gmpq, or <DIR>/cache with --address; on a cluster: storage every node shares)")
    add_precision_arg(p, default=None)
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep config keys the flags set (``sweep_sections.KEY_FLAGS``, one table for these and for the config
    errors' "--epochs sets it too") -> the flags' values."""
    from orchestrator.sweep_sections import KEY_FLAGS      # torch-free

    return {key: getattr(args, flag[2:].replace("-", "_")) for key, flag in KEY_FLAGS.items()}


def check_address_arg(address: str | None) -> None:
    """ConfigError for an empty or malformed ``--address`` (syntax only, no connection), before any slow import:
    an empty one (``--address "$ADDR"`` with ADDR unset) would otherwise run a local sweep without a word."""
    if address is None:
        return
    refuse_empty("--address", address, "give the cluster's HOST:PORT, 'auto' (the cluster 'gmpq cluster up' started, "
                 "or $RAY_ADDRESS), ray://HOST:10001, or 'local' (or leave --address out) to run on this machine "
                 "alone.")
    from cluster.connect import resolve_address

    resolve_address(address)


def config_from_args(args: argparse.Namespace, extra_overrides: dict[str, Any] | None = None) -> Any:
    """SweepConfig from --config/--preset and the override flags (ConfigError -> exit 2). With --resume
    (or --resume auto) and neither --config nor --preset, the sweep folder's saved ``sweep_config.yaml``."""
    from orchestrator.sweep_config import load_sweep_config

    check_address_arg(args.address)
    path = args.config
    resume = getattr(args, "resume", False)
    if resume and path is None and args.preset is None and (args.out or args.name):
        path = Path(args.out or Path("runs") / args.name) / "sweep_config.yaml"   # resume from the saved config
        if not path.exists():
            from gmpq_core.errors import ConfigError
            if resume == "auto":
                raise ConfigError(f"--resume auto starts a sweep when the folder holds none, but there is no "
                                  f"config to start it from: no --config or --preset, and '{path}' (the config a "
                                  "sweep saves) does not exist. Give the sweep's --config FILE (or --preset NAME) "
                                  "with --resume auto, or check --out (the sweep folder).")
            raise ConfigError(f"Nothing to resume: '{path}' does not exist. Check --out (the sweep folder), or use "
                              "--resume auto with --config or --preset to start the sweep when there is none.")
    overrides = {**overrides_from_args(args), **(extra_overrides or {})}
    return load_sweep_config(path, preset=args.preset, overrides=overrides)


def format_summary(summary: Any, tracking_uri: str | None = None, *, command: str = "gmpq sweep",
                   logging_off: str | None = None) -> str:
    """The sweep's trial table and counts; for an interrupted sweep, ``command`` is the one that continues it; with
    ``tracking_uri``, the MLflow line (``mlflow_line``; ``logging_off``: the sink's warning, if it warned)."""
    lines = [f"{'trial':<14} {'status':<10} {'budget':>6} {'proxy%':>7} {'transfer%':>9} {'GBitOPs':>8}"]
    for r in sorted(summary.rows, key=lambda r: (r["status"] != "completed", -(r["transfer_top1"] or 0))):
        lines.append(f"{r['trial_id']:<14} {r['status']:<10} {fmt(r['budget_avg_bits'], '.2f'):>6} "
                     f"{fmt(r['proxy_top1'], '.2f'):>7} {fmt(r['transfer_top1'], '.2f'):>9} "
                     f"{fmt(r['gbitops'], '.4f'):>8}")
    if summary.rows:
        lines.append(PROXY_NOTE)
    lines.append(f"{summary.n_completed} completed, {summary.n_pruned} pruned, {summary.n_failed} failed in "
                 f"{summary.wall_seconds / 60:.1f} min. {_results_text(summary.sweep_dir)}")
    if summary.interrupted:
        lines.append(interrupted_note(summary, command))
    lines += _selection_lines(summary, command)

    if tracking_uri:
        lines.append(mlflow_line(summary, tracking_uri, logging_off))
    return "\n".join(lines)


def _selection_lines(summary: Any, command: str) -> list[str]:
    """What the sweep's trials now mean for its Pareto selection: ``gmpq run`` after a resume that grew the sweep
    selects again (``sweep_grow.reselect_text``); ``gmpq sweep``: one line when pareto.parquet was selected from
    other completed trials than there are now (``pareto_stale``: a grown sweep, however many commands it took)."""
    if command == "gmpq run":
        if getattr(summary, "grown_from", None) is None:
            return []
        from orchestrator.sweep_grow import reselect_text
        note = reselect_text(summary.sweep_dir, summary.grown_from, summary.n_planned)
        return [note[0].upper() + note[1:] + "."] if note else []
    from orchestrator.pareto_stale import stale_selection, stale_text

    stale = stale_selection(summary.sweep_dir)
    return [] if stale is None else [stale_text(stale, summary.sweep_dir) + "."]


def _results_text(sweep_dir: Path) -> str:
    """Where the summary's results are: trials.parquet, once a trial has ended (its first row writes it)."""
    from orchestrator.results import TRIALS_FILE

    path = Path(sweep_dir) / TRIALS_FILE
    if path.exists():
        return f"Results: {path}"
    return f"No trial has ended yet, so there are no results ({TRIALS_FILE} is written when the first one ends)."


def mlflow_line(summary: Any, tracking_uri: str, logging_off: str | None = None) -> str:
    """The summary's MLflow line: how to look at the runs; or, when the store lacks them (``logging_off``: the
    sink's "MLflow logging disabled" warning of this run; or ended trials the folder's id files have no run of),
    that, and the ``gmpq sync-mlflow`` command that uploads them."""
    from orchestrator.mlflow_sink import DISABLED
    from orchestrator.sweep_status import mlflow_gaps_text, mlflow_view

    ended = [str(r["trial_id"]) for r in summary.rows if r.get("status") in ("completed", "pruned", "failed")]
    view = mlflow_view(summary.sweep_dir, {"tracking_uri": tracking_uri}, ended)
    if logging_off:
        why = logging_off.removeprefix(f"{DISABLED}: ").split(". Work goes on", 1)[0]
        what = "some of this sweep's runs are missing there" if view.get("parent_run") else \
            "nothing of this sweep is there"
        return (f"MLflow: logging was off ({why}): {what}; the results are complete in the Parquet tables. Once the "
                f"store answers, upload them with: gmpq sync-mlflow --sweep {summary.sweep_dir}")
    gaps = mlflow_gaps_text(view, summary.sweep_dir)
    return f"MLflow: {mlflow_ui_hint(tracking_uri)}" if gaps is None else gaps


def address_origin_text(args: argparse.Namespace, cfg: Any) -> str | None:
    """Where the Ray address a sweep joins came from when no --address was given (None: given, or none): its
    --config file, its preset, or the saved config it resumes from."""
    if getattr(args, "address", None) is not None or cfg.address is None:
        return None
    if args.config:
        return f"--config {args.config}"
    if args.preset:
        return f"the preset {args.preset}"
    from orchestrator.results import CONFIG_FILE

    return f"the sweep's config {Path(cfg.resolved().out_dir) / CONFIG_FILE}"


def address_named(args: argparse.Namespace, cfg: Any) -> Any:
    """The context in which a failed join names where the address came from (``address_origin_text``: the --config
    file, the preset, the saved config; nothing to say for --address): around every check and join of a command."""
    from orchestrator.ray_env import address_origin

    origin = address_origin_text(args, cfg)
    return address_origin(origin, cfg.address) if origin else contextlib.nullcontext()


def interrupted_note(summary: Any, command: str = "gmpq sweep") -> str:
    """What an interrupted (or SIGTERM-terminated) sweep left undone, and the command that finishes it."""
    from orchestrator.ray_env import stop_word

    left = summary.n_planned - summary.n_trials if summary.n_planned else summary.n_unfinished
    return (f"The sweep was {stop_word(getattr(summary, 'terminated', False))}: {summary.n_trials} of "
            f"{summary.n_planned or '?'} trials finished; {left} still to run ({summary.n_unfinished} stopped midway: "
            f"{'it starts' if summary.n_unfinished == 1 else 'they start'} again). Finished trials are kept. Continue with: {command} --out {summary.sweep_dir} --resume")


def continue_flag(cfg: Any) -> str:
    """The ``--resume`` flag that continues ``cfg``'s stopped sweep: ``--resume`` once its Tune state exists (the
    trials started), else ``--resume auto`` (stopped while preparing: it starts the sweep from its saved config)."""
    from orchestrator.sweep import holds_sweep_state

    return "--resume" if holds_sweep_state(cfg) else "--resume auto"


def stopped_note(cfg: Any, by_sigterm: bool, command: str = "gmpq sweep") -> str | None:
    """The line of a sweep stopped outside its trials (while preparing, or in its last steps once they ended):
    what is kept and the command (``command``: ``gmpq sweep``, or ``gmpq run`` for its sweep stage) that continues
    it; None before it saved its config (nothing to continue)."""
    from orchestrator.ray_env import stop_word
    from orchestrator.results import CONFIG_FILE, TRIALS_FILE

    cfg = cfg.resolved()
    out = Path(cfg.out_dir)
    if not (out / CONFIG_FILE).exists():
        return None
    kept = (f"its finished trials are kept ({out / TRIALS_FILE})" if _any_trial_ended(out) else
            "no trial had finished yet, so nothing was lost")
    return f"the sweep was {stop_word(by_sigterm)}; {kept}. Continue with: {command} --out {out} {continue_flag(cfg)}"


def _any_trial_ended(sweep_dir: Path) -> bool:
    """Whether the sweep's trials.parquet holds a trial (a row is written as a trial ends); a damaged one: True
    (it is there to keep; the resumed sweep names what is wrong with it)."""
    from gmpq_core.errors import CheckpointError
    from orchestrator.results import TRIALS_FILE, read_trials

    if not (sweep_dir / TRIALS_FILE).is_file():
        return False
    try:
        return len(read_trials(sweep_dir)) > 0
    except (CheckpointError, OSError):
        return True


def say_env_tracking_uri(cfg: Any, resume: bool, say: Any) -> None:
    """A line when the MLflow store comes from ``$MLFLOW_TRACKING_URI`` (the config and the flags name none): a
    variable set for other work would otherwise send the sweep's runs there unnoticed. A resume keeps its saved one."""
    from orchestrator.sweep_config import ENV_TRACKING_URI, env_tracking_uri

    if not resume and cfg.tracking_uri is None and env_tracking_uri():
        say(f"MLflow tracking URI {env_tracking_uri()} from ${ENV_TRACKING_URI} (--tracking-uri names another store; "
            f"unset the variable to log to the sweep folder's mlflow.db)")


def check_only(cfg: Any, resume: bool | str = False) -> str:
    """``--check``: every check a sweep runs before Ray starts (``sweep.check_sweep``: the folder's state for a start
    or ``resume``, the --address, the model, data, budget range, search settings and stores), and what the sweep
    would run, in a few lines. Nothing trains, Ray does not start, nothing is written."""
    from orchestrator.sampling import sampler_text
    from orchestrator.sweep import check_sweep
    from orchestrator.sweep_checks import shown_url
    from orchestrator.sweep_join import start_text

    checked = check_sweep(cfg, resume, make_folders=False)
    cfg, facts = checked.cfg, checked.facts
    if checked.done is not None:
        from orchestrator.sweep import holds_sweep_state
        from orchestrator.sweep_grow import more_trials_text
        more = f"; {more_trials_text(cfg)}" if holds_sweep_state(cfg) else ""
        return (f"config OK: the sweep '{cfg.name}' in {cfg.out_dir} already ran all its {cfg.n_trials} trials: without "
                "--check, gmpq sweep has nothing to resume (gmpq run goes on to its Pareto and fine-tune stages)"
                f"{more}.")
    (b_lo, b_hi), (g_lo, g_hi) = facts.feasible_avg_bits, facts.feasible_gbitops
    dims = "; ".join(f"{name} {_dim_text(dim)}" for name, dim in cfg.space.dims.items())
    kwargs = ", ".join(f"{k}={v}" for k, v in cfg.pruner.kwargs.items())
    return "\n".join([
        f"config OK: sweep '{cfg.name}' of {cfg.model} at {facts.input_size} px, proxy {cfg.proxy_dataset}, target "
        f"{cfg.target_dataset}; {start_text(cfg).split('; from another terminal')[0]}",
        f"space: {dims}",
        f"budgets reachable with candidates W{list(cfg.candidates.w_bits)} A{list(cfg.candidates.a_bits)}: "
        f"{b_lo:.3g}..{b_hi:.3g} average bits ({g_lo:.4g}..{g_hi:.4g} GBitOPs); budget buckets "
        f"{list(cfg.budget_buckets) or 'none (one bucket)'}",
        f"Optuna: {sampler_text(cfg.sampler.name, cfg.sampler.kwargs, cfg.seed)}; pruner {cfg.pruner.name}"
        f"{f' ({kwargs})' if kwargs else ''} within each budget bucket; storage {shown_url(cfg.optuna_storage)}",
        f"MLflow: {shown_url(cfg.tracking_uri)}; sweep folder {cfg.out_dir}", _final_text(cfg.finetune),
        *_fits_here(cfg), *_grows_text(cfg, checked.grown_from),
        f"Nothing was trained. Run the same command without --check to {'resume' if checked.resume else 'start'} the "
        "sweep."])


def _grows_text(cfg: Any, grown_from: int | None) -> list[str]:
    """``--check`` of a resume that raises n_trials: the line the sweep will say."""
    if grown_from is None:
        return []
    from orchestrator.sweep_grow import grown_text
    from orchestrator.sweep_resume import ended_count

    return [grown_text(cfg, grown_from, ended_count(cfg))]


def _final_text(ft: Any) -> str:
    """The final fine-tune the config's ``finetune`` section asks for (gmpq run's stage 3, gmpq finetune --sweep)."""
    steps = f" (at most {ft.max_steps_per_epoch} steps each)" if ft.max_steps_per_epoch else ""
    limit = f" of at most {ft.max_gbitops:g} GBitOPs (finetune.max_gbitops)" if ft.max_gbitops is not None else ""
    return (f"final fine-tune (gmpq run, gmpq finetune --sweep): the top {ft.top_k} policies{limit}, {ft.epochs} epoch"
            f"{'s' * (ft.epochs != 1)}{steps} on {ft.train_size or 'all the'} target training images, " + (
                "the cluster's CPUs (GPUs) shared out as workers (auto)" if ft.workers == "auto" else
                f"{ft.workers} worker{'s' * (ft.workers != 1)} each"))


def _fits_here(cfg: Any) -> list[str]:
    """For a sweep on this machine alone: a line when its CPUs run fewer trials at once than the config asks."""
    import os

    if cfg.address is not None or cfg.resources.gpu:
        return []
    cpus = os.cpu_count() or 1
    fit = max(1, int(cpus // cfg.resources.cpu))
    asked = min(cfg.max_concurrent_trials, cfg.n_trials)
    if fit >= asked:
        return []
    return [f"note: this machine has {cpus} CPUs, so at most {fit} trial{'s' * (fit != 1)} of "
            f"{cfg.resources.cpu:g} CPU run at once, not {asked} (max_concurrent_trials); the others wait their turn"]


def _dim_text(dim: Any) -> str:
    """A space dimension in a few words: '2.5..5 (log)', 'one of [500, 1000]', '= 2'."""
    d = dim.to_dict()
    if d["type"] == "fixed":
        return f"= {d['value']}"
    if d["type"] == "categorical":
        return f"one of {d['choices']}"
    return f"{d['type']} {d['low']:g}..{d['high']:g}{' (log)' if d.get('log') else ''}"


def _say(msg: str) -> None:
    import sys

    print(f"gmpq sweep: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    quiet_libraries(getattr(args, "verbose", False))
    cfg = config_from_args(args)                       # a bad flag fails here, before Ray and Optuna are imported
    if getattr(args, "check", False):
        with address_named(args, cfg):
            print(check_only(cfg, args.resume))
        return 0
    from orchestrator.mlflow_notes import noting_mlflow_off
    from orchestrator.ray_env import Terminated, stop_status, terminated
    from orchestrator.sweep import choose_resume, run_sweep
    resume = choose_resume(cfg, args.resume, _say)       # gmpq run: in check_sweep (it says the same line)
    say_env_tracking_uri(cfg, resume, _say)
    try:
        with noting_mlflow_off() as mlflow_off, address_named(args, cfg):
            summary = run_sweep(cfg, resume=resume, progress=not args.quiet)
    except KeyboardInterrupt as e:           # outside the trials (those stop gracefully: the summary says it)
        by_sigterm = isinstance(e, Terminated) or terminated()     # (SIGTERM handed to a handler that raised ^C's)
        note = stopped_note(cfg, by_sigterm)
        if note is None:
            raise
        _say(note)
        return stop_status(by_sigterm)
    print(format_summary(summary, cfg.resolved().tracking_uri, logging_off=mlflow_off[0] if mlflow_off else None))
    if summary.interrupted:
        return stop_status(summary.terminated)
    return 0 if summary.n_completed > 0 else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("sweep", help="Ray Tune + Optuna sweep of GMPQ searches",
                              description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(p)
    p.add_argument("--check", action="store_true",
                   help="only validate the config (model, data, budget range, search settings, stores, folders) "
                        "and say what the sweep would run; nothing trains and Ray does not start")
    p.set_defaults(func=run)

