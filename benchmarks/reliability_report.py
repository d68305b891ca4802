"""Reliability report: inject faults into real gmpq processes and count what survived.

    .venv/bin/python benchmarks/reliability_report.py            # a table
    .venv/bin/python benchmarks/reliability_report.py --json     # one JSON object
    .venv/bin/python benchmarks/reliability_report.py --only bad_inputs,damaged_files   # no sweeps: ~15 s

Scenarios: listed at the end of --help, from the registry ``SCENARIOS`` below (also --only's choices).

Totals: faults injected, trials attempted/failed/retried/recovered, rows and runs lost (must be 0),
duplicate rows/runs (must be 0), finished work recomputed (must be 0). Exit status 0 when every
scenario held, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "reliability")]

from bench_cli import check_output_file, cli_entry, write_text_file  # noqa: E402  (same folder)
from faults import Procs, fake_sweep_dir  # noqa: E402
from scenarios import Outcome, driver_kill, finetune_kill, mlflow_down_mid_sweep, trial_faults  # noqa: E402

SUMS = ("faults_injected", "trials_attempted", "attempts", "trials_failed", "trials_retried", "trials_recovered",
        "rows_lost", "duplicate_rows", "runs_lost", "duplicate_runs", "reruns_of_finished")
MUST_BE_ZERO = ("rows_lost", "duplicate_rows", "runs_lost", "duplicate_runs", "reruns_of_finished")


def _cli(argv: list[str]) -> tuple[int, str]:
    from orchestrator.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def bad_inputs(root: Path) -> Outcome:
    """Every bad input case (in this process: no Ray, seconds each); refused = exit 2, named, nothing written."""
    import os
    import re

    from bad_input_cases import CASES, materialise
    from test_validation import PENDING

    t0 = time.time()
    o = Outcome("bad_inputs")
    refused = 0
    cases = [c for c in CASES if c.id not in PENDING]
    os.environ["RAY_TMPDIR"] = str(root / "bad-raytmp")
    for case in cases:
        d = root / "bad" / case.id
        rc, err = _cli(materialise(case, d))
        good = (rc == 2 and re.search(case.match, " ".join(err.split())) is not None and "Traceback" not in err
                and not (d / "out").exists())
        refused += bool(good)
        if not good:
            o.notes.append(f"{case.id}: exit {rc}: {err.strip()[-300:]}")
    os.environ.pop("RAY_TMPDIR")
    o.faults_injected = len(cases)
    o.ok = refused == len(cases) and not (root / "bad-raytmp").exists()
    o.notes.insert(0, f"{refused}/{len(cases)} refused with exit 2 before compute; {len(PENDING)} known gaps not run: "
                      + ", ".join(sorted(PENDING)))
    o.seconds = time.time() - t0
    return o


def damaged_files(root: Path) -> Outcome:
    """Damage what gmpq reads back; each must be reported by name (exit 2) or, for run-id files, not duplicate runs."""
    from gmpq_core.fileio import save_checkpoint
    from gmpq_core.models import build_model
    from orchestrator.mlflow_sink import RUNS_FILE
    from orchestrator.sync import sync_mlflow

    t0 = time.time()
    o = Outcome("damaged_files")
    d = root / "damaged"
    fake_sweep_dir(d)
    with contextlib.redirect_stdout(io.StringIO()):
        first = sync_mlflow(d)
    checks = []
    data = (d / RUNS_FILE).read_bytes()
    (d / RUNS_FILE).write_bytes(data[: len(data) // 2])
    with contextlib.redirect_stdout(io.StringIO()):
        again = sync_mlflow(d)
    checks.append(("mlflow_runs.json truncated: no new run", again.runs_created == 0 and again.duplicates == 0
                   and again.parent_run_id == first.parent_run_id))
    (d / "trials.parquet").write_bytes((d / "trials.parquet").read_bytes()[:300])
    rc, err = _cli(["pareto", "--sweep", str(d), "--no-mlflow"])
    checks.append(("trials.parquet truncated: named", rc == 2 and "trials.parquet" in err))
    fp, out = root / "fp.pt", root / "ft"
    save_checkpoint(fp, build_model("resnet20", num_classes=10, in_channels=1, small_input=True).state_dict())
    ckpt = out / "checkpoints" / "last.pt"
    save_checkpoint(ckpt, {"epoch": 1, "model": {}, "optimizer": {}, "scheduler": {}, "history": []})
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    rc, err = _cli(["finetune", "--uniform", "4", "4", "--fp-checkpoint", str(fp), "--epochs", "2", "--train-size",
                    "100", "--test-size", "100", "--batch-size", "50", "--max-steps-per-epoch", "1", "--out", str(out)])
    checks.append(("last.pt truncated: named", rc == 2 and "last.pt" in err))
    (root / "policy.json").write_text('{"version": 1, "layers": {"layer1.0.conv1": {"w_bits": 4,')
    rc, err = _cli(["finetune", "--policy", str(root / "policy.json"), "--out", str(root / "ft2")])
    checks.append(("policy.json truncated: named", rc == 2 and "policy.json" in err))
    o.faults_injected = len(checks)
    o.ok = all(ok for _, ok in checks)
    o.notes = [f"{what}: {'ok' if ok else 'FAILED'}" for what, ok in checks]
    o.seconds = time.time() - t0
    return o


@dataclass(frozen=True)
class Scenario:
    """One scenario of the report: ``run(work, procs, cache)`` -> its Outcome, where ``work`` is the report's work
    folder, ``procs`` the processes it starts (all stopped at the end) and ``cache`` the data / model cache the
    sweeps share. ``about``: its line in --help."""
    name: str
    about: str
    run: Callable[[Path, Procs, Path], Outcome]


# the one list of scenarios, in the order they run: --only's choices, --help's list and the plan all come from it
SCENARIOS: tuple[Scenario, ...] = (
    Scenario("bad_inputs", "every bad config / flag of tests/reliability/bad_input_cases.py, refused before compute",
             lambda work, procs, cache: bad_inputs(work)),
    Scenario("damaged_files", "truncated trials.parquet, fine-tune checkpoint, run-id file: reported by name / no "
             "duplicates", lambda work, procs, cache: damaged_files(work)),
    Scenario("trial_faults", "a trial that raises, a NaN loss, a trial worker killed with SIGKILL (max_failures 1), "
             "with the MLflow server down for the whole sweep, then started and synced twice",
             lambda work, procs, cache: trial_faults(work, procs, cache, mlflow_down=True)),
    Scenario("driver_kill", "the sweep driver SIGKILLed right after the first finished trial, then --resume",
             driver_kill),
    Scenario("mlflow_down_mid", "the MLflow server stopped mid-sweep, restarted, synced twice",
             mlflow_down_mid_sweep),
    Scenario("finetune_kill", "gmpq finetune SIGKILLed after its first epoch checkpoint, then rerun",
             lambda work, procs, cache: finetune_kill(work, procs)),
)


def scenario_names() -> tuple[str, ...]:
    return tuple(sc.name for sc in SCENARIOS)


def scenarios_help() -> str:
    """--help's list of the scenarios, one paragraph each, from ``SCENARIOS``."""
    width = max(len(n) for n in scenario_names()) + 4
    lines = ["Scenarios (tiny sweeps on Fashion-MNIST, about 10 minutes on 2 cores; see "
             "tests/reliability/scenarios.py):"]
    for sc in SCENARIOS:
        lines.append(textwrap.fill(sc.about, 116, initial_indent=f"  {sc.name:<{width - 2}}",
                                   subsequent_indent=" " * width))
    return "\n".join(lines)


def run_report(work: Path, only: set[str] | None) -> dict:
    """Run the scenarios of ``SCENARIOS`` (in its order) whose names are in ``only`` (None: all of them)."""
    procs = Procs(work / "logs")
    cache = work / "cache"
    t0 = time.time()
    outcomes: list[Outcome] = []
    try:
        for sc in SCENARIOS:
            if only and sc.name not in only:
                continue
            print(f"reliability: {sc.name} ...", file=sys.stderr, flush=True)
            o = sc.run(work, procs, cache)
            outcomes.append(o)
            print(f"reliability: {sc.name}: {'held' if o.ok else 'FAILED'} in {o.seconds:.0f} s", file=sys.stderr,
                  flush=True)
    finally:
        leftovers = procs.stop_all()
    totals = {k: sum(getattr(o, k) for o in outcomes) for k in SUMS}
    ok = all(o.ok for o in outcomes) and all(totals[k] == 0 for k in MUST_BE_ZERO) and not leftovers
    return {**totals, "ok": ok, "seconds": round(time.time() - t0, 1), "leftover_processes": len(leftovers),
            "scenarios": {o.name: {k: v for k, v in o.to_dict().items() if k != "paths"} for o in outcomes}}


def format_report(rep: dict) -> str:
    cols = ("faults_injected", "trials_attempted", "trials_failed", "trials_retried", "trials_recovered",
            "rows_lost", "duplicate_rows", "runs_lost", "duplicate_runs", "reruns_of_finished")
    short = ("faults", "trials", "failed", "retried", "recovered", "rows lost", "dup rows", "runs lost", "dup runs",
             "recomputed")
    lines = [f"{'scenario':<22}" + "".join(f"{h:>11}" for h in short) + f"{'seconds':>9}  result"]
    for name, s in rep["scenarios"].items():
        lines.append(f"{name:<22}" + "".join(f"{s[c]:>11}" for c in cols) + f"{s['seconds']:>9.0f}  "
                     + ("held" if s["ok"] else "FAILED"))
    lines.append(f"{'total':<22}" + "".join(f"{rep[c]:>11}" for c in cols) + f"{rep['seconds']:>9.0f}  "
                 + ("held" if rep["ok"] else "FAILED"))
    for name, s in rep["scenarios"].items():
        for note in s["notes"]:
            lines.append(f"  {name}: {note}")
    lines.append(f"leftover processes after the run: {rep['leftover_processes']}")
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    names = scenario_names()
    p = argparse.ArgumentParser(description=__doc__, epilog=scenarios_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--work", default=None, metavar="DIR", help="work folder (default: a temporary one, removed)")
    p.add_argument("--only", default=None, metavar="A,B", help=f"run only these scenarios, of {', '.join(names)}")
    p.add_argument("--save-json", default=None, metavar="FILE", help="also write the JSON object to FILE")
    args = p.parse_args(argv)
    only = {x.strip() for x in args.only.split(",") if x.strip()} if args.only is not None else None
    if only is not None and (not only or only - set(names)):
        p.error(f"--only {args.only}: unknown scenario(s) {', '.join(sorted(only - set(names))) or '(none given)'}; "
                f"give a comma list of {', '.join(names)}.")
    check_output_file(p, args.save_json, "--save-json", stdout_ok=False)
    work = Path(args.work or tempfile.mkdtemp(prefix="gmpq-reliability-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        rep = run_report(work, only)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.save_json:
        write_text_file(args.save_json, json.dumps(rep, indent=1) + "\n")
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
