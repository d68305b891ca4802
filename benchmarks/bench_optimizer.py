"""The SGD step the product's loops take (gmpq_core.train.sgd: torch's fused kernel) against torch's
default implementation (a for-loop on a CPU, foreach on CUDA), side by side inside FP training steps.

For each model: two copies with the same weights, one per optimizer (momentum 0.9, weight decay 5e-4,
Nesterov: the FP recipe), trained on one held batch in the product's layout and precision (``auto``:
bf16 autocast + channels_last on a GPU with bfloat16, float32 channels_last on a CPU); the steps alternate
default / fused / default ... so machine noise hits both alike. Each step times its forward + backward
and its ``optimizer.step()`` apart: the optimizer runs as in a training loop, on gradients the backward
just allocated and parameters the forward and backward pushed out of the caches (timed alone on warm,
reused gradients, the fused step looked 3.5-5x faster on a CPU in this benchmark's first version, more
than a loop gets).

    python benchmarks/bench_optimizer.py                 # about a minute on 2 cores
    python benchmarks/bench_optimizer.py --device cuda
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import check_output_file, cli_entry, positive_int, progress, write_text_file  # noqa: E402

from gmpq_core.models import build_model
from gmpq_core.precision import autocast
from gmpq_core.train import sgd, training_layout_

CASES = {"cpu": (("resnet18", 32, 3, 64), ("resnet20", 28, 1, 128)),
         "cuda": (("resnet18", 224, 3, 256), ("resnet20", 28, 1, 256))}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(model, opt, x, y, device: str) -> tuple[float, float]:
    """(forward + backward seconds, optimizer-step seconds) of one training step, under the autocast the
    product's loops use on ``device`` (precision "auto": bf16 on a GPU with bfloat16, float32 on a CPU)."""
    opt.zero_grad(set_to_none=True)
    _sync(device)
    t0 = time.perf_counter()
    with autocast("auto", device):
        loss = F.cross_entropy(model(x), y)
    loss.float().backward()
    _sync(device)
    t1 = time.perf_counter()
    opt.step()
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per optimizer (default: 10 CPU, 30 CUDA)")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write the JSON list to PATH ('-': stdout)")
    args = p.parse_args(argv)
    check_output_file(p, args.json)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here; use --device cpu.", file=sys.stderr)
        return 2
    steps = args.steps or (30 if args.device == "cuda" else 10)
    kw = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    rows = []
    for i, (name, size, in_ch, batch) in enumerate(CASES[args.device], 1):
        progress(f"[{i}/{len(CASES[args.device])}] {name} {size} px, batch {batch}: 2 warm-up + {steps} timed steps "
                 "per optimizer ...")
        torch.manual_seed(0)
        base = training_layout_(build_model(name, num_classes=10, in_channels=in_ch).to(args.device), args.device)
        x = torch.randn(batch, in_ch, size, size, device=args.device)
        y = torch.randint(0, 10, (batch,), device=args.device)
        models = {"default": base, "fused": copy.deepcopy(base)}
        opts = {"default": torch.optim.SGD(models["default"].parameters(), **kw),
                "fused": sgd(models["fused"].parameters(), **kw)}
        assert opts["fused"].param_groups[0]["fused"] and not opts["default"].param_groups[0]["fused"]
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in opts}
        for i in range(steps + 2):                                 # 2 warm-up steps each
            for k in (("default", "fused") if i % 2 == 0 else ("fused", "default")):
                t = _step(models[k], opts[k], x, y, args.device)
                if i >= 2:
                    times[k].append(t)
        med = {k: (statistics.median(a for a, _ in v) * 1e3, statistics.median(b for _, b in v) * 1e3)
               for k, v in times.items()}
        (fb_d, opt_d), (fb_f, opt_f) = med["default"], med["fused"]
        rows.append({"model": name, "input_size": size, "batch_size": batch, "device": args.device,
                     "n_params": sum(q.numel() for q in base.parameters()),
                     "default_opt_ms": round(opt_d, 3), "fused_opt_ms": round(opt_f, 3),
                     "opt_speedup": round(opt_d / opt_f, 2), "fwd_bwd_ms": round((fb_d + fb_f) / 2, 2),
                     "step_speedup": round((fb_d + opt_d) / (fb_f + opt_f), 3), "threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None})
    if args.json == "-":
        print(json.dumps(rows, indent=1))
        return 0
    if args.json:
        write_text_file(args.json, json.dumps(rows, indent=1) + "\n")
    print(f"{'model':9} {'px':>4} {'batch':>5} {'fwd+bwd ms':>10} {'default opt ms':>14} {'fused opt ms':>12} "
          f"{'opt x':>6} {'step x':>7}")
    for r in rows:
        print(f"{r['model']:9} {r['input_size']:>4} {r['batch_size']:>5} {r['fwd_bwd_ms']:>10.1f} "
              f"{r['default_opt_ms']:>14.2f} {r['fused_opt_ms']:>12.2f} {r['opt_speedup']:>6.2f} "
              f"{r['step_speedup']:>7.3f}")
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}  "
          "(opt x: default / fused optimizer step; step x: the whole training step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
