"""Where the frozen teacher's pass in a search step spends its device time, part by part (CUDA).

The search runs the FP teacher's forward pass and its Grad-CAM on every batch (BatchNorms folded,
eval mode, bf16 autocast, channels_last, as ``search_policy`` runs it). This times, side by side in one
process with CUDA events (median of ``--reps``):

- the whole teacher pass (``gradcam(..., mode="detached")``);
- its stem convolution (3 input channels) as run, in NCHW, with the input zero-padded to 4 / 8
  channels (the same values: the padded weights are zero), padding included, and as im2col + GEMM
  (``teacher_pass.UnfoldConv2d``);
- its max pool as run (``max_pool2d`` keeps indices on CUDA), and compiled by TorchInductor (no indices);
- the whole trunk compiled by TorchInductor (``--compile``; its compile time printed).

Each with ``torch.backends.cudnn.benchmark`` off (PyTorch's default) and on.

    python benchmarks/bench_teacher_parts.py --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from gmpq_core.attribution import find_feature_layer, gradcam
from gmpq_core.bn_fold import frozen_teacher_
from gmpq_core.models import build_model
from gmpq_core.teacher_pass import UnfoldConv2d

from bench_cli import check_output_file, cli_entry, positive_int, write_text_file  # same folder (run as a script)


def cuda_ms(fn, reps: int) -> float:
    """Median device time of ``fn()`` in ms (CUDA events around each call, 3 warm-ups first)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def padded(x: torch.Tensor, channels: int) -> torch.Tensor:
    out = x.new_zeros((x.shape[0], channels, *x.shape[2:])).contiguous(memory_format=torch.channels_last)
    out[:, :x.shape[1]] = x
    return out


def build(batch: int, size: int, device: str = "cuda") -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=3, small_input=False)
    model = model.to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(x)
    layer = find_feature_layer(model, model_name="resnet18")
    return frozen_teacher_(model, keep=(layer,)), x, y, layer


def parts(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str, reps: int) -> dict[str, float]:
    conv = teacher.conv1
    out: dict[str, float] = {}
    bf = torch.bfloat16
    xb = x.to(bf)
    w = conv.weight.to(bf)
    b = None if conv.bias is None else conv.bias.to(bf)
    kw = dict(stride=conv.stride, padding=conv.padding)
    out["teacher_gradcam"] = cuda_ms(lambda: gradcam(teacher, x, layer, target="pred", labels=y, mode="detached"), reps)
    with torch.no_grad():
        out["stem_nhwc3"] = cuda_ms(lambda: F.conv2d(xb, w, b, **kw), reps)
        xn, wn = xb.contiguous(), w.contiguous()
        out["stem_nchw3"] = cuda_ms(lambda: F.conv2d(xn, wn, b, **kw), reps)
        for c in (4, 8):
            wc = padded(w, c)
            out[f"stem_nhwc{c}_with_pad"] = cuda_ms(lambda wc=wc, c=c: F.conv2d(padded(xb, c), wc, b, **kw), reps)
            xc = padded(xb, c)
            out[f"stem_nhwc{c}_conv_only"] = cuda_ms(lambda wc=wc, xc=xc: F.conv2d(xc, wc, b, **kw), reps)
        unf = UnfoldConv2d(conv)
        out["stem_unfold"] = cuda_ms(lambda: unf(xb), reps)      # im2col + GEMM (gmpq_core.teacher_pass)
        s = torch.relu(F.conv2d(xb, w, b, **kw))
        pool = teacher.maxpool
        out["maxpool_as_run"] = cuda_ms(lambda: pool(s), reps)
    return out


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=positive_int, default=256, help="default: %(default)s")
    p.add_argument("--size", type=positive_int, default=224, help="input pixels (default: %(default)s)")
    p.add_argument("--reps", type=positive_int, default=20, help="timed repetitions, median (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="also the max pool and the trunk compiled (TorchInductor)")
    p.add_argument("--json", default=None, help="also write the figures and the machine to this file")
    args = p.parse_args(argv)
    check_output_file(p, args.json, stdout_ok=False)
    if not torch.cuda.is_available():
        print("bench_teacher_parts.py times CUDA kernels and needs a CUDA device; torch sees none here (no CPU mode).",
              file=sys.stderr)
        return 2
    teacher, x, y, layer = build(args.batch_size, args.size)
    rows = {}
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        with torch.autocast("cuda", dtype=torch.bfloat16):
            rows[f"cudnn_benchmark={bench}"] = parts(teacher, x, y, layer, args.reps)
    if args.compile:
        torch.backends.cudnn.benchmark = False
        extra = {}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            s = torch.relu(teacher.conv1(x))
            t0 = time.perf_counter()
            cpool = torch.compile(copy.deepcopy(teacher.maxpool))
            cpool(s)
            extra["maxpool_compile_s"] = time.perf_counter() - t0
            extra["maxpool_compiled"] = cuda_ms(lambda: cpool(s), args.reps)
            trunk = copy.deepcopy(teacher)
            trunk.fc = nn.Identity()
            t0 = time.perf_counter()
            ctrunk = torch.compile(trunk)
            ctrunk(x)
            extra["trunk_compile_s"] = time.perf_counter() - t0
            extra["trunk_eager"] = cuda_ms(lambda: trunk(x), args.reps)
            extra["trunk_compiled"] = cuda_ms(lambda: ctrunk(x), args.reps)
        rows["compiled"] = extra
    print(json.dumps(rows, indent=1))
    if args.json:
        write_text_file(args.json, json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                               "batch": args.batch_size, "size": args.size, "ms": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
