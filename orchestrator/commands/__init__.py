"""One module per CLI subcommand; each defines ``register(subparsers)`` (discovered by cli.py).

Modules whose names start with ``_`` are helpers of a command, not commands (cli.py skips them)."""
