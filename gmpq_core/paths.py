"""Path checks that need no torch (the ``gmpq`` command runs them as it parses its flags)."""
from __future__ import annotations

import os

from .errors import ConfigError

__all__ = ["check_data_root"]


def check_data_root(root: object, name: str = "data root") -> str | None:
    """``root`` unless it is, or lies under, a file: ConfigError naming it as ``name`` (a CLI passes its flag,
    e.g. ``--data-root``). Reads nothing else; a folder that does not exist yet passes (a download makes it).
    Without this a file there was passed over with a warning (Fashion-MNIST) or blamed on the network (the
    CIFAR-10 download into it failed)."""
    if root is None or not isinstance(root, (str, os.PathLike)):
        return root
    path = os.path.abspath(os.path.expanduser(os.fspath(root)))
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.exists(probe) or os.path.isdir(probe):
        return root
    where = "is a file" if probe == path else f"lies under '{probe}', which is a file"
    if name.startswith("-"):
        fix = (f"pass {name} the folder that holds the dataset files, or drop {name} to use the dataset's default "
               "location")
    else:
        fix = ("pass the folder that holds the dataset files (--data-root DIR, or data_root in a config file), or "
               "leave it out to use the dataset's default location")
    label = name if name.startswith("-") else f"The {name}"
    raise ConfigError(f"{label} '{root}' {where}, not a folder; {fix}.")
