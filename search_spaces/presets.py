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


class _DuplicateKey(yaml.YAMLError):
    """A mapping names one key twice (``_Loader.construct_mapping``): ``key`` and the 1-based ``lines`` of each."""

    def __init__(self, key: Any, lines: list[int]) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.lines = key, lines


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` / ``3E4`` as floats, and refuses a key given twice in one mapping
    (PyYAML keeps the last one silently: ``n_trials: 2`` then ``n_trials: 0`` ran with 0)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, list[int]] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue                       # (a '<<' merge may repeat keys on purpose: the mapping's own win)
            key = self.construct_object(key_node)
            try:
                seen.setdefault(key, []).append(key_node.start_mark.line + 1)
            except TypeError:                  # an unhashable key: PyYAML names it itself
                continue
        twice = next(((k, lines) for k, lines in seen.items() if len(lines) > 1), None)
        if twice is not None:
            raise _DuplicateKey(*twice)
        return super().construct_mapping(node, deep=deep)


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
    text = (getattr(mark, "buffer", None) or "").rstrip("\0").rstrip()
    if mark is not None and text and mark.index >= len(text):    # PyYAML's mark: on the line after the last one
        lines = text.splitlines()
        where = f" at line {len(lines)}, column {len(lines[-1]) + 1} (the end of the file): "
    else:
        where = f" at line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ": "
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    context, opened = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and opened is not None and str(context).startswith("while "):   # where the unclosed bracket or
        problem += f" ({context} that starts at line {opened.line + 1}, column {opened.column + 1})"   # quote began
    elif context and opened is not None:     # e.g. "expected a single document in the stream": a second '---'
        problem = f"{context.rstrip('.')}, {problem}"
    return where + problem


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text; a syntax error becomes ConfigError naming ``source``, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        times = "twice" if len(e.lines) == 2 else f"{len(e.lines)} times"
        raise ConfigError(f"'{source}' gives the key {e.key!r} {times} (lines "
                          f"{', '.join(map(str, e.lines[:-1]))} and {e.lines[-1]}); YAML would keep only the last "
                          f"one silently. Keep one {e.key}: line there and delete the others.") from None
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
