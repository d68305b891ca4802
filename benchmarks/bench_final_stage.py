"""The final stage's two ways to use a machine: data-parallel fine-tunes one after the other, or
single-worker fine-tunes side by side.

Takes a finished sweep folder (``make demo`` writes ``runs/demo``), builds the Ray Train jobs of its
selected policies as ``gmpq finetune --sweep`` does (``orchestrator.final_stage.final_job`` with the sweep's
``finetune`` settings, ``run_final_job``; without the stage's bookkeeping: no progress file, final.parquet
row, model file or MLflow run), and runs them, in one local Ray session, in two arrangements alternated for
``--rounds`` rounds:

- ``data_parallel``: one policy after the other, each on ``--workers`` workers (default: every CPU),
  DDP over gloo: the shape of the final stage before side-by-side fine-tunes;
- ``side_by_side``: every policy at once (as many as the CPUs hold), 1 worker each.

A short warm-up run (a few steps of one policy in each arrangement) goes first, so neither arrangement
pays the session's cold start (worker processes, page cache); the order alternates from round to round
(data_parallel first in odd rounds, side_by_side first in even ones).

Every run trains ``--steps`` steps of the same global batch (so the same images per policy in both
arrangements) and evaluates on ``--test-size`` test images, from a fresh Ray Train storage folder
(nothing resumes). It prints, per arrangement and round, the wall time of the whole stage and the
training images per second over it, then the ratio side_by_side / data_parallel of images/s (> 1: side
by side is faster). The fine-tunes' accuracies are printed as a check that both did the same work, not
as a result: the two arrangements differ in per-worker batch and shard order.

    python benchmarks/bench_final_stage.py --sweep runs/demo --steps 150 --rounds 2 --json final.json
    python benchmarks/bench_final_stage.py --sweep runs/demo --steps 5 --test-size 100 --rounds 1   # quick: ~2 min
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import check_output_file, cli_entry, positive_int, progress, write_text_file  # noqa: E402


def _jobs(sweep_dir: Path, steps: int, test_size: int):
    from orchestrator.final_stage import final_job, target_fp_checkpoint
    from gmpq_core.errors import ConfigError
    from orchestrator.pareto import PARETO_FILE, read_pareto
    from orchestrator.results import load_resolved_config

    cfg = load_resolved_config(sweep_dir, missing_ok=False)    # CheckpointError (exit 2) when not a sweep folder
    pareto = read_pareto(sweep_dir)                              # and when pareto.parquet is missing or damaged
    chosen = pareto[pareto["selected"]] if len(pareto) else pareto
    if chosen.empty:
        raise ConfigError(
            f"--sweep {sweep_dir}: its {PARETO_FILE} selects no policy (no trial of the sweep completed with a "
            "result?), so there is no fine-tune to time. Give a sweep folder with completed trials: continue this "
            f"one (gmpq sweep --out {sweep_dir} --resume), or run the demo sweep first (make demo writes runs/demo).")
    fp = target_fp_checkpoint(sweep_dir)
    return [final_job(cfg, r, fp, epochs=1, max_steps_per_epoch=steps, test_size=test_size)
            for r in chosen.to_dict("records")]


def _arrangement(name: str, jobs, cpus: int, workers: int, storage: Path) -> dict:
    from orchestrator.side_by_side import run_side_by_side, side_by_side_slots
    from orchestrator.train_stage import run_final_job

    per_job = 1 if name == "side_by_side" else workers
    slots = side_by_side_slots(len(jobs), per_job, cpus) if name == "side_by_side" else 1
    runs: list = []

    def one(job) -> None:
        runs.append(run_final_job(job, storage_path=storage, workers=per_job))
    t0 = time.perf_counter()
    run_side_by_side(jobs, one, slots)
    wall = time.perf_counter() - t0
    images = sum(j.max_steps_per_epoch * j.batch_size for j in jobs)     # the global batch is the same in both
    return {"arrangement": name, "workers_per_policy": per_job, "side_by_side": slots, "policies": len(jobs),
            "wall_s": round(wall, 2), "train_images": images, "img_s": round(images / wall, 1),
            "runs": [{"trial_id": r.trial_id, "seconds": round(r.seconds, 1),
                      "top1": round(float(r.metrics.get("top1", float("nan"))), 2)} for r in runs]}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", default="runs/demo", help="a finished sweep folder (default: runs/demo)")
    ap.add_argument("--steps", type=positive_int, default=150,
                    help="training steps per policy (global batch each; default %(default)s)")
    ap.add_argument("--test-size", type=positive_int, default=2000,
                    help="test images evaluated per policy (default %(default)s)")
    ap.add_argument("--workers", type=positive_int, default=None, help="data_parallel workers (default: every CPU)")
    ap.add_argument("--rounds", type=positive_int, default=2, help="rounds of both arrangements (default %(default)s)")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args(argv)
    check_output_file(ap, args.json, stdout_ok=False)
    if args.workers and args.workers > (os.cpu_count() or 1):
        ap.error(f"--workers {args.workers}: more than this machine's {os.cpu_count() or 1} CPUs; Ray Train would wait "
                 "for them forever (one CPU per worker). Give at most that many, or leave --workers out (every CPU).")
    if Path(args.sweep).expanduser().is_file():
        ap.error(f"--sweep {args.sweep}: that is a file; give a finished sweep's folder (its --out), e.g. runs/demo.")
    if not Path(args.sweep).expanduser().is_dir():
        ap.error(f"--sweep {args.sweep}: no such folder. Give a finished sweep's folder (its --out), or run the demo "
                 "sweep first (make demo writes runs/demo).")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    sweep_dir = Path(args.sweep).expanduser().resolve()
    jobs = _jobs(sweep_dir, args.steps, args.test_size)
    cpus = os.cpu_count() or 1
    workers = args.workers or cpus
    rows = []
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        warm = [replace(j, max_steps_per_epoch=2, test_size=100) for j in jobs[:1]]
        progress(f"warm-up: 2 steps of one policy in each arrangement (Ray workers start), then {args.rounds} round(s) "
                 f"of {len(jobs)} policies x {args.steps} steps ...")
        for name in ("data_parallel", "side_by_side"):
            with tempfile.TemporaryDirectory(prefix="bench_final_warm_") as d:
                _arrangement(name, warm, cpus, workers, Path(d))
        for rnd in range(1, args.rounds + 1):
            order = ("data_parallel", "side_by_side") if rnd % 2 else ("side_by_side", "data_parallel")
            for name in order:
                with tempfile.TemporaryDirectory(prefix="bench_final_") as d:
                    row = {"round": rnd, **_arrangement(name, jobs, cpus, workers, Path(d))}
                rows.append(row)
                print(f"round {rnd} {name:13s}: {row['policies']} policies, {row['workers_per_policy']} worker(s) "
                      f"each, {row['side_by_side']} at a time: wall {row['wall_s']:.1f} s, "
                      f"{row['img_s']:.1f} train img/s; top1 "
                      + ", ".join(f"{r['trial_id']} {r['top1']:.2f}%" for r in row["runs"]), flush=True)
    finally:
        ray.shutdown()
    mean = {n: sum(r["img_s"] for r in rows if r["arrangement"] == n) / args.rounds
            for n in ("data_parallel", "side_by_side")}
    ratio = mean["side_by_side"] / mean["data_parallel"]
    print(f"\n{cpus} CPUs, {len(jobs)} policies, {args.steps} steps x batch {jobs[0].batch_size}, "
          f"{args.test_size} test images: side_by_side / data_parallel images/s = {ratio:.2f} "
          f"(means of {args.rounds} round(s), measured side by side in this run)")
    if args.json:
        write_text_file(args.json, json.dumps({"cpus": cpus, "sweep": str(sweep_dir), "steps": args.steps,
                                               "batch_size": jobs[0].batch_size, "test_size": args.test_size,
                                               "workers": workers, "rounds": args.rounds, "ratio": round(ratio, 3),
                                               "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
