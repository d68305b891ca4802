"""One module per CLI subcommand; each defines ``register(subparsers)`` (discovered by cli.py).

Modules whose names start with ``_`` are helpers of a command, not commands (cli.py skips them). The helpers
here import nothing heavy: ``gmpq CMD --help`` stays fast."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gmpq_core.errors import ConfigError


def help_text(doc: str | None) -> str:
    """A command module's docstring as its ``--help`` description (reST literals shown plainly)."""
    return (doc or "").replace("``", "")


def refuse_empty(flag: str, value: str | None, fix: str) -> None:
    """ConfigError when ``flag`` was given an empty value (``--out "$DIR"`` with DIR unset), naming it, then ``fix``."""
    if value is not None and not str(value).strip():
        raise ConfigError(f"{flag} {value!r} is empty (an unset shell variable?); {fix}")


def at_least(minimum: int) -> type[argparse.Action]:
    """An argparse action for an integer option of at least ``minimum`` (use with ``type=int``, or
    ``type=int_or_auto``): a smaller value is a ConfigError naming the flag and the value (one paragraph,
    exit 2), not a message about the config key it fills."""
    class AtLeast(argparse.Action):
        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
            if isinstance(values, str) and values != "auto":
                raise ConfigError(f"{option_string} must be a whole number >= {minimum} or 'auto', but got "
                                  f"{option_string} {values}.")
            if values != "auto" and values < minimum:
                raise ConfigError(f"{option_string} must be a whole number >= {minimum}, but got "
                                  f"{option_string} {values}. Pass {option_string} {minimum} or more, or leave it "
                                  "out for its default.")
            setattr(namespace, self.dest, values)
    return AtLeast


def address_help(default: str) -> str:
    """The ``--address`` help of every command that joins a Ray cluster (``gmpq sweep``, ``run``, ``finetune``,
    ``study``), worded alike and naming every accepted form, ``local`` included; ``default`` ends it (what the
    command does without ``--address``, e.g. "start a local one")."""
    return ("Ray cluster to join: HOST:PORT; 'auto' ($RAY_ADDRESS, else the cluster 'gmpq cluster up' recorded, else "
            "the one a 'ray start --head' started on this machine; another process's private ray.init() session is "
            "refused; a line names the cluster joined); ray://HOST:10001 (Ray Client); or 'local': a Ray of this "
            f"command's own, on this machine only (default: {default})")


def int_or_auto(text: str) -> int | str:
    """argparse type of a count that may be ``auto`` (``--workers auto``)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        return text                  # at_least names the flag and the value (one paragraph, exit 2)


def add_precision_arg(parser: Any, default: str | None = "auto", *, what: str = "training",
                      or_else: str = "") -> None:
    """``--precision`` (gmpq_core.precision); ``default=None`` leaves the value to a config file or preset;
    ``what`` the loop it sets (``"evaluation"`` for a command that only evaluates); ``or_else`` ends the
    default's words (where else an unset value comes from)."""
    from gmpq_core.precision import PRECISIONS      # torch-free: the help of every command stays quick

    parser.add_argument("--precision", choices=PRECISIONS, default=default,
                        help=f"{what} precision: auto = bf16 autocast on a GPU with bfloat16 (Ampere or newer), "
                             "float32 elsewhere; fp32; bf16 (also on a CPU: faster on chips with AMX / "
                             f"AVX512-BF16, slower without) (default auto{or_else})")


def mlflow_ui_hint(tracking_uri: str) -> str:
    """How to look at a tracking store: a server's URL is opened in a browser (``mlflow ui`` cannot serve
    an http store); a file or database store is served by ``mlflow ui``."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} (MLflow tracking server)"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def quiet_libraries(verbose: bool = False) -> None:
    """Keep MLflow's and Alembic's INFO lines (database set-up), MLflow's artifact progress bars and the
    deprecation notices raised in MLflow's database code (SQLAlchemy's ``noload``, ``MovedIn20Warning``: news for
    those libraries' maintainers, not for the user) out of the command's output; matplotlib's and Pillow's DEBUG
    lines also under ``-v``."""
    import logging
    import os
    import warnings

    for name in ("matplotlib", "PIL"):     # even under -v: their DEBUG lines (440 font-manager lines) bury ours
        logging.getLogger(name).setLevel(max(logging.getLogger(name).getEffectiveLevel(), logging.INFO))
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(mlflow|sqlalchemy|alembic)(\.|$)")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")   # read when mlflow is first imported
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")   # "View run ..." per run (http stores)
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def add_sweep_dir_arg(parser: Any, help: str) -> None:
    """``--sweep DIR``, which the command needs, also taken as its one positional argument (``gmpq status runs/demo``
    as ``gmpq status --sweep runs/demo``); ``resolve_sweep_dir_arg`` checks it after parsing."""
    parser.add_argument("--sweep", default=None, metavar="DIR", help=help)
    parser.add_argument("sweep_arg", nargs="?", default=None, metavar="DIR", help="the same as --sweep DIR")


def resolve_sweep_dir_arg(args: argparse.Namespace) -> None:
    """``args.sweep`` from ``--sweep DIR`` or the positional DIR (``add_sweep_dir_arg``): ConfigError when neither or
    two different folders were given."""
    given, positional = getattr(args, "sweep", None), getattr(args, "sweep_arg", None)
    command = f"gmpq {getattr(args, 'command', None) or 'COMMAND'}"
    same = given is not None and positional is not None and \
        Path(given).expanduser().resolve() == Path(positional).expanduser().resolve()
    if given is not None and positional is not None and not same:
        raise ConfigError(f"Two sweep folders were given: --sweep {given} and {positional}. Give the folder once: "
                          f"{command} --sweep DIR (or {command} DIR).")
    if given is None and positional is None:
        raise ConfigError(f"{command} needs the sweep folder (the --out of gmpq sweep or gmpq run): {command} "
                          f"--sweep DIR, or {command} DIR.")
    args.sweep = given if given is not None else positional


def refuse_missing_sweep_dir(given: str, sweep_dir: Path, what: str) -> None:
    """ConfigError when the sweep folder ``given`` (``sweep_dir`` resolved) does not exist, worded as ``gmpq status``
    words it; ``what`` ends the fix ("you want to see": "Pass the --out of the gmpq sweep or gmpq run you want to
    see."), instead of a message about a file missing from a folder that is there."""
    if not Path(sweep_dir).exists():
        raise ConfigError(f"--sweep {given}: no such folder ({sweep_dir}). Pass the --out of the gmpq sweep or gmpq "
                          f"run {what}.")


def check_tracking_uri_arg(uri: str | None, default: str, leave_out: str) -> None:
    """``--tracking-uri`` checked as ``gmpq sweep`` checks its store (``sweep_checks.check_tracking_uri``: a scheme
    MLflow knows, a sqlite file in a folder that can be written; not empty), before anything is read or written;
    ``default``: where runs go without it, ``leave_out``: what leaving it out does."""
    if uri is None:
        return
    from orchestrator.sweep_checks import check_tracking_uri

    refuse_empty("--tracking-uri", uri, f"give an MLflow tracking URI, or leave --tracking-uri out to {leave_out}.")
    check_tracking_uri(uri, "--tracking-uri", default=default, leave_out=leave_out)
