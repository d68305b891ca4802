"""What every trial of a sweep shares, prepared once before the trials: an FP teacher per proxy size
and the FP target model (``prepare_shared``). Each is read from the model cache (``cache_dir``) or,
if missing, trained: side by side as Ray tasks (``ray_map``) when Ray runs, with ``_job_cpus``
cores each; ``<sweep_dir>/shared.json`` records paths, FP accuracies (the teachers' on held-out test
images) and training seconds. A teacher nearer chance than a perfect score is warned about.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from gmpq_core.fileio import atomic_write_json

from .sweep_config import SweepConfig, is_local_cpu_sweep
from .trainable import build_search_job, trial_device

__all__ = ["SHARED_JSON", "prepare_shared"]

log = logging.getLogger(__name__)

SHARED_JSON = "shared.json"


def prepare_shared(cfg: SweepConfig, *, say=None, threads: int | None = None,
                   parallel: bool = False) -> dict[str, Any]:
    """Train (or load from the cache) what every trial shares; returns the trials' context.

    Teachers: one per proxy size in the space (``gmpq_core.jobs.get_teacher``, cached by its hash
    in ``cache_dir``). FP target model: ``gmpq_core.transfer.prepare_target_model``. Writes
    ``<sweep_dir>/shared.json`` (paths, FP accuracies, training seconds) for later stages.
    ``parallel`` (Ray running): the models not in the cache yet are trained side by side as Ray
    tasks (``ray_map``; cores per job: ``_job_cpus``), then everything is read from the cache here.
    ``threads``: torch threads for the work done in this process (default: ``_job_cpus``, one trial's
    CPU share, or all the sweep's cores for the FP target model of a local CPU sweep: on a busy small
    machine more threads than free cores slow PyTorch training down several times); the caller's
    setting is restored afterwards.
    """
    cfg = cfg.resolved()
    say = say or (lambda msg: None)
    trained = _train_missing_in_parallel(cfg, say) if parallel else {}
    return _prepare_shared(cfg, say, trained, threads)


@contextlib.contextmanager
def _torch_threads(n: float) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _shared_jobs(cfg: SweepConfig) -> list[tuple[str, int | None]]:
    """("teacher", proxy size) per proxy size in the space, then ("target", None)."""
    return [("teacher", size) for size in cfg.proxy_sizes()] + [("target", None)]


def _job_label(job: tuple[str, int | None]) -> str:
    return f"teacher for proxy size {job[1]}" if job[0] == "teacher" else "FP target model"


def _teacher_job(cfg: SweepConfig, proxy_size: int | None, device: str = "cpu") -> Any:
    """The SearchJob whose teacher serves every trial of this proxy size."""
    return build_search_job(cfg, {**cfg.space.first_point(), "proxy_size": proxy_size}, device=device)


def _target_args(cfg: SweepConfig) -> dict[str, Any]:
    """What names the FP target model (``prepare_target_model`` / ``target_model_cached`` keywords)."""
    return dict(model=cfg.model, dataset=cfg.target_dataset, check=cfg.transfer, cache_dir=cfg.cache_dir,
                data_root=cfg.data_root, image_size=cfg.image_size, small_input=cfg.small_input)


def _shared_job(cfg: SweepConfig, job: tuple[str, int | None], device: str) -> Any:
    """Run one shared job (train, or read the cache): the ``Teacher`` or the ``TargetModel``."""
    from gmpq_core.jobs import load_teacher
    from gmpq_core.transfer import prepare_target_model

    if job[0] == "teacher":
        return load_teacher(_teacher_job(cfg, job[1], device))
    return prepare_target_model(**_target_args(cfg), device=device, precision=cfg.precision)


def _shared_job_cached(cfg: SweepConfig, job: tuple[str, int | None]) -> bool:
    from gmpq_core.jobs import teacher_cached
    from gmpq_core.transfer import target_model_cached

    return teacher_cached(_teacher_job(cfg, job[1])) if job[0] == "teacher" else target_model_cached(**_target_args(cfg))


def _train_shared_task(sweep: dict, job: tuple[str, int | None]) -> float:
    """Ray task body: train one shared model into the cache; returns its seconds."""
    cfg = SweepConfig.from_dict(sweep)
    t0 = time.perf_counter()
    _shared_job(cfg, job, trial_device(cfg))
    return time.perf_counter() - t0


def _sweep_cores(cfg: SweepConfig) -> int:
    """The cores a local sweep may use: its trial slots' (``max_concurrent_trials`` x ``resources.cpu``),
    at most the machine's."""
    from .ray_env import local_cpu_count

    return max(1, min(local_cpu_count(), int(cfg.max_concurrent_trials * cfg.resources.cpu)))


def _job_cpus(cfg: SweepConfig, job: tuple[str, int | None]) -> float:
    """Cores (and torch threads) of one shared training: a trial's share, except the FP target model of a
    local CPU sweep, which takes all the sweep's cores (``_sweep_cores``) once the teachers are done. It
    is most of a cold start (62 s of 70 s in the demo on one core), and nothing else runs yet."""
    if job[0] == "target" and is_local_cpu_sweep(cfg):
        return max(_sweep_cores(cfg), cfg.resources.cpu)
    return cfg.resources.cpu


def _train_missing_in_parallel(cfg: SweepConfig, say) -> dict[tuple, float]:
    """Train the shared models missing from the cache as parallel Ray tasks; {job: seconds}."""
    from .ray_env import ray_cpus, ray_map

    missing = [job for job in _shared_jobs(cfg) if not _shared_job_cached(cfg, job)]
    if not missing or (len(missing) == 1 and cfg.address is None):   # nothing to overlap: the driver does it
        return {}
    say(f"training {len(missing)} shared models side by side: {', '.join(_job_label(j) for j in missing)}")
    sweep = cfg.to_dict()
    cpus = ray_cpus()
    seconds = ray_map(functools.partial(_train_shared_task, sweep), missing,
                      num_cpus=lambda job: min(_job_cpus(cfg, job), cpus), num_gpus=cfg.resources.gpu,
                      on_done=lambda job, s: say(f"{_job_label(job)}: trained ({s:.1f}s)"))
    unseen = [_job_label(job) for job in missing if not _shared_job_cached(cfg, job)]
    if unseen:   # trained on another node whose cache folder this one cannot see
        log.warning("%s trained on another node but not visible in %s from the driver: the cache folder is not on "
                    "shared storage, so the driver trains its own copy (set cache_dir to a shared path)",
                    ", ".join(unseen), cfg.cache_dir)
    return dict(zip(missing, seconds))


def _weak_target_message(cfg: SweepConfig, target: Any) -> str | None:
    """A one-paragraph warning when the FP target model is below ``weak_below`` (every transfer check and the
    final fine-tune start from it), else None."""
    from gmpq_core.jobs import weak_below, weak_rule

    classes = int(target.meta.get("num_classes") or 0)
    if not classes or target.top1 >= weak_below(classes):
        return None
    t = cfg.transfer
    return (f"The FP target model ({cfg.model} on {cfg.target_dataset}) reaches only {target.top1:.1f}% top-1 on its "
            f"test slice, {weak_rule(classes)}. Every transfer check and the final fine-tune start from it, so their accuracies say little. "
            f"Train it longer or on more images: transfer.fp_epochs (now {t.fp_epochs}) and transfer.fp_train_size "
            f"(now {t.fp_train_size or 'all'}) in the sweep config; it is cached, so this costs its training once.")


def _prepare_shared(cfg: SweepConfig, say, trained: Mapping[tuple, float], threads: int | None) -> dict[str, Any]:
    device = trial_device(cfg)
    teachers, teacher_top1 = {}, {}
    for job in _shared_jobs(cfg)[:-1]:
        with _torch_threads(threads or _job_cpus(cfg, job)):
            teacher = _shared_job(cfg, job, device)
        key = str(job[1])
        teachers[key] = round(teacher.seconds, 2)    # its training time, also when read from the cache
        teacher_top1[key] = round(teacher.test_top1, 2)
        when = "cached" if teacher.cached and job not in trained else f"{teachers[key]:.1f}s"
        say(f"{_job_label(job)}: top1 {teacher.test_top1:.2f}% on {teacher.test_images} held-out test images ({when})")
        weak = teacher.weak_message(_teacher_job(cfg, job[1]))
        if weak:
            log.warning("%s", weak)
    with _torch_threads(threads or _job_cpus(cfg, ("target", None))):
        target = _shared_job(cfg, ("target", None), device)
    seconds = target.seconds
    weak = _weak_target_message(cfg, target)
    if weak:
        log.warning("%s", weak)
    say(f"FP target model: top1 {target.top1:.2f}% on the {cfg.transfer.test_size or 'full'}-image test slice "
        f"({'cached' if target.cached and ('target', None) not in trained else f'{seconds:.1f}s'})")
    shared = {"target_model_path": str(target.path), "target_fp_top1": target.top1, "teacher_seconds": teachers,
              "teacher_top1": teacher_top1, "target_seconds": round(seconds, 2), "cache_dir": cfg.cache_dir}
    atomic_write_json(Path(cfg.out_dir) / SHARED_JSON, shared)
    return {"sweep": cfg.to_dict(), "target_model_path": str(target.path)}
