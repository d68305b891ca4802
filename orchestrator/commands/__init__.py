"""One module per CLI subcommand; each defines ``register(subparsers)`` (discovered by cli.py).

Modules whose names start with ``_`` are helpers of a command, not commands (cli.py skips them)."""


def help_text(doc: str | None) -> str:
    """A command module's docstring as its ``--help`` description (reST literals shown plainly)."""
    return (doc or "").replace("``", "")
