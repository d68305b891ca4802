"""How many final fine-tunes, of how many workers, the Ray cluster holds at once (moved here from ``final_stage``,
which imports them): ``final_slots``, ``auto_workers`` (``finetune.workers: auto``), the workers checked against the
cluster's CPUs / GPUs (``check_final_workers``, ``_ray_devices``) and the line saying what runs at once
(``_at_once_text``).
"""
from __future__ import annotations

from typing import Callable

from gmpq_core.errors import ConfigError

from .side_by_side import side_by_side_slots


def final_slots(n_jobs: int, workers: int, use_gpu: bool, cap: int | None) -> int:
    """How many fine-tunes of ``workers`` workers the Ray cluster holds at once (a Ray Train worker takes
    1 CPU, or 1 GPU and no CPU with ``use_gpu``), at most ``cap``, at least 1."""
    import ray
    res = ray.cluster_resources()
    return side_by_side_slots(n_jobs, workers, int(res.get("GPU" if use_gpu else "CPU", 0)), cap)


AUTO_MIN_IMAGES_PER_WORKER = 16       # workers: auto never splits a global batch finer (BatchNorm per worker)


def auto_workers(n_jobs: int, use_gpu: bool, cap: int | None, batch_size: int) -> int:
    """``finetune.workers: auto``: the cluster's GPUs (CPUs without ``use_gpu``) divided by the policies that
    run at once (all of them, at most ``cap``), at least 1, and at most ``batch_size // 16`` (each worker
    gets ``batch_size // workers`` images per step)."""
    import ray
    devices = int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 0))
    at_once = max(1, min(int(n_jobs), int(cap) if cap is not None else int(n_jobs)))
    return max(1, min(devices // at_once, int(batch_size) // AUTO_MIN_IMAGES_PER_WORKER))


def check_final_workers(workers: int) -> None:
    """Before a sweep that ends with the final stage (``gmpq run``): its workers fit the running Ray cluster
    (a ConfigError naming ``--workers`` now, not after the sweep)."""
    _ray_devices(int(workers), None, lambda _msg: None)


def _ray_devices(workers: int, use_gpu: bool | None, say: Callable[[str], None]) -> tuple[int, bool]:
    import ray
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
    if use_gpu is None:
        use_gpu = gpus >= 1
    if use_gpu and gpus < workers:
        if gpus < 1:
            raise ConfigError("use_gpu=True but the Ray cluster has no GPU; drop the GPU request.")
        say(f"only {gpus} GPU(s) in the Ray cluster: using {gpus} workers instead of {workers}")
        workers = gpus
    if not use_gpu and workers > cpus:
        raise ConfigError(f"workers={workers} needs {workers} CPUs but the Ray cluster has {cpus}; "
                          f"use --workers {max(cpus, 1)} or fewer.")
    return workers, use_gpu


def _at_once_text(n: int, slots: int, workers: int, use_gpu: bool, cap: int | None, auto: bool) -> str:
    """What the stage will run at once, and what limits it."""
    devices = "GPUs" if use_gpu else "CPUs"
    if n == 1:                                   # nothing to queue or share with
        return f"fine-tuning 1 policy on {workers} worker(s)" + (
            f" (finetune.workers: auto: the cluster's {devices})" if auto else "")
    how = "one after the other" if slots == 1 else f"{slots} at a time"
    text = f"fine-tuning {n} policies {how}, {workers} worker(s) each"
    if auto:
        text += f" (finetune.workers: auto: the cluster's {devices} shared by the policies at once)"
    if slots < n:
        text += (f"; max_concurrent {cap} caps it" if cap is not None and slots == cap
                 else f"; the cluster's {devices} hold {slots} at a time with {workers} worker(s) each")
    return text
