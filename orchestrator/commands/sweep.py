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

from . import add_precision_arg, address_help, at_least, help_text, quiet_libraries, refuse_empty
# (the summary and --check live beside this file, named for what they hold; imported here, where callers find them)
from ._sweep_check import check_only
from ._sweep_summary import continue_flag, format_summary, interrupted_note, mlflow_line, stopped_note

__all__ = ["register", "add_sweep_args", "check_address_arg", "config_from_args", "overrides_from_args",
           "format_summary", "mlflow_line", "address_origin_text", "address_named", "say_env_tracking_uri",
           "check_only", "interrupted_note", "stopped_note", "continue_flag", "run", "quiet_libraries"]


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


def say_env_tracking_uri(cfg: Any, resume: bool, say: Any) -> None:
    """A line when the MLflow store comes from ``$MLFLOW_TRACKING_URI`` (the config and the flags name none): a
    variable set for other work would otherwise send the sweep's runs there unnoticed. A resume keeps its saved one."""
    from orchestrator.sweep_config import ENV_TRACKING_URI, env_tracking_uri

    if not resume and cfg.tracking_uri is None and env_tracking_uri():
        say(f"MLflow tracking URI {env_tracking_uri()} from ${ENV_TRACKING_URI} (--tracking-uri names another store; "
            f"unset the variable to log to the sweep folder's mlflow.db)")


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

