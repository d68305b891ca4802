"""The benchmarks' shared command-line handling: argument types that refuse a bad value with a message naming it,
the ``--models`` list, a ``--json`` target checked before any compute and written whole (never half a file), and
one line instead of a traceback for a refused input (a ``GMPQError``) or Ctrl-C.

    @cli_entry
    def main(argv=None) -> int: ...      # ConfigError -> "bench_x.py: <message>", exit 2; Ctrl-C -> exit 130
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path


def progress(msg: str) -> None:
    """A progress line on stderr (stdout stays the table, or the JSON with ``--json -``)."""
    print(msg, file=sys.stderr, flush=True)


def _int_at_least(minimum: int, wanted: str):
    """An argparse type: an integer of ``minimum`` or more, refused as ``must be <wanted>``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, but got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {wanted}, but got {value}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer (1 or more)")     # argparse types
nonneg_int = _int_at_least(0, "an integer of 0 or more")


def model_cases(text: str) -> list[tuple[str, int, int]]:
    """argparse type of ``--models``: ``MODEL:INPUT_SIZE:IN_CHANNELS[,...]`` as (name, size, channels) triples, the
    names checked against the model registry (``gmpq_core.models.check_model``) before anything is built."""
    from gmpq_core.errors import GMPQError
    from gmpq_core.models import check_model

    cases = []
    for item in text.split(","):
        parts = item.strip().rsplit(":", 2)        # rsplit: a builder of your own is MODULE:FUNCTION
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
            raise argparse.ArgumentTypeError(
                f"each entry must be MODEL:INPUT_SIZE:IN_CHANNELS with positive integers (e.g. resnet20:28:1), "
                f"but got {item!r}")
        try:
            check_model(parts[0])
        except GMPQError as e:
            raise argparse.ArgumentTypeError(f"{item!r}: {e}") from None
        cases.append((parts[0], int(parts[1]), int(parts[2])))
    return cases


def check_output_file(parser: argparse.ArgumentParser, path: str | None, flag: str = "--json", *,
                      stdout_ok: bool = True) -> None:
    """Refuse (``parser.error``, exit 2) an output file that could not be written, before the benchmark computes
    anything: a folder, a missing parent folder, no permission; ``"-"`` where stdout is not offered (``stdout_ok``:
    else it would become a file named "-"). ``None`` and ``"-"`` (stdout) pass."""
    if path == "-" and not stdout_ok:
        parser.error(f"{flag} -: this benchmark writes its JSON to a file only (stdout carries its report); "
                     "give a file path, e.g. out.json.")
    if not path or path == "-":
        return
    target = Path(path).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        parser.error(f"{flag} {path}: that is a folder; give a file path inside it, e.g. {target / 'out.json'}.")
    if not parent.is_dir():
        parser.error(f"{flag} {path}: the folder {parent} does not exist; create it first (mkdir -p {parent}) "
                     "or give another path.")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        parser.error(f"{flag} {path}: no permission to write there; give a path in a folder you can write to.")


def write_text_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole (``gmpq_core.fileio.atomic_write_text``: a temporary file beside it, then
    renamed over it), so an interrupted write leaves the old file (or none), never half a JSON document."""
    from gmpq_core.fileio import atomic_write_text

    atomic_write_text(Path(path).expanduser(), text)


def cli_entry(main):
    """Wrap a benchmark's ``main(argv) -> int``: a ``GMPQError`` (a refused input: unknown model or preset, a folder
    that is not a sweep) becomes one line on stderr and exit 2; Ctrl-C one line and exit 130 (what a shell reports
    for SIGINT); real bugs keep their traceback."""
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        from gmpq_core.errors import GMPQError

        prog = Path(sys.argv[0]).name if argv is None else f"{main.__module__}.py"
        try:
            return main(argv)
        except KeyboardInterrupt:
            print(f"\n{prog}: interrupted (Ctrl-C) before the end: no --json written, and any figures printed "
                  "so far are incomplete.", file=sys.stderr)
            return 130
        except GMPQError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 2
    return wrapper
