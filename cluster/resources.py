"""Checking per-trial resource requests against the cluster before a sweep or fine-tune starts.

Ray queues a trial whose request no node can satisfy and waits forever (an autoscaler might add
such a node; a fixed cluster never will). So we check up front, from ``ray.nodes()`` entries
(their ``Resources`` are the node totals), and say which numbers disagree:

* a trial must fit on ONE node: ``cpu <= max_node CPU`` and ``gpu <= max_node GPU``;
* fractional GPUs (several proxy searches per GPU) must be < 1; whole GPUs must be integers;
* trials running at once = sum over nodes of ``min(floor(CPU_n / cpu), floor(GPU_n / gpu))``.

The functions are pure (node dicts in, dataclasses out) so they are testable without Ray.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["ResourceCheck", "TrainScaling", "check_trial_resources", "trials_that_fit", "choose_use_gpu",
           "train_scaling", "cluster_totals"]

_EPS = 1e-6  # Ray resolves resources to 1e-4; keep 0.25 * 4 == 1.0 exact enough


@dataclass(frozen=True, kw_only=True)
class ResourceCheck:
    """A request that fits: per-trial ``cpu``/``gpu``, cluster totals, how many trials fit at once."""

    cpu: float
    gpu: float
    cluster_cpu: float
    cluster_gpu: float
    n_nodes: int
    max_parallel_trials: int
    use_gpu: bool
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class TrainScaling:
    """Arguments for ``ray.train.ScalingConfig(num_workers=..., use_gpu=..., resources_per_worker=...)``."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    backend: str  # "nccl" with GPUs, "gloo" on CPU


def _alive(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if n.get("Alive", True)]


def cluster_totals(nodes: list[dict]) -> dict[str, float]:
    """Resources summed over alive nodes (what ``ray.cluster_resources()`` reports)."""
    totals: dict[str, float] = {}
    for n in _alive(nodes):
        for k, v in n.get("Resources", {}).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def _count(have: float, need: float) -> float:
    return math.inf if need <= 0 else math.floor(have / need + _EPS)


def trials_that_fit(cpu: float, gpu: float, nodes: list[dict]) -> int:
    """How many trials asking ``cpu`` CPUs and ``gpu`` GPUs each can run at the same time."""
    total = 0
    for n in _alive(nodes):
        res = n.get("Resources", {})
        fit = min(_count(float(res.get("CPU", 0.0)), cpu), _count(float(res.get("GPU", 0.0)), gpu))
        total += 0 if math.isinf(fit) else int(fit)
    return total


def _validate_request(cpu: float, gpu: float) -> None:
    for name, value in (("cpu", cpu), ("gpu", gpu)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"resources.{name} must be a number >= 0, but got {name}={value!r}.")
    if cpu == 0 and gpu == 0:
        raise ConfigError("resources asks for cpu=0 and gpu=0 per trial: Ray would start every trial at once. "
                          "Ask for at least cpu: 1 (or a GPU fraction).")
    if gpu > 1 and gpu != int(gpu):
        raise ConfigError(f"resources.gpu above 1 must be a whole number of GPUs, but got gpu={gpu}; use a fraction "
                          "below 1 to share a GPU (e.g. 0.25 runs four trials per GPU) or an integer.")


def check_trial_resources(cpu: float, gpu: float, nodes: list[dict], *,
                          max_concurrent_trials: int | None = None) -> ResourceCheck:
    """Validate one trial's ``{cpu, gpu}`` request against the cluster's alive ``nodes``.

    Raises ``ConfigError`` naming the numbers when no node can ever run a trial; returns a
    ``ResourceCheck`` with warnings when fewer trials fit at once than ``max_concurrent_trials``.
    """
    _validate_request(cpu, gpu)
    alive = _alive(nodes)
    totals = cluster_totals(alive)
    cluster_cpu, cluster_gpu = totals.get("CPU", 0.0), totals.get("GPU", 0.0)
    summary = f"{len(alive)} alive node(s), CPU={cluster_cpu:g}, GPU={cluster_gpu:g} in total"
    if not alive:
        raise ConfigError("the cluster has no alive nodes; start one (`gmpq cluster up`) or check --address.")
    if gpu > 0 and cluster_gpu == 0:
        raise ConfigError(f"each trial asks for gpu={gpu:g} but the cluster has no GPUs ({summary}). Set "
                          "resources.gpu: 0 to run on CPUs, or connect to a cluster with GPUs (--address).")
    max_cpu = max(float(n.get("Resources", {}).get("CPU", 0.0)) for n in alive)
    max_gpu = max(float(n.get("Resources", {}).get("GPU", 0.0)) for n in alive)
    if cpu > max_cpu + _EPS:
        raise ConfigError(f"each trial asks for cpu={cpu:g} but the largest node has CPU={max_cpu:g} ({summary}); "
                          f"a trial runs on one node, so lower resources.cpu to {max_cpu:g} or less.")
    if gpu > max_gpu + _EPS:
        raise ConfigError(f"each trial asks for gpu={gpu:g} but the largest node has GPU={max_gpu:g} ({summary}); "
                          f"a trial runs on one node, so lower resources.gpu to {max_gpu:g} or less.")
    fit = trials_that_fit(cpu, gpu, alive)
    if fit == 0:
        raise ConfigError(f"no node has both cpu={cpu:g} and gpu={gpu:g} free for one trial ({summary}); "
                          "lower resources.cpu or resources.gpu.")
    warnings = []
    if max_concurrent_trials is not None and max_concurrent_trials > fit:
        warnings.append(f"max_concurrent_trials={max_concurrent_trials} but only {fit} trial(s) of cpu={cpu:g}, "
                        f"gpu={gpu:g} fit at once ({summary}); the rest wait in the queue.")
    if 0 < gpu < 1:
        warnings.append(f"gpu={gpu:g} shares each GPU among {int(1 / gpu + _EPS)} trials with no memory "
                        "isolation: size batches so they fit together.")
    return ResourceCheck(cpu=float(cpu), gpu=float(gpu), cluster_cpu=cluster_cpu, cluster_gpu=cluster_gpu,
                         n_nodes=len(alive), max_parallel_trials=fit, use_gpu=gpu > 0, warnings=tuple(warnings))


def choose_use_gpu(cluster_resources: dict[str, float], requested: bool | None = None) -> bool:
    """``use_gpu`` for Ray Train: the request when given (True on a GPU-less cluster is a
    ``ConfigError``), else True exactly when the cluster has GPUs."""
    have = float(cluster_resources.get("GPU", 0.0)) > 0
    if requested is None:
        return have
    if requested and not have:
        raise ConfigError("use_gpu=True but the cluster has no GPUs (cluster_resources GPU=0); drop the GPU "
                          "request to fine-tune on CPUs with the gloo backend.")
    return bool(requested)


def train_scaling(num_workers: int, nodes: list[dict], *, cpus_per_worker: float = 1.0,
                  use_gpu: bool | None = None) -> TrainScaling:
    """The Ray Train ``ScalingConfig`` arguments for ``num_workers`` workers on this cluster: one GPU
    per worker when the cluster has GPUs (NCCL), else ``cpus_per_worker`` CPUs each (gloo).
    Raises ``ConfigError`` when fewer than ``num_workers`` workers fit at once (Train starts them
    together, as one gang, and would otherwise wait forever)."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"num_workers must be an integer >= 1, but got num_workers={num_workers!r}.")
    gpu = choose_use_gpu(cluster_totals(nodes), use_gpu)
    per_worker = {"CPU": float(cpus_per_worker)} | ({"GPU": 1.0} if gpu else {})
    fit = trials_that_fit(per_worker["CPU"], per_worker.get("GPU", 0.0), nodes)
    if fit < num_workers:
        kind = "GPU workers (1 GPU each)" if gpu else f"CPU workers ({cpus_per_worker:g} CPU each)"
        raise ConfigError(f"the fine-tune asks for {num_workers} {kind} but only {fit} fit on this cluster "
                          f"({len(_alive(nodes))} node(s)); lower --workers to {max(fit, 1)} or add nodes.")
    return TrainScaling(num_workers=num_workers, use_gpu=gpu, resources_per_worker=per_worker,
                        backend="nccl" if gpu else "gloo")
