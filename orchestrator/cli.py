"""The ``gmpq`` console command (argparse; ``main() -> int``).

Subcommands live one per module in ``orchestrator.commands``; each module defines
``register(subparsers)`` which adds a parser and sets ``func(args) -> int`` as its default.
A ``GMPQError`` becomes a one-paragraph message and exit status 2, with no traceback; real bugs
keep their traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import textwrap

from gmpq_core.errors import GMPQError

from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmpq", description="GMPQ Sweep: generalizable mixed-precision quantization searches, "
        "swept with Ray Tune and Optuna, logged to MLflow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def error_paragraph(err: BaseException) -> str:
    return textwrap.fill(f"gmpq: error: {err}", width=100)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except GMPQError as e:
        print(error_paragraph(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gmpq: interrupted; finished work is kept on disk.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
