"""A new sweep's Optuna storage must not already hold trials under the sweep's name (``check_study_free``): an
``optuna_storage`` shared by several sweeps (one database for a team), or the sweep folder's own earlier sweep
whose Tune state was deleted, would have the new sweep join those trials silently."""
from __future__ import annotations

import contextlib
import contextvars
import logging
from pathlib import Path
from typing import Iterator

from gmpq_core.errors import ConfigError

from .sweep_config import SweepConfig

__all__ = ["check_study_free", "study_trials", "state_folder_exists", "resuming"]

log = logging.getLogger(__name__)

_RESUMING: contextvars.ContextVar[bool] = contextvars.ContextVar("gmpq_resuming", default=False)


@contextlib.contextmanager
def resuming(resume: bool) -> Iterator[None]:
    """Within it, ``check_study_free`` checks nothing when ``resume``: a resume continues the sweep's own study, and
    one whose Tune state is gone is refused by ``sweep_resume.check_folder_state`` ("Nothing to resume"), not as a
    new sweep joining the study's trials."""
    token = _RESUMING.set(bool(resume))
    try:
        yield
    finally:
        _RESUMING.reset(token)


def check_study_free(cfg: SweepConfig) -> None:
    """A new sweep (its folder holds no Tune state to resume) whose Optuna storage already holds a study of its
    name with trials is refused: Optuna would add the new trials to that study silently, its sampler learning from
    the old trials, its pruning studies comparing against them, and a resume marking their running trials failed.

    One exemption: the folder's own sweep (its saved config names this sweep and storage) whose Tune experiment
    folder is there but holds no state to resume (the driver stopped while Tune started writing it). The saved
    config alone does not exempt: after ``ray_results/`` was deleted it still names the sweep, whose studies then
    hold the trials of a sweep that can no longer be resumed.
    """
    from sqlalchemy.engine import make_url

    from .results import load_resolved_config
    from .sweep_checks import shown_url
    from .sweep_resume import experiment_path, holds_sweep_state

    if _RESUMING.get():
        return                                   # a resume (``resuming``): its own checks say what is wrong
    r = cfg.resolved()
    url = r.optuna_storage
    if url.lower().startswith("sqlite:") and not Path(make_url(url).database or "").expanduser().is_file():
        return                                   # a new file: nothing in it
    if holds_sweep_state(r):
        return                                   # a resume (or the folder's "holds a sweep" refusal)
    saved = load_resolved_config(r.out_dir)
    own = saved.get("name") == r.name and saved.get("optuna_storage") == url
    counts = study_trials(url, r.name)
    if not counts:
        return
    exp = experiment_path(r)
    found = state_folder_exists(exp) if own else False
    if found:
        return                                   # this folder's own sweep, stopped before its Tune state was whole
    if found is None:
        raise ConfigError(
            f"optuna_storage {shown_url(url)!r} holds the {_studies(counts)} of this folder's earlier sweep "
            f"'{r.name}' (its sweep_config.yaml), but its Tune state at '{exp}' could not be reached, so gmpq cannot "
            "tell whether that sweep can be resumed; a new sweep would join those trials. Check the --storage URI, "
            "its credentials and the network, then run the command again (with --resume to continue the earlier "
            "sweep). Nothing has been trained yet.")
    studies = _studies(counts)
    delete = f"optuna delete-study --study-name {r.name} --storage {shown_url(url)}"
    if own:
        raise ConfigError(
            f"optuna_storage {shown_url(url)!r} holds the {studies} of this folder's earlier sweep '{r.name}' (its "
            f"sweep_config.yaml), but that sweep's Tune state at '{exp}' is gone (ray_results/ deleted, or another "
            "--storage than the sweep's), so it cannot be resumed, and a new sweep would join those trials silently: "
            "its sampler would learn from them and its pruner compare against them. To continue the earlier sweep, "
            "pass its own --storage with --resume; to start over here, delete its studies first "
            f"({delete}, and each '{r.name}-prune-bucket<k>' the same way) and the folder's trials.parquet; to keep "
            "them, give --out a new folder or the sweep another --name. Nothing has been trained yet.")
    raise ConfigError(
        f"optuna_storage {shown_url(url)!r} already holds {studies} of another sweep named '{r.name}', and the sweep "
        f"folder '{r.out_dir}' holds no sweep to resume. A new sweep there would join that study silently: its "
        "sampler would learn from the other sweep's trials and its pruner compare against them. Give this sweep "
        "another --name (or name:), or another --optuna-storage (leaving it out keeps the study in the sweep "
        "folder's optuna.db); to continue the earlier sweep, run gmpq sweep --out ITS_FOLDER --resume; to start "
        f"over, delete the old study first ({delete}).")


def _studies(counts: dict[str, int]) -> str:
    said = ", ".join(f"'{name}' ({n} trial{'s' * (n != 1)})" for name, n in counts.items())
    return f"Optuna stud{'ies' if len(counts) > 1 else 'y'} {said}"


def state_folder_exists(exp: str) -> bool | None:
    """Whether the Tune experiment folder ``exp`` (a local path or a URI) exists; None when it cannot be reached
    (a remote storage that does not answer, or refuses the credentials): not taken for a folder that is gone."""
    if "://" not in exp:
        return Path(exp).is_dir()
    try:
        from pyarrow.fs import FileType
        from ray.train._internal.storage import get_fs_and_path

        fs, path = get_fs_and_path(exp)
        return fs.get_file_info(path).type == FileType.Directory
    except Exception as e:  # noqa: BLE001 - an unreachable storage: said as such, not as a folder that is gone
        log.warning("could not look for the Tune experiment folder %s: %s", exp, e)
        return None


def study_trials(url: str, name: str) -> dict[str, int]:
    """The studies of the sweep ``name`` in the Optuna storage ``url`` (its own and its pruning studies,
    ``<name>-prune-bucket<k>``) that hold trials -> their trial counts; {} when it cannot be read (not fatal)."""
    import optuna

    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True, skip_compatibility_check=True)
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    except Exception as e:  # noqa: BLE001 - an unreadable or foreign database: the sweep's own open says more
        log.debug("could not list the studies in %s: %s", url, e)
        return {}
    return {s.study_name: s.n_trials for s in summaries if s.n_trials
            and (s.study_name == name or s.study_name.startswith(f"{name}-prune-bucket"))}
