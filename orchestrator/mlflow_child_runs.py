"""The MLflow sink's runs: finding a run by its tags, the child runs (made, or reused through the persisted ids or
their tags), their params, metrics and end, and the runs made or found deleted in this process. A mix-in of
``orchestrator.mlflow_sink.MLflowSink``, which connects (``_client``, ``_experiment_id``, ``parent_run_id``) and
turns every failing MLflow call into one warning (``call``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from .mlflow_keys import ROLE_OF_KIND, SET_ASIDE_TAG, _numeric, flatten_config

__all__ = ["SinkRuns"]

log = logging.getLogger("orchestrator.mlflow_sink")     # the sink's messages, under the name they always had


class SinkRuns:
    """Runs of ``MLflowSink`` (whose ``__init__``/``connect`` set these attributes and which defines ``call``,
    ``_run_exists`` and ``_save_ids``)."""

    sweep_dir: Path
    runs: dict[str, dict[str, str]]
    parent_run_id: str | None
    _client: Any
    _experiment_id: str
    call: Callable[..., Any]
    _run_exists: Callable[[str | None], bool]
    _save_ids: Callable[[], None]

    @property
    def made_runs(self) -> set[str]:
        """Child runs this sink made (they hold only their params: nothing to read back before logging)."""
        return self.__dict__.setdefault("_made_runs", set())

    @property
    def deleted_runs(self) -> set[str]:
        """Runs that were deleted in the store while this sink logged to them: nothing more is logged into them."""
        return self.__dict__.setdefault("_deleted_runs", set())     # (a sink unpickled from an older sweep lacks it)

    def find_run(self, tags: Mapping[str, str], *, exclude: Collection[str] = (),
                 set_aside: bool = False) -> str | None:
        """The id of the oldest active run of this experiment carrying all ``tags`` and not in ``exclude``
        (None if none); not a run set aside by a restart of its fine-tune (tag ``SET_ASIDE_TAG``: the live one is
        the run it names) unless ``set_aside``."""
        terms = []
        for k, v in tags.items():
            v = str(v)
            q = "'" if "'" not in v else '"'
            if q in v:                 # both quote kinds: the filter language cannot say it
                return None
            terms.append(f"tags.`{k}` = {q}{v}{q}")
        runs = self._client.search_runs([self._experiment_id], filter_string=" and ".join(terms), max_results=100,
                                        order_by=["attributes.start_time ASC"])
        return next((r.info.run_id for r in runs if r.info.run_id not in exclude
                     and (set_aside or SET_ASIDE_TAG not in r.data.tags)), None)

    def rekey_child(self, kind: str, old: str, new: str) -> str:
        """The child run persisted under ``old`` is now under ``new`` (saved); returns its id."""
        rid = self.runs[kind].pop(old)
        self.runs[kind][new] = rid
        self._save_ids()
        return rid

    def log_params(self, run_id: str, params: Mapping[str, str]) -> dict[str, str]:
        """Log the params the run lacks. MLflow params are immutable (a new value for a logged key is an error
        that would disable the sink): a key logged with another value keeps it, and is returned with the value
        not logged (a value that changes belongs in a tag)."""
        logged = self._client.get_run(run_id).data.params
        params = {k[:250]: str(v) for k, v in params.items()}
        kept = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        if kept:
            log.info("run %s keeps its params %s (MLflow params cannot change)", run_id, sorted(kept))
        self._log_params(run_id, {k: v for k, v in params.items() if k not in logged})
        return kept

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param
        items = [Param(k[:250], str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(run_id, params=items[i:i + 100], synchronous=True)

    # -- child runs -----------------------------------------------------------------------------
    def has_child_run(self, kind: str, key: str) -> bool:
        """Whether the child run ``kind``/``key`` was made (its id persisted) and is still there."""
        return bool(self.call(f"looking up the {kind} run of {key}", self._run_exists, self.runs[kind].get(key)))

    def child_run(self, kind: str, key: str, *, run_name: str, params: Mapping[str, Any],
                  tags: Mapping[str, str]) -> str | None:
        """The child run ``kind``/``key`` (reused if persisted and still there, else created)."""
        def make() -> str:
            rid = self.runs[kind].get(key)
            if not self._run_exists(rid) and "trial_id" in tags:
                rid = self.find_run({"mlflow.parentRunId": self.parent_run_id, "trial_id": tags["trial_id"],
                                     "gmpq.role": tags.get("gmpq.role", ROLE_OF_KIND.get(kind, kind)),
                                     **{k: v for k, v in tags.items() if k == "gmpq.recipe"}},
                                    exclude=set(self.runs[kind].values()))     # another key's run is not this one
                if rid is not None:   # persisted ids lost/damaged: reuse the run its tags identify
                    self.runs[kind][key] = rid
                    self._save_ids()
            if self._run_exists(rid):
                self._client.update_run(rid, status="RUNNING")
                return rid
            run = self._client.create_run(self._experiment_id, run_name=run_name,
                                          tags={"mlflow.parentRunId": self.parent_run_id, **tags})
            rid = run.info.run_id
            self.made_runs.add(rid)
            self._log_params(rid, flatten_config(dict(params)))
            self.runs[kind][key] = rid
            self._save_ids()
            return rid
        return self.call(f"creating the run {run_name}", make)

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(step)) for k, v in ((k, _numeric(v)) for k, v in metrics.items())
                 if v is not None]
        if run_id and items and run_id not in self.deleted_runs:
            self.call("logging metrics", self._client.log_batch, run_id, metrics=items, synchronous=True)

    def finish(self, run_id: str | None, status: str, tags: Mapping[str, str] = ()) -> None:
        if not run_id or run_id in self.deleted_runs:
            return
        for k, v in dict(tags).items():
            self.call("tagging a run", self._client.set_tag, run_id, k, v)
        self.call("ending a run", self._client.set_terminated, run_id, status)

