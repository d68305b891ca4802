"""Host (Python / dispatch) overhead of one GMPQ search step, next to one FP training step.

Host overhead is what remains when the compute is tiny: this builds the same benches as
``bench_search_step.py`` (its helpers are imported, not copied) at tiny inputs (batch 2, 16 px by
default) on the CPU with one thread, and times ``gmpq_core.search.search_step`` per mixture impl
interleaved with the FP step (median of ``--steps`` repetitions). On a GPU the search step's wall
time is bounded below by this host time (the kernels are launched asynchronously), so cutting it
is what brings the wall-time ratio down to the device-time ratio.

Variants: reference, fused, fused:conv (the one-node conv the GPU "triton" variant uses; the
triton host path itself cannot run without CUDA), compiled (opt-in, it compiles first).

    python benchmarks/bench_host_overhead.py --threads 1                 # about 30 s on 2 cores
    python benchmarks/bench_host_overhead.py --threads 1 --json out.json --profile /tmp/prof
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cli import check_output_file, cli_entry, model_cases, nonneg_int, positive_int, progress  # noqa: E402
from bench_report import load_1m, load_text, machine, run_machine  # noqa: E402
from bench_search_step import build_bench, measure_times, timed, write_json  # noqa: E402
from bench_variants import Variant  # noqa: E402

CASES = [("resnet18", 16, 3), ("resnet20", 16, 1)]
DEFAULT_VARIANTS = ("reference", "fused", "fused:conv")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=positive_int, default=2, help="default: %(default)s")
    p.add_argument("--steps", type=positive_int, default=30,
                   help="timed repetitions per kind (median; default %(default)s, 20 or more for a stable median)")
    p.add_argument("--warmup", type=nonneg_int, default=3, help="untimed steps per kind first (default: %(default)s)")
    p.add_argument("--models", type=model_cases, default=None, help="comma list of model:size:in_channels "
                                                                     "(default resnet18:16:3,resnet20:16:1)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma list of CPU variants of bench_search_step.py (default: %(default)s; compiled: opt-in)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write the JSON list to PATH ('-': stdout)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also cProfile 5 steps per kind -> DIR/host_<model>_<kind>.txt (top 40 by tottime)")
    args = p.parse_args(argv)
    check_output_file(p, args.json)
    try:
        specs = [Variant.parse(v) for v in args.variants.split(",") if v]
    except ValueError as e:
        p.error(f"--variants: {e}")
    if any(s.cuda_only for s in specs):
        p.error(f"--variants {args.variants}: triton, +graph and +tstream variants need CUDA; this benchmark runs on "
                "the CPU (use bench_search_step.py --device cuda)")
    return args


def cprofile_kind(b, kind: str, path: str, n: int = 5) -> None:
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        timed(b, kind, "cpu", False)
    prof.disable()
    with open(path, "w") as f:
        pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(40)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    cases = args.models or CASES
    rows = []
    for i, (name, size, in_ch) in enumerate(cases, 1):
        load0 = load_1m()                                 # the load before this case: its rows' loadavg_1m_start
        progress(f"[{i}/{len(cases)}] {name} {size} px, batch {args.batch_size}: {args.steps} timed steps of "
                 f"fp,{','.join(variants)} ...")
        b = build_bench(name, size, in_ch, args.batch_size, "cpu", variants, channels_last=False)
        kinds = ["fp"] + variants
        res = measure_times(b, kinds, "cpu", args.steps, args.warmup, amp=False)
        med = {k: statistics.median(v) * 1e3 for k, v in res["times"].items()}
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            for k in kinds:
                cprofile_kind(b, k, os.path.join(args.profile, f"host_{name}_{k.replace(':', '-')}.txt"))
        for k in kinds:
            rows.append({"model": name, "input_size": size, "batch_size": args.batch_size, "variant": k,
                         "ms_per_step": round(med[k], 3), "ratio_vs_fp": round(med[k] / med["fp"], 2),
                         "step_ms": [round(t * 1e3, 3) for t in res["times"][k]], "threads": args.threads,
                         "machine": machine(load0)})
    write_json(rows, args.json)
    if args.json != "-":
        print(f"{'model':9} {'px':>3} {'batch':>5} {'variant':11} {'ms/step':>9} {'x FP':>6}")
        for r in rows:
            print(f"{r['model']:9} {r['input_size']:>3} {r['batch_size']:>5} {r['variant']:11} "
                  f"{r['ms_per_step']:>9.2f} {r['ratio_vs_fp']:>6.2f}")
        m = run_machine(rows)
        print(f"x FP = ms/step / FP ms/step, measured side by side (lower is better); threads={args.threads} "
              f"steps={args.steps}; {load_text(m)}; machine={m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
