"""Where a sweep stands, read from its folder alone (no Ray session, no MLflow): what ``gmpq status`` prints.

Sources, all written as the sweep goes:
- ``sweep_config.yaml``: its name and planned number of trials;
- ``trials.parquet``: the trials that ended (completed, pruned, failed);
- ``trial_events.jsonl``: each trial's start, search epochs and transfer check (written by the trials);
- ``driver.json``: the host and pid of the command running the sweep or its fine-tune, and ``driver.finetune.json``
  the one running its final stage (``driver_markers``);
- ``pareto.parquet``, ``final.parquet`` and the fine-tune's progress files: the final stage;
- ``mlflow_parent.json`` / ``mlflow_runs.json``: the MLflow runs the sweep made (``mlflow_view``): an ended trial or
  fine-tune without one is a run its tracking store lacks (logging was off: the store could not be reached).
A trial that started, has no row, and whose driver is gone was stopped midway (Ctrl-C, a killed driver):
``--resume`` runs it again.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from gmpq_core.errors import CheckpointError
from gmpq_core.fileio import read_json

from .driver_markers import DRIVER_FILE, FINETUNE_DRIVER_FILE, driver_alive, is_this_process, live_driver, read_marker
from .pareto_stale import stale_selection
from .results import (CONFIG_FILE, FINAL_FILE, PARETO_FILE, TRIAL_EVENTS, TRIALS_FILE, load_resolved_config,
                      read_table, read_trials_table)
from .trial_status import COMPLETED, FAILED, PRUNED, TrialStatusBook

__all__ = ["RUNNING", "STOPPED", "TrialState", "SweepStatus", "read_sweep_status", "mlflow_view", "mlflow_gaps_text",
           "continue_text", "recorded_address", "no_trial_ended_text", "last_epoch_proxy_top1"]

log = logging.getLogger(__name__)
_CUT_LINES_OK = 3    # trial_events.jsonl lines a crash may leave cut (a driver and its trials append to it)
RUNNING, STOPPED = "running", "stopped"   # a started trial with no row: its driver is alive / gone


@dataclass
class TrialState:
    number: int | None
    trial_id: str
    status: str                        # completed | pruned | failed | running | stopped
    budget_avg_bits: float | None = None
    proxy_size: int | None = None
    proxy_top1: float | None = None
    transfer_top1: float | None = None
    gbitops: float | None = None
    seconds: float | None = None       # wall seconds (ended), since its start (running), start to last event (stopped)
    phase: str = ""                    # where a running or stopped trial got to
    note: str = ""                     # the pruning reason or the error


@dataclass
class SweepStatus:
    sweep_dir: Path
    name: str
    n_planned: int | None
    trials: list[TrialState]
    driver: dict | None                # driver.json, if present
    driver_alive: bool | None          # None: it runs on another host
    finetune_driver: dict | None = None    # driver.finetune.json of another live process than driver.json's
    selected: list[str] = field(default_factory=list)          # pareto.parquet's selection
    selected_from: list[str] | None = None     # pareto.parquet's front, chosen among (None: no pareto.parquet)
    front_now: list[str] = field(default_factory=list)         # the Pareto front of trials.parquet now
    stale_selection: Any = None   # pareto_stale.StaleSelection: pareto.parquet selected from other completed trials
    final: dict[str, dict] = field(default_factory=dict)       # final.parquet rows by trial id
    finetune_progress: dict[str, dict] = field(default_factory=dict)   # {"epoch", "step", "steps", "age_s"}
    shared: dict = field(default_factory=dict)                 # shared.json: FP target and teachers' accuracies
    mlflow: dict = field(default_factory=dict)                 # mlflow_view: what the tracking store lacks

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)

    @property
    def n_ended(self) -> int:
        return sum(t.status in (COMPLETED, PRUNED, FAILED) for t in self.trials)

    @property
    def active_driver(self) -> dict | None:
        """driver.json's process while it may run, else another process's final stage (``finetune_driver``): the
        final stage of a ``gmpq finetune --sweep`` started during a sweep outlives the sweep's marker."""
        if self.driver and self.driver_alive is not False:
            return {**self.driver, "alive": self.driver_alive}
        return self.finetune_driver

    @property
    def unselected_since(self) -> list[str]:
        """Trials on the Pareto front now that pareto.parquet's front lacks: they ended after ``gmpq pareto`` ran."""
        if self.selected_from is None:
            return []
        return [t for t in self.front_now if t not in self.selected_from]

    @property
    def state(self) -> str:
        """running | fine-tuning | unknown (driver elsewhere) | finished | stopped | not started"""
        d = self.active_driver
        if d and d.get("alive") is None:
            return "unknown"
        if d:
            return "fine-tuning" if d.get("stage") in ("finetune", "run") else "running"
        if self.n_planned is not None and self.n_ended >= self.n_planned:
            return "finished"
        return "stopped" if self.trials else "not started"


def _events(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / TRIAL_EVENTS
    if not path.is_file():
        return []
    out, bad = [], 0
    lines = path.read_text(errors="replace").splitlines()
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(e, dict) and e.get("trial_id"):
            out.append(e)
    if bad > _CUT_LINES_OK:                 # more than crashes cut (one line per writing process): damaged
        log.warning("%s: %d of %d lines are not JSON events and were skipped; trials that only they mention are "
                    "missing from this status (trials.parquet is unaffected)", path, bad, len(lines))
    return out


def _rows(sweep_dir: Path, name: str, numbers: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a results table, [] while it is not written (CheckpointError naming it if damaged, without
    ``trial_id`` or with text in ``numbers``: the columns printed as numbers)."""
    path = sweep_dir / name
    if not path.is_file():
        return []
    if name == TRIALS_FILE:
        return read_trials_table(sweep_dir).to_pylist()
    return read_table(path, columns=("trial_id",), numbers=numbers).to_pylist()


def _started_trials(events: list[dict]) -> dict[str, dict]:
    """trial_id -> what its events say: number, params, start time (the last attempt's), phase and the supernet's
    proxy top-1 at the attempt's last search epoch."""
    seen: dict[str, dict] = {}
    for e in events:
        t = seen.setdefault(e["trial_id"], {"number": None, "params": {}, "start": None, "phase": "", "last": None,
                                            "proxy_top1": None})
        kind = e.get("event")
        t["last"] = e.get("time") or t["last"]
        if kind in ("start", "replay"):
            t["number"] = e.get("trial_number") or t["number"]
            t["params"] = e.get("params") or t["params"]
            t["start"], t["phase"], t["proxy_top1"] = e.get("time"), "starting", None
        elif kind == "epoch":
            t["phase"] = f"search epoch {e.get('epoch')}/{e.get('of', '?')} done"
            t["proxy_top1"] = e.get("proxy_top1")         # the supernet's, at its last epoch (as a pruned trial's)
        elif kind == "transfer":
            t["phase"] = "transfer check"
    return {tid: t for tid, t in seen.items() if t["start"] is not None}


def last_epoch_proxy_top1(sweep_dir: str | Path) -> dict[str, float]:
    """Each started trial's supernet proxy_top1 at its last search epoch, from trial_events.jsonl ({} unreadable)."""
    try:
        started = _started_trials(_events(Path(sweep_dir)))
    except (CheckpointError, OSError):
        return {}
    return {tid: t["proxy_top1"] for tid, t in started.items() if t.get("proxy_top1") is not None}


def _finetune_progress(sweep_dir: Path, cfg: dict, todo: list[str]) -> dict[str, dict]:
    from .final_results import finetune_progress_dir

    from .kept_finetunes import started_manifest

    storage = finetune_progress_dir(cfg, sweep_dir)
    out = {}
    for tid in todo:
        path = storage / f"finetune-{tid}.progress.json"
        started = started_manifest(sweep_dir, tid)         # its fine-tune began (no row yet): maybe no epoch yet
        try:
            p = read_json(path)
            out[tid] = {**p, "age_s": time.time() - path.stat().st_mtime, "started": started is not None}
        except (CheckpointError, OSError):
            if started is not None:
                out[tid] = {"started": True, "started_at": started.get("started_at")}
    return out


def read_sweep_status(sweep_dir: str | Path, *, own_marker: bool = True) -> SweepStatus:
    """The status of the sweep in ``sweep_dir`` (CheckpointError if it is not a sweep folder or a file is damaged).
    ``own_marker=False``: a driver.json naming this process (a command's own stage asking) counts as none."""
    sweep_dir = Path(sweep_dir)
    cfg = load_resolved_config(sweep_dir, missing_ok=False)
    driver = read_marker(sweep_dir / DRIVER_FILE)
    if driver is not None and not own_marker and is_this_process(driver):   # the caller's own stage: no other
        driver = None                                                         # command runs the sweep
    alive = driver_alive(driver)
    finetune = live_driver(sweep_dir, FINETUNE_DRIVER_FILE)
    if finetune is not None and driver is not None and finetune.get("pid") == driver.get("pid") \
            and finetune.get("host") == driver.get("host"):
        finetune = None                                     # the same process: driver.json says it
    started = _started_trials(_events(sweep_dir))
    rows = {str(r["trial_id"]): r for r in _rows(sweep_dir, TRIALS_FILE)}
    trials = []
    for tid, r in rows.items():
        ev = started.get(tid, {})
        trials.append(TrialState(
            number=ev.get("number"), trial_id=tid, status=str(r.get("status")),
            budget_avg_bits=r.get("budget_avg_bits") if r.get("budget_avg_bits") is not None
            else r.get("param_budget_avg_bits"),
            proxy_size=r.get("param_proxy_size"), proxy_top1=r.get("proxy_top1"), transfer_top1=r.get("transfer_top1"),
            gbitops=r.get("gbitops"), seconds=r.get("wall_seconds"), note=str(r.get("error") or "")))
    now = time.time()
    for tid, ev in started.items():
        if tid in rows:
            continue
        params = ev["params"]
        running = alive is not False
        trials.append(TrialState(   # a stopped trial's time: from its start to its last event
            number=ev["number"], trial_id=tid, status=RUNNING if running else STOPPED,
            budget_avg_bits=params.get("budget_avg_bits"), proxy_size=params.get("proxy_size"),
            proxy_top1=ev["proxy_top1"], seconds=(now if running else float(ev["last"] or ev["start"])) - float(ev["start"]), phase=ev["phase"]))
    book = TrialStatusBook(sweep_dir / "trial_status.json")    # read once: the pruner's reasons
    for t in trials:
        if t.status == PRUNED and not t.note:
            t.note = book.reason(t.trial_id) or ""
    trials.sort(key=lambda t: (t.number is None, t.number or 0, t.trial_id))
    pareto = _rows(sweep_dir, PARETO_FILE)
    selected = [str(r["trial_id"]) for r in pareto if r.get("selected")]
    final = {str(r["trial_id"]): r for r in _rows(sweep_dir, FINAL_FILE, ("final_top1", "gbitops", "seconds"))}
    progress = _finetune_progress(sweep_dir, cfg, [t for t in selected if t not in final])
    return SweepStatus(sweep_dir=sweep_dir, name=str(cfg.get("name") or sweep_dir.name), n_planned=cfg.get("n_trials"),
                       trials=trials, driver=driver, driver_alive=alive, finetune_driver=finetune, selected=selected,
                       selected_from=[str(r["trial_id"]) for r in pareto] if (sweep_dir / PARETO_FILE).is_file() else None,
                       front_now=_front_ids(sweep_dir) if (sweep_dir / PARETO_FILE).is_file() else [],
                       stale_selection=stale_selection(sweep_dir, cfg=cfg),
                       final=final,
                       finetune_progress=progress, shared=_read_shared(sweep_dir),
                       mlflow=mlflow_view(sweep_dir, cfg, [t.trial_id for t in trials if t.status in (COMPLETED, PRUNED,
                                                                                                   FAILED)], final))


def _front_ids(sweep_dir: Path) -> list[str]:
    """The trial ids on the Pareto front of trials.parquet now ([] when it cannot be read: nothing is claimed)."""
    from .pareto import pareto_front

    try:
        return [str(t) for t in pareto_front(read_trials_table(sweep_dir).to_pandas())["trial_id"]]
    except (CheckpointError, OSError, KeyError):
        return []


def continue_text(sweep_dir: str | Path, flag: str = "--resume") -> str:
    """The commands that continue a sweep stopped before all its trials ended (``gmpq status``, and ``gmpq pareto``
    / ``gmpq finetune --sweep`` before any trial ended: ``no_trial_ended_text``). A sweep that ran joined to a Ray
    cluster (its saved config has an ``address``) continues on that cluster; once it is gone, ``--address`` names
    the new one (worded as a lost cluster's paragraph: ``cluster_watch.join_hint``)."""
    text = (f"Continue with: gmpq sweep --out {sweep_dir} {flag} (or gmpq run --out {sweep_dir} {flag}, which also "
            "fine-tunes).")
    address = recorded_address(sweep_dir)
    if address is None:
        return text
    from .cluster_watch import join_hint

    return (f"{text} It joins the Ray cluster its {CONFIG_FILE} records ({address}); if that cluster is gone, "
            f"add{join_hint(False)}.")


def recorded_address(sweep_dir: str | Path) -> str | None:
    """The Ray cluster address a sweep's saved config records (None: none, ``local``, or no readable config)."""
    try:
        address = load_resolved_config(sweep_dir, follow_moves=False).get("address")
    except (CheckpointError, OSError):
        return None
    address = str(address).strip() if address is not None else ""
    return address if address and address != "local" else None


def no_trial_ended_text(sweep_dir: str | Path) -> str | None:
    """Why a sweep folder (it has ``sweep_config.yaml``) has no ``trials.parquet`` yet, and what to do: wait for the
    running sweep, or continue the stopped one (``continue_text``: ``--resume``, or ``--resume auto`` when no trial
    started, which starts the sweep from its saved config). None when trials.parquet exists or ``sweep_dir`` is no
    sweep folder (then the missing file is named as such)."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / TRIALS_FILE).exists() or not (sweep_dir / CONFIG_FILE).is_file():
        return None
    st = read_sweep_status(sweep_dir, own_marker=False)      # (a final stage asking: its own marker is no sweep)
    text = (f"No trial of the sweep {sweep_dir} has ended yet, so it has no results: {TRIALS_FILE} is written when "
            "the first one ends.")
    d = st.active_driver or {}
    if st.state in ("running", "fine-tuning"):
        return (f"{text} The sweep is running (pid {d.get('pid')} on {d.get('host')}): wait until a trial has ended "
                f"(gmpq status --sweep {sweep_dir} shows where it stands).")
    if st.state == "unknown":
        return (f"{text} It is driven from {d.get('host')}, maybe still running: gmpq status --sweep {sweep_dir} "
                f"there shows where it stands. If it stopped: {continue_text(sweep_dir)}")
    return f"{text} {continue_text(sweep_dir, '--resume' if st.state == 'stopped' else '--resume auto')}"


def mlflow_view(sweep_dir: str | Path, cfg: dict, ended: Iterable[str], finetuned: Iterable[str] = ()) -> dict:
    """What the sweep's tracking store lacks, from the folder alone (MLflow is not asked): ``{"tracking_uri",
    "parent_run": whether mlflow_parent.json records the sweep's parent run, "missing_trials" / "missing_finetunes":
    the ended trials and fine-tuned policies with no run in mlflow_runs.json}``. The sink records each run as it
    makes it (a trial's at its start), so one missing was never logged: the store could not be reached then (the
    sweep warned "MLflow logging disabled"). {} when an id file is unreadable (nothing is claimed)."""
    from .mlflow_sink import PARENT_FILE, RUNS_FILE, default_tracking_uri

    sweep_dir = Path(sweep_dir)
    try:
        parent = read_json(sweep_dir / PARENT_FILE) if (sweep_dir / PARENT_FILE).is_file() else {}
        runs = read_json(sweep_dir / RUNS_FILE) if (sweep_dir / RUNS_FILE).is_file() else {}
    except (CheckpointError, OSError):
        return {}
    trials = runs.get("trials") if isinstance(runs.get("trials"), dict) else {}
    finetunes = runs.get("finetune") if isinstance(runs.get("finetune"), dict) else {}
    has_run = {str(k).split(":", 1)[0].split("#", 1)[0] for k in finetunes}    # <trial_id>[:<recipe>][#<run>]
    return {"tracking_uri": str(cfg.get("tracking_uri") or default_tracking_uri(sweep_dir)),
            "parent_run": bool(isinstance(parent, dict) and parent.get("run_id")),
            "missing_trials": [t for t in ended if t not in trials],
            "missing_finetunes": [t for t in finetuned if t not in has_run]}


def _read_shared(sweep_dir: Path) -> dict:
    """shared.json (the shared models' paths and accuracies), {} while it is not written or unreadable."""
    try:
        d = read_json(sweep_dir / "shared.json")
    except (CheckpointError, OSError):
        return {}
    return d if isinstance(d, dict) else {}


def mlflow_gaps_text(view: dict, sweep_dir: str | Path, *, running: bool = False) -> str | None:
    """The line saying what the tracking store lacks (``mlflow_view``) and the command that uploads it (``running``:
    once the command still running the sweep ends, as the sync refuses before); None when it lacks nothing (or no
    trial has ended yet)."""
    trials, finetunes = view.get("missing_trials") or [], view.get("missing_finetunes") or []
    if not view or not (trials or finetunes):
        return None
    sync = f"gmpq sync-mlflow --sweep {sweep_dir}"
    when = "once the command running it has ended and the store answers" if running else "once the store answers"
    uri = view["tracking_uri"]
    if not view.get("parent_run"):
        return (f"MLflow lacks this sweep: nothing of it was logged to {uri} (its logging was off: the tracking store "
                f"could not be reached). The results are complete in the Parquet tables; {when}, upload them with: "
                f"{sync}")
    parts = [f"{len(ids)} {what} run(s) ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"
             for ids, what in ((trials, "trial"), (finetunes, "fine-tune")) if ids]
    return (f"MLflow lacks {' and '.join(parts)} in {uri} (its logging was off for part of the sweep: the tracking "
            f"store could not be reached). " + ("Once the command running it has ended, upload" if running else "Upload")
            + f" them with: {sync}")
