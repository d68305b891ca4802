"""Where a Ray join's address comes from and whether it answers (moved here from ``ray_env``, which imports them).

``address_origin(origin)`` names a saved config as where an address came from (``gmpq finetune --sweep``,
``gmpq sweep --resume``), so a failed join's message names that file, not ``--address``. ``ray_client_text`` and
``head_node_text`` word a Ray Client address in messages. ``check_join_address`` / ``_join_address`` resolve
``--address`` as ``cluster.connect`` does ("auto": ``$RAY_ADDRESS``, the recorded cluster, else one ``ray start``
began here) and refuse a malformed address or a HOST:PORT where no Ray cluster answers (``_speaks_grpc``) within
seconds. Their lines go to ``ray_env``'s logger, as before they moved.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Any, Iterator

__all__ = ["address_origin", "ray_client_text", "head_node_text", "check_join_address"]

log = logging.getLogger("orchestrator.ray_env")     # the join's lines, under the name they always had


_ADDRESS_ORIGIN: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "gmpq_address_origin", default=None)

_ADDRESS_FIXES = ("--address auto (the cluster 'gmpq cluster up' recorded, or $RAY_ADDRESS) or --address HOST:PORT "
                  "('gmpq cluster status' shows it)")


@contextlib.contextmanager
def address_origin(origin: str, address: str | None = None) -> Iterator[None]:
    """While inside, an address joined here (``address`` only, when given) is said to come from ``origin`` (e.g.
    "the sweep's config DIR/sweep_config.yaml"), not from ``--address``: a command that reads it from a saved
    config (``gmpq finetune --sweep``, ``gmpq sweep --resume``) names that file in a failed join's message."""
    token = _ADDRESS_ORIGIN.set((origin, address))
    try:
        yield
    finally:
        _ADDRESS_ORIGIN.reset(token)


def _origin_of(address: str) -> str | None:
    """The origin ``address_origin`` set for ``address`` (None: it was given as --address)."""
    held = _ADDRESS_ORIGIN.get()
    if held is None or (held[1] is not None and held[1].strip() != address.strip()):
        return None
    return held[0]


def _address_said(address: str, resolved: Any, origin: str | None) -> str:
    """Where the address joined came from, for messages: "--address auto, from state file ...", or "address
    '10.0.0.5:6379' from the sweep's config ..., not from --address" (``address_origin``)."""
    if origin is None:
        return f"--address {address}, from {resolved.source}"
    via = "" if resolved.source == origin else f", resolved from {resolved.source}"
    return f"address {address!r} from {origin}, not from --address{via}"


def _address_fixes(origin: str | None) -> str:
    """The --address that fixes a failed join, worded alike in every such message (``origin``: the address came
    from a saved config, ``address_origin``)."""
    if origin:
        return (f"A cluster started again has another address, and --address overrides the recorded one: "
                f"{_ADDRESS_FIXES}; or start one ('gmpq cluster up')")
    return f"Start one ('gmpq cluster up'), or give the cluster's address: {_ADDRESS_FIXES}"


def ray_client_text(address: str | None) -> str | None:
    """How ``address`` reaches its cluster through Ray Client, for messages: ``ray://HOST:PORT`` itself, or
    ``--address auto, from $RAY_ADDRESS=ray://HOST:PORT`` (auto follows the variable: ``cluster.connect``); None when
    it does not go through Ray Client. Nothing is probed."""
    given = str(address or "").strip()
    if given.startswith("ray://"):
        return given
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if given == "auto" and env.startswith("ray://"):
        return f"--address auto, from $RAY_ADDRESS={env}"
    return None


def head_node_text(address: str | None) -> str:
    """The --address of a Ray Client refusal's fix, "resume it from the head node (...)": --address auto, and with
    $RAY_ADDRESS unset where ``address`` is auto following a ray:// one (else auto is Ray Client again)."""
    return ("(--address auto)" if str(address or "").strip() != "auto" else
            "(--address auto there, with $RAY_ADDRESS unset: a ray:// one goes through Ray Client again)")


def check_join_address(address: str) -> None:
    """The checks of joining ``address`` (``_join_address``: the syntax, auto's discovery, a HOST:PORT that must
    answer) without joining or saying anything: a command refuses a dead or wrong address before it writes a file."""
    _join_address(address, announce=False)


def _join_address(address: str, *, announce: bool = True) -> str | None:
    """``--address`` as ``ray.init`` needs it: "auto" becomes ``$RAY_ADDRESS``, else the cluster ``gmpq cluster up``
    recorded, else a cluster ``ray start`` started on this machine (``cluster.discover``: never another process's
    private ``ray.init()`` session), and a line says which and where it came from; a malformed address is a
    ConfigError, and a HOST:PORT where nothing answers is a ClusterError within seconds (``ray.init`` would retry
    for minutes; a ``ray://`` address or Ray's own discovery is not probed), naming where the address came from
    (``address_origin``) and the --address that fixes it. Token auth is switched on when a token exists (``gmpq cluster up`` starts clusters that require it).
    None: "local"."""
    import socket

    from cluster.connect import require_client_package, resolve_address, use_token_auth_if_available
    from cluster.errors import ClusterError

    origin = _origin_of(address)
    resolved = resolve_address(address, source=origin or "argument")
    if resolved.kind == "local":
        return None
    if resolved.kind == "auto":               # not $RAY_ADDRESS, not gmpq cluster up's record: what runs here
        from cluster.discover import discover_cluster

        resolved = discover_cluster()         # ClusterError for none, several, or other processes' private sessions
    require_client_package(resolved)
    if resolved.kind == "gcs":
        host, _, port = resolved.address.rpartition(":")
        try:
            conn = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
        except OSError as e:
            said = _address_said(address, resolved, origin)
            raise ClusterError(f"No Ray cluster answers at {resolved.address} ({said}): {e}. "
                               f"{_address_fixes(origin)}; or run on this machine alone with --address local."
                               ) from None
        with conn:
            grpc = _speaks_grpc(conn)
        if not grpc:                              # another service on that port: ray.init would retry for minutes
            said = _address_said(address, resolved, origin)
            raise ClusterError(f"Something answers at {resolved.address} ({said}) but it is not a Ray cluster: it "
                               f"does not speak gRPC as a Ray head's GCS port does (another service, such as an MLflow "
                               f"server, on that port?). The head's address is the one 'ray start --head' or 'gmpq "
                               f"cluster up' printed (GCS port 6379 by default). {_address_fixes(origin)}; or run on "
                               "this machine alone with --address local.") from None
    if not announce:
        return resolved.address
    use_token_auth_if_available()                      # only once there is a cluster to join
    if resolved.address != address:
        log.warning("%s: joining the Ray cluster at %s (from %s)",
                    f"address {address!r} from {origin}" if origin else f"--address {address}", resolved.address,
                    resolved.source)
    return resolved.address


def _speaks_grpc(conn: Any, timeout_s: float = 5.0) -> bool:
    """Whether the service on the connected socket ``conn`` answers the HTTP/2 client preface with a SETTINGS frame
    within ``timeout_s``, as every gRPC server (a Ray GCS) does; an HTTP/1 server or another service does not. True
    without checking when Ray's GCS uses TLS (``$RAY_USE_TLS``: the handshake comes first there)."""
    if os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true", "yes"):
        return True
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])   # + an empty SETTINGS
    try:
        conn.settimeout(timeout_s)
        conn.sendall(preface)
        head = b""
        while len(head) < 9:                      # the first frame's header: length (3), type (1), flags, stream
            chunk = conn.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:                               # a timeout included: a gRPC server answers at once
        return False
    return head[3] == 4 and int.from_bytes(head[5:9], "big") & 0x7FFFFFFF == 0
