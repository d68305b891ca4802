"""``gmpq bitops``: MACs and BitOPs of a model under a bit policy (or uniform bits), both conventions.

Contract used by other tools: with ``--json`` it prints one JSON object with at least ``macs`` (all
conv + linear MACs per image), ``bitops_quantized`` (quantized layers, MACs x w x a),
``bitops_total`` (whole network, other layers at 32 x 32) and ``layers`` (``{name, macs, w_bits,
a_bits, ...}`` per Conv2d/Linear). The quantized layers of ``--policy FILE`` are its layers plus a stem /
classifier its meta quantizes (``gmpq search --include-stem --stem-bits B``), as the search counted them.

With uniform bits, model flags left out take the values of the other commands' default: resnet20 on the default
dataset, Fashion-MNIST (28 px, 1 input channel, 10 classes; the small-input stem for images up to 64 px; 3 channels
for a larger --input-size, RGB as ImageNet-sized counts assume), so that
``--model resnet18`` alone counts the network ``gmpq search --model resnet18`` searches. The header names the values
that were filled in this way and the flags that change them.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from gmpq_core.errors import ConfigError

from ..common_args import (add_model_args, build_seeded_model, check_policy_fits, load_policy_arg, policy_meta,
                           resolve_model_options, uniform_policy)

if TYPE_CHECKING:       # it imports torch: loaded when counting (the help stays quick)
    from gmpq_core.bitops import BitOpsReport


# --w-bits/--a-bits with no model flag: the model the other commands default to (resnet20 on Fashion-MNIST); with
# some model flags, the others' values (the small-input stem then follows the input size, as for a dataset)
DEFAULT_MODEL = {"model": "resnet20", "input_size": 28, "in_channels": 1, "num_classes": 10, "small_input": True}
DEFAULT_DATASET = "Fashion-MNIST"
DEFAULT_NOTE = " (the default model, as the other commands': --model, --input-size, --in-channels count another)"
MODEL_FLAGS = {"model": "--model", "input_size": "--input-size", "in_channels": "--in-channels",
               "num_classes": "--num-classes"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bitops", help="count MACs and BitOPs of a model under a bit policy",
        description="Count per-layer MACs and BitOPs of a model under a bit policy (--policy FILE) or uniform "
                    "bits (--w-bits W --a-bits A). BitOPs are reported in both conventions: over the quantized "
                    "layers only (GMPQ/EdMIPS) and over the whole network with FP layers at 32x32 (HAWQ/OMPQ).")
    add_model_args(p)
    g = p.add_argument_group("bits (give --policy, or --w-bits and --a-bits; those count resnet20 at 28 px, 1 "
                             "channel, 10 classes, the other commands' default, where no model flag says otherwise)")
    g.add_argument("--policy", default=None, metavar="FILE", help="bit policy JSON")
    g.add_argument("--w-bits", type=int, default=None, metavar="W", help="weight bits of every searchable layer")
    g.add_argument("--a-bits", type=int, default=None, metavar="A", help="activation bits of every searchable layer")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def _check_bit_args(args: argparse.Namespace) -> None:
    has_bits = args.w_bits is not None or args.a_bits is not None
    if args.policy is not None and has_bits:
        raise ConfigError("Give either --policy FILE or --w-bits/--a-bits, not both (got --policy "
                          f"{args.policy} and --w-bits {args.w_bits} --a-bits {args.a_bits}).")
    if args.policy is None and not has_bits:
        raise ConfigError("No bits given. Pass --policy FILE (a bit policy JSON) or uniform bits with "
                          "--w-bits W --a-bits A (e.g. --w-bits 4 --a-bits 4).")
    if args.policy is None and (args.w_bits is None or args.a_bits is None):
        missing = "--a-bits" if args.a_bits is None else "--w-bits"
        raise ConfigError(f"Uniform bits need both --w-bits and --a-bits, but {missing} is missing "
                          "(e.g. --w-bits 4 --a-bits 4).")


def _check_model_flags(args: argparse.Namespace) -> None:
    """The model numbers given, checked before anything else (``--num-classes 0`` was reported as a missing
    ``--input-size``)."""
    from ..common_args import check_input_size_arg

    for key, what in (("num_classes", "the number of classes"), ("in_channels", "the number of input channels")):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ConfigError(f"{what} must be a positive integer, but got {MODEL_FLAGS[key]} {value}; e.g. "
                              f"{MODEL_FLAGS[key]} {DEFAULT_MODEL[key]}, or leave it out ({DEFAULT_MODEL[key]}, "
                              f"{DEFAULT_DATASET}'s).")
    if args.input_size is not None:
        check_input_size_arg(args.input_size)


def _default_source(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The values of the model flags left out (the default model's: resnet20 on Fashion-MNIST; the small-input stem
    when the input size is at most ``SMALL_INPUT_MAX_PX``, as for a dataset) and which keys they fill."""
    from ..common_args import SMALL_INPUT_MAX_PX

    filled = [k for k in MODEL_FLAGS if getattr(args, k) is None]
    source = {k: DEFAULT_MODEL[k] for k in filled}
    size = args.input_size if args.input_size is not None else DEFAULT_MODEL["input_size"]
    source["small_input"] = size <= SMALL_INPUT_MAX_PX
    if "in_channels" in filled and size > SMALL_INPUT_MAX_PX:    # an ImageNet-sized input: RGB, as published counts
        source["in_channels"] = 3
    return source, filled


def run(args: argparse.Namespace) -> int:
    from gmpq_core.bitops import count_bitops
    from gmpq_core.models import small_input_variant

    _check_bit_args(args)
    _check_model_flags(args)
    policy = load_policy_arg(args.policy)
    filled: list[str] = []
    if policy is None:
        source, filled = _default_source(args)
    else:
        source = policy_meta(policy)
    defaulted = len(filled) == len(MODEL_FLAGS)
    opts = resolve_model_options(args, sources=[source])
    model = build_seeded_model(opts, seed=0)
    if policy is None:
        policy = uniform_policy(model, args.w_bits, args.a_bits)
    else:
        for warning in check_policy_fits(policy, model, opts, args=args):   # a typed flag the meta contradicts
            print(f"gmpq bitops: warning: {warning}", file=sys.stderr, flush=True)
    # shapes only: on the meta device nothing is allocated or computed (a 4096 px input is instant)
    report = count_bitops(model.to("meta"), policy, opts.input_size, opts.in_channels)
    avg_w, avg_a = policy.average_bits()
    summary = {**opts.to_dict(), "policy": args.policy, "avg_w_bits": avg_w, "avg_a_bits": avg_a,
               "gmacs": report.macs / 1e9, "default_model": defaulted, "defaults": [] if defaulted else filled}
    variant = small_input_variant(opts.model)
    if variant is False:            # one stem (resnet20's is the small-input one): the count says so, whatever asked
        summary["small_input"] = True
        summary["small_input_ignored"] = args.small_input is False
    if args.json:
        print(json.dumps({**report.to_dict(), **summary}))
    else:
        print(format_table(report, summary))
    return 0


def _defaults_note(summary: dict) -> str:
    """`` (--in-channels 1, --num-classes 10: not given, so the default's, ...)`` for the model flags filled in."""
    from ..common_args import SMALL_INPUT_MAX_PX

    filled = summary.get("defaults") or []
    if not filled:
        return ""
    given = ", ".join(f"{MODEL_FLAGS[k]} {summary[k]}" for k in filled)
    rgb = "in_channels" in filled and summary.get("in_channels") == 3 and summary.get("input_size", 0) > SMALL_INPUT_MAX_PX
    why = "as the other commands' default, resnet20 on " + DEFAULT_DATASET + \
        ("; 3 input channels for an input this large (RGB)" if rgb else "")
    return f" ({given}: not given, so {why}; pass {'it' if len(filled) == 1 else 'them'} to count another)"


def _stem_text(summary: dict) -> str:
    if summary.get("small_input_ignored"):
        return (f", small-input stem (its only one: --no-small-input changes nothing for {summary['model']})")
    return ", small-input stem" if summary["small_input"] else ""


def format_table(report: BitOpsReport, summary: dict) -> str:
    """A readable per-layer table plus totals in both BitOPs conventions."""
    width = max([len(c.name) for c in report.layers] + [5])
    lines = [f"{summary['model']} at {summary['input_size']}x{summary['input_size']}, "
             f"{summary['in_channels']} input channel(s), {summary['num_classes']} classes"
             f"{_stem_text(summary)}{DEFAULT_NOTE if summary.get('default_model') else _defaults_note(summary)}",
             f"{'layer':<{width}}  {'MACs':>14}  {'W':>2}  {'A':>2}  {'BitOPs':>16}  quantized"]
    for c in report.layers:
        lines.append(f"{c.name:<{width}}  {c.macs:>14,}  {c.w_bits:>2}  {c.a_bits:>2}  {c.bitops:>16,}  "
                     f"{'yes' if c.quantized else 'no (FP, 32x32)'}")
    lines += [f"MACs (all conv + linear): {report.macs:,} ({report.macs / 1e9:.4f} G)",
              f"BitOPs, quantized layers only (GMPQ/EdMIPS): {report.bitops_quantized:,} "
              f"({report.bitops_quantized / 1e9:.3f} G)",
              f"BitOPs, whole network, FP layers at 32x32 (HAWQ/OMPQ): {report.bitops_total:,} "
              f"({report.bitops_total / 1e9:.3f} G)",
              f"mean bits over policy layers (unweighted): W {summary['avg_w_bits']:.2f}, A {summary['avg_a_bits']:.2f}"]
    return "\n".join(lines)
