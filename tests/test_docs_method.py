"""docs/method.md cannot go stale silently: every name it writes in backticks exists in the code, and every
"docs/method.md, section N" that README or a help text cites is one of its sections.

How a backticked token is read (``problem`` returns why it does not exist, None when it does or is a formula):
- ``gmpq CMD --flag ...``: the command and each of its ``--flags`` (the argparse parser of ``gmpq``);
  ``--flag ...`` alone: a flag of some command;
- ``key: value`` / ``key=value``: the key as below; a SearchConfig key's value must also be accepted by it;
- ``name:``: a key or a section of a sweep config;
- ``dir/file.py``, ``dir/*.yaml``: a path (glob) under the repository root;
- ``section.key`` (search, space, transfer, finetune, budget, candidates): a key of that section;
  ``package.module.name`` (gmpq_core, orchestrator, search_spaces, cluster): importable, the name an attribute;
  ``Class.field``: a class gmpq_core exports and one of its fields or attributes;
- ``lower_snake``: a config key (SearchConfig, SearchJob, the sweep config and its sections, presets,
  search-space parameters) or a result field / trials.parquet column;
- ``CamelCase``: a class gmpq_core exports; ``name()`` is refused (write the module path);
- anything with spaces or operators, and symbols such as ``L_gen``: a formula, not checked.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import re
from functools import lru_cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "method.md"
PACKAGES = ("gmpq_core", "orchestrator", "search_spaces", "cluster")
_IDENT = r"[a-z_][a-z0-9_]*"


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@lru_cache(maxsize=None)
def sections() -> dict[str, frozenset[str]]:
    from gmpq_core.complexity import Budget
    from gmpq_core.policy import BitCandidates
    from gmpq_core.search_config import SearchConfig
    from gmpq_core.transfer import TransferCheck
    from orchestrator.sweep_sections import FinetuneStage
    from search_spaces.space import PARAMS
    return {"search": frozenset(_fields(SearchConfig)), "space": frozenset(PARAMS),
            "transfer": frozenset(_fields(TransferCheck)), "finetune": frozenset(_fields(FinetuneStage)),
            "budget": frozenset(_fields(Budget)), "candidates": frozenset(_fields(BitCandidates))}


def _yaml_keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return {str(k) for k in node} | {k for v in node.values() for k in _yaml_keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _yaml_keys(v)}
    return set()


@lru_cache(maxsize=None)
def known_keys() -> frozenset[str]:
    from gmpq_core.finetune import FinetuneConfig
    from gmpq_core.jobs import SearchJob
    from gmpq_core.policy import QuantSpec
    from gmpq_core.search_config import SearchResult
    from orchestrator.results import METRIC_FIELDS
    from orchestrator.sweep_config import SweepConfig
    keys = set().union(*sections().values())
    for cls in (FinetuneConfig, SearchJob, QuantSpec, SearchResult, SweepConfig):
        keys |= _fields(cls)
    keys |= {f.name for f in METRIC_FIELDS}
    for preset in (ROOT / "search_spaces" / "presets").glob("*.yaml"):
        keys |= _yaml_keys(yaml.safe_load(preset.read_text()))
    return frozenset(keys)


@lru_cache(maxsize=None)
def cli_options() -> dict[str, frozenset[str]]:
    from orchestrator.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: frozenset(p._option_string_actions) for name, p in sub.choices.items()}


def _key_problem(key: str) -> str | None:
    if "." in key:
        section, _, name = key.partition(".")
        if section not in sections():
            return f"'{section}' is not a config section ({', '.join(sections())})"
        return None if name in sections()[section] else f"'{name}' is not a key of the '{section}:' section"
    return None if key in known_keys() else f"'{key}' is not a config key or result field"


def _value_problem(key: str, raw: str) -> str | None:
    from gmpq_core.search_config import SearchConfig
    if key not in sections()["search"]:
        return None
    try:
        SearchConfig(**{key: yaml.safe_load(raw)})
    except Exception as e:      # the config's own refusal, named
        return f"SearchConfig refuses {key}={raw}: {e}"
    return None


def _object_problem(token: str) -> str | None:
    parts = token.split(".")
    if parts[0][:1].isupper():                    # Class.field
        import gmpq_core
        obj = getattr(gmpq_core, parts[0], None)
        if obj is None:
            return f"gmpq_core exports no class '{parts[0]}'"
        rest = parts[1:]
    elif parts[0] in PACKAGES:
        for i in range(len(parts), 0, -1):
            name = ".".join(parts[:i])
            try:
                obj = importlib.import_module(name)
            except ModuleNotFoundError as e:
                if e.name is not None and name.startswith(e.name) and e.name.startswith(parts[0]):
                    continue
                raise
            rest = parts[i:]
            break
    else:
        return _key_problem(token)
    for name in rest:
        if dataclasses.is_dataclass(obj) and isinstance(obj, type) and name in _fields(obj):
            return None if name == rest[-1] else f"'{token}': a field has no attributes here"
        if not hasattr(obj, name):
            return f"'{token}': {getattr(obj, '__name__', obj)!s} has no '{name}'"
        obj = getattr(obj, name)
    return None


def problem(token: str) -> str | None:
    """Why ``token`` names nothing that exists (None: it exists, or it is a formula)."""
    if token == "gmpq" or token.startswith("gmpq "):
        words = token.split()[1:]
        if not words or words[0].startswith("-"):
            return None
        options = cli_options().get(words[0])
        if options is None:
            return f"'gmpq {words[0]}' is not a command ({', '.join(sorted(cli_options()))})"
        bad = [w.split("=")[0] for w in words[1:] if w.startswith("--") and w.split("=")[0] not in options]
        return f"'gmpq {words[0]}' has no option {bad[0]}" if bad else None
    if token.startswith("--"):
        flag = token.split()[0].split("=")[0]
        return None if any(flag in o for o in cli_options().values()) else f"no gmpq command has {flag}"
    key = rf"{_IDENT}(?:\.{_IDENT})?"
    kv = re.fullmatch(rf"({key}): (.+)", token) or re.fullmatch(rf"({key})=(\S+)", token)
    if kv:
        return _key_problem(kv[1]) or _value_problem(kv[1], kv[2])
    if re.fullmatch(rf"{_IDENT}:", token):
        return _key_problem(token[:-1])
    if re.search(r"\s", token):
        return None                                                    # a formula or an example
    if "/" in token and re.fullmatch(r"[\w.*-]+(/[\w.*-]+)+/?", token):
        return None if glob.glob(str(ROOT / token)) else f"no file matches '{token}'"
    if re.fullmatch(rf"{_IDENT}\(\)", token):
        return f"'{token}': write the function with its module path (gmpq_core.module.{token[:-2]})"
    if re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", token):
        return _object_problem(token)
    if re.fullmatch(r"[A-Z][A-Za-z0-9]+", token):
        import gmpq_core
        return None if hasattr(gmpq_core, token) else f"gmpq_core exports no '{token}'"
    if re.fullmatch(_IDENT, token):
        return _key_problem(token)
    return None                                                        # symbols (L_gen, A_q), numbers, lists


def doc_tokens(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def section_numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^## (\d+)\. \S", text, flags=re.M)]


def test_every_backticked_name_in_method_doc_exists():
    text = DOC.read_text()
    tokens = doc_tokens(text)
    assert len(tokens) > 100                                           # the doc still names its code
    problems = sorted({f"`{t}`: {p}" for t in tokens if (p := problem(t))})
    assert not problems, "docs/method.md names what the code does not have:\n" + "\n".join(problems)


def test_checker_flags_made_up_names():
    for token in ("made_up_key", "p_mode: fxed", "search.no_such_key", "finetune.epoch", "gmpq_core.search.no_such_fn",
                  "gmpq_core.no_such_module", "SearchResult.no_field", "gmpq search --no-such-flag", "gmpq no-cmd",
                  "gmpq_core/no_such_file.py", "search_policy()", "NoSuchClass", "--no-such-flag"):
        assert problem(token), token
    for token in ("eta", "p_mode: fixed", "finetune.nesterov", "gmpq_core.losses.rank_distance", "SearchResult.ard",
                  "gmpq search --lr-arch 0.1", "search_spaces/presets/*.yaml", "L_gen", "p = kappa * x"):
        assert problem(token) is None, token


def test_sections_are_numbered_one_to_n():
    numbers = section_numbers(DOC.read_text())
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 10, numbers


def test_citations_of_the_method_doc_name_its_sections():
    """README and the code cite docs/method.md with section numbers it has, and no longer the file outside the repo."""
    have = set(section_numbers(DOC.read_text()))
    files = [ROOT / "README.md"] + [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    cited, outside = [], []
    for path in files:
        text = path.read_text()
        for m in re.finditer(r"docs/method\.md,? sections? (\d+)((?:(?:,| and| or) \d+)*)", text):
            cited += [(path.name, int(n)) for n in re.findall(r"\d+", m[1] + m[2])]
        if path.name == "README.md" and "shared/docs/METHOD.md" in text:
            outside.append(path.name)
    assert cited, "nothing cites docs/method.md with a section number"
    assert not [c for c in cited if c[1] not in have], f"cited sections that do not exist: {cited}"
    assert not outside, f"{outside} still cite ../shared/docs/METHOD.md (outside the repository)"
