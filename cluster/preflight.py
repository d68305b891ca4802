"""One call the sweep / fine-tune makes after joining Ray and before launching anything.

    with ray_session(cfg.address):
        pre = preflight_sweep(storage_path=cfg.storage_path, cpu=cfg.resources.cpu, gpu=cfg.resources.gpu,
                              max_concurrent_trials=cfg.max_concurrent_trials,
                              shared_paths={"out_dir": cfg.out_dir})
        for w in pre.warnings: log.warning(w)

It fails fast (``ConfigError``) on a storage path that some hosts cannot see and on per-trial
requests that no node can satisfy, instead of a sweep that hangs in Ray's queue or loses results.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .connect import StorageCheck, alive_nodes, validate_storage_for_cluster
from .resources import ResourceCheck, check_trial_resources

__all__ = ["Preflight", "preflight_sweep"]


@dataclass(frozen=True, kw_only=True)
class Preflight:
    n_nodes: int
    hosts: tuple[str, ...]
    storage: StorageCheck
    extra_paths: dict[str, StorageCheck]
    resources: ResourceCheck

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.resources.warnings


def preflight_sweep(*, storage_path: str, cpu: float, gpu: float, max_concurrent_trials: int | None = None,
                    shared_paths: Mapping[str, str] | None = None, nodes: list[dict] | None = None,
                    probe: bool = True) -> Preflight:
    """Check ``storage_path`` (and ``shared_paths``, e.g. the sweep folder whose caches trials read)
    against the cluster's hosts and one trial's ``cpu``/``gpu`` against its nodes. Needs a
    connected Ray unless ``nodes`` (``ray.nodes()`` dicts) is given and ``probe`` is False."""
    nodes = alive_nodes() if nodes is None else nodes
    storage = validate_storage_for_cluster(storage_path, nodes, probe=probe)
    extra = {name: validate_storage_for_cluster(path, nodes, probe=probe, label=name)
             for name, path in (shared_paths or {}).items() if path}
    resources = check_trial_resources(cpu, gpu, nodes, max_concurrent_trials=max_concurrent_trials)
    return Preflight(n_nodes=resources.n_nodes, hosts=storage.hosts, storage=storage, extra_paths=extra,
                     resources=resources)
