"""Named sweep presets: YAML files in ``search_spaces/presets/`` (one full sweep config each).

``list_presets()`` names them; ``load_preset(name)`` returns the parsed mapping (the sweep config
loader merges a user file and CLI flags over it). ``load_yaml`` reads YAML 1.2-style numbers
(``1e-5`` is a float, not a string as in PyYAML's YAML 1.1) and reports syntax errors with their
line and column.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from gmpq_core.errors import ConfigError

__all__ = ["PRESET_DIR", "list_presets", "load_preset", "preset_path", "load_yaml", "parse_yaml", "yaml_problem"]

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` / ``3E4`` as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line, to follow "is not valid YAML": `` at line L, column C: problem`` or ``: problem``
    (PyYAML's own text spans several lines, with carets)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ": "
    return where + " ".join(str(getattr(err, "problem", None) or err).split())


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text; a syntax error becomes ConfigError naming ``source``, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"'{source}' is not valid YAML{yaml_problem(e)}. Fix the syntax there.") from None


def load_yaml(path: str | Path) -> Any:
    """Read and parse a UTF-8 YAML file (ConfigError if missing, unreadable, binary or malformed)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"The config file '{p}' is not text (a binary file, e.g. a checkpoint or an archive?). "
                          "Config files are UTF-8 YAML: pass the .yaml file itself.") from None
    except OSError as e:
        raise ConfigError(f"Cannot read the config file '{p}' ({e.strerror}). Check the path.") from None
    return parse_yaml(text, str(p))


def list_presets() -> list[str]:
    """Names of the bundled presets (file stems in ``PRESET_DIR``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    if not isinstance(name, str) or name not in list_presets():
        raise ConfigError(f"Unknown preset {name!r}. Available presets: {', '.join(list_presets())}.")
    return PRESET_DIR / f"{name}.yaml"


def load_preset(name: str) -> dict[str, Any]:
    """The preset's sweep config as a plain mapping (unknown name -> ConfigError listing them)."""
    data = load_yaml(preset_path(name))
    if not isinstance(data, dict):
        raise ConfigError(f"Preset '{name}' must be a YAML mapping, but its top level is {type(data).__name__}.")
    return data
