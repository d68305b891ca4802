"""Start (or join) Ray quietly, sized for small machines (STACK_NOTES.md).

``ray_session(address=None)`` starts a local Ray with one CPU slot per core, no dashboard, a small
object store and no usage stats, and shuts it down on exit, unless Ray was already running in this
process (then it is reused and left running: tests share one session that way).
``address="auto"`` or ``"ray://host:10001"`` joins an existing cluster instead. Inside it SIGTERM (a batch
job preempted, ``kill``) does what Ctrl-C does (``ctrl_c_signals``), instead of Ray's handlers ending the
driver at once (or with a stack dump) and leaving the sweep's driver marker behind.
``ctrl_c_signals()``: the one context manager for the driver's signal handlers: SIGTERM as Ctrl-C (raising
``Terminated``, a ``KeyboardInterrupt``, so a command exits 143, not Ctrl-C's 130), Python's own Ctrl-C
where asked, and the handlers from before put back after (Ray Tune's ``fit()`` leaves its own behind).
``ray_map(fn, items, ...)`` runs independent jobs (FP trainings before a sweep or study) as parallel
Ray tasks and returns their results in order.
``address_origin``, ``check_join_address``, ``ray_client_text``, ``head_node_text`` and the join's address
checks live in ``ray_address`` (importable from here too).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any, Callable, Iterator, Sequence

from .ray_address import (_ADDRESS_FIXES, _ADDRESS_ORIGIN, _address_fixes, _address_said,  # noqa: F401 (re-exported)
                          _join_address, _origin_of, _speaks_grpc, address_origin, check_join_address, head_node_text,
                          ray_client_text)

__all__ = ["quiet_ray_env", "local_cpu_count", "ray_cpus", "init_ray", "ray_session", "address_origin", "ray_client_text",
           "head_node_text",
           "ctrl_c_signals", "fit_restoring_handlers", "Terminated", "terminated", "clear_terminated", "stop_status",
           "stop_word",
           "ray_map", "OBJECT_STORE_BYTES"]

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 200 * 1024 * 1024

_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",          # no usage-stats prompt or upload
    "RAY_DEDUP_LOGS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",               # no Tune status tables: the sweep prints its own lines
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": None,   # must stay unset: ResultGrid needs the JSON logger
    "TUNE_WARN_THRESHOLD_S": "5",            # "operation took 0.8 s" warnings only when really slow
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",      # no traceback per failed trial: the sweep's line names the error
}


def quiet_ray_env() -> None:
    """Set the environment defaults that keep Ray quiet (the user's explicit settings win)."""
    for key, value in _QUIET_ENV.items():
        if value is not None:
            os.environ.setdefault(key, value)


def local_cpu_count() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # not Linux
        return max(1, os.cpu_count() or 1)


def ray_cpus() -> int:
    """CPUs of the running Ray cluster's largest live node (at least 1): the most one task can get."""
    import ray

    return max([1, *(int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive"))])


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             object_store_memory: int | None = OBJECT_STORE_BYTES, log_to_driver: bool = False) -> bool:
    """Initialise Ray unless it already is; return True if this call started/joined it."""
    import ray

    quiet_ray_env()
    if ray.is_initialized():
        return False
    kwargs: dict = {"include_dashboard": False, "log_to_driver": log_to_driver, "logging_level": logging.ERROR,
                    "configure_logging": True}
    given = address
    if address is not None:
        address = _join_address(address)    # None for "local"
    if address is None:
        # A local session stays on loopback (Ray otherwise binds the host's outward-facing address).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # "local": without an address ray.init joins $RAY_ADDRESS or the cluster a `ray start` recorded instead
        kwargs.update(address="local", num_cpus=num_cpus or local_cpu_count(), object_store_memory=object_store_memory)
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
    else:
        kwargs["address"] = address
    log.info("starting Ray (%s)", address or f"local, {kwargs.get('num_cpus')} CPUs")
    try:
        ray.init(**kwargs)
        if address == "auto":                 # left to Ray's discovery (no /proc): say what it joined
            log.warning("--address auto: joined the Ray cluster at %s (found by Ray's own discovery)",
                        ray.get_runtime_context().gcs_address)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError, ray.exceptions.RayError) as e:
        if address is None:
            raise
        from cluster.errors import ClusterError

        from cluster.connect import resolve_address

        origin = _origin_of(given)
        said = _address_said(given, resolve_address(given, source=origin or "argument"), origin)
        raise ClusterError(f"Could not join the Ray cluster at {address!r} ({said}): {e}. Check that it runs and "
                           "that this machine may join it ('gmpq cluster status' or 'ray status'; a cluster with token "
                           f"auth needs its token in ~/.ray/auth_token or $RAY_AUTH_TOKEN). {_address_fixes(origin)}; "
                           "or run on this machine alone with --address local.") from None
    return True


class Terminated(KeyboardInterrupt):
    """SIGTERM handled as Ctrl-C (``ctrl_c_signals``): the same stop, but the command exits 143, not 130."""


_sigterm_seen = False         # set by SIGTERM; cleared when ``ctrl_c_signals`` takes SIGTERM over afresh


def terminated() -> bool:
    """Whether SIGTERM reached the driver since ``ctrl_c_signals`` (outermost) took it over; also when it was
    handed to a Ray Tune run's SIGINT handler, which stops the sweep without an exception."""
    return _sigterm_seen


def clear_terminated() -> None:
    """Forget an earlier SIGTERM (``terminated``): a command starting in a process that ran others (tests, a
    notebook) asks about its own."""
    global _sigterm_seen
    _sigterm_seen = False


def stop_status(by_sigterm: bool) -> int:
    """A command's exit status once stopped: 128 + the signal, as a shell reports it (143 SIGTERM, 130 Ctrl-C)."""
    return 128 + int(signal.SIGTERM if by_sigterm else signal.SIGINT)


def stop_word(by_sigterm: bool) -> str:
    """How the stop reads in a command's last line: "terminated (SIGTERM)" or "interrupted" (Ctrl-C)."""
    return "terminated (SIGTERM)" if by_sigterm else "interrupted"


def _ctrl_c_now(signum: int, frame: Any) -> None:
    """A SIGTERM handler: what Ctrl-C does at this moment. A Ray Tune run's SIGINT handler in place stops the
    sweep gracefully; else ``Terminated`` (a KeyboardInterrupt)."""
    global _sigterm_seen
    _sigterm_seen = True
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler not in (signal.default_int_handler, _ctrl_c_now):
        handler(signal.SIGINT, frame)
    else:
        raise Terminated


_PUT_BACK = (signal.SIGINT, signal.SIGTERM, *((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()))


@contextlib.contextmanager
def ctrl_c_signals(*, sigterm: bool = True, python_sigint: bool = False) -> Iterator[None]:
    """The driver's signal handlers, in the main thread only (elsewhere nothing changes). Inside: SIGTERM does
    what Ctrl-C does (``sigterm``; ``ray.init`` installs a handler that ends the driver at once,
    skipping every ``finally``: the driver marker stays, Ray is not shut down), and with ``python_sigint``
    Python's own Ctrl-C (KeyboardInterrupt), not a handler a Ray Tune run left. After: the SIGINT, SIGTERM
    and SIGUSR1 handlers from before are put back (Ray Tune's ``fit()`` installs SIGINT and SIGUSR1 ones and
    leaves them once its trials end, where they only log); one installed from C, which Python cannot put
    back, as Python's Ctrl-C for SIGINT, else the default (terminate)."""
    global _sigterm_seen
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in _PUT_BACK}
    if sigterm:
        if before[signal.SIGTERM] is not _ctrl_c_now:      # the outermost: this command's SIGTERM is new
            _sigterm_seen = False
        signal.signal(signal.SIGTERM, _ctrl_c_now)
    if python_sigint:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in before.items():
            if handler is None:
                handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, handler)


def fit_restoring_handlers(tuner: Any) -> Any:
    """``tuner.fit()``, the signal handlers from before put back after it (``ctrl_c_signals``): Ray Tune installs
    a SIGINT handler that stops its run gracefully and leaves it once the trials end, where it only logs, so
    Ctrl-C in a sweep's or a study's last steps (Ray's shutdown, the summary; ``gmpq run``'s later stages) did
    nothing."""
    with ctrl_c_signals():
        return tuner.fit()


@contextlib.contextmanager
def ray_session(address: str | None = None, **kwargs) -> Iterator[bool]:
    """Context manager around ``init_ray``: shuts Ray down on exit only if it started it here; SIGTERM acts as
    Ctrl-C inside (``ctrl_c_signals``), and after it the handlers from before ``ray.init`` (which installs its
    own SIGTERM one) are back."""
    import ray

    with ctrl_c_signals(sigterm=False):
        started = init_ray(address, **kwargs)
        with ctrl_c_signals():
            try:
                yield started
            finally:
                if started:
                    ray.shutdown()


def ray_map(fn: Callable[[Any], Any], items: Sequence[Any], *,
            num_cpus: float | Callable[[Any], float] = 1, num_gpus: float = 0,
            threads: int | None = None, on_done: Callable[[Any, Any], None] | None = None) -> list:
    """``[fn(x) for x in items]``, each call a Ray task with ``num_cpus`` / ``num_gpus`` (Ray must be running).

    The tasks run side by side as far as the cluster's free resources allow. ``num_cpus``: a number, or
    ``item -> number`` (a long job may take more cores: it starts once that many are free).
    ``threads``: torch threads in each task (default: the task's ``num_cpus``, at least 1; more threads
    than the task's cores slow small machines down). ``on_done(item, result)`` is called on the driver
    as each task finishes (progress lines). The first task exception (as its own type: ``except
    ConfigError`` works) is raised once every task has ended, so the other trainings still reach their
    cache.
    """
    import ray

    def work(item: Any, n_threads: int) -> Any:
        import torch

        torch.set_num_threads(n_threads)
        return fn(item)

    cpus_of = num_cpus if callable(num_cpus) else (lambda _item: num_cpus)
    remote = ray.remote(work)
    refs = []
    for item in items:
        cpus = cpus_of(item)
        refs.append(remote.options(num_cpus=cpus, num_gpus=num_gpus).remote(item, threads or max(1, int(cpus))))
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending, error = list(refs), None
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=1.0)   # back in Python each second: a Ctrl-C or
        if not done:                                                      # SIGTERM is handled at once, whatever
            continue                                                      # the wait does with signals
        i = index[done[0]]
        try:
            results[i] = ray.get(done[0])
        except ray.exceptions.RayError as e:   # raised below: the task's own exception, not Ray's wrapper
            cause = getattr(e, "cause", None)
            error = error or (cause if isinstance(cause, BaseException) else e)
            continue
        if on_done is not None:
            on_done(items[i], results[i])
    if error is not None:
        raise error
    return results
