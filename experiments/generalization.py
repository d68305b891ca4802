"""The generalization study: does a policy searched on a small proxy transfer (the claim of GMPQ: Wang et al., ICCV
2021, "Generalizable Mixed-Precision Quantization via Attribution Rank Preservation")?

A grid of cells (method x proxy x budget x seed). Each cell: get a bit policy (search it on the
proxy, or uniform / random at the budget), fine-tune it on the FULL target with one fixed recipe
starting from the target FP model, evaluate it on the target test set. Methods:

    gmpq            capacity-aware p = kappa * mean_l 1 / (E[b_w] E[b_a])     (ours, the paper's claim)
    gmpq_fixed_p3   p fixed at 3                                              (official released default)
    eta0            eta = 0: no attribution loss (EdMIPS on the proxy; first-order Grad-CAM, same gradients)
    target_search   the gmpq search on the whole target training set          (the expensive reference)
    uniform         the largest uniform WbAb with b*b <= budget^2             (no search)
    random          random per-layer architecture probabilities -> argmax + budget repair (sanity floor)

This module is pure PyTorch + gmpq_core (no Ray): ``StudyConfig``, ``expand_grid``, ``prepare_models``
(target FP model and one FP teacher per proxy, cached on disk) and ``run_cell``. The Ray Tune
runner is ``experiments.generalization_ray``; the analysis is ``orchestrator.study``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from gmpq_core.errors import BudgetInfeasibleError, ConfigError, did_you_mean
from gmpq_core.policy import BitCandidates
from gmpq_core.precision import check_precision, resolve_precision

__all__ = ["METHODS", "SEARCHED", "TARGET_PROXY", "NO_PROXY", "ProxySpec", "FPRecipe", "StudyConfig",
           "load_study_config", "check_same_study_config", "check_study_data", "expand_grid", "cell_id",
           "uniform_bits", "cost_summary", "smoke_version"]

# Search overrides per searched method (on top of StudyConfig.search).
SEARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "gmpq": {"p_mode": "capacity"},
    "gmpq_fixed_p3": {"p_mode": "fixed", "p_fixed": 3.0},
    "eta0": {"eta": 0.0, "second_order": False},   # L_gen weight 0: identical gradients, no 2nd-order graph
    "target_search": {"p_mode": "capacity"},
}
METHODS = ("gmpq", "gmpq_fixed_p3", "eta0", "target_search", "uniform", "random")
SEARCHED = ("gmpq", "gmpq_fixed_p3", "eta0", "target_search")
PER_PROXY = ("gmpq", "gmpq_fixed_p3", "eta0")
TARGET_PROXY = "target"   # proxy column of target_search cells
NO_PROXY = "none"         # proxy column of uniform / random cells


def _int(name: str, v: Any, minimum: int, *, optional: bool = False) -> None:
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}{' or null' if optional else ''}, "
                          f"but got {name}={v!r}.")


@dataclass(frozen=True, kw_only=True)
class ProxySpec:
    """A proxy: ``size`` stratified training images of ``dataset`` (null = its whole training split)."""
    name: str
    dataset: str
    size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name in (TARGET_PROXY, NO_PROXY) \
                or "|" in self.name:
            raise ConfigError(f"proxy name must be a short non-empty string other than '{TARGET_PROXY}' / "
                              f"'{NO_PROXY}' and without '|', but got name={self.name!r} (e.g. 'fmnist500').")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError(f"proxy dataset must be a dataset name like 'fashion_mnist', but got {self.dataset!r}.")
        _int(f"size of proxy '{self.name}'", self.size, 10, optional=True)


@dataclass(frozen=True, kw_only=True)
class FPRecipe:
    """FP training of the target model / the teachers: ``steps`` SGD steps (whole epochs, the last one
    cut) at ``batch_size``, cosine from ``lr`` (gmpq_core.train.train_fp)."""
    steps: int = 300
    batch_size: int = 128
    lr: float = 0.1

    def __post_init__(self) -> None:
        _int("steps", self.steps, 1)
        _int("batch_size", self.batch_size, 1)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"lr must be a number > 0, but got lr={self.lr!r}.")


def _recipe(value: Any, what: str) -> FPRecipe:
    if isinstance(value, FPRecipe):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} must be a mapping {{steps, batch_size, lr}}, but got {value!r}.")
    unknown = sorted(set(value) - {f.name for f in fields(FPRecipe)})
    if unknown:
        raise ConfigError(f"Unknown keys {unknown} in {what}.{did_you_mean(unknown, ('steps', 'batch_size', 'lr'))} "
                          "Valid: steps, batch_size, lr.")
    return FPRecipe(**dict(value))


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """The whole study. ``search`` holds the fixed SearchConfig fields (method overrides go on top;
    ``target_search`` overrides apply to the target-set search only); ``finetune`` the FinetuneConfig
    fields (the seed is the cell's). ``test_size``: target test images used (null = all, stratified
    subset otherwise); ``proxy_eval_size``: proxy test images for the proxy-side top-1 and ARD;
    ``ard_images``: target test images for the target-side ARD of the fine-tuned model."""
    name: str = "generalization"
    model: str = "resnet20"
    small_input: bool = True
    image_size: int | None = None
    target: str = "fashion_mnist"
    data_root: str | None = None
    proxies: tuple[ProxySpec, ...] = ()
    budgets: tuple[float, ...] = (3.0,)
    seeds: tuple[int, ...] = (0, 1)
    methods: tuple[str, ...] = METHODS
    candidates: BitCandidates = field(default_factory=BitCandidates)
    search: Mapping[str, Any] = field(default_factory=dict)
    target_search: Mapping[str, Any] = field(default_factory=dict)
    finetune: Mapping[str, Any] = field(default_factory=dict)
    target_fp: FPRecipe = field(default_factory=FPRecipe)
    teacher: FPRecipe = field(default_factory=lambda: FPRecipe(steps=100))
    proxy_seed: int = 0
    proxy_eval_size: int | None = 1000
    test_size: int | None = None
    ard_images: int = 256
    resources: Mapping[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_concurrent_trials: int = 2
    tracking_uri: str | None = None
    notes: str = ""
    precision: str = "auto"          # gmpq_core.precision: auto (bf16 on a GPU with bfloat16), fp32, bf16

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        from .generalization_axes import budget_list, method_list, proxy_entries, resources_mapping, seed_list
        set_("proxies", tuple(p if isinstance(p, ProxySpec) else ProxySpec(**p) for p in proxy_entries(self.proxies)))
        set_("candidates", BitCandidates.from_any(self.candidates))
        set_("target_fp", _recipe(self.target_fp, "target_fp"))
        set_("teacher", _recipe(self.teacher, "teacher"))
        set_("budgets", budget_list(self.budgets))   # lists of the right values, each once (a repeated seed counted
        set_("seeds", seed_list(self.seeds))         # twice in every standard error and verdict)
        set_("methods", method_list(self.methods, METHODS))
        set_("resources", resources_mapping(self.resources))
        check_precision(self.precision)
        from gmpq_core.models import check_model
        set_("model", check_model(self.model))       # a user's PATH.py:FUNCTION made absolute
        names = [p.name for p in self.proxies]
        if len(set(names)) != len(names):
            raise ConfigError(f"proxy names must be unique, but got {names}.")
        if any(m in PER_PROXY for m in self.methods) and not self.proxies:
            raise ConfigError("methods gmpq / gmpq_fixed_p3 / eta0 need at least one proxy under 'proxies'.")
        for name, lo, opt in (("proxy_seed", 0, False), ("proxy_eval_size", 10, True), ("test_size", 10, True),
                              ("ard_images", 0, False), ("max_concurrent_trials", 1, False),
                              ("image_size", 4, True)):
            _int(name, getattr(self, name), lo, optional=opt)
        for key in ("search", "target_search", "finetune"):
            if not isinstance(getattr(self, key), Mapping):
                raise ConfigError(f"'{key}' must be a mapping of settings, but got {getattr(self, key)!r}.")
            set_(key, dict(getattr(self, key)))
        for key in ("budget", "candidates", "seed"):
            if key in self.search or key in self.target_search:
                raise ConfigError(f"'search.{key}' is set by the study (budgets / candidates / seeds); remove it.")
        if "seed" in self.finetune:
            raise ConfigError("'finetune.seed' is set per cell from 'seeds'; remove it.")
        searched = any(m in SEARCHED for m in self.methods)
        from gmpq_core.search_config import SearchConfig

        for b in self.budgets:          # every budget against the candidates, uniform and random cells too (under the
            try:                        # lowest: each failed after the FP models trained; over the highest: it ran the
                                        # highest bits, labelled with a budget it does not have)
                self.search_config("gmpq", b, 0) if searched else SearchConfig.from_dict(
                    {"candidates": self.candidates, "budget": {"avg_bits": b}, "seed": 0})
            except BudgetInfeasibleError as e:
                raise ConfigError(f"budgets: {b!r} cannot be {'searched' if searched else 'reached'}: {e} In a study "
                                  "config the candidates are its top-level 'candidates:' key; or drop this "
                                  "budget.") from None
        self.finetune_config(0)

    # -- derived configs ------------------------------------------------------------------------
    def search_config(self, method: str, budget: float, seed: int):
        from gmpq_core.search_config import SearchConfig
        d = {**self.search, **SEARCH_OVERRIDES[method]}
        if method == "target_search":
            d.update(self.target_search)
        return SearchConfig.from_dict({**d, "candidates": self.candidates, "budget": {"avg_bits": budget},
                                       "seed": int(seed)})

    def finetune_config(self, seed: int):
        from gmpq_core.finetune import FinetuneConfig
        known = {f.name for f in fields(FinetuneConfig)}
        unknown = sorted(set(self.finetune) - known)
        if unknown:
            raise ConfigError(f"Unknown finetune keys {unknown}.{did_you_mean(unknown, known - {'seed'})} "
                              f"Valid: {', '.join(sorted(known - {'seed'}))}.")
        return FinetuneConfig(**{**self.finetune, "seed": int(seed)})

    def proxy(self, name: str) -> ProxySpec:
        if name == TARGET_PROXY:
            return ProxySpec(name="target_full", dataset=self.target, size=None)
        for p in self.proxies:
            if p.name == name:
                return p
        raise ConfigError(f"Unknown proxy '{name}'; the study has {[p.name for p in self.proxies]}.")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": 1}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "proxies":
                v = [{"name": p.name, "dataset": p.dataset, "size": p.size} for p in v]
            elif f.name == "candidates":
                v = {"w_bits": list(v.w_bits), "a_bits": list(v.a_bits)}
            elif isinstance(v, FPRecipe):
                v = {"steps": v.steps, "batch_size": v.batch_size, "lr": v.lr}
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StudyConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"a study config must be a mapping, but got {type(d).__name__}.")
        d = dict(d)
        version = d.pop("version", 1)
        if version != 1:
            raise ConfigError(f"Unsupported study config version {version!r}; this tool reads version 1.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown and {"space", "n_trials"} & set(unknown):       # a sweep config handed to gmpq study
            raise ConfigError(f"This is a sweep config (it has {sorted({'space', 'n_trials'} & set(unknown))}), not "
                              "a study config: run it with gmpq sweep --config FILE. A study config lists proxies, "
                              "budgets, seeds and methods (experiments/generalization*.yaml).")
        if unknown:
            raise ConfigError(f"Unknown study config keys {unknown}.{did_you_mean(unknown, known)} "
                              f"Valid keys: {', '.join(sorted(known))}.")
        return cls(**d)


def load_study_config(path: str | Path) -> StudyConfig:
    """Read a study YAML file; a malformed file gives ConfigError with its line and column."""
    from search_spaces.presets import load_yaml

    return StudyConfig.from_dict(load_yaml(path) or {})


_RESUMABLE_KEYS = frozenset({"methods", "budgets", "seeds", "name", "resources", "max_concurrent_trials",
                             "tracking_uri", "notes"})


def _same_shared_proxies(old: Any, new: Any) -> bool:
    """Proxies may be added or dropped (a cell id names its proxy), but one name keeps one spec."""
    before = {p.get("name"): p for p in old or []}
    return all(before[p.get("name")] == p for p in new or [] if p.get("name") in before)


RESUME_FIX = "Resume with the same config, or pass another --out."


def check_same_study_config(cfg: StudyConfig, study_dir: str | Path, rows_file: str, *, fix: str = RESUME_FIX) -> None:
    """Rows already in ``study_dir`` (``rows_file``) must come from the same config: a resumed study
    never mixes two settings. The grid axes a cell id names (methods, budgets, seeds, proxies: a proxy
    name keeps its spec) may grow or shrink, and how cells are run (name, resources, concurrency,
    tracking, notes) may change; any other difference is a ConfigError naming the keys and ending with ``fix``
    (a run's: resume with the same config, or another --out)."""
    import yaml

    out = Path(study_dir)
    saved = out / "study_config.yaml"
    if not (saved.is_file() and (out / rows_file).is_file()):
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    old.setdefault("precision", "fp32")            # a study saved before the key ran float32 everywhere
    from .generalization_cells import _device      # "auto" and "fp32" are the same on a CPU
    for d in (old, new):
        d["precision"] = resolve_precision(d["precision"], _device(cfg))
    diff = sorted(k for k in set(old) | set(new) if k not in _RESUMABLE_KEYS and old.get(k) != new.get(k)
                  and not (k == "proxies" and _same_shared_proxies(old.get(k), new.get(k))))
    if diff:
        raise ConfigError(f"'{out}' holds rows of a study whose config differs in {', '.join(diff)} from this one "
                          f"(saved in '{saved}'). {fix}")


def _check_dataset_name(name: str, where: str) -> None:
    from gmpq_core.data import DATASETS, check_dataset_name, other_dataset_title

    try:
        check_dataset_name(name)
    except ConfigError as e:       # a typo gets the closest name; a dataset gmpq lacks is named as such, not "corrected"
        hint = "" if other_dataset_title(name) else did_you_mean([name], DATASETS)
        raise ConfigError(f"In the study config, {where}: {e}{hint}") from None


def check_study_data(cfg: StudyConfig) -> None:
    """The datasets a study names, checked as ``gmpq sweep`` checks its own before Ray starts (and before the
    study folder is written): known names (target, each proxy's), each proxy's size within its training split
    and not below its classes, ``test_size`` within the target's test split, and proxies with the target's
    classes and channels (a teacher trained on a proxy is loaded as the target's model). ConfigError naming the
    key; reads the dataset files (downloading one the first time, as a study would)."""
    from gmpq_core.data import check_subset_size, load_dataset

    _check_dataset_name(cfg.target, "target")
    for p in cfg.proxies:
        _check_dataset_name(p.dataset, f"the dataset of proxy '{p.name}'")
    target = load_dataset(cfg.target, root=cfg.data_root, image_size=cfg.image_size)
    ti, n_test = target.info, len(target.test)
    check_subset_size(cfg.test_size, n_test, ti.num_classes, "test_size", cfg.target, "test", role="target")
    for p in cfg.proxies:
        bundle = load_dataset(p.dataset, root=cfg.data_root, image_size=cfg.image_size)
        pi = bundle.info
        check_subset_size(p.size, len(bundle.train), pi.num_classes, f"proxy '{p.name}': size", p.dataset, "training")
        if (pi.num_classes, pi.in_channels) != (ti.num_classes, ti.in_channels):
            raise ConfigError(f"proxy '{p.name}' ({p.dataset}: {pi.num_classes} classes, {pi.in_channels} "
                              f"channel(s)) does not match the target '{cfg.target}' ({ti.num_classes} classes, "
                              f"{ti.in_channels} channel(s)): the teacher trained on a proxy is loaded as the target's "
                              "model. Use a proxy dataset with the target's classes and channels.")


# -- the grid ---------------------------------------------------------------------------------
def cell_id(method: str, proxy: str, budget: float, seed: int) -> str:
    return f"{method}|{proxy}|b{budget:g}|s{seed}"


def expand_grid(cfg: StudyConfig) -> list[dict[str, Any]]:
    """Every cell as {cell_id, method, proxy, budget, seed}; per-proxy methods at every proxy, the
    others (target_search, uniform, random) once per budget and seed."""
    cells = []
    for budget in cfg.budgets:
        for seed in cfg.seeds:
            for method in cfg.methods:
                proxies = ([p.name for p in cfg.proxies] if method in PER_PROXY
                           else [TARGET_PROXY] if method == "target_search" else [NO_PROXY])
                for proxy in proxies:
                    cells.append({"cell_id": cell_id(method, proxy, budget, seed), "method": method,
                                  "proxy": proxy, "budget": float(budget), "seed": int(seed)})
    return cells


def uniform_bits(candidates: BitCandidates, avg_bits: float) -> tuple[int, int]:
    """The largest uniform WbAb (b a candidate for both weights and activations) with b*b <= avg_bits^2,
    i.e. the uniform policy that fits a budget of ``avg_bits`` average bits."""
    common = sorted(set(candidates.w_bits) & set(candidates.a_bits))
    fits = [b for b in common if b * b <= avg_bits * avg_bits * (1 + 1e-9)]
    if not fits:
        raise BudgetInfeasibleError(f"no uniform WbAb with b in {common} fits a budget of {avg_bits:g} average "
                                    f"bits; raise the budget or add a lower candidate.")
    return fits[-1], fits[-1]


def cost_summary(cfg: StudyConfig) -> dict[str, int]:
    """How many cells of each kind the grid has (for the log and the sizing note)."""
    cells = expand_grid(cfg)
    return {"cells": len(cells), "searches": sum(c["method"] in SEARCHED for c in cells),
            "finetunes": len(cells)}



def smoke_version(cfg: StudyConfig) -> StudyConfig:
    """``cfg`` shrunk to minutes (the same code paths): 1 budget, at most 2 proxies and 2 seeds,
    a couple of steps everywhere, small evaluation sets, and ``<name>_smoke`` as its name."""
    d = cfg.to_dict()
    d.update(name=f"{cfg.name}_smoke", budgets=list(cfg.budgets[:1]), seeds=list(cfg.seeds[:2]),
             proxies=d["proxies"][:2], proxy_eval_size=100, test_size=200, ard_images=16,
             target_fp={**d["target_fp"], "steps": 8}, teacher={**d["teacher"], "steps": 4})
    d["search"] = {**d["search"], "epochs": 1, "max_steps_per_epoch": 1, "recalibrate_bn_batches": 1}
    d["target_search"] = {k: v for k, v in d["target_search"].items() if k not in ("epochs", "max_steps_per_epoch")}
    d["finetune"] = {**d["finetune"], "epochs": 1, "max_steps_per_epoch": 2}
    return StudyConfig.from_dict(d)
