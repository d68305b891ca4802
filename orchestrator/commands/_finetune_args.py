"""The options of ``gmpq finetune``'s single-policy mode (moved here from ``finetune``, which imports them): the
parser's groups (``add_single_args``, shared with other fine-tune modes), the defaults it fills in without
``--sweep`` (``SINGLE_DEFAULTS``) and the options given that ``--sweep`` mode does not use
(``_single_mode_options_given``).
"""
from __future__ import annotations

import argparse

from ..common_args import add_data_args, add_model_args, add_policy_args, add_run_args
from ._finetune_checks import _DISTILL_DEFAULTS
from . import at_least

_FP_DEFAULTS = {"fp_epochs": 2, "fp_lr": 0.1}                            # the parser's; used only when FP is trained


# where gmpq finetune --sweep takes a value left unset: its help says it after the single-policy default
WITH_SWEEP = "; with --sweep: the sweep config's"


def add_single_args(p: argparse.ArgumentParser) -> None:
    """The options of a single-policy fine-tune (shared with other fine-tune modes)."""
    add_policy_args(p)
    add_model_args(p, default_model="resnet20")
    add_data_args(p, or_else=WITH_SWEEP)
    g = p.add_argument_group("FP model")
    g.add_argument("--fp-checkpoint", default=None, metavar="FILE",
                   help="FP state dict (fp.pt from 'gmpq train-fp'); without it: DIR/fp.pt of an earlier run, "
                        "else the sweep's FP target model for a policy exported by a sweep, else trained first")
    g.add_argument("--fp-epochs", type=int, action=at_least(1), default=_FP_DEFAULTS["fp_epochs"], metavar="E",
                   help="epochs of the FP training, when it is trained here (default 2); that training uses the "
                        "fine-tune's --train-size, --test-size, --batch-size and --max-steps-per-epoch too")
    g.add_argument("--fp-lr", type=float, default=_FP_DEFAULTS["fp_lr"], metavar="LR",
                   help="peak learning rate of that FP training (default 0.1)")
    g = p.add_argument_group("fine-tune")
    g.add_argument("--train-size", type=int, action=at_least(1), default=None, metavar="N",
                   help=f"fine-tune on a stratified subset of N training images (default: the whole split{WITH_SWEEP})")
    g.add_argument("--epochs", type=int, action=at_least(1), default=None, metavar="E",
                   help=f"fine-tune epochs (default 1{WITH_SWEEP})")
    g.add_argument("--lr", type=float, default=None, metavar="LR",
                   help=f"peak learning rate (default 0.01{WITH_SWEEP})")
    g.add_argument("--weight-decay", type=float, default=4e-5, metavar="WD", help="weight decay (default 4e-5)")
    g.add_argument("--distill", action="store_true", help="distil from the FP model (KL at temperature T + CE)")
    g.add_argument("--distill-alpha", type=float, default=_DISTILL_DEFAULTS["distill_alpha"], metavar="ALPHA",
                   help="weight of the distillation term, with --distill (default 0.5)")
    g.add_argument("--distill-temperature", type=float, default=_DISTILL_DEFAULTS["distill_temperature"],
                   metavar="T", help="distillation temperature, with --distill (default 4)")
    g.add_argument("--include-stem", action="store_true", help="quantize the stem too (8 bits unless in the policy)")
    g.add_argument("--include-classifier", action="store_true",
                   help="quantize the classifier too (8 bits unless in the policy)")
    g.add_argument("--max-steps-per-epoch", type=int, action=at_least(1), default=None, metavar="N",
                   help=f"cap every epoch at N batches (quick checks; default: no cap{WITH_SWEEP})")
    add_run_args(p, default_out="runs/finetune", or_else=WITH_SWEEP)


SINGLE_DEFAULTS = {"epochs": 1, "lr": 0.01, "batch_size": 128, "precision": "auto"}


SWEEP_MODE_OPTIONS = {"epochs", "lr", "batch_size", "train_size", "test_size", "max_steps_per_epoch",   # both modes
                      "precision"}


def _single_mode_options_given(args: argparse.Namespace) -> list[str]:
    """The single-policy options set on this command line (``--sweep`` mode does not use them)."""
    p = argparse.ArgumentParser()
    add_single_args(p)
    defaults = vars(p.parse_args([]))
    return ["--" + k.replace("_", "-") for k, v in sorted(vars(args).items())
            if k in defaults and k not in SWEEP_MODE_OPTIONS and v != defaults[k]]
