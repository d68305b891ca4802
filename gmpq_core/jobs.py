"""The one thin entry point the CLI and the Ray trainable both call: ``run_search_job(SearchJob)``.

A job names a model and a proxy dataset; it loads the stratified proxy subset, trains (or loads
from the on-disk cache) the FP teacher on it, and runs ``search_policy``. The returned policy's
``meta`` carries what ``gmpq finetune`` needs to rebuild the model: model, dataset, in_channels,
num_classes, small_input, input_size, budget.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from .attribution import check_gradcam_layer
from .bitops import layer_macs
from .complexity import check_budget
from .data import canonical_data_source, load_dataset, make_loader, proxy
from .errors import CheckpointError, ConfigError, did_you_mean
from .fileio import default_cache_dir, load_checkpoint, load_model_state, save_checkpoint
from .layers import searchable_layers
from .models import build_model, check_model, model_file_tag, model_source_key
from .names import SEARCH_DATASET, SEARCH_MODEL
from .policy import BitPolicy
from .precision import check_precision, resolve_precision
from .reporting import Reporter
from .search import search_policy
from .search_config import SearchConfig, SearchResult
from .train import TrainConfig, evaluate, seeded, train_fp

__all__ = ["SearchJob", "Teacher", "weak_below", "weak_rule", "load_teacher", "get_teacher", "teacher_cache_path",
           "teacher_cached", "check_job_budget", "check_job", "run_search_job"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
TEACHER_CACHE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class SearchJob:
    """A search on a proxy dataset. ``proxy_size=None`` uses the whole training split; ``eval_size``
    test images (stratified; None = the whole test split, 0 = none) measure ``proxy_top1``."""
    model: str = SEARCH_MODEL
    dataset: str = SEARCH_DATASET
    data_root: str | None = None
    proxy_size: int | None = 2000
    proxy_seed: int = 0
    small_input: bool = True
    teacher_epochs: int = 3
    teacher_batch_size: int = 128
    cache_dir: str = field(default_factory=default_cache_dir)
    device: str = "cpu"
    precision: str = "auto"                  # precision.py: auto (bf16 on a GPU with bfloat16), fp32, bf16
    search: SearchConfig = field(default_factory=SearchConfig)
    eval_size: int | None = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.search, SearchConfig):
            object.__setattr__(self, "search", SearchConfig.from_dict(self.search or {}))
        object.__setattr__(self, "model", check_model(self.model))      # a user's file: its absolute path
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError(f"dataset must be a dataset name such as 'fashion_mnist', but got {self.dataset!r}.")
        for name, minimum, optional in (("proxy_size", 1, True), ("proxy_seed", 0, False),
                                        ("teacher_epochs", 1, False), ("eval_size", 0, True),
                                        ("teacher_batch_size", 1, False)):
            v = getattr(self, name)
            if (v is None and optional) or (isinstance(v, int) and not isinstance(v, bool) and v >= minimum):
                continue
            raise ConfigError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, but got "
                              f"{name}={v!r}.")
        if not isinstance(self.small_input, bool):
            raise ConfigError(f"small_input must be true or false, but got small_input={self.small_input!r}.")
        check_precision(self.precision)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["search"] = self.search.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchJob":
        """Job keys at the top level, search keys under ``search:`` (or, for convenience, at the top level)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a search job must be a mapping of its fields, but got {type(d).__name__}.")
        job_keys = {f.name for f in fields(cls)} - {"search"}
        search_keys = {f.name for f in fields(SearchConfig)}
        nested = d.get("search") or {}
        if not isinstance(nested, Mapping):
            raise ConfigError(f"'search' must be a mapping of search settings, but got {nested!r}.")
        unknown = sorted(set(d) - job_keys - search_keys - {"search"})
        if unknown:
            raise ConfigError(f"Unknown keys {unknown} in the search job.{did_you_mean(unknown, job_keys | search_keys)} "
                              f"Job keys: {', '.join(sorted(job_keys))}; "
                              f"search keys (top level or under 'search'): {', '.join(sorted(search_keys))}.")
        search = {**{k: v for k, v in d.items() if k in search_keys}, **dict(nested)}
        return cls(**{k: v for k, v in d.items() if k in job_keys}, search=SearchConfig.from_dict(search))


def _load_data(job: SearchJob):
    bundle = load_dataset(job.dataset, root=job.data_root)
    return bundle, proxy(bundle.train, job.proxy_size, job.proxy_seed)


def _teacher_key(job: SearchJob, info: Any) -> dict[str, Any]:
    dataset, root = canonical_data_source(job.dataset, job.data_root)   # no working-directory dependence
    return {"version": TEACHER_CACHE_VERSION, "model": job.model, "dataset": dataset,
            "data_root": root, "proxy_size": job.proxy_size, "proxy_seed": job.proxy_seed,
            "teacher_epochs": job.teacher_epochs, "seed": job.search.seed, "small_input": job.small_input,
            "batch_size": job.teacher_batch_size, "image_size": info.image_size,
            "in_channels": info.in_channels, "num_classes": info.num_classes,
            **model_source_key(job.model)}


def teacher_cache_path(job: SearchJob, info: Any) -> Path:
    """``<cache_dir>/teachers/<model>-<dataset>-<hash>.pt`` (hash of the teacher's recipe and data; not of the
    device or the precision, which change its rounding, not its recipe: the precision it was trained in is
    recorded in the entry's meta)."""
    digest = hashlib.sha256(json.dumps(_teacher_key(job, info), sort_keys=True).encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", job.dataset)[:40]
    return Path(job.cache_dir).expanduser() / "teachers" / f"{model_file_tag(job.model)}-{safe}-{digest}.pt"


def teacher_cached(job: SearchJob) -> bool:
    """Whether ``get_teacher(job)`` would load its teacher from the cache (no training)."""
    return teacher_cache_path(job, _load_data(job)[0].info).is_file()


def _fresh_model(job: SearchJob, info: Any) -> nn.Module:
    with seeded(job.search.seed):
        return build_model(job.model, num_classes=info.num_classes, in_channels=info.in_channels,
                           small_input=job.small_input, input_size=getattr(info, "image_size", None))


def check_job_budget(job: SearchJob, *, label: str | None = None, model: nn.Module | None = None,
                     info: Any = None) -> int | None:
    """The job's budget in BitOPs (None without one); BudgetInfeasibleError before any training if
    the candidates cannot meet it on this model and input size (``label``: what the message calls the budget,
    e.g. the flag that gave it; ``model``: a fresh model of the job, built here when not given; ``info``: its
    dataset's, loaded here when not given)."""
    if job.search.budget is None:
        return None
    info = load_dataset(job.dataset, root=job.data_root).info if info is None else info
    model = _fresh_model(job, info) if model is None else model
    all_macs = layer_macs(model, info.image_size, info.in_channels)
    macs = {n: all_macs[n] for n in searchable_layers(model)}
    budget = job.search.budget.to_bitops(macs)
    check_budget(budget, macs, job.search.candidates, model_name=job.model, input_size=info.image_size, label=label)
    return budget


def check_job(job: SearchJob, *, gradcam_where: str, budget_label: str | None = None) -> int | None:
    """Everything about ``job`` that needs its model, checked before any training: the model builds (a user's
    builder that raises is a ConfigError), its Grad-CAM layer resolves as the search resolves it
    (``attribution.check_gradcam_layer``; ``gradcam_where`` names where ``search.gradcam_layer`` was set) and the
    budget is feasible (``check_job_budget``, ``budget_label``). Returns the budget in BitOPs (None without one)."""
    info = load_dataset(job.dataset, root=job.data_root).info
    model = _fresh_model(job, info)
    check_gradcam_layer(model, model_name=job.model, override=job.search.gradcam_layer, input_size=info.image_size,
                        in_channels=info.in_channels, override_where=gradcam_where)
    return check_job_budget(job, label=budget_label, model=model, info=info)      # the dataset loaded once


TEACHER_TEST_IMAGES = 1000   # held-out test images (stratified, proxy_seed) that measure every teacher


def weak_below(num_classes: int) -> float:
    """The top-1 (%) under which an FP model counts as weak: halfway between chance and 100%."""
    chance = 100.0 / num_classes
    return chance + 0.5 * (100.0 - chance)


def weak_rule(num_classes: int) -> str:
    """The rule in words, for the warnings: "below 55% (halfway between chance, 10%, and 100%)"."""
    return f"below {weak_below(num_classes):.3g}% (halfway between chance, {100.0 / num_classes:.3g}%, and 100%)"


@dataclass(frozen=True)
class Teacher:
    """The FP teacher of a job and how good it is: ``test_top1`` (%) on ``test_images`` held-out test
    images (``TEACHER_TEST_IMAGES`` stratified ones, whatever the job's ``eval_size``, so the figure kept
    in the cache means the same for every job), ``train_top1`` on the proxy, the training ``seconds``,
    and whether it came from the cache."""
    model: nn.Module
    test_top1: float
    test_images: int
    train_top1: float | None
    seconds: float
    cached: bool
    num_classes: int

    @property
    def weak_below(self) -> float:
        """The top-1 (%) under which a teacher counts as weak: ``weak_below(num_classes)``."""
        return weak_below(self.num_classes)

    def weak_message(self, job: SearchJob) -> str | None:
        """A one-paragraph warning when ``test_top1`` is below ``weak_below``, else None."""
        if self.test_top1 >= self.weak_below:
            return None
        return (f"The FP teacher of {job.model} on {job.proxy_size or 'all'} {job.dataset} proxy images reaches only "
                f"{self.test_top1:.1f}% top-1 on {self.test_images} held-out test images, "
                f"{weak_rule(self.num_classes)}. GMPQ keeps the supernet's Grad-CAM maps close to "
                f"this teacher's, so a weak teacher gives the search little to preserve. Raise teacher_epochs (now "
                f"{job.teacher_epochs}: `gmpq search --teacher-epochs E`, or `teacher_epochs:` in a sweep config) or "
                f"use a larger proxy (proxy_size); the teacher is cached, so its training is paid once.")


def _eval_loader(job: SearchJob, bundle: Any, split: Any) -> Any:
    return make_loader(split, bundle.info, batch_size=max(job.search.batch_size, 256), train=False, device=job.device)


def _teacher_test_top1(job: SearchJob, bundle: Any, model: nn.Module) -> tuple[float, int]:
    split = proxy(bundle.test, min(TEACHER_TEST_IMAGES, len(bundle.test)), job.proxy_seed)
    top1 = evaluate(model, _eval_loader(job, bundle, split), device=job.device, precision=job.precision)["top1"]
    return float(top1), len(split)


def _cached_teacher(job: SearchJob, bundle: Any, path: Path) -> Teacher | None:
    """The cached teacher, or None when the file is missing or damaged (then it is retrained). An entry from
    before the accuracy was recorded is measured once and rewritten (kept as it was if the cache is read-only)."""
    info = bundle.info
    if not path.is_file():
        return None
    model = _fresh_model(job, info)
    try:
        ckpt = load_checkpoint(path)
        load_model_state(model, ckpt["state_dict"], path, what="cached FP teacher",
                         fix="The entry was written by another version of gmpq.")
        meta = dict(ckpt.get("meta") or {})
    except (CheckpointError, KeyError, RuntimeError) as e:
        log.warning("teacher cache %s is unusable (%s); retraining it", path, e)
        return None
    model.to(job.device).eval()
    log.info("teacher loaded from %s", path)
    if "test_top1" not in meta:
        meta["test_top1"], meta["test_images"] = _teacher_test_top1(job, bundle, model)
        try:
            save_checkpoint(path, {"state_dict": ckpt["state_dict"], "meta": meta})
        except OSError as e:
            log.warning("cannot record the teacher's accuracy in its cache entry %s (%s); it is measured again "
                        "next time", path, e)
    return Teacher(model=model, test_top1=float(meta["test_top1"]), test_images=int(meta["test_images"]),
                   train_top1=meta.get("train_top1"), seconds=float(meta.get("seconds") or 0.0), cached=True,
                   num_classes=info.num_classes)


def load_teacher(job: SearchJob, *, progress: Progress | None = None, reporter: Reporter | None = None) -> Teacher:
    """The FP teacher of ``job`` with its held-out accuracy: loaded from the cache, else trained on the
    proxy (SGD + cosine, ``teacher_epochs``), measured, and written to the cache atomically. A damaged
    cache file is retrained."""
    bundle, split = _load_data(job)
    info = bundle.info
    path = teacher_cache_path(job, info)
    cached = _cached_teacher(job, bundle, path)
    if cached is not None:
        return cached
    model = _fresh_model(job, info)
    loader = make_loader(split, info, batch_size=job.teacher_batch_size, train=True, seed=job.search.seed,
                         device=job.device)
    cfg = TrainConfig(epochs=job.teacher_epochs, batch_size=job.teacher_batch_size, seed=job.search.seed)
    result = train_fp(model, loader, None, config=cfg, reporter=reporter, device=job.device, progress=progress,
                      precision=job.precision)
    model.eval()
    test_top1, test_images = _teacher_test_top1(job, bundle, model)
    meta = {**_teacher_key(job, info), "train_top1": result.top1, "seconds": result.seconds,
            "test_top1": test_top1, "test_images": test_images,
            "precision": resolve_precision(job.precision, job.device)}
    save_checkpoint(path, {"state_dict": model.state_dict(), "meta": meta})
    log.info("teacher trained in %.1f s (top-1 %.2f%% on %d held-out images, %.2f%% on the proxy), cached at %s",
             result.seconds, test_top1, test_images, result.top1, path)
    return Teacher(model=model, test_top1=test_top1, test_images=test_images, train_top1=result.top1,
                   seconds=result.seconds, cached=False, num_classes=info.num_classes)


def get_teacher(job: SearchJob, *, progress: Progress | None = None, reporter: Reporter | None = None) -> nn.Module:
    """The FP teacher module of ``job`` (``load_teacher(...).model``)."""
    return load_teacher(job, progress=progress, reporter=reporter).model


def run_search_job(job: SearchJob, *, reporter: Reporter | None = None,
                   progress: Progress | None = None, checked: bool = False) -> SearchResult:
    """Teacher (cached) + ``search_policy`` on the job's proxy; the policy's meta describes the model. ``checked``:
    the caller ran ``check_job`` on this job (the budget is not checked again: a model build and a dataset read)."""
    if not checked:
        check_job_budget(job)
    teacher = load_teacher(job, progress=progress)
    bundle, split = _load_data(job)
    info = bundle.info
    train_loader = make_loader(split, info, batch_size=job.search.batch_size, train=True, seed=job.search.seed,
                               device=job.device)
    eval_loader = None
    if job.eval_size != 0:
        size = None if job.eval_size is None else min(job.eval_size, len(bundle.test))
        eval_loader = _eval_loader(job, bundle, proxy(bundle.test, size, job.proxy_seed))
    result = search_policy(teacher.model, train_loader, config=job.search, input_size=info.image_size,
                           in_channels=info.in_channels, eval_loader=eval_loader, reporter=reporter,
                           device=job.device, model_name=job.model, progress=progress, precision=job.precision)
    meta = {**result.policy.meta, "model": job.model, "dataset": job.dataset, "in_channels": info.in_channels,
            "num_classes": info.num_classes, "small_input": job.small_input, "input_size": info.image_size,
            "budget": job.search.budget.to_dict() if job.search.budget is not None else None,
            "proxy_size": job.proxy_size, "proxy_seed": job.proxy_seed, "seed": job.search.seed,
            "teacher_top1": teacher.test_top1, "precision": resolve_precision(job.precision, job.device)}
    policy = BitPolicy(layers=result.policy.layers, fingerprint=result.policy.fingerprint, meta=meta)
    return dataclasses.replace(result, policy=policy)
