"""The sections of a sweep config (``SweepConfig``'s nested mappings) as frozen dataclasses: ``Resources`` (per
trial), ``PrunerConfig`` and ``SamplerConfig`` (the Optuna pruner and sampler by name), ``FinetuneStage`` (the
final Ray Train fine-tune) and ``FaultInjection`` (the reliability tests' ``testing:`` switches), with the small
checks ``sweep_config`` shares (``_require``, ``_is_pos``, ``_from_mapping``: a section given as a mapping, its
unknown keys refused), and
``check_placement``/``misplaced``: where a key written in the wrong place belongs (``search_epochs`` at the top
level: in ``space:``), said before any look-alike suggestion. Torch-free at import, like ``sweep_config`` (the
light CLI path imports it)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from gmpq_core.errors import ConfigError, did_you_mean

__all__ = ["Resources", "PrunerConfig", "SamplerConfig", "FinetuneStage", "FaultInjection", "KEY_FLAGS", "SECTIONS",
           "misplaced", "check_placement"]

# The `gmpq sweep` flags that set a config key (dotted: inside a section): what commands.sweep.overrides_from_args
# reads, and what the config errors name ("--epochs sets it too").
KEY_FLAGS = {"n_trials": "--n-trials", "max_concurrent_trials": "--max-concurrent", "out_dir": "--out",
             "model": "--model", "name": "--name", "seed": "--seed", "tracking_uri": "--tracking-uri",
             "optuna_storage": "--optuna-storage", "address": "--address", "storage_path": "--storage",
             "cache_dir": "--cache-dir", "space.search_epochs": "--epochs", "precision": "--precision"}
# The nested sections, in the order a key of several is offered, with what each holds.
SECTIONS = {"space": "searched or fixed per trial", "search": "fixed settings of every trial's search",
            "transfer": "the transfer check of every trial", "finetune": "the final fine-tune",
            "resources": "per trial", "pruner": "the Optuna pruner", "sampler": "the Optuna sampler",
            "candidates": "the bitwidths",
            "testing": "fault injection"}


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_pos(value: Any, *, integer: bool = False) -> bool:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    return ok and not isinstance(value, bool) and math.isfinite(value) and value > 0



def check_max_gbitops(value: Any, name: str = "finetune.max_gbitops", where: str = "") -> float | None:
    """``value`` as a float (None: no limit); ConfigError naming ``name`` (``where``: the file that holds it) unless a
    finite number > 0 or None. The one rule of the GBitOPs limit: the config key, the flags (``pareto_pick``)."""
    if value is None:
        return None
    if not _is_pos(value):
        quoted = " (a quoted number is text: write it without quotes)" if isinstance(value, str) else ""
        raise ConfigError(f"{name} must be a number > 0 (the most GBitOPs a selected policy may cost: its quantized "
                          f"layers' BitOPs / 1e9, pareto.parquet's gbitops column) or null for no limit, but got "
                          f"{name}={value!r}{f' in {where}' if where else ''}{quoted}.")
    return float(value)

def _from_mapping(cls: type, section: str, d: Any) -> Any:
    if isinstance(d, cls):
        return d
    named = (f" Write it as {section}: {{name: {d}}}." if section in ("pruner", "sampler") and isinstance(d, str)
             else "")
    _require(d is None or isinstance(d, Mapping), f"'{section}' must be a mapping, but got {d!r}.{named}")
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    _require(not unknown, f"Unknown key(s) {unknown} in '{section}'.{did_you_mean(unknown, known)} "
                          f"Known keys: {sorted(known)}.{_loose_pruner_hint(section, d, unknown)}")
    return cls(**d)


def _loose_pruner_hint(section: str, d: Mapping[str, Any], unknown: list[str]) -> str:
    """For keys written beside the pruner's (sampler's) name (not typos of 'name' or 'kwargs'): its own arguments
    go under ``kwargs``, the section written out with them."""
    import difflib

    import yaml

    loose = [k for k in unknown if not difflib.get_close_matches(str(k), ("name", "kwargs"), n=1, cutoff=0.7)]
    if section not in ("pruner", "sampler") or not loose:
        return ""
    kwargs = dict(d["kwargs"]) if isinstance(d.get("kwargs"), Mapping) else {}
    fixed = {"name": d.get("name", "median" if section == "pruner" else "tpe"),
             "kwargs": {**kwargs, **{k: d[k] for k in loose}}}
    text = yaml.safe_dump({section: fixed}, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return f" A {section}'s own arguments go under 'kwargs': {text[1:-1]}."


@functools.lru_cache(maxsize=1)
def _places() -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """(takes, homes): each place of a sweep config ("" = the top level, then ``SECTIONS``) -> the keys it
    accepts, and -> the keys that belong there (``search`` accepts ``epochs``, refusing it with its own message,
    but ``epochs`` does not belong there: the sweep sets it from ``space.search_epochs``)."""
    from gmpq_core.search_config import SearchConfig
    from gmpq_core.transfer import TransferCheck
    from search_spaces.space import PARAMS

    from .sweep_config import _SEARCH_FROM_SWEEP, SweepConfig

    def names(cls: type) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls) if not f.metadata.get("testing"))

    takes = {"": names(SweepConfig), "space": frozenset(PARAMS), "search": names(SearchConfig),
             "transfer": names(TransferCheck), "finetune": names(FinetuneStage), "resources": names(Resources),
             "pruner": names(PrunerConfig), "sampler": names(SamplerConfig),
             "candidates": frozenset({"w_bits", "a_bits"}),
             "testing": names(FaultInjection)}
    return takes, {**takes, "search": takes["search"] - _SEARCH_FROM_SWEEP}


def _inline(key: str, value: Any) -> str:
    import yaml

    text = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()
    return text if len(text) <= 80 else "{" + key + ": ...}"


def misplaced(where: str, given: Mapping[str, Any]) -> dict[str, str]:
    """Keys of ``given`` (the mapping at ``where``: "" for the top level, or a section) that ``where`` does not
    take but another place does -> the sentence saying where each belongs. A real typo is not here: the caller
    answers it with ``did_you_mean``."""
    from .sweep_config import _SPACE_TO_SEARCH

    as_space = {setting: dim for dim, setting in _SPACE_TO_SEARCH.items() if setting}   # epochs: search_epochs
    takes, places = _places()
    out = {}
    for key in sorted(set(given) - takes[where], key=str):
        if where == "space" and key in as_space:        # the dimension's own name: space: {search_epochs: 2}
            name = as_space[key]
            out[key] = (f"'{key}' is called '{name}' in 'space:' (space: {_inline(name, given[key])})"
                        + (f"; gmpq sweep {KEY_FLAGS[f'space.{as_space[key]}']} sets it too."
                           if f"space.{as_space[key]}" in KEY_FLAGS else "."))
            continue
        homes = [(p, key) for p in places if p != where and key in places[p]]     # the top level ("") first
        if key in as_space and where != "space":        # a search setting the sweep sets from a space dimension
            homes.insert(0, ("space", as_space[key]))
        if not homes:
            continue

        def example(place: str, name: str) -> str:
            text = _inline(name, given[key])
            return text[1:-1] if place == "" else f"{place}: {text}"

        def section(place: str, name: str) -> str:
            return f"'{place}:'" + (f" as '{name}'" if name != key else "") + f" ({SECTIONS[place]})"

        here = "at the top level" if where == "" else f"in '{where}:'"
        if len(homes) == 1:
            place, name = homes[0]
            home = (f"at the top level ({example(place, name)})" if place == "" else f"in the '{place}:' section"
                    + (f" as '{name}'" if name != key else "") + f" ({example(place, name)})")
            text = f"'{key}' belongs {home}, not {here}"
        else:
            named = [section(p, n) for p, n in homes if p]
            sections = f"{', '.join(named[:-1])} or {named[-1]}" if len(named) > 1 else named[0]
            home = (f"at the top level ({example(*homes[0])}) or in the section {sections}" if homes[0][0] == ""
                    else f"in one of the sections {sections}")
            text = f"'{key}' belongs {home}, not {here}" + (f" (e.g. {example(*homes[0])})" if homes[0][0] else "")
        dotted = {(n if p == "" else f"{p}.{n}"): (f"the top-level '{n}'" if p == "" else f"{p}.{n}")
                  for p, n in homes}
        flag = next((f"{KEY_FLAGS[d]} sets " + ("it too" if len(homes) == 1 else said)
                     for d, said in dotted.items() if d in KEY_FLAGS), None)
        out[key] = text + (f"; gmpq sweep {flag}." if flag else ".") + _alike_here(where, key, takes[where])
    return out


def _alike_here(where: str, key: str, here: frozenset[str]) -> str:
    """For a key that belongs elsewhere but is also the start of a key of ``where`` (``max_concurrent`` at the top
    level: ``finetune.max_concurrent``, or the top level's ``max_concurrent_trials``): that one too."""
    alike = sorted(k for k in here if isinstance(key, str) and k.startswith(f"{key}_"))
    if not alike:
        return ""
    dotted = alike[0] if where == "" else f"{where}.{alike[0]}"
    flag = f" (gmpq sweep {KEY_FLAGS[dotted]} sets it)" if dotted in KEY_FLAGS else ""
    return f" Or did you mean '{alike[0]}'{' at the top level' if where == '' else f' in {where!r}'}{flag}?"


def check_placement(where: str, given: Any) -> None:
    """ConfigError when ``given`` (the mapping at ``where``) holds a key that belongs in another place; the
    message says where, before any "did you mean" for the other unknown keys. Keys unknown everywhere are left
    to the place's own check."""
    if not isinstance(given, Mapping) or set(given) <= _places()[0][where]:
        return
    wrong = misplaced(where, given)
    if not wrong:
        return
    takes, places = _places()
    known = places[where] - ({"testing"} if where == "" and "testing" not in given else set())
    unknown = sorted(set(given) - takes[where], key=str)
    typos = [k for k in unknown if k not in wrong]
    head = (f"Unknown sweep config key(s) {unknown}." if where == ""
            else f"Unknown key(s) {unknown} in '{where}'.")
    raise ConfigError(f"{head} {' '.join(wrong.values())}{did_you_mean(typos, known)} "
                      f"Known keys{'' if where == '' else f' of {where!r}'}: {sorted(known)}.")


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Per-trial resources: CPU slots and a GPU fraction (fractions share a GPU without isolation)."""
    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        _require(_is_pos(self.cpu), f"resources.cpu must be a number > 0 (CPU slots per trial, e.g. 1), but got cpu={self.cpu!r}.")
        _require(isinstance(self.gpu, (int, float)) and not isinstance(self.gpu, bool) and self.gpu >= 0,
                 f"resources.gpu must be >= 0 (e.g. 0.25), but got gpu={self.gpu!r}.")

    def to_ray(self) -> dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass(frozen=True, kw_only=True)
class _OptunaPart:
    """An Optuna part by its config ``name`` and its ``kwargs``, checked by building it (``_build``)."""
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    section = ""

    def __post_init__(self) -> None:
        _require(isinstance(self.kwargs, Mapping), f"{self.section}.kwargs must be a mapping, but got {self.kwargs!r}.")
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        self._build()

    def _build(self) -> Any:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class PrunerConfig(_OptunaPart):
    """An ``optuna.pruners`` pruner by name (median|percentile|successive_halving|hyperband|none)."""
    name: str = "median"
    section = "pruner"

    def _build(self) -> Any:
        from .pruning import make_pruner
        return make_pruner(self.name, self.kwargs)


@dataclass(frozen=True, kw_only=True)
class SamplerConfig(_OptunaPart):
    """The sweep's ``optuna.samplers`` sampler by name (``orchestrator.sampling.SAMPLERS``), seeded with the
    config's ``seed``."""
    name: str = "tpe"
    section = "sampler"

    def _build(self) -> Any:
        from .sampling import make_sampler
        return make_sampler(self.name, self.kwargs)


@dataclass(frozen=True, kw_only=True)
class FinetuneStage:
    """The final Ray Train fine-tune of the selected policies (read by orchestrator.final_stage)."""
    top_k: int = 2
    workers: int | str = 2                   # per policy; "auto": the cluster's CPUs (GPUs) / policies at once
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.01
    distill: bool = False
    max_steps_per_epoch: int | None = None
    nesterov: bool = False                   # plain SGD momentum, as METHOD.md 6 says
    max_concurrent: int | None = None        # policies fine-tuned side by side (null: as many as the cluster holds)
    train_size: int | None = None            # stratified target train / test images (null: the full split)
    test_size: int | None = None
    max_gbitops: float | None = None         # select only among front policies of at most this many GBitOPs (null: any)

    def __post_init__(self) -> None:
        check_max_gbitops(self.max_gbitops)
        _require(self.max_concurrent is None or _is_pos(self.max_concurrent, integer=True),
                 f"finetune.max_concurrent must be a positive integer or null (as many as the cluster holds), "
                 f"but got max_concurrent={self.max_concurrent!r}.")
        _require(self.workers == "auto" or _is_pos(self.workers, integer=True),
                 f"finetune.workers must be a positive integer or 'auto' (the cluster's CPUs, or GPUs, shared by "
                 f"the policies fine-tuned at once), but got workers={self.workers!r}.")
        for name in ("top_k", "epochs", "batch_size"):
            _require(_is_pos(getattr(self, name), integer=True),
                     f"finetune.{name} must be a positive integer, but got {name}={getattr(self, name)!r}.")
        _require(_is_pos(self.lr), f"finetune.lr must be > 0, but got lr={self.lr!r}.")
        _require(isinstance(self.distill, bool), f"finetune.distill must be true/false, got {self.distill!r}.")
        _require(isinstance(self.nesterov, bool), f"finetune.nesterov must be true/false, got {self.nesterov!r}.")
        _require(self.max_steps_per_epoch is None or _is_pos(self.max_steps_per_epoch, integer=True),
                 f"finetune.max_steps_per_epoch must be a positive integer or null, got {self.max_steps_per_epoch!r}.")
        for name in ("train_size", "test_size"):
            _require(getattr(self, name) is None or _is_pos(getattr(self, name), integer=True),
                     f"finetune.{name} must be a positive integer or null (the full split), but got "
                     f"{name}={getattr(self, name)!r}.")


@dataclass(frozen=True, kw_only=True)
class FaultInjection:
    """``testing:`` switches of the reliability tests (leave empty in real sweeps). Trials are named by
    their 1-based creation number (the ``_<n>_`` in Tune's trial folder names): ``raise_trials`` raise
    at the start of their first ``raise_attempts`` attempts; ``nan_trials`` get
    ``SearchConfig.inject_nan_at_epoch = nan_epoch`` (their loss turns NaN in that epoch, every attempt)."""
    raise_trials: tuple[int, ...] = ()
    raise_attempts: int = 1
    nan_trials: tuple[int, ...] = ()
    nan_epoch: int = 1

    def __post_init__(self) -> None:
        for name in ("raise_trials", "nan_trials"):
            v = getattr(self, name)
            _require(isinstance(v, (list, tuple)) and all(_is_pos(n, integer=True) for n in v),
                     f"testing.{name} must be a list of trial numbers (1, 2, ...), but got {v!r}.")
            object.__setattr__(self, name, tuple(v))
        for name in ("raise_attempts", "nan_epoch"):
            _require(_is_pos(getattr(self, name), integer=True),
                     f"testing.{name} must be a positive integer, but got {getattr(self, name)!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"raise_trials": list(self.raise_trials), "raise_attempts": self.raise_attempts,
                "nan_trials": list(self.nan_trials), "nan_epoch": self.nan_epoch}
