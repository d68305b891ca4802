"""``gmpq finetune --policy``'s checks of its inputs before any work: option values the configs would reject later
under another name and options with no effect (``_check_single_args``), exactly one bit policy (``_policy_from_args``),
and an FP model recorded as trained on another dataset than the one fine-tuned on (``_check_fp_dataset``). Torch-free
(the parser's help stays quick)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from gmpq_core.errors import ConfigError
from gmpq_core.fileio import load_checkpoint

from ..common_args import check_uniform_bits, load_policy_arg
from ._finetune_fp import FPSource
from ._finetune_resume import same_dataset

if TYPE_CHECKING:
    from gmpq_core.policy import BitPolicy

_DISTILL_DEFAULTS = {"distill_alpha": 0.5, "distill_temperature": 4.0}   # the parser's; used only with --distill


def _check_single_args(args: argparse.Namespace, *, trains_fp: bool) -> None:
    """Values the configs would reject later under another name (``lr``), and options with no effect. --fp-lr is
    checked only when the FP model is trained here (said to be ignored otherwise, once the FP model is loaded)."""
    if args.fp_checkpoint is not None and not Path(args.fp_checkpoint).is_file():
        load_checkpoint(args.fp_checkpoint)    # its "not found" / "is a folder" paragraph now, before any data loads
    if trains_fp and not (
            isinstance(args.fp_lr, (int, float)) and math.isfinite(args.fp_lr) and args.fp_lr > 0):
        raise ConfigError(f"--fp-lr must be a finite number > 0, but got --fp-lr {args.fp_lr}. Use e.g. --fp-lr 0.1 "
                          "(the peak learning rate of the FP training), or leave it out.")
    if not args.distill:
        unused = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("distill_alpha", "distill_temperature")
                  if getattr(args, k) != _DISTILL_DEFAULTS[k]]
        if unused:
            raise ConfigError(f"{' and '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect without "
                              "--distill (distillation from the FP model is off). Add --distill, or drop "
                              f"{'it' if len(unused) == 1 else 'them'}.")


def _policy_from_args(args: argparse.Namespace) -> BitPolicy | None:
    if (args.policy is None) == (args.uniform is None):
        raise ConfigError("Give exactly one bit policy: --policy FILE (e.g. DIR/policy.json from 'gmpq search') "
                          "or --uniform W A (e.g. --uniform 4 4), but got "
                          + ("both." if args.policy is not None else "neither."))
    if args.uniform is not None:
        check_uniform_bits(*args.uniform)
    return load_policy_arg(args.policy)


def _check_fp_dataset(args: argparse.Namespace, fp: FPSource, fp_info: dict, info) -> str | None:
    """An FP model recorded (fp_result.json) as trained on another dataset than ``info``, the one fine-tuned on.

    Its own ``DIR/fp.pt`` kept from an earlier run is refused (the user did not ask for that model). An
    ``--fp-checkpoint`` whose classifier cannot predict the dataset's labels (another number of classes, or of
    input channels) is refused; one of the same shape is fine-tuned with a note (returned, to print once the FP
    model is loaded), as transfer between datasets labelled alike (digits -> MNIST) can be meant. A checkpoint
    without a recorded dataset is not checked."""
    fp_data = fp_info.get("dataset")
    kept = fp.path if fp.kind == "kept" else None          # (the sweep's FP target model was checked when picked)
    if not fp_data or fp.kind not in ("given", "kept") or same_dataset(fp_data, info.name):
        return None
    fp_classes, fp_channels = fp_info.get("num_classes"), fp_info.get("in_channels")
    other_labels = (fp_classes is not None and fp_classes != info.num_classes) or \
        (fp_channels is not None and fp_channels != info.in_channels)
    if kept is not None:
        on_purpose = "" if other_labels else (f"; add --fp-checkpoint {kept} there to fine-tune that FP model on "
                                              f"{info.name} on purpose")
        raise ConfigError(f"The FP model '{kept}', kept from an earlier run in this --out folder, was trained on "
                          f"'{fp_data}', but this run fine-tunes on '{info.name}'. Pass another --out for the "
                          f"{info.name} run (this folder's FP model and fine-tune checkpoints belong to the {fp_data} "
                          f"run){on_purpose}.")
    ckpt = args.fp_checkpoint
    if other_labels:
        raise ConfigError(f"The FP checkpoint '{ckpt}' was trained on '{fp_data}' ({fp_classes} classes, "
                          f"{fp_channels}-channel images, per the fp_result.json beside it), but '{info.name}' has "
                          f"{info.num_classes} classes of {info.in_channels}-channel images: that model does not "
                          f"predict the labels of {info.name}. Give an FP checkpoint trained on {info.name} ('gmpq "
                          f"train-fp --dataset {info.name}'), leave out --fp-checkpoint to train one first, or pass "
                          f"--dataset {fp_data}.")
    distilled = " (and --distill distils from it)" if args.distill else ""
    return (f"the FP checkpoint {ckpt} was trained on '{fp_data}' (per the fp_result.json beside it), not on "
            f"'{info.name}': fine-tuning it on {info.name} assumes both label their {info.num_classes} classes "
            f"alike, and the FP top-1 reported is that model's on {info.name}{distilled}; pass --dataset {fp_data}, "
            f"or an FP checkpoint of {info.name}, if that was not meant")
