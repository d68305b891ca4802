"""The report of ``bench_search_step.py``: the machine record of each row, the ``--json`` output and the table
it prints."""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from bench_cli import write_text_file  # same folder (run as a script)


def load_1m() -> float | None:
    """The machine's 1-minute load average now (processes running or waiting for a core, averaged over the last
    minute; compare it with ``cores``), or None where the OS keeps none."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine(loadavg_1m_start: float | None) -> dict:
    """The machine record of a measurement: CPU, cores, versions, GPU, and the 1-minute load average before it
    (``loadavg_1m_start``: ``load_1m()`` read by the caller when the measurement began) and now, at its end
    (``loadavg_1m_end``), so a reader can tell whether other work ran beside it."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        out.update(loadavg_1m_start=loadavg_1m_start, loadavg_1m_end=load_1m())
    return out


def load_text(m: dict) -> str:
    """A machine record's load averages as printed: ``load 1m: start 0.52, end 1.87 (2 cores)``."""
    if "loadavg_1m_end" not in m:
        return "load 1m: not recorded (this OS keeps no load average)"
    return f"load 1m: start {m['loadavg_1m_start']}, end {m['loadavg_1m_end']} ({m['cores']} cores)"


def run_machine(rows: list[dict]) -> dict:
    """The machine record of a whole run, from its rows' (``row["machine"]``): the first row's, which has the load
    average before the first measurement, with the load average after the last row's."""
    if not rows:
        return machine(None)
    first, last = rows[0]["machine"], rows[-1]["machine"]
    return {**first, **({"loadavg_1m_end": last["loadavg_1m_end"]} if "loadavg_1m_end" in last else {})}


def write_json(rows: list[dict], target: str | None) -> None:
    """``--json`` output: nothing (None), stdout ("-"), or the file ``target`` (written whole: see write_text_file)."""
    if not target:
        return
    text = json.dumps(rows, indent=1)
    if target == "-":
        print(text)
    else:
        write_text_file(target, text + "\n")


def _mb(v: float | None) -> str:
    return "-" if v is None else str(v)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """The rows as a table on stdout, then the settings and machine they were measured with."""
    print(f"{'model':9} {'px':>4} {'batch':>5} {'variant':9} {'FP img/s':>9} {'search img/s':>12} {'ratio':>6} "
          f"{'mem ratio':>9} {'FP MB':>7} {'search MB':>9} {'1st step s':>10}")
    for r in rows:
        mr = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        print(f"{r['model']:9} {r['input_size']:>4} {r['batch_size']:>5} {r['variant']:9} {r['fp_img_s']:>9.1f} "
              f"{r['search_img_s']:>12.1f} {r['ratio']:>6.2f} {mr:>9} {_mb(r['fp_step_mb']):>7} "
              f"{_mb(r['search_step_mb']):>9} {r['first_step_s']:>10.1f}")
    print("ratio = FP img/s / search img/s, measured side by side (1.0 is the limit; lower is better); mem ratio = "
          "search MB / FP MB (peak extra memory of one step); 1st step s: the first search step, compilation included")
    m = run_machine(rows)
    print(f"device={args.device} threads={args.threads} amp={args.amp} channels_last={args.channels_last} "
          f"cudnn_benchmark={args.cudnn_benchmark}; {load_text(m)}; machine={m}")
