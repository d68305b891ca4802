"""A sweep folder that was moved or copied works on its own files.

``sweep_config.yaml`` records absolute paths: ``out_dir`` and, made concrete from it, the MLflow store
(``sqlite:///<out_dir>/mlflow.db``), the Optuna storage, the Tune results and, on a cluster, the cache. Read
from another place (a sweep copied from the cluster to a laptop, a folder renamed, a saved config reused
with a new ``--out``), every recorded path *inside the recorded out_dir* is read as the same path inside the
folder now used; paths outside it (a shared cache, an MLflow server, another store the user named) stay.
So a copy never writes into the original, and a moved folder does not point at a place that is gone.

MLflow keeps its artifact locations in its own store: a moved SQLite store inside the sweep folder gets
them rebased too (``rebase_mlflow_artifacts``), so ``mlflow ui`` on the copy shows the copy's plots.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

__all__ = ["FOLLOWING_KEYS", "SWEEP_MARKERS", "artifacts_written_in", "follow_folder", "moved_path",
           "looks_like_sweep_folder", "recorded_dir", "rebase_mlflow_artifacts", "same_folder", "sqlite_file",
           "store_not_yet_moved", "usable_cache_dir"]

log = logging.getLogger(__name__)

#: config keys whose value, when inside the recorded out_dir, follows the folder
FOLLOWING_KEYS = ("tracking_uri", "optuna_storage", "storage_path", "cache_dir")
#: files a sweep leaves in its folder (a config file beside none of them is a template, not a sweep's)
SWEEP_MARKERS = ("trials.parquet", "optuna.db", "mlflow.db", "ray_results", "trial_events.jsonl")
SQLITE = "sqlite:///"
_told: set = set()


def _resolve(path: str | Path) -> Path:
    """The folder in use: absolute, links followed."""
    return Path(path).expanduser().resolve()


def _recorded(path: str | Path) -> Path:
    """A recorded path: absolute, but links not followed (a link inside the old folder stays inside it)."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def same_folder(old: Path, new: Path) -> bool:
    """Whether ``old`` (recorded) and ``new`` (in use) are one folder, also under two mount paths."""
    try:
        return old == new or (old.exists() and os.path.samefile(old, new))
    except OSError:
        return False


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other URI)."""
    return _recorded(uri[len(SQLITE):]) if isinstance(uri, str) and uri.startswith(SQLITE) else None


def moved_path(value: Any, old: Path, new: Path) -> Any:
    """``value`` (a path, a ``sqlite:///`` or a ``file://`` URI) with ``old``'s part replaced by ``new`` when it
    lies inside ``old``; anything else (a server, a bucket, a path elsewhere) unchanged."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith(SQLITE):
        path, back = sqlite_file(value), lambda p: SQLITE + str(p)
    elif value.startswith("file://"):
        path, back = _recorded(urllib.parse.unquote(urllib.parse.urlparse(value).path)), Path.as_uri
    elif "://" in value:
        return value
    else:
        path, back = _recorded(value), str
    try:
        inside = path.relative_to(old)
    except ValueError:
        return value
    return back(new / inside)


def recorded_dir(data: Mapping[str, Any]) -> Path | None:
    """The sweep folder a saved config was written for (its ``out_dir``), None when it names none."""
    out = data.get("out_dir") if isinstance(data, Mapping) else None
    return _recorded(out) if isinstance(out, str) and out else None


def follow_folder(data: Mapping[str, Any], folder: str | Path, *, tell: bool = False) -> dict[str, Any]:
    """``data`` (a sweep config mapping) for the sweep folder ``folder``: ``out_dir`` set to it and every
    path under ``FOLLOWING_KEYS`` that lay inside the recorded ``out_dir`` moved along (``tell``: say so,
    once per folder and process)."""
    data = dict(data)
    old, new = recorded_dir(data), _resolve(folder)
    if old is None or same_folder(old, new):
        return data
    if tell and (old, new) not in _told:
        _told.add((old, new))
        log.info("sweep folder %s was written as %s: using the MLflow store, Optuna storage and Tune results "
                 "inside %s, not those in %s", new, old, new, old)
    data["out_dir"] = str(new)
    for key in FOLLOWING_KEYS:
        data[key] = moved_path(data.get(key), old, new)
    return data


def looks_like_sweep_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds what a sweep writes (so its ``sweep_config.yaml`` describes that folder)."""
    return any((Path(folder) / name).exists() for name in SWEEP_MARKERS)


def artifacts_written_in(db: Path, experiment_name: str) -> Path | None:
    """The folder whose ``mlartifacts`` holds the artifacts of ``experiment_name`` in the MLflow SQLite store
    ``db`` (None: no such experiment, or its artifacts are not in a sweep folder's ``mlartifacts``)."""
    con = sqlite3.connect(str(db), timeout=30)
    try:
        row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment_name,)).fetchone()
    except sqlite3.OperationalError:        # no tables yet: a store MLflow has not set up
        return None
    finally:
        con.close()
    location = row[0] if row else None
    if not isinstance(location, str) or not location.startswith("file://") or not location.endswith("/mlartifacts"):
        return None
    return Path(urllib.parse.unquote(urllib.parse.urlparse(location).path)).parent


def usable_cache_dir(recorded: str | None, *, address: str | None, say=None) -> str | None:
    """The model cache for a sweep read on this machine: the recorded one, or (it is not here: a folder
    copied from another machine; no Ray cluster joined, whose nodes need the shared one) this machine's
    default cache. Every cached file is named by what its weights depend on, so any cache holding it serves."""
    if recorded is None or address is not None or Path(recorded).expanduser().is_dir():
        return recorded
    from gmpq_core.fileio import default_cache_dir

    here = str(_resolve(default_cache_dir()))
    (say or log.info)(f"the sweep's model cache {recorded} is not on this machine: using {here} (a model not "
                      "cached there yet is trained once)")
    return here


def store_not_yet_moved(sweep_dir: str | Path, cfg: Mapping[str, Any], experiment_name: str) -> Path | None:
    """For a moved or copied sweep folder whose own SQLite MLflow store still keeps the artifacts of
    ``experiment_name`` under the folder it was written in (no gmpq command has logged there since): that
    folder; else None. Reads only."""
    here, db = _resolve(sweep_dir), sqlite_file(cfg.get("tracking_uri") or "")
    if db is None or not db.is_file() or not db.is_relative_to(here):
        return None
    try:
        old = artifacts_written_in(db, experiment_name)
    except sqlite3.Error:
        return None
    return old if old is not None and not same_folder(old, here) else None


def rebase_mlflow_artifacts(db: Path, old: Path, new: Path) -> int:
    """In the MLflow SQLite store ``db``, artifact locations under ``old``'s ``mlartifacts`` point under
    ``new``'s (experiments, runs, logged models). Returns how many were changed."""
    old_uri, new_uri = (old / "mlartifacts").as_uri(), (new / "mlartifacts").as_uri()
    changed = 0
    con = sqlite3.connect(str(db), timeout=30)
    try:
        with con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                                  ("logged_models", "artifact_location")):
                if table not in tables:
                    continue
                cur = con.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "   # noqa: S608 - fixed names
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (new_uri, len(old_uri) + 1, old_uri, len(old_uri) + 1, old_uri + "/"))
                changed += cur.rowcount
    finally:
        con.close()
    if changed:
        log.info("MLflow store %s: %d artifact location(s) moved from %s to %s", db, changed, old_uri, new_uri)
    return changed
