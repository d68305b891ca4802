"""The sweep's configuration: one YAML file (or a preset) + CLI overrides -> a frozen ``SweepConfig``.

``load_sweep_config(path, preset=..., overrides=...)`` merges preset <- file <- overrides (nested
mappings merge key by key; dotted override keys such as ``"space.search_epochs"`` reach inside),
checking as it loads what the file alone can tell (an unknown pruner or sampler, listing the choices; an empty
space; wrong types and ranges). Then ``sweep_checks.check_sweep_config(cfg)`` validates everything that
needs the model or the data, BEFORE Ray starts: an unknown model or dataset (listing the choices), a budget
range outside what the bit candidates reach, proxy or transfer slices larger than the dataset, an out
dir that cannot be written. Errors are ``ConfigError``/``BudgetInfeasibleError``/``DataError`` -> exit 2.
The nested sections (``Resources``, ``PrunerConfig``, ``SamplerConfig``, ``FinetuneStage``, ``FaultInjection``) live in
``sweep_sections`` and are importable from here too.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from gmpq_core.data import canonical_dataset_name
from gmpq_core.models.imported import canonical_model_name
from gmpq_core.errors import ConfigError, did_you_mean
from gmpq_core.fileio import absolute_path, default_cache_dir
from gmpq_core.policy import BitCandidates
from gmpq_core.precision import check_precision
from gmpq_core.transfer import TransferCheck
from search_spaces.presets import load_preset, load_yaml
from search_spaces.space import SearchSpace

from .sweep_sections import (SECTIONS, FaultInjection, FinetuneStage, PrunerConfig, Resources, SamplerConfig,
                             _from_mapping, _is_pos, _require, check_placement)

__all__ = ["env_tracking_uri", "ENV_TRACKING_URI", "is_local_cpu_sweep", "CONFIG_VERSION", "Resources", "PrunerConfig",
           "SamplerConfig", "FinetuneStage", "SweepConfig", "load_sweep_config", "save_resolved_config", "deep_merge",
           "trial_search_config", "saved_before_precision"]

CONFIG_VERSION = 1
# Search-config fields the sweep always sets; the fixed `search:` part may not set them (nor space ones).
_SEARCH_FROM_SWEEP = {"epochs", "budget", "candidates", "seed"}
_SPACE_TO_SEARCH = {"search_epochs": "epochs", "budget_avg_bits": "budget", "proxy_size": None}
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
# Keys a user of Optuna expects that a sweep config does not take: what the sweep does instead.
_SAMPLER = ("the Optuna sampler is the 'sampler' section: sampler: {name: tpe|random|nsga2|qmc|gp, kwargs: {...}} "
            "(seeded with the config's 'seed'). Rename this key to 'sampler'.")
_NOT_SETTINGS = {"optuna_sampler": _SAMPLER}


def env_tracking_uri() -> str | None:
    """MLflow's own ``$MLFLOW_TRACKING_URI`` (None when unset or blank): the tracking URI of a sweep or study that
    names none (``--tracking-uri``, the config's ``tracking_uri``), before the folder's own SQLite store."""
    return os.environ.get(ENV_TRACKING_URI, "").strip() or None


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """Everything one sweep needs. Paths may be relative (resolved against the working directory).

    On a multi-node cluster (``address``), ``storage_path`` (Tune state) and ``cache_dir`` (teachers,
    FP target model) must be on storage that every node shares; the MLflow and Optuna stores are
    written by the driver only.
    """
    name: str = "sweep"
    out_dir: str | None = None                # None -> runs/<name>
    model: str = "resnet20"
    proxy_dataset: str = "fashion_mnist"
    target_dataset: str = "fashion_mnist"
    data_root: str | None = None
    image_size: int | None = None             # None -> the datasets' own size
    small_input: bool = True
    candidates: BitCandidates = field(default_factory=BitCandidates)
    space: SearchSpace = field(default_factory=SearchSpace)
    n_trials: int = 6
    max_concurrent_trials: int = 2
    seed: int = 0
    resources: Resources = field(default_factory=Resources)
    precision: str = "auto"                   # gmpq_core.precision: auto (bf16 on a GPU with bfloat16), fp32, bf16
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)   # seeded with `seed`
    budget_buckets: tuple[float, ...] = (2.75, 3.5, 4.5)
    max_failures: int = 0
    teacher_epochs: int = 3
    proxy_eval_size: int | None = 1000        # proxy test images measuring proxy_top1 (0 = training top-1)
    search: Mapping[str, Any] = field(default_factory=dict)
    transfer: TransferCheck = field(default_factory=TransferCheck)
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    tracking_uri: str | None = None           # None -> $MLFLOW_TRACKING_URI, else sqlite:///<abs out_dir>/mlflow.db
    optuna_storage: str | None = None         # None -> sqlite:///<abs out_dir>/optuna.db
    address: str | None = None                # None -> start a local Ray
    storage_path: str | None = None           # None -> <abs out_dir>/ray_results
    cache_dir: str | None = None              # None -> $GMPQ_CACHE_DIR, else ~/.cache/gmpq (teachers, FP target),
                                              # or with an address <abs out_dir>/cache (storage the nodes share)
    testing: FaultInjection = field(default_factory=FaultInjection)   # fault injection, for tests only

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and self.name and all(c.isalnum() or c in "-_." for c in self.name),
                 f"name must be a non-empty string of letters, digits, '-', '_' or '.', but got name={self.name!r}.")
        for name in SECTIONS:                # a key of another section (or of the top level): say where it belongs
            check_placement(name, getattr(self, name))
        object.__setattr__(self, "candidates", BitCandidates.from_any(self.candidates))
        if not isinstance(self.space, SearchSpace):
            object.__setattr__(self, "space", SearchSpace.from_dict(self.space))
        if isinstance(self.address, str) and self.address.strip() in ("", "local"):
            object.__setattr__(self, "address", None)   # "local" = no cluster: cache, tail threads as without it
        for name, cls in (("resources", Resources), ("pruner", PrunerConfig), ("sampler", SamplerConfig),
                          ("finetune", FinetuneStage),
                          ("testing", FaultInjection)):
            object.__setattr__(self, name, _from_mapping(cls, name, getattr(self, name)))
        if not isinstance(self.transfer, TransferCheck):
            _require(isinstance(self.transfer, Mapping) or self.transfer is None,
                     f"'transfer' must be a mapping, but got {self.transfer!r}.")
            object.__setattr__(self, "transfer", TransferCheck.from_dict(self.transfer))
        _require(self.proxy_eval_size is None or (isinstance(self.proxy_eval_size, int) and not isinstance(
            self.proxy_eval_size, bool) and self.proxy_eval_size >= 0),
            f"proxy_eval_size must be an integer >= 0 or null, but got {self.proxy_eval_size!r}.")
        for name in ("n_trials", "max_concurrent_trials", "teacher_epochs"):
            _require(_is_pos(getattr(self, name), integer=True),
                     f"{name} must be a positive integer, but got {name}={getattr(self, name)!r}"
                     f"{_unquote(getattr(self, name))}")
        _require(isinstance(self.max_failures, int) and not isinstance(self.max_failures, bool)
                 and self.max_failures >= 0, f"max_failures must be an integer >= 0, got {self.max_failures!r}.")
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
                 f"seed must be an integer >= 0, but got seed={self.seed!r}{_unquote(self.seed)}")
        _require(self.image_size is None or _is_pos(self.image_size, integer=True),
                 f"image_size must be a positive integer or null, but got image_size={self.image_size!r}.")
        _require(isinstance(self.small_input, bool), f"small_input must be true/false, got {self.small_input!r}.")
        check_precision(self.precision)
        edges = self.budget_buckets
        _require(isinstance(edges, (list, tuple)) and all(_is_pos(e) for e in edges)
                 and list(edges) == sorted(set(edges)),
                 f"budget_buckets must be increasing average-bit edges such as [2.75, 3.5, 4.5], but got {edges!r}.")
        object.__setattr__(self, "budget_buckets", tuple(float(e) for e in edges))
        _require(isinstance(self.search, Mapping), f"'search' must be a mapping, but got {self.search!r}.")
        object.__setattr__(self, "search", dict(self.search))
        from_space = {_SPACE_TO_SEARCH.get(n, n) for n in self.space.dims} - {None}
        clash = sorted(set(self.search) & (_SEARCH_FROM_SWEEP | from_space))
        _require(not clash, f"search.{clash[0] if clash else ''} is set by the sweep (space, candidates or seed); "
                            "move it to 'space' (e.g. as a fixed value) or to the top level.")
        self._check_space()

    def _check_space(self) -> None:
        sp = self.space
        if sp.is_empty():
            raise ConfigError("The search space is empty: give at least 'budget_avg_bits' and one searched "
                              "dimension under 'space' (see search_spaces/presets/demo.yaml).")
        _require("budget_avg_bits" in sp, "The search space needs 'budget_avg_bits' (a range such as "
                                          "{type: float, low: 2.5, high: 5.0}, or a fixed value).")
        if not sp.varying() and self.n_trials > 1:
            raise ConfigError(f"The search space has no dimension that varies, so the {self.n_trials} trials "
                              "would all be identical: make one dimension a range or a list, or set n_trials: 1.")
        if "proxy_size" in sp:
            _require(sp.possible_values("proxy_size") is not None,
                     "'proxy_size' must be a fixed value or a list (teachers are trained once per proxy size "
                     f"before the sweep), but got {sp['proxy_size']!r}.")

    # -- resolved paths ------------------------------------------------------------------------------
    @property
    def sweep_dir(self) -> Path:
        return Path(self.out_dir or os.path.join("runs", self.name)).expanduser().resolve()

    def resolved(self) -> "SweepConfig":
        """A copy with every None path/URI made concrete (what is saved with the sweep)."""
        d = self.sweep_dir
        local = self.storage_path and "://" not in self.storage_path     # a folder, not a URI (s3://, gs://)
        return replace(self, out_dir=str(d),
                       tracking_uri=absolute_sqlite(self.tracking_uri or env_tracking_uri())
                       or f"sqlite:///{d / 'mlflow.db'}",
                       optuna_storage=absolute_sqlite(self.optuna_storage) or f"sqlite:///{d / 'optuna.db'}",
                       storage_path=absolute_path(self.storage_path) if local else
                       self.storage_path or str(d / "ray_results"),
                       cache_dir=str(Path(self.cache_dir or os.environ.get("GMPQ_CACHE_DIR")
                                          or (d / "cache" if self.address else default_cache_dir()))
                                     .expanduser().resolve()),
                       data_root=absolute_path(self.data_root),          # absolute: trials run in their own folders
                       proxy_dataset=canonical_dataset_name(self.proxy_dataset),
                       target_dataset=canonical_dataset_name(self.target_dataset),
                       model=canonical_model_name(self.model))      # a user's model file: its absolute path

    def proxy_sizes(self) -> tuple:
        """Every proxy size a trial may use (None = the whole proxy train split)."""
        return self.space.possible_values("proxy_size") or (None,)

    # -- (de)serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": CONFIG_VERSION}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "candidates":
                v = {"w_bits": list(v.w_bits), "a_bits": list(v.a_bits)}
            elif f.name == "space":
                v = v.to_dict()
            elif f.name in ("resources", "finetune", "transfer"):
                v = {g.name: getattr(v, g.name) for g in fields(v)}
            elif f.name in ("pruner", "sampler"):
                v = {"name": v.name, "kwargs": dict(v.kwargs)}
            elif f.name == "budget_buckets":
                v = list(v)
            elif f.name == "search":
                v = dict(v)
            elif f.name == "testing":
                if v == FaultInjection():    # internal test hooks: saved only when set
                    continue
                v = v.to_dict()
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SweepConfig":
        _require(isinstance(d, Mapping), f"A sweep config must be a mapping, but got {type(d).__name__}.")
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        _require(version == CONFIG_VERSION, f"Unsupported sweep config version {version!r}; this gmpq reads "
                                            f"version {CONFIG_VERSION}.")
        d.pop("preset", None)
        check_placement("", d)               # a section's key at the top level: where it belongs, not a look-alike
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        for key in sorted(set(unknown) & set(_NOT_SETTINGS)):
            raise ConfigError(f"'{key}' is not a sweep config key: {_NOT_SETTINGS[key]}")
        _require(not unknown, f"Unknown sweep config key(s) {unknown}.{did_you_mean(unknown, known)} "
                              f"Known keys: {sorted(known - {'testing'})}.")   # the tests' hooks, not shown
        return cls(**d)


def check_trial_count(cfg: SweepConfig) -> None:
    """A space of lists only holds a few distinct configurations: more trials than that would repeat one exactly
    (the same seed gives the same result). Checked when a sweep starts (``check_sweep_config``), not as a config
    loads: a sweep begun before this check keeps its resume."""
    sp = cfg.space
    varying = sp.varying()
    if not varying or any(sp.possible_values(n) is None for n in varying):
        return
    points = math.prod(len(sp.possible_values(n)) for n in varying)
    lists = ", ".join(f"{n} {list(sp.possible_values(n))}" for n in varying)
    _require(cfg.n_trials <= points,
             f"The search space has at most {points} distinct configurations ({lists}), "
             f"but n_trials is {cfg.n_trials}: the other trials would repeat one of them exactly (the same "
             f"seed gives the same result). Set n_trials: {points} or fewer, or make a dimension a range "
             "(e.g. eta: {type: float, low: 1, high: 100, log: true}).")


def absolute_sqlite(url: str | None) -> str | None:
    """``sqlite:///relative.db`` made absolute against the working directory (``sqlite:////abs/relative.db``), as
    a sweep saves it: a resume, ``gmpq status`` or a trial started elsewhere opened another file. Other URLs, an
    absolute path and ``:memory:`` unchanged."""
    if not url or not url.lower().startswith("sqlite:///"):
        return url
    path, sep, query = url[len("sqlite:///"):].partition("?")
    if not path or path.startswith("/") or path == ":memory:":
        return url
    return f"sqlite:///{absolute_path(path)}{sep}{query}"


def _unquote(value: Any) -> str:
    """The end of a message about ``value``: for a whole number written in quotes ('7'), how to write it."""
    if isinstance(value, str) and value.strip().isdigit():
        return f" (a string: write {value.strip()} without quotes)."
    return "."


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``: nested mappings key by key, anything else replaced.

    A ``pruner`` (or a space dimension) that names a new ``name`` (``type``) replaces the old one
    whole, so its arguments do not mix with the previous pruner's (dimension's).
    """
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        old = out.get(k)
        atomic = isinstance(v, Mapping) and isinstance(old, Mapping) and any(
            key in v and v[key] != old.get(key) for key in ("name", "type"))
        if isinstance(v, Mapping) and isinstance(old, Mapping) and not atomic:
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return nested


def load_sweep_config(path: str | os.PathLike | None = None, preset: str | None = None,
                      overrides: Mapping[str, Any] | None = None) -> SweepConfig:
    """preset <- YAML file <- overrides (None values ignored; dotted keys reach nested sections)."""
    data: dict[str, Any] = {}
    if preset is not None:
        data = load_preset(preset)
    if path is not None:
        file_data = load_yaml(path)
        _require(isinstance(file_data, Mapping), f"'{path}' must contain a YAML mapping at the top level.")
        if "preset" in file_data and preset is None:
            data = load_preset(file_data["preset"])
        file_data = saved_before_precision(file_data)
        data = deep_merge(data, _own_folder(path, file_data, (overrides or {}).get("out_dir")))
    if not data:
        raise ConfigError("No sweep config given: pass --config FILE or --preset NAME "
                          "(see 'gmpq sweep --help' for the presets).")
    data = deep_merge(data, _nest(overrides or {}))
    return SweepConfig.from_dict(data)


def saved_before_precision(file_data: Mapping[str, Any]) -> Mapping[str, Any]:
    """A sweep's saved config written before the ``precision`` key existed: that sweep trained in float32
    everywhere (GPUs included), so it resumes and fine-tunes in float32, not under today's ``auto``."""
    from .moved_sweep import recorded_dir

    if "precision" in file_data or recorded_dir(file_data) is None:
        return file_data
    return {**file_data, "precision": "fp32"}


def _own_folder(path: str | os.PathLike, file_data: Mapping[str, Any], out_dir: Any) -> dict[str, Any]:
    """A saved sweep config used for another folder (``--out`` elsewhere, or the folder it lies in moved or
    copied) keeps none of the recorded folder's stores: see ``moved_sweep``."""
    from .moved_sweep import follow_folder, looks_like_sweep_folder, recorded_dir

    recorded = recorded_dir(file_data)
    if recorded is None:
        return dict(file_data)
    if out_dir is not None:
        return follow_folder(file_data, out_dir)
    here = Path(path).expanduser().resolve().parent
    if Path(path).name == "sweep_config.yaml" and looks_like_sweep_folder(here):   # the sweep's own file, moved
        return follow_folder(file_data, here, tell=True)
    return dict(file_data)


def trial_search_config(cfg: SweepConfig, params: Mapping[str, Any]) -> Any:
    """The ``SearchConfig`` of one trial: the sweep's fixed ``search`` part + the trial's ``params``."""
    from gmpq_core.complexity import Budget
    from gmpq_core.search_config import SearchConfig

    kw: dict[str, Any] = dict(cfg.search)
    for name in ("eta", "lam", "p_mode", "kappa", "p_fixed", "lr_arch", "lr"):
        if name in params:
            kw[name] = params[name]
    if "search_epochs" in params:
        kw["epochs"] = int(params["search_epochs"])
    try:
        return SearchConfig(candidates=cfg.candidates, budget=Budget(avg_bits=float(params["budget_avg_bits"])),
                            seed=cfg.seed, **kw)
    except ConfigError as e:          # a key of the config's search section: named as written there
        from .common_args import naming_section

        overridden = {*params, *(("epochs",) if "search_epochs" in params else ())}    # the trial's own values
        raise naming_section(e, "search", [k for k in cfg.search if k not in overridden]) from None


def is_local_cpu_sweep(cfg: SweepConfig) -> bool:
    """A sweep on this machine's CPUs only: its trials share the driver's cores and sweep folder."""
    return cfg.address is None and not cfg.resources.gpu


def save_resolved_config(cfg: SweepConfig) -> Path:
    """Write ``<out_dir>/sweep_config.yaml`` (atomic) with every default made concrete."""
    import yaml

    from gmpq_core.fileio import atomic_write_text

    resolved = cfg.resolved()
    text = yaml.safe_dump(resolved.to_dict(), sort_keys=False, default_flow_style=None)
    return atomic_write_text(Path(resolved.out_dir) / "sweep_config.yaml", text)
