"""A whole search with and without CUDA graphs (``SearchConfig.cuda_graph``), or in float32 and under the
default precision (``--compare precision``: ``precision="fp32"`` against ``"auto"``, bf16 + channels_last
on a GPU with bfloat16), side by side.

``bench_search_step.py`` times one step on one batch held in memory; this runs what a user runs:
``run_search_job`` on a real Fashion-MNIST proxy (teacher from the model cache, data loader, every
epoch's evaluation, the derived policy's evaluation), alternating the two settings (graphs: ``"off"`` and
``"auto"``, both at the default precision; precision: ``"fp32"`` and ``"auto"``, both with graphs on
``"auto"``) for ``--rounds`` rounds, and prints each run's search seconds, the ratio of the medians, and
whether the two settings found the same policy, with the largest per-epoch cross-entropy difference.

    python benchmarks/bench_search_graph.py --device cuda [--model resnet18 --proxy-size 10000 --epochs 2]
    python benchmarks/bench_search_graph.py --device cuda --compare precision
    python benchmarks/bench_search_graph.py --device cpu --model resnet20 --proxy-size 256 --epochs 1  # smoke: 35 s
On CPU both graph settings run eagerly (graphs are CUDA only), and ``auto`` precision is float32: the
ratio is then ~1 by construction, and what differs from 1 is noise (the output says so).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import check_output_file, cli_entry, positive_int, progress, write_text_file  # noqa: E402

from gmpq_core.complexity import Budget
from gmpq_core.jobs import SearchJob, run_search_job
from gmpq_core.search_config import SearchConfig

MODES = {"graph": ("off", "auto"), "precision": ("fp32", "auto")}


def run(args: argparse.Namespace, mode: str):
    graph, precision = (mode, "auto") if args.compare == "graph" else ("auto", mode)
    cfg = SearchConfig(budget=Budget(avg_bits=args.bits), epochs=args.epochs, batch_size=args.batch_size,
                       lr_arch=args.lr_arch, seed=0, cuda_graph=graph, recalibrate_bn_batches=4)
    job = SearchJob(model=args.model, proxy_size=args.proxy_size, device=args.device, search=cfg,
                    eval_size=args.eval_size, cache_dir=args.cache_dir or SearchJob().cache_dir, precision=precision)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = run_search_job(job)
    return time.perf_counter() - t0, res


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--proxy-size", type=positive_int, default=10000, help="default: %(default)s")
    p.add_argument("--eval-size", type=positive_int, default=1000, help="default: %(default)s")
    p.add_argument("--epochs", type=positive_int, default=2, help="default: %(default)s")
    p.add_argument("--batch-size", type=positive_int, default=256, help="default: %(default)s")
    p.add_argument("--bits", type=float, default=3.0)
    p.add_argument("--lr-arch", type=float, default=3.0)
    p.add_argument("--rounds", type=positive_int, default=2, help="default: %(default)s")
    p.add_argument("--cache-dir", default=None, help="model cache (default: the gmpq cache)")
    p.add_argument("--compare", choices=tuple(MODES), default="graph",
                   help="graph: cuda_graph off vs auto; precision: fp32 vs auto (default graph)")
    p.add_argument("--json", default=None, help="write the runs and the summary to this file")
    args = p.parse_args(argv)
    check_output_file(p, args.json, stdout_ok=False)
    modes = MODES[args.compare]
    key = "cuda_graph" if args.compare == "graph" else "precision"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; use --device cpu for a smoke run.", file=sys.stderr)
        return 2
    progress(f"warm-up: one search per setting ({key} {' and '.join(modes)}; trains the teacher if the cache has none), "
             f"then {args.rounds} round(s) of both ...")
    for mode in modes:                                   # teacher training / cache load and first-use costs
        run(args, mode)
    runs: dict[str, list] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            secs, res = run(args, mode)
            runs[mode].append((secs, res))
            print(f"round {r + 1} {key}={mode:4}: {secs:6.2f} s wall, search_seconds {res.search_seconds:6.2f}, "
                  f"proxy top-1 {res.proxy_top1:.2f}%, {res.bitops_quantized / 1e9:.4f} GBitOPs, "
                  f"precision {res.policy.meta['precision']}", flush=True)
    med = {m: statistics.median(s for s, _ in runs[m]) for m in modes}
    base, new = modes
    ref, got = runs[base][0][1], runs[new][0][1]
    same_policy = ref.policy.layers == got.policy.layers
    ce_diff = max(abs(a["ce"] - b["ce"]) for a, b in zip(ref.history, got.history))
    print(f"median wall s: {base} {med[base]:.2f}, {new} {med[new]:.2f}; speed-up {med[base] / med[new]:.2f}x; "
          f"same policy: {same_policy}; max |ce difference| per epoch {ce_diff:.2e} "
          f"({torch.cuda.get_device_name(0) if args.device == 'cuda' else 'CPU'})")
    if args.device == "cpu":
        print("  on a CPU both settings run the same code (CUDA graphs are CUDA only; auto precision is float32 "
              "here): any difference from 1.00x is this machine's noise, not a speed-up")
    if args.json:
        out = {"args": vars(args), "median_s": med, "speedup": med[base] / med[new], "same_policy": same_policy,
               "max_ce_diff": ce_diff, "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
               "runs": {m: [{"wall_s": s, "search_seconds": r.search_seconds, "proxy_top1": r.proxy_top1,
                             "gbitops": r.bitops_quantized / 1e9} for s, r in runs[m]] for m in modes}}
        write_text_file(args.json, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
