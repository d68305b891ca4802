"""Lines and records of a sweep joining a Ray cluster: the start line, the shared-storage warning (only when a node
runs on another host), the join line of an address read from a file, and the cluster joined recorded in place of
``auto`` in the sweep's saved config."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import ray

from .sweep_config import SweepConfig, save_resolved_config

__all__ = ["start_text", "other_hosts", "warn_unshared", "say_recorded_join", "say_recorded_sweep_join",
           "record_joined_address", "keep_recorded_address"]

log = logging.getLogger("orchestrator.sweep")    # the sweep's own channel, as before these lines moved here


def start_text(cfg: SweepConfig, fit: int | None = None, grown_from: int | None = None) -> str:
    """The sweep's line as its trials start: how many (``grown_from``: a resume that grows the sweep from that many
    says how many are new), how many at a time (never more than there are, nor than the ``fit`` that the cluster's
    nodes hold at once), and each one's resources."""
    n = cfg.n_trials
    at_once = min(cfg.max_concurrent_trials, n) if cfg.max_concurrent_trials else n
    at_once = min(at_once, fit) if fit else at_once
    new = f" ({n - grown_from} new)" if grown_from is not None and grown_from < n else ""
    return (f"{n} trial{'' if n == 1 else 's'}{new}, {at_once} at a time, {cfg.resources.cpu:g} CPU"
            f"{f' + {cfg.resources.gpu:g} GPU' if cfg.resources.gpu else ''} each; "
            f"from another terminal: gmpq status --sweep {cfg.out_dir}")


def other_hosts(nodes: list[dict]) -> list[str]:
    """The hosts of ``nodes`` (``ray.nodes()`` dicts; the hostname check of the storage preflight,
    ``cluster.connect.distinct_hosts``) other than this machine: a node whose hostname is this machine's, or,
    without a hostname, whose address is one of this machine's, runs here and sees the sweep folder."""
    import socket

    from cluster.connect import distinct_hosts

    away = [h for h in distinct_hosts(nodes) if h not in (socket.gethostname(), "localhost")]
    if not away:
        return []
    here = {"127.0.0.1", "::1"}                       # a node without a hostname: by its address
    try:
        here.add(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - the others still count
        pass
    try:
        here.update(str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return [h for h in away if h not in here]


def warn_unshared(cfg: SweepConfig, unshared: tuple[str, ...]) -> None:
    """Inside the joined cluster: the settings left at their defaults inside the sweep folder (``unshared``) need
    storage every node shares only when a node runs on another host than this one (a ``gmpq cluster up`` cluster
    on this machine alone sees the folder)."""
    if not unshared:
        return
    from cluster.connect import alive_nodes

    try:
        away = other_hosts(alive_nodes())
    except Exception as e:  # noqa: BLE001 - a warning: the preflight names a real problem on its own
        log.debug("cannot list the Ray cluster's nodes: %s", e)
        return
    from .cluster_watch import _gcs_address

    gcs = _gcs_address() or cfg.address
    need = (f"{' and '.join(unshared)} on storage every node shares (NFS, S3); the default"
            f"{'s are' if len(unshared) > 1 else ' is'} inside {cfg.out_dir}")
    if away:
        shown = ", ".join(away[:5]) + (f" and {len(away) - 5} more" if len(away) > 5 else "")
        log.warning("the sweep joins a Ray cluster (%s) with nodes on other hosts (%s): trials on its other nodes "
                    "need %s", gcs, shown, need)
    elif not _gmpq_local_cluster(gcs):     # an autoscaling cluster may add nodes on other hosts later
        log.warning("the sweep joins a Ray cluster (%s) whose nodes all run on this host so far: nodes it adds later "
                    "(an autoscaling cluster) run trials that need %s", gcs, need)


def _gmpq_local_cluster(address: str | None) -> bool:
    """Whether ``address`` is the cluster ``gmpq cluster up`` recorded on this machine (its default folder or
    ``$GMPQ_CLUSTER_DIR``): all its nodes run here, and it adds none."""
    from cluster.local import load_cluster_state

    try:
        state = load_cluster_state()
    except Exception:  # noqa: BLE001 - unreadable: not known to be local
        return False
    return state is not None and address is not None and state.address == address


def say_recorded_join(address: str | None) -> None:
    """The line of a command joining a cluster whose address it read from a file, not from --address
    (``ray_env.address_origin``: ``gmpq sweep --resume``, a --config file's address; ``gmpq finetune --sweep``):
    ``joining the Ray cluster at ... (from ...)``, as ``--address auto`` says it (``sweep_resume.say_joining``)."""
    from .ray_env import _origin_of
    from .sweep_resume import say_joining

    if address is not None and (origin := _origin_of(address)) is not None:
        say_joining(address, origin)


def record_joined_address(cfg: SweepConfig) -> None:
    """Inside the Ray session of a sweep given ``--address auto``: its saved config records the cluster joined (its
    GCS address), not ``auto``, which a later ``gmpq finetune --sweep`` or ``--resume`` would resolve again to
    whatever runs then (refused when two clusters do)."""
    from .cluster_watch import _gcs_address    # (None under Ray Client: its ray:// address is kept)

    if str(cfg.address or "").strip() != "auto":
        return
    joined = _gcs_address()
    if joined is not None:
        save_resolved_config(replace(cfg, address=joined))


def keep_recorded_address(cfg: SweepConfig) -> SweepConfig:
    """``cfg`` with the address its folder's config records in place of ``auto`` (``--resume --address auto``): the
    config saved before the join, or by a resume that joins no cluster (nothing to do), keeps the cluster the sweep
    ran on; the one joined replaces it once joined (``record_joined_address``)."""
    from .sweep_status import recorded_address

    if str(cfg.address or "").strip() != "auto":
        return cfg
    return replace(cfg, address=recorded_address(cfg.out_dir) or cfg.address)


def say_recorded_sweep_join(sweep_dir: Path, recorded: str | None) -> None:
    """The line of a final stage about to join the cluster its sweep's config records (no --address given):
    ``joining the Ray cluster at ... (from the sweep's config ...)``, as ``--address auto`` says where it joins
    (``sweep_resume.say_joining``). Nothing when Ray runs in this process already (``gmpq run`` joined it)."""
    import ray

    if recorded is None or ray.is_initialized():
        return
    from .results import CONFIG_FILE
    from .sweep_resume import say_joining

    say_joining(recorded, f"the sweep's config {sweep_dir / CONFIG_FILE}")
