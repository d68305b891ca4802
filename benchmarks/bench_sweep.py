"""Where a sweep's wall time goes: trial compute (search + transfer check) versus orchestration.

Runs ``orchestrator.sweep.run_sweep`` on a preset (``demo`` by default) in a fresh folder, then
reads the per-trial timings in ``trials.parquet`` (``search_seconds + transfer_seconds``) and
prints:

    compute_fraction = sum over trials of (search_s + transfer_s) / (sweep wall_s x trial slots)

where the trial slots are ``max_concurrent_trials`` (the sweep can keep that many trials computing
at once; 1.0 means every slot computed all the time). The rest is orchestration, split where it
can be measured: shared preparation (datasets, FP teachers, FP target model; ``prepare_shared``, whose
missing models train side by side as Ray tasks),
Ray start and shutdown (``ray_session``), and the remainder of the Tune phase (actor start,
scheduling, MLflow/Parquet callbacks, and inside the trials their data/teacher loading: the
difference between a trial's wall_seconds and its compute is printed too). The phases are timed by
wrapping those two functions for this run only; nothing else changes. Pruned or failed trials have
no search/transfer timings: their wall_seconds count as compute (an upper bound) and are listed.
Part of the rest is not orchestration but the sweep's tail: once the last trial has started, a slot
whose trial ends (an early-pruned one, say) has nothing left to run. That share is printed on its own
(``tail_idle_slot_s``, from the trials' start/finish times); in a local CPU sweep the slot's cores are
not idle then but lent to the trials still running (``orchestrator.tail_threads``), which shortens
the tail, but the slot counts as without compute here. A second figure counts cores instead of slots:

    core_compute_fraction = (trial compute + lent_slot_s) / (sweep wall_s x trial slots)

where ``lent_slot_s`` is, for each trial that took lent cores (its ``threads`` events in
``trial_events.jsonl``), the time from the switch to its end times the extra threads per slot's
cores: the share of the machine's cores assigned to computing trials. An upper bound of the cores
that computed (a lent thread counts as a busy core, however much it sped the trial up); the goal is
judged on ``compute_fraction``.

    python benchmarks/bench_sweep.py --n-trials 2 --epochs 1 --cache-dir ~/.cache/gmpq   # quick: 40 s, warm cache
    python benchmarks/bench_sweep.py --cache-dir ~/.cache/gmpq    # demo preset, as `gmpq sweep --preset demo`: ~1.5 min
    python benchmarks/bench_sweep.py --json sweep.json    # a cold start: teachers and FP target model trained first
    python benchmarks/bench_sweep.py --prep both          # cold start: sequential vs parallel preparation

Without --cache-dir the sweep gets a fresh, empty model cache (unlike `gmpq sweep`, which uses ~/.cache/gmpq): the
teachers and the FP target model train first, minutes on 2 cores. The sweep's progress goes to stderr, the figures to
stdout (--json -: the JSON alone). A sweep stopped midway (Ctrl-C) gives no figures and exit status 130.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse
import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench_cli import check_output_file, cli_entry, positive_int, write_text_file   # same folder (run as a script)


class SweepStopped(Exception):
    """The timed sweep ended before all its trials did (Ctrl-C, SIGTERM, a stopped driver): no figures."""

    def __init__(self, ended: int, planned: int, terminated: bool):
        super().__init__(f"the sweep stopped after {ended} of its {planned} trials ended "
                         f"({'SIGTERM' if terminated else 'Ctrl-C or a stopped driver'}): no figures (a part of a sweep "
                         "would give a wrong compute fraction) and no --json written.")
        self.terminated = terminated


def _timed_phase(times: dict, key: str, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - t0
    return wrapper


def _timed_session(times: dict, session_cm):
    @contextlib.contextmanager
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        with session_cm(*a, **k) as s:
            times["ray_start_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            try:
                yield s
            finally:
                times["tune_phase_s"] = time.perf_counter() - t1
                t2 = time.perf_counter()
        times["ray_stop_s"] = time.perf_counter() - t2
    return wrapper


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from gmpq_core.precision import PRECISIONS      # torch-free
    from search_spaces.presets import list_presets  # torch-free

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo", help=f"one of {', '.join(list_presets())} (default: %(default)s)")
    p.add_argument("--n-trials", type=positive_int, default=None, help="default: the preset's")
    p.add_argument("--epochs", type=positive_int, default=None, help="search epochs per trial (default: the preset's)")
    p.add_argument("--max-concurrent", type=positive_int, default=None,
                   help="trial slots: trials computing at once (default: the preset's)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the sweep's training precision (default: the preset's, auto: float32 on a CPU)")
    p.add_argument("--out", default=None, help="sweep folder, new or empty (default: a fresh temporary folder, "
                                                 "removed after)")
    p.add_argument("--cache-dir", default=None,
                   help="teacher / FP-target cache shared across sweeps, e.g. ~/.cache/gmpq (default: a fresh folder "
                        "inside the sweep folder, so the teachers and the FP target model are trained: a cold start)")
    p.add_argument("--prep", choices=("parallel", "sequential", "both"), default="parallel",
                   help="how the missing shared models are trained: as parallel Ray tasks (what gmpq sweep does), "
                        "one after the other in the driver (as before; Ray already running), or both: one cold sweep each, "
                        "one after the other in this invocation")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write the JSON summary to PATH ('-': stdout)")
    args = p.parse_args(argv)
    if args.prep == "both" and (args.out or args.cache_dir):
        p.error("--prep both runs two cold sweeps in fresh temporary folders: drop --out and --cache-dir")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and (out.is_file() or (out.is_dir() and any(out.iterdir()))):
        p.error(f"--out {args.out}: {'that is a file' if out.is_file() else 'the folder already holds files'}; the "
                "benchmark times a fresh sweep: give a new or empty folder, or leave --out out (a temporary folder, "
                "removed after).")
    check_output_file(p, args.json)
    return args


def run_once(args: argparse.Namespace, prep: str, import_s: float) -> dict:
    """One sweep with timed phases, in ``--out`` or a temporary folder removed after; its summary row (see the
    module doc)."""
    tmp = args.out is None
    out = Path(tempfile.mkdtemp(prefix="gmpq_bench_sweep_") if tmp else args.out)
    try:
        return _run_in(out, args, prep, import_s)
    finally:            # also after a refused config, an error or Ctrl-C: no temporary sweep left behind
        if tmp:
            shutil.rmtree(out, ignore_errors=True)


def _run_in(out: Path, args: argparse.Namespace, prep: str, import_s: float) -> dict:
    import pyarrow.parquet as pq

    import orchestrator.ray_env as ray_env
    import orchestrator.sweep as sweep_mod
    from orchestrator.sweep_config import load_sweep_config

    overrides = {"n_trials": args.n_trials, "max_concurrent_trials": args.max_concurrent, "out_dir": str(out),
                 "space.search_epochs": args.epochs, "name": "bench_sweep", "precision": args.precision}
    overrides["cache_dir"] = str(Path(args.cache_dir).expanduser().resolve()) if args.cache_dir else str(out / "cache")
    cfg = load_sweep_config(preset=args.preset, overrides={k: v for k, v in overrides.items() if v is not None})
    times: dict[str, float] = {}
    orig_prepare, orig_session = sweep_mod.prepare_shared, ray_env.ray_session
    prepare = orig_prepare if prep == "parallel" else functools.partial(_sequential, orig_prepare)
    sweep_mod.prepare_shared = _timed_phase(times, "prepare_s", prepare)
    ray_env.ray_session = _timed_session(times, orig_session)
    load0 = round(os.getloadavg()[0], 2)     # and at the end: was other work running beside the sweep?
    try:
        t0 = time.perf_counter()
        summary = sweep_mod.run_sweep(cfg, progress=True)
        wall = time.perf_counter() - t0
    finally:
        sweep_mod.prepare_shared, ray_env.ray_session = orig_prepare, orig_session
    if summary.interrupted:
        raise SweepStopped(summary.n_trials, summary.n_planned or cfg.n_trials, summary.terminated)
    # the preparation runs inside the Ray session (its trainings are Ray tasks): not part of the Tune phase
    times["tune_phase_s"] = times.get("tune_phase_s", 0.0) - times.get("prepare_s", 0.0)
    rows = pq.read_table(Path(summary.sweep_dir) / "trials.parquet").to_pylist()
    slots = max(1, int(cfg.resolved().max_concurrent_trials))
    compute = in_trial_other = 0.0
    no_timing = []
    for r in rows:
        s, t, w = r.get("search_seconds"), r.get("transfer_seconds"), r.get("wall_seconds")
        if s is None:
            no_timing.append(r["trial_id"])
            compute += w or 0.0
            continue
        c = s + (t or 0.0)
        compute += c
        if w is not None:
            in_trial_other += max(w - c, 0.0)
    capacity = wall * slots
    tail_idle = _tail_idle_slot_s(rows, slots)
    from datetime import datetime

    finished = {r["trial_id"]: datetime.fromisoformat(r["finished_at"]).timestamp() for r in rows if r.get("finished_at")}
    lent = _lent_slot_s(Path(summary.sweep_dir) / "trial_events.jsonl", cfg.resolved().resources.cpu, finished)
    res = {"preset": args.preset, "prep": prep, "n_trials": len(rows), "n_completed": summary.n_completed,
           "n_pruned": summary.n_pruned, "n_failed": summary.n_failed, "slots": slots,
           "wall_s": round(wall, 2), "import_s": round(import_s, 2),
           "prepare_s": round(times.get("prepare_s", 0.0), 2), "ray_start_s": round(times.get("ray_start_s", 0.0), 2),
           "tune_phase_s": round(times.get("tune_phase_s", 0.0), 2), "ray_stop_s": round(times.get("ray_stop_s", 0.0), 2),
           "trial_compute_s": round(compute, 2), "in_trial_non_compute_s": round(in_trial_other, 2),
           "compute_fraction": round(compute / capacity, 4) if capacity > 0 else None,
           "tail_idle_slot_s": round(tail_idle, 2),
           "tail_idle_fraction": round(tail_idle / capacity, 4) if capacity > 0 else None,
           "lent_slot_s": round(lent, 2),
           "core_compute_fraction": round((compute + lent) / capacity, 4) if capacity > 0 else None,
           "compute_fraction_of_tune_phase": (round(compute / (times["tune_phase_s"] * slots), 4)
                                              if times.get("tune_phase_s") else None),
           "trials_without_timings": no_timing, "shortened": bool(args.n_trials or args.epochs),
           "cache_dir": cfg.resolved().cache_dir, "precision": cfg.precision,
           "trials": [{k: r.get(k) for k in ("budget_avg_bits", "proxy_size", "search_seconds", "transfer_seconds",
                                             "transfer_top1")} for r in sorted(rows, key=lambda r: r.get("started_at") or "")],
           "loadavg_1m_start": load0, "loadavg_1m_end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    return res


def _tail_idle_slot_s(rows: list[dict], slots: int) -> float:
    """Slot-seconds left idle after the last trial started (nothing left to run: the sweep's tail), from the
    driver-side start/finish times in trials.parquet: the integral of (slots - running trials) over that span."""
    from datetime import datetime

    spans = [(datetime.fromisoformat(r["started_at"]).timestamp(), datetime.fromisoformat(r["finished_at"]).timestamp())
             for r in rows if r.get("started_at") and r.get("finished_at")]
    if not spans:
        return 0.0
    last_start, end = max(a for a, _ in spans), max(b for _, b in spans)
    cuts = sorted({last_start, end, *(b for _, b in spans if last_start < b < end)})
    idle = 0.0
    for lo, hi in zip(cuts, cuts[1:]):
        running = sum(a <= lo and b >= hi for a, b in spans)
        idle += max(slots - running, 0) * (hi - lo)
    return idle


def _lent_slot_s(events_path: Path, cpu_per_trial: float, finished: dict[str, float] | None = None) -> float:
    """Slot-seconds of cores lent to running trials at the sweep's tail: for each ``threads`` event, the
    threads over the trial's own (``max(1, int(cpu))``), in slots, times the time until the trial's next
    switch, end, or new attempt (``start``/``replay``), else its ``finished`` time (a pruned trial logs no
    end). An upper bound of the cores that computed: a lent thread counts as a busy core."""
    if not events_path.is_file() or cpu_per_trial <= 0:
        return 0.0
    own = max(1, int(cpu_per_trial))
    events = [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()]
    lent = 0.0
    for e in events:
        if e.get("event") != "threads":
            continue
        later = [x["time"] for x in events if x.get("trial_id") == e["trial_id"] and x["time"] > e["time"]
                 and x.get("event") in ("threads", "end", "start", "replay")]
        stop = min(later) if later else (finished or {}).get(e["trial_id"])
        if stop is not None and stop > e["time"]:
            lent += max(e["threads"] - own, 0) / own * (stop - e["time"])
    return lent


def _sequential(prepare, cfg, **kw):
    """``prepare_shared`` as before the Ray-task preparation: everything in the driver, one job at a time."""
    return prepare(cfg, **{**kw, "parallel": False})


def _verdict(res: dict) -> str:
    if res.get("shortened"):    # --n-trials / --epochs: fixed costs (Ray's start, the tail) weigh more
        return "(the goal, >= 90%, is judged on the preset's own sweep; this one is shortened: not judged)"
    return f"(goal >= 90%: {'met' if res['compute_fraction'] >= 0.9 else 'MISSED'})"


def _print(res: dict) -> None:
    slots, wall = res["slots"], res["wall_s"]
    print(f"sweep '{res['preset']}' (prep {res['prep']}): {res['n_trials']} trial(s) ({res['n_completed']} completed, "
          f"{res['n_pruned']} pruned, {res['n_failed']} failed), {slots} slot(s), wall {wall:.1f} s "
          f"(+{res['import_s']:.1f} s imports)")
    print(f"  trial compute (search + transfer): {res['trial_compute_s']:.1f} slot-s of {wall * slots:.1f} -> "
          f"{100 * res['compute_fraction']:.1f}% of the wall time " + _verdict(res))
    if res["n_trials"] < slots:
        print(f"  note: {res['n_trials']} trial(s) on {slots} slots: a slot never had a trial of its own, so the "
              f"fraction cannot reach {100 * res['n_trials'] / slots:.0f}%; give --n-trials {slots} or more "
              f"(or --max-concurrent {res['n_trials']}) for a figure to judge")
    print(f"  of the rest, slots without a trial after the last one started (nothing left to run; their "
          f"cores go to the trials still running): {res['tail_idle_slot_s']:.1f} slot-s = "
          f"{100 * res['tail_idle_fraction']:.1f}% of the wall time")
    print(f"  counting cores assigned to trials, not slots (the tail's cores lent to the last trials: "
          f"{res['lent_slot_s']:.1f} slot-s; an upper bound, a lent thread counts as a busy core): "
          f"{100 * res['core_compute_fraction']:.1f}%")
    print(f"  orchestration: prepare {res['prepare_s']:.1f} s, Ray start {res['ray_start_s']:.1f} s, "
          f"Ray stop {res['ray_stop_s']:.1f} s, Tune phase {res['tune_phase_s']:.1f} s "
          f"(compute fills {100 * (res['compute_fraction_of_tune_phase'] or 0):.1f}% of its slots); inside "
          f"trials but outside compute {res['in_trial_non_compute_s']:.1f} s")
    if res.get("loadavg_1m_end") is not None:
        print(f"  load 1m: start {res['loadavg_1m_start']}, end {res['loadavg_1m_end']} ({res['cpus']} cores; near "
              "or above the core count: other work shared the machine, and the fraction is lower for it)")
    if res["trials_without_timings"]:
        print(f"  {len(res['trials_without_timings'])} trial(s) without search/transfer timings (wall counted as "
              f"compute): {res['trials_without_timings']}")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import orchestrator.sweep  # noqa: F401  (counted as import time, not as sweep time)
    import_s = time.perf_counter() - T_START
    preps = ("sequential", "parallel") if args.prep == "both" else (args.prep,)
    try:
        results = [run_once(args, prep, import_s) for prep in preps]
    except SweepStopped as e:
        print(f"bench_sweep.py: {e}", file=sys.stderr)
        return 143 if e.terminated else 130
    if args.json:
        text = json.dumps(results[0] if len(results) == 1 else results, indent=1)
        if args.json == "-":
            print(text)
        else:
            write_text_file(args.json, text + "\n")
    if args.json != "-":
        for res in results:
            _print(res)
        if len(results) == 2:
            seq, par = results
            print(f"side by side: prepare {seq['prepare_s']:.1f} s -> {par['prepare_s']:.1f} s "
                  f"(x{seq['prepare_s'] / max(par['prepare_s'], 1e-9):.2f} faster), compute fraction "
                  f"{100 * seq['compute_fraction']:.1f}% -> {100 * par['compute_fraction']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
