"""Joining a Ray cluster and checking that the sweep's storage path suits it.

Addresses (``--address``):
  * ``None`` / ``"local"``: start a private Ray instance in this process (single machine).
  * ``"auto"``: ``$RAY_ADDRESS`` if set, else the cluster recorded by ``gmpq cluster up`` (its state
    file), else the cluster a ``ray start --head`` recorded (``/tmp/ray/ray_current_cluster``) or that runs on this
    machine; never another process's private ``ray.init()`` session (``cluster.discover``: refused, named).
  * ``"HOST:PORT"``: the GCS of an existing cluster (this process becomes a driver on it).
  * ``"ray://HOST:PORT"``: Ray Client (needs the grpcio package; the driver-side Tune loop then
    runs on the head node, so sweep files are written there).

Storage (``--storage``): Tune writes trial results and checkpoints from every node and reads them
from the driver, so on a cluster spanning several hosts the path must be shared: ``s3://``,
``gs://`` (pyarrow filesystems) or a mount every host sees. Several nodes on one host share its
disk, so a local path is fine there.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import ClusterError, ConfigError

__all__ = ["ResolvedAddress", "ClusterInfo", "StorageCheck", "REMOTE_SCHEMES", "resolve_address", "connect",
           "disconnect", "use_token_auth_if_available", "require_client_package", "alive_nodes", "distinct_hosts", "check_storage_path", "probe_shared_path",
           "validate_storage_for_cluster", "storage_filesystem", "probe_storage_write"]

log = logging.getLogger(__name__)
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True, kw_only=True)
class ResolvedAddress:
    """``kind``: "local" (start Ray here), "gcs" (join HOST:PORT), "client" (ray://), "auto" (Ray finds it)."""

    kind: str
    address: str | None
    source: str  # "default", "argument" (or the caller's ``source``), "RAY_ADDRESS", "state file <path>", "ray discovery"
    # ("ray discovery", kind "auto": cluster.discover.discover_cluster picks the cluster when joining)


@dataclass(frozen=True, kw_only=True)
class ClusterInfo:
    """What ``connect`` joined: resources summed over alive nodes, and how many hosts they span."""

    address: str | None
    kind: str
    n_nodes: int
    hosts: tuple[str, ...]
    resources: dict[str, float]

    @property
    def n_gpus(self) -> float:
        return float(self.resources.get("GPU", 0.0))


@dataclass(frozen=True, kw_only=True)
class StorageCheck:
    """Result of :func:`check_storage_path`: ``kind`` is "remote" (a URI) or "local" (a path)."""

    storage_path: str
    kind: str
    hosts: tuple[str, ...]
    reason: str


def _check_host_port(value: str, what: str) -> None:
    m = _HOST_PORT.match(value)
    if not m or not 0 < int(m.group("port")) < 65536:
        raise ConfigError(f"{what} must look like HOST:PORT (e.g. 10.0.0.5:6379), but got {value!r}.")


def resolve_address(address: str | None, *, environ: Mapping[str, str] | None = None,
                    state_dir: str | os.PathLike | None = None, source: str = "argument") -> ResolvedAddress:
    """Turn ``--address`` into what ``ray.init`` needs, without connecting (see module docstring). ``source``:
    where an explicit address (HOST:PORT, ray://) came from, for messages: the ``--address`` argument, or e.g.
    "the sweep's config DIR/sweep_config.yaml" when a command read it there."""
    env = os.environ if environ is None else environ
    if address is None or address.strip() in ("", "local"):
        return ResolvedAddress(kind="local", address=None, source="default")
    address = address.strip()
    if address == "auto":
        if env.get("RAY_ADDRESS"):
            try:
                inner = resolve_address(env["RAY_ADDRESS"], environ={}, state_dir=state_dir)
            except ConfigError as e:
                raise ConfigError(f"--address auto follows $RAY_ADDRESS={env['RAY_ADDRESS']!r}, which is not a "
                                  f"Ray cluster address: {e} Unset it, or give --address HOST:PORT.") from None
            if inner.kind == "auto":
                return ResolvedAddress(kind="auto", address="auto", source="RAY_ADDRESS")
            return ResolvedAddress(kind=inner.kind, address=inner.address, source="RAY_ADDRESS")
        from .local import DEFAULT_STATE_DIR, STATE_FILE, load_cluster_state, node_status

        recorded = load_cluster_state(state_dir)
        if recorded is not None and node_status(recorded).get("head"):
            path = Path(state_dir or DEFAULT_STATE_DIR) / STATE_FILE
            return ResolvedAddress(kind="gcs", address=recorded.address, source=f"state file {path}")
        return ResolvedAddress(kind="auto", address="auto", source="ray discovery")
    if address.startswith("ray://"):
        _check_host_port(address[len("ray://"):], "a ray:// address")
        return ResolvedAddress(kind="client", address=address, source=source)
    if "://" in address:
        raise ConfigError(f"--address must be 'auto', HOST:PORT or ray://HOST:PORT, but got {address!r}; "
                          "an http:// address is Ray's dashboard, not its GCS (default port 6379).")
    _check_host_port(address, "--address")
    return ResolvedAddress(kind="gcs", address=address, source=source)


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            object_store_mb: int | None = None, state_dir: str | os.PathLike | None = None,
            log_to_driver: bool = False, runtime_env: dict | None = None) -> ClusterInfo:
    """``ray.init`` for a resolved address; ``num_cpus``/``num_gpus``/``object_store_mb`` only apply
    when starting a local instance (Ray refuses them when joining). Idempotent: an already
    initialised Ray is reused. Raises ``ClusterError`` when the cluster cannot be reached."""
    resolved = resolve_address(address, state_dir=state_dir)
    if resolved.kind == "auto":
        from .discover import discover_cluster

        resolved = discover_cluster(state_dir=state_dir)   # never another process's private ray.init() session
    if resolved.kind != "local":
        use_token_auth_if_available()
    import ray

    if ray.is_initialized() and resolved.kind == "gcs":
        current = ray.get_runtime_context().gcs_address or ""
        if current.rsplit(":", 1)[-1] != resolved.address.rsplit(":", 1)[-1]:
            raise ClusterError(f"Ray in this process is already connected to {current}, not {resolved.address}; "
                               "call cluster.connect.disconnect() first.")
    if not ray.is_initialized():
        kwargs: dict = {"log_to_driver": log_to_driver, "runtime_env": runtime_env,
                        "logging_level": logging.ERROR}   # no "Connecting to existing Ray cluster" INFO lines
        if resolved.kind == "local":
            kwargs.update(address="local",        # without it ray.init joins $RAY_ADDRESS or a 'ray start' cluster
                          num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                          object_store_memory=None if object_store_mb is None else object_store_mb * 2**20)
        else:
            require_client_package(resolved)
            kwargs["address"] = resolved.address
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            ray.init(**kwargs)
        except (ConnectionError, TimeoutError, RuntimeError) as e:
            raise ClusterError(f"could not join the Ray cluster at {resolved.address!r} (from {resolved.source}): "
                               f"{e}. Check that the head runs (`gmpq cluster status` or `ray status`) and the "
                               "port is reachable.") from None
    from .resources import cluster_totals

    nodes = alive_nodes()
    return ClusterInfo(address=resolved.address, kind=resolved.kind, n_nodes=len(nodes),
                       hosts=distinct_hosts(nodes), resources=cluster_totals(nodes))


def require_client_package(resolved: ResolvedAddress) -> None:
    """A ray:// address (Ray Client) needs the grpcio package: a ConfigError saying so, before ray.init."""
    if resolved.kind != "client":
        return
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise ConfigError(f"address {resolved.address!r} uses Ray Client, which needs the grpcio package (pip "
                          "install 'ray[client]'); or run on the head node with --address auto.") from None


def _token_available(environ: Mapping[str, str]) -> bool:
    path = environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return bool(environ.get("RAY_AUTH_TOKEN")) or Path(path).exists()


def use_token_auth_if_available(environ: dict | None = None) -> bool:
    """Set ``RAY_AUTH_MODE=token`` when it is unset and a Ray auth token exists; return whether
    token auth is on. Ray 2.60 enables token auth on its own only for a cluster it finds without
    an address; a driver given an explicit address (``HOST:PORT``) sends no token unless the mode
    is set, and a cluster with token auth (``gmpq cluster up`` starts one) then refuses it."""
    env = os.environ if environ is None else environ
    if "RAY_AUTH_MODE" not in env and _token_available(env):
        env["RAY_AUTH_MODE"] = "token"
        if environ is None and "ray._raylet" in sys.modules:
            # Ray caches its config at import; re-read it as Ray's own token setup does.
            sys.modules["ray._raylet"].Config.initialize("")
    return env.get("RAY_AUTH_MODE", "").lower() == "token"


def disconnect() -> None:
    """``ray.shutdown()`` (stops a local instance; leaves a joined cluster running)."""
    import ray

    ray.shutdown()


def alive_nodes() -> list[dict]:
    """``ray.nodes()`` entries whose ``Alive`` is true (dead nodes linger in the list)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def distinct_hosts(nodes: list[dict]) -> tuple[str, ...]:
    """The hosts a node list spans, sorted. A host is a node's hostname (``NodeManagerHostname``),
    or its IP (``NodeManagerAddress``) when no hostname is given: several Ray nodes on one machine
    share both, nodes in different machines or pods differ in both. Dead nodes are ignored."""
    hosts = set()
    for n in nodes:
        if not n.get("Alive", True):
            continue
        host = n.get("NodeManagerHostname") or n.get("NodeManagerAddress")
        if host:
            hosts.add(str(host))
    return tuple(sorted(hosts))


def _scheme(storage_path: str) -> str | None:
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", storage_path)
    return m.group(1).lower() if m else None


def check_storage_path(storage_path: str, nodes: list[dict], *, visible_on: Mapping[str, bool] | None = None,
                       label: str = "storage_path") -> StorageCheck:
    """Decide whether ``storage_path`` suits a cluster made of ``nodes`` (``ray.nodes()`` dicts).

    Remote URIs (s3://, gs://, ...) suit any cluster. A local path (or ``file://``) suits a cluster
    on one host. On several hosts it suits only when a probe showed every host sees the same
    folder (``visible_on``: host -> bool from :func:`probe_shared_path`, e.g. an NFS mount);
    otherwise ``ConfigError`` explains why and what to use instead (``label`` names the setting in
    the message, e.g. "out_dir"). Pure: no Ray, no I/O.
    """
    if not isinstance(storage_path, str) or not storage_path.strip():
        raise ConfigError(f"{label} must be a non-empty path or URI, but got {storage_path!r}.")
    scheme = _scheme(storage_path)
    hosts = distinct_hosts(nodes)
    if scheme is not None and scheme != "file":
        if scheme not in REMOTE_SCHEMES:
            raise ConfigError(f"{label} {storage_path!r} has an unsupported scheme {scheme!r}; use a "
                              f"local path or one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}.")
        return StorageCheck(storage_path=storage_path, kind="remote", hosts=hosts,
                            reason=f"{scheme}:// object storage is reachable from every node")
    if len(hosts) <= 1:
        return StorageCheck(storage_path=storage_path, kind="local", hosts=hosts,
                            reason="all nodes run on one host and share its disk")
    if visible_on is not None and all(visible_on.get(h, False) for h in hosts):
        return StorageCheck(storage_path=storage_path, kind="local", hosts=hosts,
                            reason=f"a probe file written here was visible on all {len(hosts)} hosts")
    blind = [h for h in hosts if visible_on is not None and not visible_on.get(h, False)]
    seen = f" (a probe file written here was not visible on {', '.join(blind)})" if blind else ""
    shown = ", ".join(hosts[:5]) + (f", ... ({len(hosts)} in all)" if len(hosts) > 5 else "")
    raise ConfigError(
        f"{label} {storage_path!r} is a local path, but the cluster's nodes span {len(hosts)} hosts "
        f"({shown}){seen}. Ray Tune writes each trial's results and checkpoints on the node that runs it "
        "and reads them on the driver, so the storage must be shared by every host: use "
        "--storage s3://BUCKET/PREFIX or gs://BUCKET/PREFIX, or a folder on a shared mount (NFS) that "
        "exists at the same path on every node.")


def probe_shared_path(storage_path: str, nodes: list[dict] | None = None, *, timeout_s: float = 60.0) -> dict[str, bool]:
    """Write a probe file under ``storage_path`` here, then ask one node per host (a zero-CPU task
    pinned with ``NodeAffinitySchedulingStrategy``) whether it sees it. Returns host -> bool.
    Needs a connected Ray; the probe file is removed afterwards."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = Path(storage_path[len("file://"):] if storage_path.startswith("file://") else storage_path)
    local.mkdir(parents=True, exist_ok=True)
    probe = local / f".gmpq-probe-{uuid.uuid4().hex}"
    probe.write_text("probe")

    @ray.remote(num_cpus=0, max_retries=0)
    def _sees(path: str) -> bool:
        return os.path.exists(path)

    nodes = alive_nodes() if nodes is None else nodes
    one_per_host: dict[str, str] = {}
    for n in nodes:
        host = n.get("NodeManagerHostname") or n.get("NodeManagerAddress")
        if n.get("Alive", True) and host and host not in one_per_host:
            one_per_host[host] = n["NodeID"]
    try:
        refs = {h: _sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                .remote(str(probe.absolute())) for h, node_id in one_per_host.items()}
        try:
            values = ray.get(list(refs.values()), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"the shared-storage probe did not answer in {timeout_s:.0f} s on all hosts "
                               f"({', '.join(refs)}); are the nodes busy or unreachable?") from None
        return dict(zip(refs, (bool(v) for v in values)))
    finally:
        probe.unlink(missing_ok=True)


def validate_storage_for_cluster(storage_path: str, nodes: list[dict] | None = None, *,
                                 probe: bool = True, label: str = "storage_path") -> StorageCheck:
    """:func:`check_storage_path` on the connected cluster's alive nodes, probing a local path's
    visibility first when the nodes span several hosts and ``probe`` is true."""
    nodes = alive_nodes() if nodes is None else nodes
    visible_on = None
    scheme = _scheme(storage_path)
    if probe and (scheme is None or scheme == "file") and len(distinct_hosts(nodes)) > 1:
        visible_on = probe_shared_path(storage_path, nodes)
    return check_storage_path(storage_path, nodes, visible_on=visible_on, label=label)


def storage_filesystem(storage_path: str):
    """``(pyarrow.fs.FileSystem, path inside it)`` for a URI (pyarrow resolves s3://, gs://,
    hdfs://; credentials come from the usual environment), or the local filesystem and an
    absolute path. Raises ``ConfigError`` naming the URI when pyarrow cannot build the filesystem."""
    import pyarrow.fs as pafs

    scheme = _scheme(storage_path)
    if scheme is None:
        return pafs.LocalFileSystem(), str(Path(storage_path).expanduser().absolute())
    try:
        return pafs.FileSystem.from_uri(storage_path)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"pyarrow cannot open storage {storage_path!r}: {e}. Check the URI and that "
                          "pyarrow was built with that filesystem (pyarrow.fs).") from None


def probe_storage_write(storage_path: str, *, label: str = "storage_path", hint: str = "") -> None:
    """Write and delete a small file under a storage URI (s3://, gs://, file://, ...) from this host, so
    a wrong bucket, missing credentials or no network fail in seconds with ``ConfigError`` naming the
    URI, before anything is computed (Ray Tune only finds out when the Tuner starts). Local paths are
    left to ``check_writable_dir``."""
    scheme = _scheme(storage_path)
    if scheme is None:
        return
    if scheme != "file" and scheme not in REMOTE_SCHEMES:
        raise ConfigError(f"{label} {storage_path!r} has an unsupported scheme {scheme!r}; use a local path or one "
                          f"of {', '.join(s + '://' for s in REMOTE_SCHEMES)}.{hint}")
    try:
        fs, path = storage_filesystem(storage_path)
        fs.create_dir(path, recursive=True)
        probe = f"{path.rstrip('/')}/.gmpq_write_probe_{os.getpid()}"
        with fs.open_output_stream(probe) as f:
            f.write(b"gmpq")
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}{hint}") from None
    except (OSError, ValueError) as e:   # pyarrow's errors: no such bucket, no credentials, no network, ...
        reason = " ".join(str(e).split())[:400]
        raise ConfigError(f"{label} {storage_path!r} cannot be written from this host ({type(e).__name__}: {reason}). "
                          "Check the bucket or folder name, the credentials (for s3://: AWS_ACCESS_KEY_ID / "
                          f"AWS_PROFILE or ~/.aws; for gs://: GOOGLE_APPLICATION_CREDENTIALS) and the network.{hint}") from None
    try:
        fs.delete_file(probe)
    except (OSError, ValueError) as e:   # writable but not deletable: Tune only writes; say what was left
        log.warning("%s %r: wrote the probe file %s but cannot delete it (%s); delete it by hand", label,
                    storage_path, probe, " ".join(str(e).split())[:200])
