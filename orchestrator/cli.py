"""The ``gmpq`` console command (argparse; ``main() -> int``).

Subcommands live one per module in ``orchestrator.commands``; each module defines
``register(subparsers)`` which adds a parser and sets ``func(args) -> int`` as its default. Only the
named command's module is imported; every command module is light (torch, Ray, MLflow, Optuna and pyarrow are
imported by the code that runs a command), so ``gmpq --help``, ``gmpq COMMAND --help`` and argparse errors take
~0.1 s (``tests/orchestrator/test_cli.py`` checks none of those libraries is loaded).
A ``GMPQError`` becomes a one-paragraph message and exit status 2, with no traceback; real bugs
keep their traceback. Ctrl-C ends a command with one line, ``interrupted_text``, and exit status 130; SIGTERM
while Ray runs (``orchestrator.ray_env.ctrl_c_signals``: a preempted batch job, ``kill``) does the same, the
line saying it was terminated, with status 143 (128 + 15, as a shell reports a process SIGTERM ended).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import shlex
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

from gmpq_core.errors import GMPQError

from . import commands


def _command_modules() -> list[str]:
    """The modules of ``orchestrator.commands`` (found on disk, not imported)."""
    return sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))


def _named_command(argv: list[str]) -> str | None:
    """The module of the command ``argv`` names (its first word that is not an option), if there is one
    and no ``-h``/``--help`` comes before it (that asks for the list of every command)."""
    for arg in argv:
        if arg in ("-h", "--help"):
            return None
        if not arg.startswith("-"):
            return next((m for m in _command_modules() if m.replace("_", "-") == arg), None)
    return None


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown option, a bad choice, a missing value) as the CLI's others: one paragraph,
    exit 2, saying where the options are listed, instead of the command's whole usage block first."""

    command_prog: str | None = None       # 'gmpq sweep': the command named (its unrecognized options are gmpq's)

    def error(self, message: str):  # type: ignore[override]
        prog = self.command_prog or self.prog
        sys.stderr.write(error_paragraph(GMPQError(f"{message}. '{prog} --help' lists the options.")) + "\n")
        sys.exit(2)


VERSIONED = ("torch", "torchvision", "ray", "optuna", "mlflow", "pyarrow")


def version_text() -> str:
    """``gmpq 0.1.0 (torch 2.11.0, ray 2.60.0, ...; Python 3.11.2)``: from the installed packages' metadata, none
    of them imported (the line a bug report wants)."""
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    libs = ", ".join(f"{name} {version(name)}" for name in VERSIONED)
    return f"gmpq {version('gmpq-sweep')} ({libs}; Python {sys.version.split()[0]})"


class _VersionAction(argparse.Action):
    """``--version``: the line, unwrapped (argparse's own action wraps it to the terminal's width), then exit 0."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        print(version_text())
        parser.exit(0)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``gmpq`` parser with every command, or only with ``command``'s (its module name)."""
    parser = _Parser(
        prog="gmpq", description="GMPQ Sweep: generalizable mixed-precision quantization searches, "
        "swept with Ray Tune and Optuna, logged to MLflow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("-V", "--version", action=_VersionAction, nargs=0,
                        help="print gmpq's version and those of the libraries it runs on, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules():
        if command is None or name == command:
            importlib.import_module(f"{commands.__name__}.{name}").register(sub)
    if command is not None:
        parser.command_prog = f"gmpq {command.replace('_', '-')}"
    return parser


def error_paragraph(err: BaseException) -> str:
    # the prefix as an indent: a first word too long for the line (a deep path) stays after it, not below
    return textwrap.fill(str(err), width=100, initial_indent="gmpq: error: ", break_on_hyphens=False,
                         break_long_words=False)


_OWN_PACKAGES = ("orchestrator", "gmpq_core", "experiments", "cluster", "search_spaces")


def _own_code(filename: str) -> bool:
    """Whether ``filename`` is one of this project's modules (not a library's)."""
    root = Path(commands.__file__).resolve().parents[2]
    try:
        parts = Path(filename).resolve().relative_to(root).parts
    except ValueError:
        return False
    return len(parts) > 1 and parts[0] in _OWN_PACKAGES


_python_formatwarning = warnings.formatwarning


def format_warning(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` for the command: the project's own warnings (MLflow unreachable, a weak teacher)
    as one ``gmpq: warning:`` paragraph, without the file, line and source line Python adds; a library's
    warnings as Python formats them. (Formatting only: code that records warnings still gets them.)"""
    if not _own_code(filename):
        return _python_formatwarning(message, category, filename, lineno, line)
    return textwrap.fill(str(message), width=100, initial_indent="gmpq: warning: ", break_on_hyphens=False,
                         break_long_words=False) + "\n"


INTERRUPTED = "gmpq: interrupted; finished work is kept on disk."


def interrupted_text(args: argparse.Namespace, argv: list[str], *, by_sigterm: bool = False) -> str:
    """The line a command stopped by Ctrl-C (or SIGTERM: "terminated (SIGTERM)") ends with: for ``gmpq finetune
    --sweep DIR``, what is kept and that the same command continues it (finished policies are not run again, a
    policy's finished epochs are its Ray Train checkpoints); else the generic one. (``gmpq sweep`` and ``gmpq
    run`` say it themselves, with the state of their stage.)"""
    from orchestrator.ray_env import stop_word

    if args.command == "finetune" and getattr(args, "sweep", None):
        from orchestrator.commands._finetune_sweep import kept_on_interrupt_text

        return (f"gmpq finetune: the fine-tune was {stop_word(by_sigterm)}; "
                f"{kept_on_interrupt_text(Path(args.sweep).expanduser())}. Continue with: {shlex.join(['gmpq', *argv])}")
    return INTERRUPTED.replace("interrupted", stop_word(by_sigterm))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.formatwarning = format_warning
    parser = build_parser(_named_command(argv))
    try:
        args = parser.parse_args(argv)         # a count out of range (common_args.at_least) is a ConfigError
        args.argv = argv                       # the command as given (a stopped command's line to continue it)
        if hasattr(args, "sweep_arg"):         # --sweep DIR, or DIR (commands.add_sweep_dir_arg)
            commands.resolve_sweep_dir_arg(args)
    except GMPQError as e:
        print(error_paragraph(e), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):    # 'gmpq' or 'gmpq -v': a usage error (argparse's exit 2), as 'gmpq cluster'
        parser.print_help(sys.stderr)
        print(error_paragraph(GMPQError("no command given; pick one of the commands listed above ('gmpq COMMAND "
                                        "--help' describes one, e.g. 'gmpq sweep --help').")), file=sys.stderr)
        return 2
    from orchestrator.ray_env import clear_terminated

    clear_terminated()                     # a SIGTERM of an earlier command of this process (tests) is not this one's
    try:
        return int(args.func(args) or 0)
    except GMPQError as e:
        print(error_paragraph(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from orchestrator.ray_env import Terminated, stop_status, terminated

        by_sigterm = isinstance(e, Terminated) or terminated()    # (SIGTERM handed to a handler raising ^C's)
        print(interrupted_text(args, argv, by_sigterm=by_sigterm), file=sys.stderr)
        return stop_status(by_sigterm)
    except BrokenPipeError:            # 'gmpq status --sweep DIR | head': the reader left, as it may
        if not _stdout_gone():
            raise                      # another pipe (a subprocess, a socket): a real error
        return 141                     # 128 + SIGPIPE, what a shell reports for a command its pipe closed


def _stdout_gone() -> bool:
    """Whether stdout's reader has left; if so stdout now points at /dev/null, so Python's flush at exit
    does not raise a second BrokenPipeError."""
    import os
    import select
    try:                               # a pipe whose reader closed polls as an error on the writing end
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        if not any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0)):
            return False
    except (AttributeError, OSError, ValueError):
        pass                           # cannot tell (no poll, no descriptor): take it as stdout's
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):    # no file descriptor (captured output): nothing to flush there
        pass
    return True


if __name__ == "__main__":
    sys.exit(main())
