"""The generalization study without Ray: every cell one after the other in this process.

For a machine that has torch but not the orchestration stack (a lent GPU box without Ray/MLflow), and
for a deadline: cells are run in grid order until ``--minutes`` would be exceeded, and every finished
row is written at once, so a run cut short keeps what it computed and a rerun resumes.

    python -m experiments.generalization_local --config experiments/generalization_gpu_short.yaml \
        --out runs/study_gpu --minutes 4

Writes ``<out>/study.parquet`` (same rows as ``gmpq study``; pandas + pyarrow needed) and
``<out>/rows.jsonl`` (the same rows as JSON lines, always), ``study_config.yaml`` and
``study_timing.json`` (with the device name). Build the results page afterwards, anywhere:
``gmpq study --out <out> --analyze-only --report docs/results_gpu.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from gmpq_core.errors import GMPQError
from gmpq_core.fileio import atomic_write_json, atomic_write_text, read_json

from .generalization import StudyConfig, check_same_study_config, check_study_data, expand_grid, load_study_config
from .generalization_cells import prepare_models, run_cell, shared_models_summary

ROWS_FILE = "rows.jsonl"


def _done_ids(out: Path) -> set[str]:
    path = out / ROWS_FILE
    if not path.is_file():
        return set()
    done = set()
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:   # a line cut by a kill: that cell reruns
            continue
        if row.get("status") == "completed":
            done.add(row["cell_id"])
    return done


def _append_row(out: Path, row: dict[str, Any]) -> None:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    with open(out / ROWS_FILE, "a") as f:
        f.write(json.dumps(clean) + "\n")
        f.flush()


def _to_parquet(out: Path, rows: list[dict[str, Any]], say: Callable[[str], None]) -> None:
    try:
        from .generalization_ray import write_rows   # pandas + pyarrow (no Ray needed to import)
    except ImportError as e:
        say(f"study.parquet not written ({e}); the rows are in {out / ROWS_FILE}")
        return
    write_rows(out, rows)


def device_name(cfg: StudyConfig) -> str:
    if cfg.resources["gpu"] > 0 and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()})"


def run_local(cfg: StudyConfig, out: str | Path, *, minutes: float | None = None,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the cells not yet completed in ``out`` until the deadline; returns the timing record."""
    t0 = time.perf_counter()
    out = Path(out).expanduser().resolve()
    check_same_study_config(cfg, out, ROWS_FILE)
    check_study_data(cfg)                  # dataset names and sizes: before anything is written
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    cells = expand_grid(cfg)
    done = _done_ids(out)
    todo = [c for c in cells if c["cell_id"] not in done]
    say(f"study '{cfg.name}' on {device_name(cfg)}: {len(cells)} cells, {len(done)} done, {len(todo)} to run")
    paths = prepare_models(cfg, out)
    t_prep = time.perf_counter() - t0
    say(f"shared FP models ready after {t_prep:.0f} s")
    rows, longest = [], 0.0
    for i, cell in enumerate(todo, 1):
        elapsed = time.perf_counter() - t0
        if minutes is not None and elapsed + longest > minutes * 60:
            say(f"deadline: stopping before cell {i}/{len(todo)} ({elapsed:.0f} s used, last cell took {longest:.0f} s)")
            break
        c0 = time.perf_counter()
        row = {**run_cell(cell, cfg, paths), "status": "completed", "error": None,
               "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "node_id": None,
               "hostname": platform.node()}
        longest = max(longest, time.perf_counter() - c0)
        _append_row(out, row)
        rows.append(row)
        say(f"[{time.perf_counter() - t0:5.0f}s] cell {i}/{len(todo)} {cell['cell_id']}: target top1 "
            f"{row['target_top1']:.2f}%, {row['gbitops_quantized']:.3f} GBitOPs, search {row['search_seconds']:.1f} s")
    all_rows = [json.loads(ln) for ln in (out / ROWS_FILE).read_text().splitlines() if ln.strip()] \
        if (out / ROWS_FILE).is_file() else []
    if all_rows:
        _to_parquet(out, [{k: (math.nan if v is None and k not in ("error", "node_id") else v) for k, v in r.items()}
                          for r in all_rows], say)
    timing_file = out / "study_timing.json"
    timing = read_json(timing_file) if timing_file.is_file() else {"runs": []}
    run = {"wall_seconds": time.perf_counter() - t0, "prepare_seconds": t_prep, "cells_run": len(rows), "failed": 0,
           "device": device_name(cfg), "runner": "experiments.generalization_local",
           "shared_models": shared_models_summary(paths)}
    timing["runs"].append(run)
    timing["device"] = run["device"]
    atomic_write_json(timing_file, timing)
    say(f"{len(rows)} cells run in {run['wall_seconds']:.0f} s; {len(all_rows)}/{len(cells)} rows in {out}")
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, metavar="FILE")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--minutes", type=float, default=None, help="start no cell that would end after this")
    p.add_argument("--smoke", action="store_true", help="the config shrunk to smoke size")
    args = p.parse_args(argv)
    from .generalization import smoke_version
    try:
        cfg = load_study_config(args.config)
        if args.smoke:
            cfg = smoke_version(cfg)
        run_local(cfg, args.out, minutes=args.minutes, say=lambda m: print(m, flush=True))
    except GMPQError as e:               # ConfigError, BudgetInfeasibleError: one line, exit 2
        print(f"generalization_local: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
