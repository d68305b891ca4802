"""What a sweep folder already holds, and what a resume may do with it.

``experiment_path`` (the Tune experiment a resume restores), ``resolve_resume`` (``--resume auto``: resume
when the folder holds this sweep's Tune state, else start one, as ``tune.run(resume="AUTO")`` did), ``choose_resume``
(that choice said: what ``gmpq sweep`` and ``gmpq run``, through ``check_sweep``, both call), and the
checks a resume runs before Ray starts: the same config (``_check_same_config``), a folder moved under Ray
Client (``_check_moved_resume``), a study's folder (``check_not_a_study``); ``_saved_cache_dir`` keeps the
cache the sweep started with.
"""
from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from ray import tune

from gmpq_core.errors import ConfigError
from gmpq_core.precision import resolve_precision

from .sweep_config import SweepConfig
from .trainable import trial_device

__all__ = ["RESUME_AUTO", "experiment_path", "check_not_a_study", "holds_sweep_state", "resolve_resume",
           "choose_resume", "check_folder_state",
           "resume_choice_text", "STUDY_FILES", "joining_text", "say_joining", "ended_count", "grown_from"]

log = logging.getLogger(__name__)


def experiment_path(cfg: SweepConfig) -> str:
    """The Tune experiment folder (<storage_path>/<name>), as text: a URI storage (``s3://bucket/x``) keeps its
    ``//`` (a ``Path`` would make it ``s3:/bucket/x``, which Tune cannot restore)."""
    r = cfg.resolved()
    storage = str(r.storage_path)
    if "://" not in storage:
        return str(Path(storage) / r.name)
    parts = urllib.parse.urlsplit(storage)           # s3://bucket/x?endpoint_override=...: the name joins the path
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{r.name}"))


def _saved_cache_dir(cfg: SweepConfig) -> str | None:
    """The cache folder saved with the sweep in ``cfg``'s folder (None when there is none)."""
    from .moved_sweep import usable_cache_dir
    from .sweep_config import load_sweep_config

    saved_path = cfg.sweep_dir / "sweep_config.yaml"
    saved = load_sweep_config(saved_path).cache_dir if saved_path.exists() else None
    return usable_cache_dir(saved, address=cfg.address, say=lambda msg: log.warning("%s", msg))


def _saved_tracking_uri(cfg: SweepConfig) -> str | None:
    """The MLflow store saved with the sweep in ``cfg``'s folder (a path inside a moved folder read inside this one;
    None when there is none): a resume naming no store keeps it, whatever ``$MLFLOW_TRACKING_URI`` says now."""
    from .results import load_resolved_config

    return load_resolved_config(cfg.sweep_dir).get("tracking_uri")


STUDY_FILES = ("study_config.yaml", "study.parquet")   # what `gmpq study` writes (experiments.generalization_ray)


def check_not_a_study(sweep_dir: str | Path) -> None:
    """ConfigError if ``sweep_dir`` holds a study of ``gmpq study``: a sweep there would take over its MLflow
    parent run (``mlflow_parent.json``) and mix its trials into the study's folder."""
    path = Path(sweep_dir).expanduser().absolute()
    found = [f for f in STUDY_FILES if (path / f).is_file()]
    if found:
        raise ConfigError(f"The folder '{path}' holds the results of a study of 'gmpq study' ({', '.join(found)}); "
                          "a sweep there would take over its MLflow parent run (mlflow_parent.json) and mix its "
                          "trials into the study's folder. Give --out a new folder (continue the study with "
                          f"'gmpq study --out {path}').")


RESUME_AUTO = "auto"      # run_sweep(resume=...), --resume auto: resume when there is a sweep, else start one


def holds_sweep_state(cfg: SweepConfig) -> bool:
    """Whether the Tune experiment state of ``cfg``'s sweep (``experiment_path``) exists: what a resume restores."""
    return _holds_state(experiment_path(cfg))


def _holds_state(exp: str) -> bool:
    return ("://" in exp or Path(exp).exists()) and tune.Tuner.can_restore(exp)


def resolve_resume(cfg: SweepConfig, resume: bool | str) -> bool:
    """``run_sweep``'s ``resume`` as a bool: True and False as given; ``"auto"``: whether ``cfg``'s folder holds
    this sweep (its saved ``sweep_config.yaml`` names it) and its Tune state exists (``holds_sweep_state``).
    ConfigError when ``"auto"`` finds neither that nor a fresh start: another sweep's saved config, this sweep's
    results with no Tune state to resume (a new sweep would mix its trials into them), Tune state of this
    name that another folder sharing the storage wrote (resuming it here would continue that sweep), or a
    storage it cannot read."""
    if isinstance(resume, bool):
        return resume
    if resume != RESUME_AUTO:
        raise ConfigError(f"resume must be True, False or {RESUME_AUTO!r}, but got resume={resume!r}.")
    from .results import load_resolved_config

    check_not_a_study(cfg.sweep_dir)     # named as such, not as "no sweep to resume"
    sweep_dir, exp = cfg.sweep_dir, experiment_path(cfg)
    saved = load_resolved_config(sweep_dir).get("name")
    if saved is not None and saved != cfg.name:
        raise ConfigError(f"--resume auto found the sweep '{saved}' in '{sweep_dir}' (sweep_config.yaml), not "
                          f"'{cfg.name}': it neither resumes another sweep nor starts a second one beside it. "
                          f"Continue '{saved}' with --out {sweep_dir} --resume auto and its config (or no --config), "
                          "or give --out a new folder.")
    try:
        state = _holds_state(exp)
    except (ValueError, OSError) as e:   # a URI storage pyarrow cannot read or reach (s3:// without access)
        raise ConfigError(f"--resume auto cannot look for the sweep's Tune state at '{exp}': {e}. Check the "
                          "--storage URI and its credentials; nothing has been trained yet.") from None
    if state and saved is None:
        raise ConfigError(f"--resume auto found Tune state of a sweep named '{cfg.name}' at '{exp}', but "
                          f"'{sweep_dir}' holds no sweep (no sweep_config.yaml): another --out sharing this "
                          "--storage wrote it, and resuming it here would continue that sweep in this folder. "
                          "Give this sweep another --name (or its own --storage), or resume the other one with "
                          "its own --out.")
    if state:
        return True
    if (sweep_dir / "trials.parquet").exists():
        raise ConfigError(f"--resume auto found results of the sweep '{cfg.name}' in '{sweep_dir}' (trials.parquet) "
                          f"but no Tune experiment state to resume at '{exp}' (another --storage "
                          "than the sweep's, or ray_results/ deleted?); a new sweep would mix its trials into them. "
                          "Give the sweep's own --storage, or give --out a new folder.")
    return False


def resume_choice_text(cfg: SweepConfig, resumed: bool) -> str:
    """What ``--resume auto`` chose, in words."""
    return (f"resuming the sweep in {cfg.sweep_dir}" if resumed
            else f"no sweep to resume in {cfg.sweep_dir}: starting one")


def choose_resume(cfg: SweepConfig, resume: bool | str, say: Callable[[str], None] = lambda m: None) -> bool:
    """``--resume`` as a bool (``resolve_resume``), the one place ``gmpq sweep`` and ``gmpq run`` (``check_sweep``)
    take it from: for ``"auto"``, the choice said with ``say`` (``resume_choice_text``; also under --quiet: a
    retried job's log shows it); True and False as given, said by no line."""
    chosen = resolve_resume(cfg, resume)
    if not isinstance(resume, bool):
        say(resume_choice_text(cfg, chosen))
    return chosen


def check_folder_state(cfg: SweepConfig, resume: bool) -> None:
    """``run_sweep``'s refusals by what the (resolved) ``cfg``'s folder holds, before any file is written (``gmpq
    sweep --check`` runs them too): a resume with no Tune state (or a moved folder's), a new sweep where one is,
    or a new sweep in a folder with another sweep's results."""
    from .results import TRIALS_FILE, load_resolved_config

    exp, sweep_dir = experiment_path(cfg), Path(cfg.out_dir)
    if resume:
        _check_moved_resume(cfg)
        if not tune.Tuner.can_restore(exp):
            raise ConfigError(f"Nothing to resume: no Tune experiment state in '{exp}'. Run the sweep without "
                              "--resume first (same --out and --name), or with --resume auto, which starts it when "
                              "there is nothing to resume.")
        return
    if holds_sweep_state(cfg):
        raise ConfigError(f"The sweep folder already holds a sweep at '{exp}'. Continue it with --resume (or "
                          "--resume auto, which also starts a sweep where there is none), or pick another --out.")
    other = load_resolved_config(sweep_dir).get("name")
    if other is not None and other != cfg.name and (sweep_dir / TRIALS_FILE).exists():
        raise ConfigError(f"The folder '{sweep_dir}' holds the results of sweep '{other}' (trials.parquet, MLflow "
                          f"parent run); a second sweep '{cfg.name}' there would mix its trials into them. Give "
                          f"--out a new folder, or continue '{other}' with --resume.")


def _check_moved_resume(cfg: SweepConfig) -> None:
    """Through Ray Client (``ray://``) Tune restores a sweep on the cluster, out of reach of
    ``optuna_storage_now``: a sweep folder moved since it was written cannot resume that way."""
    from .moved_sweep import recorded_dir, same_folder
    from .results import load_resolved_config

    from .ray_env import head_node_text, ray_client_text

    old = recorded_dir(load_resolved_config(cfg.out_dir, follow_moves=False))
    client = ray_client_text(cfg.address)     # ray://, or auto following $RAY_ADDRESS=ray://
    if client and old is not None and not same_folder(old, Path(cfg.out_dir)):
        raise ConfigError(f"The sweep folder {cfg.out_dir} was written as {old}; through Ray Client ({client}) "
                          "Tune would restore it on the cluster with the old folder's Optuna storage. Resume it "
                          f"from the head node {head_node_text(cfg.address)}, or move the folder back to {old}.")


def _check_same_config(cfg: SweepConfig) -> int | None:
    """A resumed sweep must keep its config (Tune restores the old searcher and space anyway). The cache
    folder may move: its files are named by what their weights depend on; the ``finetune`` section may
    change (it is the final stage's, after the sweep: ``gmpq run --resume --workers 2``); ``n_trials`` may grow
    (``sweep_grow.check_growth``: not shrink, not through Ray Client). The ``testing`` section
    is saved only when set (older folders hold it with its defaults): missing, it compares as its defaults. The
    ``sampler`` (older folders: none, TPE) compares with its arguments' defaults written out. Returns the saved
    ``n_trials`` when the resume grows it, else None."""
    from .sweep_config import load_sweep_config
    from .sampling import with_defaults
    from .sweep_sections import FaultInjection

    saved_path = Path(cfg.out_dir) / "sweep_config.yaml"
    if not saved_path.exists():
        return None
    old, new = load_sweep_config(saved_path).resolved().to_dict(), cfg.to_dict()
    device = trial_device(cfg)                                  # "auto" and "fp32" are the same on a CPU
    old["precision"], new["precision"] = (resolve_precision(d["precision"], device) for d in (old, new))
    for d in (old, new):
        d.setdefault("testing", FaultInjection().to_dict())
        d["sampler"]["kwargs"] = with_defaults(d["sampler"]["name"], d["sampler"]["kwargs"])   # (loaded: always set)
    saved_n, n = old.get("n_trials"), new.get("n_trials")
    counts = isinstance(saved_n, int) and isinstance(n, int)      # (a count compared by check_growth)
    diff = [d for k in sorted(new) if k not in ("address", "cache_dir", "finetune") and not (k == "n_trials" and counts)
            for d in _differences(k, old.get(k), new.get(k))]
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        fewer = (f" (and --n-trials {n}: a resumed sweep may run more trials than its {saved_n}, not fewer)"
                 if counts and n < saved_n else "")
        raise ConfigError(f"--resume must use the sweep's saved config, but these settings differ from "
                          f"'{saved_path}': {shown}{fewer}. Resume with --out {cfg.out_dir} --resume and no other "
                          f"sweep settings (the final fine-tune's may change, and --n-trials may grow), or start a "
                          "new sweep with another --out.")
    if not counts or n == saved_n:
        return None
    from .sweep_grow import check_growth

    check_growth(cfg, saved_n, ended_count(cfg))                  # fewer: refused, naming how many ended
    return saved_n


def grown_from(cfg: SweepConfig) -> int | None:
    """The trial count a resume of ``cfg`` (resolved) grows the sweep from, None when it does not grow: the saved
    config's when ``cfg`` raises it (``_check_same_config``: its refusals too), or the smaller count Ray Tune saved
    (``sweep_grow.tune_saved_count``: a grown resume stopped before Tune saved its state, the saved config already
    raised), so a later plain ``--resume`` still says and records the growth; that one is checked as a grown resume
    is (``sweep_grow.check_growth``: through Ray Client, refused before Ray starts)."""
    from .sweep_grow import check_growth, tune_saved_count

    old = _check_same_config(cfg)
    tune_n = tune_saved_count(cfg)
    if tune_n is not None and tune_n < cfg.n_trials:
        if old is None:                                 # (a count the config raised: checked there)
            check_growth(cfg, tune_n, ended_count(cfg), tune_saved=True)
        return min(tune_n, old) if old is not None else tune_n
    return old


def ended_count(cfg: SweepConfig) -> int | str:
    """How many of the sweep's trials have ended (rows of its trials.parquet; "?" when it cannot be read)."""
    from .results import read_trials

    try:
        return len(read_trials(cfg.out_dir, missing_ok=True))
    except Exception:  # noqa: BLE001 - only a count in a message: the resume's own checks name a damaged table
        return "?"


def _differences(key: str, old: Any, new: Any) -> list[str]:
    """``key``'s differences as ``space.search_epochs (saved 2, now 1)``, nested mappings by their dotted keys."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str) for d in _differences(f"{key}.{k}", old.get(k), new.get(k))]
    name = key.removesuffix(".value")              # a space dimension's fixed value: space.search_epochs
    return [f"{name} (saved {_short(old)}, now {_short(new)})"]


def _short(value: Any) -> str:
    text = "unset" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def refuse_beside_running_sweep(sweep_dir: str | Path, resume: bool) -> None:
    """ConfigError, before anything is written, when another live process runs the sweep in ``sweep_dir``
    (``driver.json``: a ``gmpq sweep``, or a ``gmpq run`` in any stage): a second driver there runs the same trials
    again beside it and rewrites trials.parquet, the MLflow runs and the Optuna study with its own view, losing
    the first one's results. A ``gmpq finetune --sweep`` there is no reason (it only reads the ended trials). A
    process on another host, which cannot be checked from here, only gets a warning: a retried batch job finds its
    killed predecessor's marker until the heartbeat makes it stale (``driver_markers``)."""
    from .driver_markers import driver_text, ended_marker_text, live_driver

    driver = live_driver(sweep_dir)
    if driver is None or (driver.get("stage") == "finetune" and driver.get("command") in (None, "finetune")):
        return
    if driver["alive"] is None:
        log.warning("%s is marked as running the sweep in %s from another host (cannot be checked from here); if it "
                    "still runs, stop this command: two drivers would run the same trials and overwrite each other's "
                    "results", driver_text(driver), sweep_dir)
        return
    what = "--resume" if resume else "sweep"
    raise ConfigError(f"The sweep in '{sweep_dir}' is running: {driver_text(driver)}. A second {what} there would run "
                      "its trials again beside it and rewrite the results it writes (trials.parquet, the MLflow runs, "
                      f"the Optuna study), losing some. Follow it with: gmpq status {sweep_dir}. To continue it from "
                      f"here instead, stop that process first (Ctrl-C there, or kill {driver.get('pid')}: it keeps "
                      f"what ended), then resume; {ended_marker_text(sweep_dir)}.")


def joining_text(address: str, origin: str) -> str | None:
    """The line of a command about to join the Ray cluster at ``address``, read from ``origin`` (the sweep's config,
    a --config file) rather than given as --address: ``joining the Ray cluster at ... (from ...)``, worded as
    ``--address auto``'s line (``ray_env._join_address``). None where that line is said already (an address that
    resolves to another: ``auto``) or nothing is joined (``local``)."""
    from cluster.connect import resolve_address

    try:
        resolved = resolve_address(address, source=origin)
    except ConfigError:                     # a malformed address: the join names it
        return None
    if resolved.kind not in ("gcs", "client") or resolved.address != address.strip():
        return None
    return f"joining the Ray cluster at {resolved.address} (from {origin}; --address overrides it)"


def say_joining(address: str | None, origin: str) -> None:
    """Say ``joining_text`` on the channel ``--address auto``'s line goes to (``ray_env``'s log)."""
    from . import ray_env

    text = joining_text(address, origin) if address else None
    if text is not None:
        ray_env.log.warning("%s", text)
