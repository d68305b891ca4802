"""Speed of one GMPQ search step against one full-precision training step, side by side.

For each model, on ONE batch held in memory, this builds the FP model (plain SGD training step), the FP teacher and
one supernet per variant (same weights, same batch), then interleaves timed repetitions: FP step, variant 1 step,
variant 2 step, ... so machine noise hits all of them alike. The search step is ``gmpq_core.search.search_step``:
exactly the per-batch code ``search_policy`` runs (teacher Grad-CAM, supernet Grad-CAM second order, L_gen with eta =
40, budget penalty, one backward, SGD step, metrics with one host sync).

    ratio        = FP images/s / search images/s            (median step times; 1.0 is the limit)
    memory_ratio = peak step memory of search / that of FP
                   CUDA: torch.cuda.max_memory_allocated minus the allocation before the steps;
                   CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS after setup
                   and one warm-up step, in a fresh subprocess per variant (MALLOC_MMAP_THRESHOLD_
                   fixed so freed tensors leave RSS).

Variants: reference (plain autograd mixtures), fused (activation and weight mixtures as recompute-in-backward nodes,
eager kernels), compiled (TorchInductor kernels, and mixtures + conv as one node that recomputes the mixed operands in
backward; its first step includes compilation, reported as first_step_s), triton (CUDA; Triton kernels, one node per
conv), and fused:conv (fused kernels with the one-node conv). A "+graph" suffix (CUDA; e.g. triton+graph) replays the
variant's step from a CUDA graph (gmpq_core/graph_step.py, SearchConfig.cuda_graph); its memory is that of the capture
and a replay, from a fresh capture. The teacher has its BatchNorms folded into its convolutions, as ``search_policy``
runs it (gmpq_core/bn_fold.py); "+bnteacher" gives the variant the teacher with its BatchNorms (as before session 14).
"+keep": the one-node conv keeps its two mixed operands for backward instead of recomputing them
(``set_mixture_impl_(keep_operands=True)``; by default the eager "fused" kernels on a CPU and the Triton kernels on a
GPU do, since session 18); "+recompute" makes it recompute them (``keep_operands=False``). "+tstream": the teacher's
pass on a second CUDA stream beside the supernet's forward pass (``search_step(teacher_stream=True)``). "+tsplit": the
teacher split at its Grad-CAM layer (``gmpq_core.teacher_pass``), "+tcompile": its trunk compiled too, "+tunfold": its
RGB stem as im2col + GEMM, "+tfreeze": compiled with TorchInductor's ``freezing`` (weights as constants). "+tweights":
the weight mixtures in Triton kernels too (``fused_kernels.TRITON_WEIGHT_KERNELS``, off by default until measured).
Suffixes combine: triton+graph+recompute. (Variant names are parsed in bench_variants.py; the machine record, the
--json output and the printed table are bench_report.py's; the per-model setup, Bench and build_bench, is
bench_search_setup.py's.)

Progress on stderr; stdout: the table, its legend and settings (--json -: the JSON alone). On the 2-core build machine:
    python benchmarks/bench_search_step.py --variants fused --no-memory    # the quickest check: under 10 s
    python benchmarks/bench_search_step.py --variants reference,fused --steps 2   # with memory: ~2.5 min (busy cores)
    python benchmarks/bench_search_step.py --device cpu     # every CPU variant, compiled too: several minutes
    python benchmarks/bench_search_step.py --device cuda --json out.json   # 224 px, batch 256, bf16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from gmpq_core.fused_triton import triton_available
from gmpq_core.search import search_step
from gmpq_core import fused_kernels

from bench_cli import check_output_file, cli_entry, model_cases, nonneg_int, positive_int, progress  # same folder
from bench_report import load_1m, machine, print_table, write_json  # same folder (run as a script)
from bench_search_setup import Bench, build_bench  # same folder (run as a script); re-exported
from bench_variants import ALL_VARIANTS, SUFFIXES, Variant  # noqa: F401 - same folder (run as a script); re-exported

CASES = {"cpu": [("resnet18", 32, 3), ("resnet20", 28, 1)], "cuda": [("resnet18", 224, 3), ("resnet20", 28, 1)]}


def fp_step(b: Bench) -> None:
    b.fp_opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(b.fp(b.x), b.y)
    loss.backward()
    b.fp_opt.step()
    float(loss.detach())  # the training loop reads its loss each step too


def run_step(b: Bench, kind: str) -> None:
    fused_kernels.TRITON_WEIGHT_KERNELS = kind in b.tweight_kinds    # read per call: captures see it too
    if kind == "fp":
        return fp_step(b)
    if kind in b.graphs:
        b.graphs[kind](b.x, b.y)
        return
    net, opt = b.supernets[kind]
    search_step(net, b.teacher_of(kind), b.x, b.y, opt, b.cfg, layer=b.layer, macs_vec=b.macs_vec,
                budget_bitops=b.budget_bitops, first_macs=b.first_macs, teacher_stream=kind in b.stream_kinds)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(b: Bench, kind: str, device: str, amp: bool) -> float:
    ctx = torch.autocast(device, dtype=torch.bfloat16) if amp else nullcontext()
    _sync(device)
    t0 = time.perf_counter()
    with ctx:
        run_step(b, kind)
    _sync(device)
    return time.perf_counter() - t0


def measure_times(b: Bench, kinds: list[str], device: str, steps: int, warmup: int, amp: bool) -> dict:
    first = {k: timed(b, k, device, amp) for k in kinds}  # compilation happens here
    for _ in range(max(warmup - 1, 0)):
        for k in kinds:
            timed(b, k, device, amp)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for rep in range(steps):  # interleaved, rotating the order each repetition
        order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
        for k in order:
            times[k].append(timed(b, k, device, amp))
    return {"first": first, "times": times}


def cuda_memory(b: Bench, kind: str, amp: bool) -> int:
    torch.cuda.synchronize()
    for m in [b.fp] + [n for n, _ in b.supernets.values()]:
        m.zero_grad(set_to_none=True)
    if kind in b.graphs:  # a fresh capture: one eager step, then the capture and its first replay are measured
        b.graphs[kind] = None
        b.graphs[kind] = b.graphed(kind, warmup=1)
        timed(b, kind, "cuda", amp)
        b.supernets[kind][1].zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    timed(b, kind, "cuda", amp)
    return torch.cuda.max_memory_allocated() - base


def profile_kinds(b: Bench, kinds: list[str], args: argparse.Namespace) -> None:
    """Write the 25 most expensive operators of 3 steps per kind (where the search step's time goes)."""
    from torch.profiler import ProfilerActivity, profile
    os.makedirs(args.profile, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort = "cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    for k in kinds:
        with profile(activities=acts, record_shapes=args.device == "cuda") as prof:
            for _ in range(3):
                timed(b, k, args.device, args.amp)
        path = os.path.join(args.profile, f"profile_{b.name}_{b.size}_{k.replace(':', '-').replace('+', '-')}.txt")
        with open(path, "w") as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=25) + "\n")
            if args.device == "cuda":     # the kernels themselves (a replayed graph shows no operators)
                f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45,
                                                  max_name_column_width=110) + "\n")
                if k not in b.graphs:     # eager: operators by input shapes (which tensors the slow kernels get)
                    f.write(prof.key_averages(group_by_input_shape=True).table(
                        sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=40,
                        max_shapes_column_width=150) + "\n")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_worker(args: argparse.Namespace) -> int:
    """Hidden mode: one fresh process, one kind; prints {"extra_mb": peak RSS - RSS after setup}."""
    import gc
    torch.set_num_threads(args.threads)
    name, size, in_ch = args.mem_case.split(":")
    kinds = [] if args.mem_kind == "fp" else [args.mem_kind]
    b = build_bench(name, int(size), int(in_ch), args.batch_size, "cpu", kinds, args.channels_last)
    run_step(b, args.mem_kind)  # warm-up (and compilation)
    for m in [b.fp] + [n for n, _ in b.supernets.values()]:
        m.zero_grad(set_to_none=True)
    gc.collect()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS watermark
    for _ in range(2):
        run_step(b, args.mem_kind)
    print(json.dumps({"extra_mb": (_status_kb("VmHWM") - base) / 1024.0, "base_mb": base / 1024.0}))
    return 0


def cpu_memory(case: tuple, kind: str, args: argparse.Namespace) -> float | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--mem-case", ":".join(map(str, case)), "--mem-kind", kind,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if args.channels_last:
        cmd.append("--channels-last")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if res.returncode != 0:
        print(f"memory worker failed for {case} {kind}:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(json.loads(res.stdout.strip().splitlines()[-1])["extra_mb"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: 64 on CPU, 256 on CUDA")
    p.add_argument("--steps", type=positive_int, default=None, help="timed repetitions (default: 4 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=nonneg_int, default=None, help="untimed steps first (default: 1 CPU, 3 CUDA)")
    p.add_argument("--models", type=model_cases, default=None, help="comma list of model:size:in_channels "
                   "(default: resnet18:32:3,resnet20:28:1 on CPU, resnet18:224:3,resnet20:28:1 on CUDA)")
    p.add_argument("--variants", default=None,
                   help=f"comma list of impl[:conv][+suffix...], impl one of {ALL_VARIANTS}, e.g. fused,fused:conv "
                        "(default: all that run here; suffixes in the module docstring)")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                   help="torch threads (default: torch's, here %(default)s)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (CUDA default; on a CPU: fast only with AMX / AVX512-BF16)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (CUDA default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True for every kind (FP too): cuDNN times its algorithms")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write the JSON list to PATH ('-': stdout)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile 3 steps of each kind with torch.profiler; top ops per kind -> DIR/profile_*.txt")
    p.add_argument("--mem-case", help=argparse.SUPPRESS)
    p.add_argument("--mem-kind", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_output_file(p, args.json)
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (256 if cuda else 64)
    args.steps = args.steps or (20 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.amp = cuda if args.amp is None else args.amp
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    return args


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mem_case:
        return memory_worker(args)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here; use --device cpu.", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    default_variants = [v for v in ALL_VARIANTS if v != "triton" or (args.device == "cuda" and triton_available())]
    if args.device == "cuda" and "triton" in default_variants:
        default_variants.append("triton+graph")
    variants = args.variants.split(",") if args.variants else default_variants
    try:
        specs = [Variant.parse(v) for v in variants]
    except ValueError as e:
        print(f"--variants: {e}", file=sys.stderr)
        return 2
    if not cuda and any(s.cuda_only for s in specs):    # on a CPU they would run other kernels under their name
        print(f"--variants {','.join(variants)}: triton, '+graph' (CUDA graphs) and '+tstream' (a CUDA stream) "
              "variants need CUDA; use them with --device cuda.", file=sys.stderr)
        return 2
    cases = args.models or CASES[args.device]
    rows = []
    for i, case in enumerate(cases, 1):
        name, size, in_ch = case
        t0, load0 = time.perf_counter(), load_1m()       # the load before this case: its rows' loadavg_1m_start
        progress(f"[{i}/{len(cases)}] {name} {size} px, batch {args.batch_size}: building FP + {len(variants)} "
                 f"supernet(s), then {max(args.warmup, 1)} warm-up + {args.steps} timed steps of "
                 f"fp,{','.join(variants)} ...")
        b = build_bench(name, size, in_ch, args.batch_size, args.device, variants, args.channels_last)
        kinds = ["fp"] + variants
        res = measure_times(b, kinds, args.device, args.steps, args.warmup, args.amp)
        med = {k: statistics.median(v) for k, v in res["times"].items()}
        graph_counts = {v: dict(g.counts) for v, g in b.graphs.items()}   # steps replayed vs eager, timed ones
        if args.profile:
            profile_kinds(b, kinds, args)
        mem = {}
        if not args.no_memory:
            progress(f"[{i}/{len(cases)}] {name}: peak memory of each kind{' (a fresh process each)' * (not cuda)} ...")
            for k in kinds:
                mem[k] = (cuda_memory(b, k, args.amp) / 2**20 if args.device == "cuda" else cpu_memory(case, k, args))
        del b
        progress(f"[{i}/{len(cases)}] {name}: done in {time.perf_counter() - t0:.0f} s")
        for v in variants:
            fp_img_s, s_img_s = args.batch_size / med["fp"], args.batch_size / med[v]
            mr = (mem[v] / mem["fp"]) if mem.get(v) is not None and mem.get("fp") else None
            rows.append({"model": name, "input_size": size, "batch_size": args.batch_size, "device": args.device,
                         "variant": v, "fp_img_s": round(fp_img_s, 2), "search_img_s": round(s_img_s, 2),
                         "ratio": round(fp_img_s / s_img_s, 3), "memory_ratio": None if mr is None else round(mr, 3),
                         "fp_step_mb": None if mem.get("fp") is None else round(mem["fp"], 1),
                         "search_step_mb": None if mem.get(v) is None else round(mem[v], 1),
                         "fp_step_s": [round(t, 4) for t in res["times"]["fp"]],
                         "search_step_s": [round(t, 4) for t in res["times"][v]],
                         "first_step_s": round(res["first"][v], 2), "amp": args.amp, "threads": args.threads,
                         **({"graph_steps": graph_counts[v]} if v in graph_counts else {}),
                         "channels_last": args.channels_last, "cudnn_benchmark": args.cudnn_benchmark,
                         "memory_method": ("cuda max_memory_allocated - allocated before the step" if cuda
                                           else "peak RSS - RSS after setup, fresh subprocess per variant"),
                         "machine": machine(load0)})
    write_json(rows, args.json)
    if args.json != "-":
        print_table(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
