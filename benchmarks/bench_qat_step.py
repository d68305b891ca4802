"""Speed of one quantization-aware fine-tune step against one full-precision training step, side by side.

The QAT step is what the transfer check of every trial, the final Ray Train fine-tune and the study's
cells run: ``gmpq_core.train.train_one_epoch`` on a policy-quantized copy of the model
(``apply_policy_`` + ``calibrate_``; cross-entropy, SGD with momentum). For each model, on ONE batch held
in memory, it builds the FP model and two quantized copies (same weights, same policy, same batch):

- ``reference``: the quantizers as plain autograd formulas (``quant_impl="reference"``, the only path
  before session 12);
- ``fused``: the default (``"auto"``): each quantized layer one node on the search's fused kernels
  (eager kernels on the CPU, Triton on CUDA; ``gmpq_core/qmodules.py``).

Timed chunks of ``--chunk`` steps are interleaved (FP, reference, fused, rotating the order), so machine
noise hits all three alike; medians per step. The policy cycles (w, a) bits over (2, 4), (3, 3), (4, 2),
(6, 6) layer by layer. Models are in the layout training uses (``gmpq_core.train.training_layout_``:
channels_last on the CPU). ``--layouts`` instead compares that layout with plain NCHW for the FP and
the fused QAT step (variants ``fp``/``fp_nchw``, ``fused``/``fused_nchw``; ratio = time / FP time in the
training layout).

    ratio        = FP images/s / QAT images/s                (1.0 is the limit)
    memory_ratio = CUDA only: peak allocated during a step of QAT / that of FP

    python benchmarks/bench_qat_step.py --device cpu                     # about a minute on 2 cores
    python benchmarks/bench_qat_step.py --device cuda --json qat.json    # 224 px, batch 256, bf16
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search_step import _sync, machine, write_json  # noqa: E402  (same sync, machine record, --json)

from gmpq_core.layers import searchable_layers  # noqa: E402
from gmpq_core.models import build_model  # noqa: E402
from gmpq_core.policy import BitPolicy, QuantSpec  # noqa: E402
from gmpq_core.qmodules import apply_policy_, calibrate_, set_quant_impl_  # noqa: E402
from gmpq_core.train import train_one_epoch, training_layout_  # noqa: E402

CASES = {"cpu": [("resnet20", 28, 1), ("resnet18", 32, 3)],
         "cuda": [("resnet18", 224, 3), ("resnet20", 28, 1)]}
BITS = [(2, 4), (3, 3), (4, 2), (6, 6)]
KINDS = ("fp", "reference", "fused")
LAYOUT_KINDS = ("fp", "fp_nchw", "fused", "fused_nchw")


def build(name: str, size: int, in_ch: int, batch: int, device: str, channels_last: bool, layouts: bool) -> dict:
    """FP model and its quantized copies (``layouts``: and NCHW twins), each with its SGD optimizer, and the
    batch."""
    torch.manual_seed(0)
    fp = build_model(name, num_classes=10, in_channels=in_ch, small_input=size <= 64).to(device)
    x = torch.randn(batch, in_ch, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        fp, x = fp.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    policy = BitPolicy(layers={n: QuantSpec(w_bits=BITS[i % 4][0], a_bits=BITS[i % 4][1])
                               for i, n in enumerate(searchable_layers(fp))})
    quantized = calibrate_(apply_policy_(copy.deepcopy(fp), policy), x)
    models = {"fp": fp, "reference": set_quant_impl_(copy.deepcopy(quantized), "reference"),
              "fused": set_quant_impl_(quantized, "auto")}
    if layouts:
        models = {"fp_nchw": copy.deepcopy(fp), "fp": fp, "fused_nchw": copy.deepcopy(models["fused"]),
                  "fused": models["fused"]}
    for k, m in models.items():
        if not k.endswith("_nchw"):
            training_layout_(m, device)
    return {"x": x, "y": y, "models": models,
            "opts": {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}}


def timed_chunk(b: dict, kind: str, steps: int, device: str, amp: bool) -> float:
    """Seconds per step of ``steps`` steps of the fine-tune's training loop on the held batch."""
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
    _sync(device)
    t0 = time.perf_counter()
    with ctx:
        train_one_epoch(b["models"][kind], [(b["x"], b["y"])] * steps, b["opts"][kind], device=device)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def cuda_peak(b: dict, kind: str, amp: bool) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    timed_chunk(b, kind, 1, "cuda", amp)
    return torch.cuda.max_memory_allocated() - base


def measure(b: dict, device: str, rounds: int, chunk: int, amp: bool) -> dict[str, float]:
    kinds = tuple(b["models"])
    for k in kinds:                                   # warm-up (Triton compiles here on CUDA)
        timed_chunk(b, k, 2, device, amp)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for k in order:
            times[k].append(timed_chunk(b, k, chunk, device, amp))
    return {k: statistics.median(v) for k, v in times.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 on CPU, 256 on CUDA")
    p.add_argument("--rounds", type=int, default=5, help="timed chunks per kind (default 5)")
    p.add_argument("--chunk", type=int, default=None, help="steps per timed chunk (default: 2 CPU, 10 CUDA)")
    p.add_argument("--models", default=None, help="comma list of model:size:in_channels (default per device)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (CUDA default)")
    p.add_argument("--layouts", action="store_true", help="compare the training layout with NCHW (FP and fused)")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write the JSON list to PATH ('-': stdout)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device; use --device cpu.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    batch = args.batch_size or (256 if cuda else 128)
    chunk = args.chunk or (10 if cuda else 2)
    amp = cuda if args.amp is None else args.amp
    cases = ([(m, int(s), int(c)) for m, s, c in (t.split(":") for t in args.models.split(","))]
             if args.models else CASES[args.device])
    rows = []
    print(f"{'model':10} {'px':>4} {'batch':>5} {'variant':10} {'FP img/s':>9} {'QAT img/s':>9} {'ratio':>6} "
          f"{'mem ratio':>9}")
    for name, size, in_ch in cases:
        b = build(name, size, in_ch, batch, args.device, channels_last=cuda, layouts=args.layouts)
        med = measure(b, args.device, args.rounds, chunk, amp)
        if args.layouts:
            for kind in LAYOUT_KINDS:
                row = {"model": name, "input_size": size, "batch_size": batch, "device": args.device, "variant": kind,
                       "img_s": batch / med[kind], "ratio": med[kind] / med["fp"], "threads": torch.get_num_threads(),
                       **machine()}
                rows.append(row)
                print(f"{name:10} {size:4d} {batch:5d} {kind:10} {'':9} {row['img_s']:9.1f} {row['ratio']:6.2f}")
            print(f"{'':10} training layout / NCHW: FP {med['fp_nchw'] / med['fp']:.2f}x, "
                  f"QAT {med['fused_nchw'] / med['fused']:.2f}x faster")
            continue
        fp_mem = cuda_peak(b, "fp", amp) if cuda else None
        for kind in ("reference", "fused"):
            mem = cuda_peak(b, kind, amp) / fp_mem if cuda else None
            row = {"model": name, "input_size": size, "batch_size": batch, "device": args.device, "variant": kind,
                   "fp_img_s": batch / med["fp"], "qat_img_s": batch / med[kind], "ratio": med[kind] / med["fp"],
                   "memory_ratio": mem, "threads": torch.get_num_threads(), "amp": amp, **machine()}
            rows.append(row)
            print(f"{name:10} {size:4d} {batch:5d} {kind:10} {row['fp_img_s']:9.1f} {row['qat_img_s']:9.1f} "
                  f"{row['ratio']:6.2f} {'-' if mem is None else f'{mem:.2f}':>9}")
        print(f"{'':10} fused / reference: {med['reference'] / med['fused']:.2f}x faster")
    write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
