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
(6, 6) layer by layer. Every variant trains as the product does at ``--precision`` (default ``auto``: bf16
autocast on a GPU with bfloat16, float32 on the CPU; ``gmpq_core/precision.py``) in the layout training
uses (``gmpq_core.train.training_layout_``: channels_last on the CPU and on a GPU in bf16); inputs NCHW,
as the loaders give them. ``--layouts`` instead compares that layout with plain NCHW for the FP and the
fused QAT step (variants ``fp``/``fp_nchw``, ``fused``/``fused_nchw``; ratio = time / FP time in the
training layout); ``--precisions`` compares float32 with bf16 (``fp``/``fp_bf16``, ``fused``/``fused_bf16``;
ratio = time / FP float32 time), each in its training layout as the product runs it (on CUDA: bf16 in
channels_last against float32 in NCHW, i.e. ``precision: auto`` against ``fp32``).

    ratio        = FP images/s / QAT images/s                (1.0 is the limit)
    memory_ratio = CUDA only: peak allocated during a step of QAT / that of FP

    python benchmarks/bench_qat_step.py --models resnet20:28:1 --rounds 2   # smoke: ~15 s (2 rounds: noisy)
    python benchmarks/bench_qat_step.py --device cpu                     # 2.3 min on the 2-core build machine
    python benchmarks/bench_qat_step.py --device cuda --json qat.json    # 224 px, batch 256, bf16
    python benchmarks/bench_qat_step.py --precisions                     # bf16 vs float32 on this CPU
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import check_output_file, cli_entry, model_cases, positive_int  # noqa: E402
from bench_report import load_1m, load_text, machine, write_json  # noqa: E402  (same machine record, --json)
from bench_search_step import _sync  # noqa: E402  (same sync)

from gmpq_core.layers import searchable_layers  # noqa: E402
from gmpq_core.models import build_model  # noqa: E402
from gmpq_core.policy import BitPolicy, QuantSpec  # noqa: E402
from gmpq_core.precision import PRECISIONS, resolve_precision  # noqa: E402
from gmpq_core.qmodules import apply_policy_, calibrate_, set_quant_impl_  # noqa: E402
from gmpq_core.train import sgd, train_one_epoch, training_layout_  # noqa: E402

CASES = {"cpu": [("resnet20", 28, 1), ("resnet18", 32, 3)],
         "cuda": [("resnet18", 224, 3), ("resnet20", 28, 1)]}
BITS = [(2, 4), (3, 3), (4, 2), (6, 6)]


def build(name: str, size: int, in_ch: int, batch: int, device: str, precision: str, mode: str) -> dict:
    """FP model and its quantized copies, each with its SGD optimizer and its precision, and the batch.
    ``mode``: "impl" (fp / reference / fused), "layouts" (and NCHW twins of fp and fused) or "precisions"
    (fp and fused in float32 and in bf16: the ``_bf16`` twins; the others float32)."""
    torch.manual_seed(0)
    fp = build_model(name, num_classes=10, in_channels=in_ch, small_input=size <= 64).to(device)
    x = torch.randn(batch, in_ch, size, size, device=device)       # NCHW, as the data loaders give it
    y = torch.randint(0, 10, (batch,), device=device)
    policy = BitPolicy(layers={n: QuantSpec(w_bits=BITS[i % 4][0], a_bits=BITS[i % 4][1])
                               for i, n in enumerate(searchable_layers(fp))})
    quantized = calibrate_(apply_policy_(copy.deepcopy(fp), policy), x)
    models = {"fp": fp, "reference": set_quant_impl_(copy.deepcopy(quantized), "reference"),
              "fused": set_quant_impl_(quantized, "auto")}
    if mode == "layouts":
        models = {"fp_nchw": copy.deepcopy(fp), "fp": fp, "fused_nchw": copy.deepcopy(models["fused"]),
                  "fused": models["fused"]}
    elif mode == "precisions":
        models = {"fp": fp, "fp_bf16": copy.deepcopy(fp), "fused": models["fused"],
                  "fused_bf16": copy.deepcopy(models["fused"])}
    precisions = {k: ("bf16" if k.endswith("_bf16") else "fp32") if mode == "precisions" else precision
                  for k in models}
    for k, m in models.items():
        if not k.endswith("_nchw"):
            training_layout_(m, device, precisions[k])
    return {"x": x, "y": y, "models": models, "precision": precisions,
            "opts": {k: sgd(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}}


def timed_chunk(b: dict, kind: str, steps: int, device: str) -> float:
    """Seconds per step of ``steps`` steps of the fine-tune's training loop on the held batch."""
    _sync(device)
    t0 = time.perf_counter()
    train_one_epoch(b["models"][kind], [(b["x"], b["y"])] * steps, b["opts"][kind], device=device,
                    precision=b["precision"][kind])
    _sync(device)
    return (time.perf_counter() - t0) / steps


def cuda_peak(b: dict, kind: str) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    timed_chunk(b, kind, 1, "cuda")
    return torch.cuda.max_memory_allocated() - base


def measure(b: dict, device: str, rounds: int, chunk: int) -> dict[str, float]:
    kinds = tuple(b["models"])
    for k in kinds:                                   # warm-up (Triton compiles here on CUDA)
        timed_chunk(b, k, 2, device)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for k in order:
            times[k].append(timed_chunk(b, k, chunk, device))
    return {k: statistics.median(v) for k, v in times.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: 128 on CPU, 256 on CUDA")
    p.add_argument("--rounds", type=positive_int, default=5, help="timed chunks per kind (default 5)")
    p.add_argument("--chunk", type=positive_int, default=None, help="steps per timed chunk (default: 2 CPU, 10 CUDA)")
    p.add_argument("--models", type=model_cases, default=None, help="comma list of model:size:in_channels "
                   "(default: resnet20:28:1,resnet18:32:3 on CPU, resnet18:224:3,resnet20:28:1 on CUDA)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="training precision, as the product's (default auto: bf16 on CUDA, float32 on the CPU)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--layouts", action="store_true", help="compare the training layout with NCHW (FP and fused)")
    mode.add_argument("--precisions", action="store_true", help="compare bf16 with float32 (FP and fused)")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write the JSON list to PATH ('-': stdout)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device; use --device cpu.")
    if args.precisions and args.precision != "auto":
        p.error("--precisions runs both float32 and bf16; leave --precision out.")
    check_output_file(p, args.json)
    return args


def _row(name: str, size: int, batch: int, args: argparse.Namespace, kind: str, b: dict, load0: float | None,
         **values) -> dict:
    """A row of the JSON; ``load0``: the 1-minute load average before its case (``loadavg_1m_start``)."""
    return {"model": name, "input_size": size, "batch_size": batch, "device": args.device, "variant": kind,
            "precision": resolve_precision(b["precision"][kind], args.device), **values,
            "threads": torch.get_num_threads(), **machine(load0)}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    batch = args.batch_size or (256 if cuda else 128)
    chunk = args.chunk or (10 if cuda else 2)
    mode = "layouts" if args.layouts else "precisions" if args.precisions else "impl"
    cases = args.models or CASES[args.device]
    rows = []
    out = sys.stderr if args.json == "-" else sys.stdout      # with --json -, stdout is the JSON alone
    say = functools.partial(print, file=out, flush=True)
    if mode == "impl":
        say(f"{'model':10} {'px':>4} {'batch':>5} {'variant':10} {'precision':9} {'FP img/s':>9} {'QAT img/s':>9} "
            f"{'ratio':>6} {'mem ratio':>9}")
    else:                                                     # each kind's own images/s; ratio = time / FP time
        say(f"{'model':10} {'px':>4} {'batch':>5} {'variant':10} {'precision':9} {'img/s':>9} {'ratio':>6}")
    run_load0 = load_1m()                                     # the load before the run, printed at its end
    for name, size, in_ch in cases:
        load0 = load_1m()                                     # the load before this case: its rows' loadavg_1m_start
        b = build(name, size, in_ch, batch, args.device, args.precision, mode)
        med = measure(b, args.device, args.rounds, chunk)
        if mode != "impl":
            for kind in b["models"]:
                row = _row(name, size, batch, args, kind, b, load0, img_s=batch / med[kind],
                           ratio=med[kind] / med["fp"])
                rows.append(row)
                say(f"{name:10} {size:4d} {batch:5d} {kind:10} {row['precision']:9} {row['img_s']:9.1f} "
                    f"{row['ratio']:6.2f}")
            if mode == "layouts":
                say(f"{'':10} training layout / NCHW: FP {med['fp_nchw'] / med['fp']:.2f}x, "
                    f"QAT {med['fused_nchw'] / med['fused']:.2f}x faster")
            else:
                say(f"{'':10} bf16 / float32: FP {med['fp'] / med['fp_bf16']:.2f}x, "
                    f"QAT {med['fused'] / med['fused_bf16']:.2f}x faster")
            continue
        fp_mem = cuda_peak(b, "fp") if cuda else None
        for kind in ("reference", "fused"):
            mem = cuda_peak(b, kind) / fp_mem if cuda else None
            row = _row(name, size, batch, args, kind, b, load0, fp_img_s=batch / med["fp"],
                       qat_img_s=batch / med[kind], ratio=med[kind] / med["fp"], memory_ratio=mem)
            rows.append(row)
            say(f"{name:10} {size:4d} {batch:5d} {kind:10} {row['precision']:9} {row['fp_img_s']:9.1f} "
                f"{row['qat_img_s']:9.1f} {row['ratio']:6.2f} {'-' if mem is None else f'{mem:.2f}':>9}")
        say(f"{'':10} fused / reference: {med['reference'] / med['fused']:.2f}x faster")
    say("ratio = step time / FP step time" + (" (FP img/s / QAT img/s)" if mode == "impl" else "")
        + ", measured side by side in this run (lower is faster)")
    say(f"{load_text(machine(run_load0))}, before and after the whole run")
    write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
