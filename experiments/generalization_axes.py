"""The grid axes of a study config checked as written (``StudyConfig.__post_init__`` calls these first): ``proxies``,
``budgets``, ``seeds``, ``methods`` and ``resources``, each a list (a mapping) of the right kind of value without
repeats. A scalar where a list belongs, a proxy with a misspelt field or a repeated seed used to end in a Python
traceback, or worse, ran: a seed listed twice ran its cells twice and counted as two seeds in every std, standard
error and verdict of the page. Errors are ``ConfigError`` naming the key, the value and the fix (exit 2).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from gmpq_core.errors import ConfigError, did_you_mean

__all__ = ["proxy_entries", "budget_list", "seed_list", "method_list", "resources_mapping"]

_PROXY_FIELDS = ("name", "dataset", "size")
_EXAMPLE_PROXY = "{name: fmnist500, dataset: fashion_mnist, size: 500}"


def _as_list(key: str, value: Any, example: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ConfigError(f"'{key}' must be a list, e.g. {key}: {example}, but got {key}: {value!r}.")
    return list(value)


def _unquote_hint(value: Any) -> str:
    """The hint for a number written in quotes (a string that parses as one), else a full stop."""
    try:
        float(value) if isinstance(value, str) else None
    except ValueError:
        return "."
    return " (write it without quotes)." if isinstance(value, str) else "."


def _no_repeats(key: str, values: list, what: str) -> None:
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise ConfigError(f"'{key}' lists {', '.join(twice)} more than once ({key}: {values}): each {what} would run "
                          f"its cells again and count twice in the means, standard errors and verdicts. List each "
                          "once.")


def proxy_entries(value: Any) -> list[dict[str, Any]]:
    """``proxies`` as a list of mappings with the fields of ``ProxySpec`` (unknown or missing ones named)."""
    entries = _as_list("proxies", value, f"[{_EXAMPLE_PROXY}]")
    out = []
    for i, p in enumerate(entries, 1):
        if hasattr(p, "name") and hasattr(p, "dataset"):       # a ProxySpec already
            out.append(p)
            continue
        if not isinstance(p, Mapping):
            raise ConfigError(f"proxies: entry {i} must be a mapping such as {_EXAMPLE_PROXY}, but got {p!r}.")
        unknown = sorted(set(p) - set(_PROXY_FIELDS), key=str)
        if unknown:
            raise ConfigError(f"proxies: entry {i} ({dict(p)}) has unknown field(s) {unknown}."
                              f"{did_you_mean([str(k) for k in unknown], _PROXY_FIELDS)} A proxy's fields: name, "
                              f"dataset, size (null: the whole training split), e.g. {_EXAMPLE_PROXY}.")
        missing = [k for k in ("name", "dataset") if k not in p]
        if missing:
            raise ConfigError(f"proxies: entry {i} ({dict(p)}) lacks {' and '.join(missing)}; e.g. {_EXAMPLE_PROXY}.")
        out.append(dict(p))
    return out


def budget_list(value: Any) -> tuple[float, ...]:
    """``budgets`` as average bits: numbers (not strings, not true/false) between 1 and 8, each once."""
    budgets = _as_list("budgets", value, "[2.5, 3.0]")
    if not budgets:
        raise ConfigError("'budgets' must list at least one budget in average bits, e.g. budgets: [2.5, 3.0].")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ConfigError(f"budgets must be numbers (average bits, e.g. 3.0), but got {b!r} in budgets: "
                              f"{budgets}{_unquote_hint(b)}")
        if not 1 <= b <= 8:
            raise ConfigError(f"budgets are average bits per layer between 1 and 8 (the bit candidates bound them "
                              f"further, e.g. 2..6 for [2, 3, 4, 6]), but got {b!r} in budgets: {budgets}.")
    budgets = [float(b) for b in budgets]
    _no_repeats("budgets", budgets, "budget")
    return tuple(budgets)


def seed_list(value: Any) -> tuple[int, ...]:
    """``seeds``: integers >= 0, each once."""
    seeds = _as_list("seeds", value, "[0, 1, 2]")
    if not seeds:
        raise ConfigError("'seeds' must list at least one seed, e.g. seeds: [0, 1, 2] (3 or more give verdicts).")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"seeds must be integers >= 0, but got {s!r} in seeds: {seeds}{_unquote_hint(s)}")
    _no_repeats("seeds", seeds, "seed")
    return tuple(seeds)


def method_list(value: Any, known: Sequence[str]) -> tuple[str, ...]:
    """``methods``: names of ``known``, each once (an unknown one named, with the look-alike)."""
    methods = _as_list("methods", value, "[gmpq, eta0, uniform, random]")
    if not methods:
        raise ConfigError(f"'methods' must list at least one of {list(known)}.")
    bad = [m for m in methods if m not in known]
    if bad:
        raise ConfigError(f"methods must be among {', '.join(known)}, but got unknown {bad} in methods: {methods}."
                          f"{did_you_mean([str(m) for m in bad], known)}")
    _no_repeats("methods", methods, "method")
    return tuple(methods)


def resources_mapping(value: Any) -> dict[str, float]:
    """``resources``: {cpu: N, gpu: G} per cell, numbers >= 0."""
    res = value if isinstance(value, Mapping) else None
    if res is None or set(res) - {"cpu", "gpu"} or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in res.values()):
        raise ConfigError(f"resources must be {{cpu: N, gpu: G}} with numbers >= 0 (per cell, e.g. "
                          f"{{cpu: 1, gpu: 0}}), but got {value!r}.")
    return {"cpu": float(res.get("cpu", 1)), "gpu": float(res.get("gpu", 0))}
