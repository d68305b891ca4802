"""The Ray Tune callback that logs a sweep to MLflow (driver side), off Tune's event loop.

One parent run per sweep and one child run per trial (the layout is ``mlflow_sink``'s). With
``background=True`` (what ``gmpq sweep`` uses) every MLflow call goes, in order, to one writer thread:
Tune's loop only copies what a hook needs (the trial's config, result, status, error text) and goes on
starting and stopping trials, and opening the tracking store (importing mlflow, creating a new SQLite
store's tables: 3-4 s on 2 cores) and making the parent run overlap Ray's start and the first trials
instead of delaying them. ``flush()`` waits for the writes queued so far. A trial's end is flushed before
its hook returns (Tune records the trial as finished right after, and a resumed sweep does not rerun it,
so its run must be closed by then); ``on_experiment_end`` and ``close()`` (which ``run_sweep`` calls
however the sweep ends) flush too, so nothing queued is lost.
``background=False`` makes every call in the hook itself (tests and one-off use).
Metrics: the trial's numeric sampled config at step 0 (``param_<name>``, as trials.parquet's columns: params sort as
text), each search epoch's report at ``step=epoch`` (the supernet's proxy_top1 and ard as ``supernet_proxy_top1`` /
``supernet_ard``, ce, p, ...), then the final metrics at the last epoch's step, a completed trial's derived-policy
proxy_top1 and ard under those names (``final_metrics``: as trials.parquet names them), so no metric's history mixes
the supernet's values with the policy's; a final metric the last epoch's report logged at that step with the same
value (the search's ``p``) is not logged again. A run an earlier version logged (a resumed sweep's:
``mlflow_keys.legacy_layout``, read once per trial when its run is opened) keeps its names: the supernet's plain, the
policy's ``policy_proxy_top1`` / ``policy_ard``.
"""
from __future__ import annotations

import functools
import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Mapping

from ray.tune import Callback

from .mlflow_keys import CONFIG_METRIC_PREFIX, config_metrics, legacy_layout, trial_run_name
from .mlflow_notes import POLICY_KEYS, final_metrics  # noqa: F401 (re-exported: importable from here too)
from .mlflow_sink import _RAY_KEYS, RUN_STATUS, MLflowSink, _phase_key
from .results import error_text, resolve_status

__all__ = ["MLflowCallback", "POLICY_KEYS", "final_metrics"]

log = logging.getLogger(__name__)

class MLflowCallback(Callback):
    """Ray Tune callback (driver side) logging the sweep to MLflow: parent run + one child run per trial."""

    def __init__(self, tracking_uri: str | None, experiment_name: str, sweep_dir: str | Path,
                 resolved_config: Mapping[str, Any], status_book: Any = None, *, background: bool = False) -> None:
        self.sink = MLflowSink(tracking_uri, sweep_dir, experiment_name=experiment_name,
                               resolved_config=resolved_config)
        self.status_book = status_book
        self.background = background
        self._run_of: dict[str, str | None] = {}
        self._recoveries: dict[str, int] = {}
        self._ended: set[str] = set()        # trials whose run this driver ended (the rest: stopped midway)
        self._last_epoch: dict[str, tuple[int, dict]] = {}   # per trial: the step and metrics of its last report
        self._legacy: set[str] = set()       # trials whose run an earlier version logged (its metric names kept)
        self._writer: ThreadPoolExecutor | None = None
        self._queued: list[Future] = []
        self._lock = threading.Lock()       # the writer and its queue: Tune's loop, and a lost cluster's cleanup

    @property
    def parent_run_id(self) -> str | None:
        return self.sink.parent_run_id

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with the experiment state: no thread, no per-run bookkeeping
        return {**self.__dict__, "_run_of": {}, "_recoveries": {}, "_ended": set(), "_writer": None, "_queued": [],
                "_last_epoch": {}, "_legacy": set(), "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a sweep pickled before the writer thread existed lacks these
        self.__dict__.update({"background": False, "_run_of": {}, "_recoveries": {}, "_ended": set(),
                              "_writer": None, "_queued": [], "_last_epoch": {}, "_legacy": set(), **state,
                              "_lock": threading.Lock()})

    # -- the writer -----------------------------------------------------------------------------
    def _do(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``fn`` now, or queue it for the writer thread (in submission order)."""
        if not self.background:
            fn(*args, **kwargs)
            return
        with self._lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="gmpq-mlflow")
            self._queued = [f for f in self._queued if not f.done()]
            self._queued.append(self._writer.submit(self._guarded, functools.partial(fn, *args, **kwargs)))

    @staticmethod
    def _guarded(call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception:  # noqa: BLE001 - the sink turns MLflow failures into one warning; anything else is ours
            log.exception("MLflow logging step failed; the sweep goes on (its results are in the Parquet tables)")

    def open_store(self) -> None:
        """Connect to the tracking store and find/create the experiment (queued when in the background)."""
        self._do(self.sink.open_store)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the writes queued so far; False if ``timeout`` passed first."""
        with self._lock:
            pending = [f for f in self._queued if not f.done()]
        done, not_done = wait(pending, timeout=timeout)
        with self._lock:
            self._queued = [f for f in self._queued if not f.done()]
        return not not_done

    def close(self) -> None:
        """Flush and stop the writer thread (a later hook starts a new one)."""
        self.flush()
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    # -- Tune hooks: copy what the write needs, then write (or queue) -----------------------------
    def setup(self, **info: Any) -> None:
        self._run_of, self._recoveries, self._ended, self._last_epoch, self._legacy = {}, {}, set(), {}, set()
        self._do(self.sink.connect, reopen=True)

    def _child(self, tid: str, params: Mapping[str, Any]) -> str | None:
        if tid not in self._run_of:
            rid = self._run_of[tid] = self.sink.child_run(
                "trials", tid, run_name=trial_run_name(tid, params, self.sink.resolved_config.get("space")),
                params=params,
                tags={"trial_id": tid, "status": "running", "gmpq.role": "trial"})
            client = self.sink.client if rid else None             # (made the run: connected)
            run = self.sink.call("reading a run", client.get_run, rid) if client is not None else None
            if run is not None and legacy_layout(run.data.metrics):     # reopened: an earlier version's run
                self._legacy.add(tid)
            if run is not None and not any(k.startswith(CONFIG_METRIC_PREFIX) for k in run.data.metrics):
                self.sink.log_metrics(rid, config_metrics(params))      # sortable as numbers (params: as text)
        rid = self._run_of[tid]
        return None if rid in self.sink.deleted_runs else rid     # deleted meanwhile: nothing more logged into it

    def _keys(self, tid: str, report: Mapping[str, Any]) -> dict[str, Any]:
        """A per-epoch report by its MLflow keys in the trial's run (``_phase_key``)."""
        return {_phase_key(report, k, legacy=tid in self._legacy): v for k, v in report.items()}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._do(self._child, str(trial.trial_id), dict(trial.config or {}))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("done"):
            return                          # the final row: logged once in on_trial_complete
        step = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        report = {k: v for k, v in result.items() if k not in _RAY_KEYS}     # (keyed in the writer: _keys)
        self._last_epoch[str(trial.trial_id)] = (step, report)
        self._do(self._log_result, str(trial.trial_id), dict(trial.config or {}), report, step)

    def _log_result(self, tid: str, params: Mapping[str, Any], report: Mapping[str, Any], step: int) -> None:
        rid = self._child(tid, params)
        self.sink.log_metrics(rid, self._keys(tid, report), step=step)

    def _end(self, trial: Any, errored: bool) -> None:
        tid = str(trial.trial_id)
        last = dict(trial.last_result or {})
        status = resolve_status(self.status_book, tid, errored, last)
        error = error_text(trial)[:5000] if errored else None
        self._do(self._end_run, tid, dict(trial.config or {}), last, status, error, self._last_epoch.pop(tid, None))

    def _end_run(self, tid: str, params: Mapping[str, Any], last: Mapping[str, Any], status: str,
                 error: str | None, last_epoch: tuple[int, Mapping[str, Any]] | None = None) -> None:
        rid = self._child(tid, params)
        self._ended.add(tid)
        if rid is None:
            return
        step = int(last.get("epoch") or 0)
        if last_epoch is not None:
            last_epoch = (last_epoch[0], self._keys(tid, last_epoch[1]))
        final = _not_logged_at(step, final_metrics(last, status, legacy=tid in self._legacy), last_epoch)
        if last.get("replayed"):          # a finished trial Tune reran after a driver crash: log only what is missing
            run = self.sink.call("reading a run", self.sink.client.get_run, rid)
            final = {k: v for k, v in final.items() if run is not None and k not in run.data.metrics}
        self.sink.log_metrics(rid, final, step=step)
        if last.get("policy_json"):
            self.sink.call("logging policy.json", self.sink.client.log_text, rid, str(last["policy_json"]),
                           "policy.json")
        tags = {"status": status}
        if error is not None:
            tags["error"] = error
        self.sink.finish(rid, RUN_STATUS[status], tags)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A failed attempt that Tune retries (FailureConfig.max_failures): its error becomes a tag."""
        tid = str(trial.trial_id)
        n = self._recoveries[tid] = self._recoveries.get(tid, 0) + 1
        self._do(self._tag_retry, tid, dict(trial.config or {}), n, error_text(trial)[:5000])

    def _tag_retry(self, tid: str, params: Mapping[str, Any], attempt: int, error: str) -> None:
        rid = self._child(tid, params)
        if rid is None:
            return
        for k, v in {f"error.attempt{attempt}": error, "status": "retrying"}.items():
            self.sink.call("tagging a retried run", self.sink.client.set_tag, rid, k, v)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=False)
        self.flush()       # Tune saves the trial as finished right after: a driver killed then must not lose it

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=True)
        self.flush()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._do(self._end_experiment)
        self.flush()

    def end_interrupted(self) -> None:
        """The sweep stops without Tune's end hook (its Ray cluster was lost: ``sweep_lost``): end the runs as
        ``on_experiment_end`` does, the parent run KILLED (trials are left to run), after every write queued
        before, and wait for them."""
        self._do(self._end_experiment, interrupted=True)
        self.close()

    def _end_experiment(self, interrupted: bool = False) -> None:
        """Runs of trials the sweep stopped midway (Ctrl-C) end KILLED, tagged "interrupted", and so does the
        parent run (also when ``interrupted``); a resumed sweep reopens them (``child_run``) and ends them as its
        trials end."""
        stopped = [tid for tid in self._run_of if tid not in self._ended]
        for tid in stopped:
            if self._run_of[tid] is not None:
                self.sink.finish(self._run_of[tid], "KILLED", {"status": "interrupted"})
        self.sink.finish(self.sink.parent_run_id, "KILLED" if stopped or interrupted else "FINISHED")


def _same_value(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _not_logged_at(step: int, final: Mapping[str, Any], last_epoch: tuple[int, Mapping[str, Any]] | None) -> dict:
    """``final`` less what the trial's last per-epoch report already logged at ``step`` with the same value (the
    search's ``p``, which a completed trial reports again; a pruned or failed trial's whole last report), so that no
    metric's history holds one value twice at one step."""
    if last_epoch is None or last_epoch[0] != step:
        return dict(final)
    logged = last_epoch[1]
    return {k: v for k, v in final.items() if not (k in logged and _same_value(logged[k], v))}
