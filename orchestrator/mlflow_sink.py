"""MLflow view of a sweep, logged from the Ray driver only (SQLite allows one writer at a time); the
Tune callback that drives it during a sweep is ``orchestrator.mlflow_callback``.

Layout in the tracking store (explicit URI; default ``sqlite:///<sweep dir>/mlflow.db``):
- one parent run per sweep (id kept in ``<sweep_dir>/mlflow_parent.json`` so a resumed sweep reuses it)
  with the resolved config as a few flattened params (as at its start: params cannot change; the final
  stage's later settings are ``last_finetune.*`` tags, ``mlflow_stages``) and ``sweep_config.yaml`` as artifact,
  tag ``gmpq.sweep_dir`` (its folder), named after the experiment, or also its folder when the experiment
  holds another sweep's (sweeps of one ``--name`` share it), a description (``mlflow.note.content``) of this
  layout; later the Pareto table + plot and the Parquet tables, and the description sums up the front and the
  fine-tunes (``mlflow_stages``, ``mlflow_links``);
- one child run per trial (tag ``mlflow.parentRunId``; ids kept in ``<sweep_dir>/mlflow_runs.json`` so a
  resumed sweep does not duplicate them): the trial's config as params (its numbers also as metrics
  ``param_<name>``, which sort as numbers), per-epoch metrics with
  ``step=epoch`` (the supernet's ``supernet_proxy_top1`` / ``supernet_ard``, ...), the final metrics (the derived
  policy's ``proxy_top1`` / ``ard``, as trials.parquet names them), ``policy.json``, tag ``status`` and run status
  FINISHED (completed), KILLED (pruned) or FAILED (failed); later tag ``pareto`` (a selected one's also
  ``selection_reason``) and, once fine-tuned, metric ``final_top1`` and tag ``finetune_run_id``, and a description
  of what became of it (``mlflow_stages``, ``mlflow_links``);
- one child run per final fine-tune (``finetune-<trial_id>``, ``mlflow_stages.log_final``): per epoch and at the end
  final.parquet's ``final_top1`` / ``final_top5`` / ``final_loss`` / ``workers`` (runs of earlier versions: ``top1``
  ... per epoch), tag ``trial_run_id`` (its trial's run) and a description.

MLflow is a view: if the tracking store cannot be reached, the sink warns once and does nothing more
(Parquet stays the source of truth); ``gmpq sync-mlflow --sweep DIR`` (``orchestrator.sync``) uploads
what is missing later. Runs are found again by their persisted ids, else by their tags (``trial_id``,
``gmpq.role``, parent run; ``gmpq.sweep_dir`` for the parent), so a lost or damaged id file does not
duplicate them. A parent run deleted in the store is restored with the runs deleted with it, one ``mlflow gc``
removed is made again with the runs that were under it moved under it and the sweep's tables (``mlflow_parent``; also
when gc removes it while a command logs to it: at the first write the store refuses, ``call``); a
child run deleted in the store, or removed by gc, is left alone (nothing is logged into it, said once per run and
process; the others go on; ``gmpq sync-mlflow`` makes it again). Trial runs are named by their trial id and what
the sweep varies (``mlflow_keys.trial_run_name``). Against an ``http(s)://`` server the client retries a failed
request at most ``HTTP_RETRY_DEFAULTS`` times (MLflow's own default backs off for about 4 minutes, which would stall
the sweep driver), unless the ``MLFLOW_HTTP_REQUEST_*`` variables are set.

This module holds the sink (``MLflowSink``: connection, parent run, warn-once) and ``sweep_experiment_name``; the
layout's names and keys (id-file names, run statuses, metric keys, param flattening) are ``orchestrator.mlflow_keys``,
re-exported here; the sink's mix-ins are its persisted ids and the store's identity after a move
(``orchestrator.mlflow_ids.SinkIdFiles``) and its child runs, params, metrics and run ends
(``orchestrator.mlflow_child_runs.SinkRuns``).
"""
from __future__ import annotations

import logging
import os
import shlex
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Mapping

from gmpq_core.errors import CheckpointError
from gmpq_core.fileio import read_json

from .mlflow_child_runs import SinkRuns
from .mlflow_ids import SinkIdFiles
from .mlflow_parent import (LostParent, fill_new_parent, gone_run, leave_deleted, lost_parent_line, parent_for,
                            reattach_orphans, refused_deleted_run, removed_parent, replace_removed_parent,
                            restore_deleted_parent, restore_meanwhile)
from .mlflow_keys import _RAY_KEYS, FINAL_METRICS, RUN_STATUS, _phase_key  # noqa: F401  (re-exported for importers)
from .mlflow_keys import (DISABLED, HTTP_RETRY_DEFAULTS, PARENT_FILE, ROLE_OF_KIND, RUNS_FILE,  # noqa: F401
                          SET_ASIDE_TAG, _numeric, default_tracking_uri, flatten_config)
from .moved_sweep import follow_folder, recorded_dir, same_folder, sqlite_file
from .results import CONFIG_FILE, TRIALS_FILE, load_resolved_config

__all__ = ["DISABLED", "PARENT_FILE", "RUNS_FILE", "default_tracking_uri", "flatten_config", "sweep_experiment_name", "MLflowSink"]

log = logging.getLogger(__name__)


def _reachable(uri: str, timeout_s: float = 3.0) -> str | None:
    """None if an http(s) tracking server answers (any HTTP status), else the reason it does not."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None                     # it answered: reachable
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))
    return None


class MLflowSink(SinkIdFiles, SinkRuns):
    """Driver-side MLflow writer of one sweep: parent run, child runs, persisted ids, warn-once on failure."""

    PARENT_ROLE = "sweep"        # the parent run's ``gmpq.role`` tag (a study's sink: "study")
    lost_parent: LostParent | None = None     # what ``connect`` found of a lost parent run (``mlflow_parent``)
    tell_lost_parent = True      # say it in one line (``gmpq sync-mlflow``'s report says it instead)
    fill_lost_parent = True      # a new parent for a removed one gets the sweep's tables (the sync logs them itself)

    def __init__(self, tracking_uri: str | None, sweep_dir: str | Path, *, experiment_name: str | None = None,
                 resolved_config: Mapping[str, Any] | None = None) -> None:
        self.sweep_dir = Path(sweep_dir)
        self.tracking_uri = tracking_uri or default_tracking_uri(self.sweep_dir)
        try:                                                # the saved config, as written (read once)
            recorded = load_resolved_config(self.sweep_dir, follow_moves=False)
        except CheckpointError:
            if not resolved_config:
                raise                                       # no config to log: the damaged file is named
            recorded = {}
        self.resolved_config = dict(resolved_config or follow_folder(recorded, self.sweep_dir, tell=True))
        self._written_for = recorded_dir(recorded)          # for id files older than their "sweep_dir"; the
        self._store_moved_from: Path | None = None          # store's own artifact root, when it tells (better)
        self.experiment_name = experiment_name or sweep_experiment_name(self.sweep_dir, self.resolved_config)
        self.enabled = True
        self._client = None
        self.parent_run_id: str | None = None
        self.runs: dict[str, dict[str, str]] = {"trials": {}, "finetune": {}}

    def __getstate__(self) -> dict[str, Any]:
        # Tuner pickles callbacks into tuner.pkl: drop the client (reconnected lazily after unpickling).
        state = self.__dict__.copy()
        state["_client"] = None
        state.pop("_deleted_runs", None)        # (a resumed sweep finds them again: ``child_run`` makes new ones)
        state.pop("_restored_meanwhile", None)
        state.pop("_made_runs", None)  # (this process's: a resumed sweep may restore its parent again)
        state.pop("_parent_moved", None)
        return state

    # -- failure handling ---------------------------------------------------------------------
    def _disable(self, what: str, err: BaseException | str) -> None:
        if self.enabled:
            warnings.warn(f"{DISABLED}: {what} failed on tracking URI '{self.tracking_uri}' ({err}). "
                          f"{self.goes_on()}", RuntimeWarning, stacklevel=3)
        self.enabled = False

    def goes_on(self) -> str:
        """What the warning says happens without MLflow (a study's sink words it for a study)."""
        return (f"Work goes on without it; the sweep's results are complete in its Parquet tables "
                f"({self.sweep_dir / TRIALS_FILE}, ...). Once the server is back, '{self.sync_command()}' uploads "
                "what is missing.")

    def sync_command(self) -> str:
        """The ``gmpq sync-mlflow`` command that uploads to this sink's store, to be copied as printed: with
        ``--tracking-uri`` unless the store is the one sync-mlflow defaults to (``sync.sync_mlflow``: the sweep's
        saved ``tracking_uri``, else its own mlflow.db), e.g. a ``--tracking-uri`` given to a later stage only."""
        try:
            saved = load_resolved_config(self.sweep_dir)
        except CheckpointError:
            saved = {}
        default = (saved or self.resolved_config).get("tracking_uri") or default_tracking_uri(self.sweep_dir)
        same = default == self.tracking_uri or (sqlite_file(default) is not None
                                                and sqlite_file(default) == sqlite_file(self.tracking_uri))
        command = f"gmpq sync-mlflow --sweep {shlex.quote(str(self.sweep_dir))}"
        return command if same else f"{command} --tracking-uri {shlex.quote(self.tracking_uri)}"

    def call(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        """Run one MLflow call; on any failure warn once and disable the sink (MLflow is only a view). A run deleted
        in the store (in the UI), or a child run ``mlflow gc`` removed, only stops that run's logging (the parent:
        restored, or, removed by gc, replaced by a new one as ``connect`` does, and the call made again on it;
        ``mlflow_parent``)."""
        if not self.enabled or not self.connect():
            return None
        if "_parent_moved" in self.__dict__:            # a parent replaced meanwhile: its old id names the new one
            args = tuple(parent_for(self, a) for a in args)
            kwargs = {k: parent_for(self, v) for k, v in kwargs.items()}
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MlflowException, requests/sqlalchemy errors, OSError: all mean "cannot log"
            rid, gone = refused_deleted_run(e), gone_run(self, e)   # but a deleted or gc'd run is that run's loss only
            if rid is None and gone is None:
                if removed_parent(self, e) and replace_removed_parent(self):   # gc'd meanwhile: a new parent, once
                    return self.call(what, fn, *args, **kwargs)
                self._disable(what, f"{type(e).__name__}: {e}")
                return None
        if rid is not None and rid == self.parent_run_id and restore_meanwhile(self):
            return self.call(what, fn, *args, **kwargs)
        leave_deleted(self, rid or gone, gone=rid is None)
        return None

    # -- connection and parent run (persisted ids: SinkIdFiles) --------------------------------
    def open_store(self) -> bool:
        """Connect to the tracking store and find/create the experiment, without touching any run (a new
        SQLite store creates its tables here, ~2 s: ``run_sweep`` does this while Ray starts)."""
        if self._client is not None or not self.enabled:
            return self.enabled
        if self.tracking_uri.startswith(("http://", "https://")):
            for key, value in HTTP_RETRY_DEFAULTS.items():
                os.environ.setdefault(key, value)
        why = _reachable(self.tracking_uri)
        if why:
            self._disable("connecting", why)
            return False
        self._follow_move()
        try:
            from mlflow.tracking import MlflowClient
            client = MlflowClient(tracking_uri=self.tracking_uri)
            self._experiment_id = self._experiment(client)
            self._client = client
        except Exception as e:  # see call(): any failure here means MLflow is unusable for this sweep
            self._disable("connecting", f"{type(e).__name__}: {e}")
        return self.enabled

    def connect(self, *, reopen: bool = False) -> bool:
        """Connect, find/create the experiment and the parent run (``reopen``: mark it RUNNING again)."""
        if (self._client is not None and self.parent_run_id is not None) or not self.enabled:
            return self.enabled
        if not self.open_store():
            return False
        try:
            self._load_ids()
            lost = restore_deleted_parent(self)         # deleted: restored; removed by gc: a new one, runs moved
            self.parent_run_id = self._parent(self._client, reopen=reopen)
            lost = reattach_orphans(self, lost)
            self.lost_parent = fill_new_parent(self, lost, reopen=reopen) if self.fill_lost_parent else lost
            line = lost_parent_line(self.lost_parent, self)
            if line and self.tell_lost_parent:
                log.warning("%s", line)
        except Exception as e:  # as in open_store
            self._client = None
            self._disable("connecting", f"{type(e).__name__}: {e}")
        return self.enabled

    @property
    def client(self):
        """The MLflow client; once a parent run was replaced (``replace_removed_parent``), one whose calls name the new
        parent where they name the removed one (a stage took ``parent_run_id`` before, in a closure: ``parent_for``)."""
        if self._client is None or "_parent_moved" not in self.__dict__:
            return self._client
        return _ParentMapped(self, self._client)

    def _experiment(self, client) -> str:
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            return client.create_experiment(self.experiment_name, artifact_location=self._artifact_location())
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _run_exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        from mlflow.exceptions import MlflowException
        try:
            return self._client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _parent(self, client, *, reopen: bool) -> str:
        path = self.sweep_dir / PARENT_FILE
        if path.exists():
            try:
                data = read_json(path)
            except CheckpointError as e:
                log.warning("%s Starting a new parent run.", e)
                data = {}
            if self._same_store(data) and self._run_exists(data.get("run_id")):
                if reopen:
                    client.update_run(data["run_id"], status="RUNNING")
                old = self._written_in(data)
                if old is not None:            # moved or copied: the id file names this folder now, and the
                    self._save_parent(data["run_id"])     # run's tag too unless a copy shares a server's runs
                    if self._own_store() or not old.exists():
                        client.set_tag(data["run_id"], "gmpq.sweep_dir", str(self.sweep_dir.resolve()))
                return data["run_id"]
        found = self.find_run({"gmpq.role": self.PARENT_ROLE, "gmpq.sweep_dir": str(self.sweep_dir.resolve())})
        for old in (self._store_moved_from, self._written_for):
            if found is None and old is not None and not same_folder(old, self.sweep_dir.resolve()):
                found = self.find_run({"gmpq.role": self.PARENT_ROLE, "gmpq.sweep_dir": str(old)})
        if found is not None:          # the id file is lost or damaged: the tags find the parent again
            if reopen:
                client.update_run(found, status="RUNNING")
            self._save_parent(found)
            return found
        here = str(self.sweep_dir.resolve())    # another sweep's parent in the experiment (one --name): add the folder
        role = self.PARENT_ROLE
        name = f"{self.experiment_name} ({here})" if self.find_run({"gmpq.role": role}) else self.experiment_name
        run = client.create_run(self._experiment_id, run_name=name,
                                tags={"gmpq.role": role, "gmpq.sweep_dir": here, **self._first_note()})
        rid = run.info.run_id
        self._log_params(rid, flatten_config(self.resolved_config))
        cfg_file = self.sweep_dir / CONFIG_FILE
        if cfg_file.is_file():
            client.log_artifact(rid, str(cfg_file))
        else:
            import yaml
            client.log_text(rid, yaml.safe_dump(self.resolved_config, sort_keys=False), CONFIG_FILE)
        self._save_parent(rid)
        return rid

    def _first_note(self) -> dict[str, str]:
        """A new sweep parent run's description tags: the layout of its runs (``mlflow_links.sweep_note``; the
        Pareto and final stages add their tables' summary). A study's parent gets none."""
        if self.PARENT_ROLE != "sweep":
            return {}
        from .mlflow_links import NOTE_DIGEST_TAG, NOTE_TAG, _digest, sweep_note
        text = sweep_note(self.experiment_name, self.sweep_dir.resolve(), None, None)
        return {NOTE_TAG: text, NOTE_DIGEST_TAG: _digest(text)}


class _ParentMapped:
    """An MLflow client whose methods get ``parent_for``'s ids (``MLflowSink.client`` after a parent was replaced)."""

    def __init__(self, sink: MLflowSink, client: Any) -> None:
        self._sink, self._client = sink, client

    def __getattr__(self, name: str) -> Any:
        attr, sink = getattr(self._client, name), self._sink
        if not callable(attr):
            return attr

        def mapped(*args: Any, **kwargs: Any) -> Any:
            return attr(*(parent_for(sink, a) for a in args), **{k: parent_for(sink, v) for k, v in kwargs.items()})
        return mapped


def __getattr__(name: str) -> Any:
    # ``MLflowCallback`` lived here before ``orchestrator.mlflow_callback``: the tuner.pkl of a sweep started then
    # names this module, and resuming that sweep unpickles it
    if name == "MLflowCallback":
        from .mlflow_callback import MLflowCallback
        return MLflowCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sweep_experiment_name(sweep_dir: str | Path, cfg: Mapping[str, Any]) -> str:
    """The MLflow experiment of a sweep: the one its parent run is in (``mlflow_parent.json``), else the
    sweep's name, else its folder's."""
    path = Path(sweep_dir) / PARENT_FILE
    if path.exists():
        try:
            name = read_json(path).get("experiment_name")
            if name:
                return str(name)
        except CheckpointError as e:          # damaged id file: a new parent run will be made
            log.warning("%s", e)
    return str(cfg.get("name") or Path(sweep_dir).name)
