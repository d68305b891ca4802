"""``gmpq train-fp``: train a full-precision model and write ``DIR/fp.pt`` + ``DIR/fp_result.json``.

``fp.pt`` is the model's state dict (read back with ``torch.load(weights_only=True)``), written
atomically; ``fp_result.json`` holds the test metrics, the model options (so later stages can
rebuild the same architecture) and the per-epoch history.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmpq_core.errors import ConfigError
from gmpq_core.fileio import atomic_write_json, load_checkpoint, load_model_state, read_json, save_checkpoint
from gmpq_core.precision import resolve_precision

from ..common_args import (ModelOptions, add_data_args, add_model_args, add_run_args, build_seeded_model,
                           check_out_arg, resolve_device, resolve_model_options)
from ..progress import ProgressReporter, make_progress
from . import at_least
from ._single_run import check_out_paths, file_marks, replaced_since, stopped, written_text

if TYPE_CHECKING:       # torch and what imports it load where they are used: the parser (the help) stays quick
    from torch import nn

    from gmpq_core.train import TrainConfig, TrainResult

log = logging.getLogger(__name__)

FP_WEIGHTS, FP_RESULT = "fp.pt", "fp_result.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-fp", help="train a full-precision model",
        description="Train a full-precision model with SGD (Nesterov) and a cosine schedule; write DIR/fp.pt "
                    "(state dict) and DIR/fp_result.json (top-1/top-5, model options, history).")
    add_model_args(p, default_model="resnet20")
    add_data_args(p)
    p.add_argument("--proxy-size", type=int, action=at_least(1), default=None, metavar="N",
                   help="train on a stratified subset of N training images (default: the whole split)")
    p.add_argument("--epochs", type=int, action=at_least(1), default=2, metavar="E", help="epochs (default 2)")
    p.add_argument("--lr", type=float, default=0.1, metavar="LR", help="peak learning rate (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, metavar="WD", help="weight decay (default 5e-4)")
    p.add_argument("--max-steps-per-epoch", type=int, action=at_least(1), default=None, metavar="N",
                   help="cap every epoch at N batches (quick checks)")
    add_run_args(p, default_out="runs/fp")
    p.set_defaults(func=run)


def load_dataset(*args: Any, **kwargs: Any) -> Any:
    """``gmpq_core.data.load_dataset``, imported when first called (it imports torch)."""
    from gmpq_core.data import load_dataset

    return load_dataset(*args, **kwargs)


def load_data(args: argparse.Namespace, *, train_size: int | None, input_size: int | None,
              dataset: str | None = None, train_flag: str = "--proxy-size") -> tuple[Any, Any, Any]:
    """(info, train split, test split) of ``dataset`` (default: ``--dataset``), subsets stratified by ``--seed``.

    ``train_size`` is what the user gave as ``train_flag``; errors about the sizes name the flags."""
    from gmpq_core.data import proxy
    from gmpq_core.data.registry import check_image_size

    name = dataset or args.dataset or args.default_dataset
    check_image_size(input_size, "--input-size" if args.input_size is not None else "input_size")  # before a resize
    bundle = load_dataset(name, root=args.data_root, image_size=input_size)
    return (bundle.info, proxy(bundle.train, train_size, seed=args.seed, what=train_flag),
            proxy(bundle.test, args.test_size, seed=args.seed, what="--test-size"))


def loaders(info: Any, train_split: Any, test_split: Any, *, batch_size: int, seed: int, device: str):
    from gmpq_core.data import make_loader

    train = make_loader(train_split, info, batch_size=batch_size, train=True, seed=seed, device=device)
    test = make_loader(test_split, info, batch_size=max(batch_size, 256), train=False, seed=seed, device=device)
    return train, test


def train_fp_stage(args: argparse.Namespace, *, out: Path, opts: ModelOptions, data: tuple[Any, Any, Any],
                   epochs: int, lr: float, weight_decay: float = 5e-4,
                   max_steps_per_epoch: int | None = None) -> tuple[nn.Module, dict]:
    """Train the FP model ``opts`` on ``data`` = (info, train, test); write ``out/fp.pt`` + ``out/fp_result.json``."""
    from gmpq_core.train import TrainConfig, train_fp

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    info, train_split, test_split = data
    model = build_seeded_model(opts, args.seed)
    config = TrainConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=args.batch_size,
                         seed=args.seed, max_steps_per_epoch=max_steps_per_epoch)
    train_loader, test_loader = loaders(info, train_split, test_split, batch_size=args.batch_size,
                                        seed=args.seed, device=device)
    bar = make_progress("train-fp epoch")
    try:
        result = train_fp(model, train_loader, test_loader, config=config, device=device, progress=bar,
                          reporter=ProgressReporter("train-fp", total_epochs=epochs), precision=precision)
    finally:
        bar.close()
    summary = fp_summary(result, opts, info.name, config, train_size=len(train_split), test_size=len(test_split))
    summary["precision"] = precision
    save_checkpoint(out / FP_WEIGHTS, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    atomic_write_json(out / FP_RESULT, summary)
    return model, summary


def fp_summary(result: TrainResult, opts: ModelOptions, dataset: str, config: TrainConfig, *,
               train_size: int, test_size: int) -> dict:
    return {"top1": result.top1, "top5": result.top5, "loss": result.loss, "epochs_run": result.epochs_run,
            "seconds": result.seconds, **opts.to_dict(), "dataset": dataset, "train_size": train_size,
            "test_size": test_size, "config": config.to_dict(), "history": result.history}


def load_fp_model(path: str | Path, opts: ModelOptions) -> nn.Module:
    """Build the model for ``opts`` and load the FP state dict at ``path`` (CheckpointError if it does not fit)."""
    model = build_seeded_model(opts, seed=0)
    expected = (f"a {opts.model} (in_channels={opts.in_channels}, num_classes={opts.num_classes}, "
                f"small_input={opts.small_input})")
    load_model_state(model, load_checkpoint(path), path, what="FP checkpoint", expected=expected,
                     fix="Pass the --model, --in-channels, --num-classes and --small-input it was trained with (the "
                         "fp_result.json that 'gmpq train-fp' writes beside fp.pt records them), or an FP checkpoint "
                         f"of this {opts.model} (train one with 'gmpq train-fp', or leave out --fp-checkpoint to have "
                         "'gmpq finetune' train it first).")
    return model


def fp_result_beside(path: str | Path) -> dict:
    """The fp_result.json written next to an FP checkpoint, or {} when there is none."""
    p = Path(path).with_name(FP_RESULT)
    return read_json(p) if p.is_file() else {}


_RECORDED = ("model", "input_size", "in_channels", "num_classes", "small_input")     # what an FP model is trained for


def _asked(args: argparse.Namespace) -> dict:
    """What the command line alone says this run trains (before the data is loaded): the model, the dataset, and
    the model options given as flags."""
    from gmpq_core.models import check_model

    asked = {k: getattr(args, k) for k in _RECORDED[1:] if getattr(args, k) is not None}
    model = check_model(args.model, "--model") if args.model is not None else args.default_model
    return {**asked, "model": model,
            "dataset": args.dataset or args.default_dataset}


def _weights_fit(path: Path, opts: ModelOptions) -> bool:
    """Whether the state dict at ``path`` has this run's model's entries and shapes (an unreadable file: no)."""
    from gmpq_core.errors import GMPQError

    try:
        state = load_checkpoint(path)
    except (GMPQError, OSError):
        return False
    want = build_seeded_model(opts, seed=0).state_dict()
    return isinstance(state, dict) and set(state) == set(want) and all(
        getattr(state[k], "shape", None) == want[k].shape for k in want)


def check_earlier_fp(out: Path, now: dict, opts: ModelOptions | None = None) -> str:
    """``out/fp.pt`` of an earlier run trained for another model or data than ``now`` (model options and
    ``dataset``; only those known) is refused, naming what its fp_result.json records and the fixes: this run
    would overwrite it (as ``gmpq finetune`` refuses a folder's checkpoints of another run; no flag overwrites, as
    none does elsewhere). Without the record, ``opts`` (the resolved model) is checked against its weights. Returns
    the notice that this run replaces what is there ("": nothing is)."""
    from ._finetune_resume import as_flags, same_dataset

    weights, record = out / FP_WEIGHTS, out / FP_RESULT
    if not weights.is_file():
        return ""
    files = f"'{weights}' and '{record}'" if record.is_file() else f"'{weights}'"
    fix = f"Pass another --out for this run, or delete {files} to train this model there."
    old = fp_result_beside(weights) if record.is_file() else {}
    if not isinstance(old.get("model"), str) or not isinstance(old.get("dataset"), str):
        if opts is not None and not _weights_fit(weights, opts):
            raise ConfigError(f"'{weights}' holds an FP model whose weights do not fit this run's {opts.model} "
                              f"({as_flags(opts.to_dict(), list(_RECORDED[1:]))}), and no fp_result.json says what "
                              f"it was trained for: this run would overwrite it. {fix}")
        return (f"{out} holds an earlier {FP_WEIGHTS} that fits this model (and no {FP_RESULT}); this run replaces it "
                "when it ends (pass another --out to keep it)")
    other = [k for k in _RECORDED if k in now and k in old and now[k] != old[k]]
    other_data = "dataset" in now and not same_dataset(str(now["dataset"]), old["dataset"])
    if other or other_data:
        trains = " ".join(([as_flags(now, other)] if other else [])
                          + ([f"on '{now['dataset']}'"] if other_data else []))
        raise ConfigError(f"'{weights}' holds the FP model of an earlier run, trained with "
                          f"{as_flags(old, [k for k in _RECORDED if k in old])} on '{old['dataset']}' (its {FP_RESULT} "
                          f"records it), but this run trains {trains}: it would overwrite that model. {fix}")
    return (f"{out} holds an earlier run's {FP_WEIGHTS} and {FP_RESULT} of this model and data; this run replaces them "
            "when it ends (pass another --out to keep them)")


def _train_config(args: argparse.Namespace) -> None:
    """The FP recipe's values checked before any notice or work, the errors naming the flags (``--lr -1``)."""
    from gmpq_core.errors import GMPQError
    from gmpq_core.train import TrainConfig

    from ..common_args import naming_flags

    given = {key: (f"--{key.replace('_', '-')}", getattr(args, key)) for key in
             ("epochs", "lr", "weight_decay", "batch_size", "seed", "max_steps_per_epoch")
             if getattr(args, key, None) is not None}
    try:
        TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                    seed=args.seed, max_steps_per_epoch=args.max_steps_per_epoch)
    except GMPQError as e:
        err = naming_flags(e, given)
        fixes = {"--weight-decay": "Use e.g. --weight-decay 5e-4 (0: none), or leave it out.",
                 "--seed": "Use e.g. --seed 0, or leave it out."}
        extra = next((fix for flag, fix in fixes.items() if str(err).startswith(flag + " ")
                      and "Use e.g." not in str(err)), "")
        raise type(err)(f"{err} {extra}".strip()) from None


def _check_no_finetune_here(out: Path) -> None:
    """``out`` holding a ``gmpq finetune --policy`` run's checkpoint started from the fp.pt there is refused: the
    checkpoint records that model's weights, and replacing them would strand the fine-tune (its rerun refuses the
    new model, and the one it was built on is gone)."""
    from gmpq_core.errors import GMPQError
    from gmpq_core.finetune import CHECKPOINT_NAME, recorded_fp

    from ._finetune_resume import CHECKPOINTS

    ckpt, weights = out / CHECKPOINTS / CHECKPOINT_NAME, out / FP_WEIGHTS
    if not ckpt.is_file() or not weights.is_file():
        return
    try:
        started = recorded_fp(load_checkpoint(ckpt))
    except (GMPQError, OSError):
        return                          # not a fine-tune state: nothing here depends on fp.pt
    source = started.get("source") if started is not None else None
    if source is not None and os.path.abspath(source) != os.path.abspath(weights):
        return                          # started from another file (--fp-checkpoint)
    raise ConfigError(f"'{out}' holds a 'gmpq finetune' run whose checkpoint '{ckpt}' was started from the FP model "
                      f"'{weights}': this run would replace that model, and the fine-tune could then not be resumed "
                      f"or continued (its FP model, distillation teacher and reported FP top-1 would be gone). Pass "
                      f"another --out for this run, or delete '{out / CHECKPOINTS}' first if you mean to discard that "
                      "fine-tune.")


def run(args: argparse.Namespace) -> int:
    from orchestrator.ray_env import ctrl_c_signals

    state: dict[str, Any] = {}
    with ctrl_c_signals(python_sigint=True):     # SIGTERM (a batch job stopped, kill) as Ctrl-C: one line, exit 143
        try:
            return _run(args, state)
        except KeyboardInterrupt as e:
            return stopped("gmpq train-fp", e, stopped_text(Path(args.out).expanduser(), state.get("marks")))


def stopped_text(out: Path, marks: dict | None) -> str:
    """What an interrupted train-fp leaves in ``out``, by the files there now against ``marks`` (``file_marks``,
    taken before the training; None: stopped before), and what rerunning the same command does."""
    again = "Rerunning the same command trains the model again from epoch 1"
    replaced = replaced_since(out, marks)
    written = written_text("training", out, (FP_WEIGHTS, FP_RESULT), replaced)
    if written is not None:             # stopped while it wrote its files (or after): they are this training's
        return f"{written} {again}{'' if len(replaced) == 2 else ' and writes both'}."
    earlier = f" (the earlier {FP_WEIGHTS} in {out} is left as it was)" if (out / FP_WEIGHTS).is_file() else ""
    return f"train-fp keeps no checkpoint, so nothing of this training is kept{earlier}. {again}."


def _run(args: argparse.Namespace, state: dict[str, Any]) -> int:
    from orchestrator.data_roots import check_given_data_root

    check_given_data_root(args.data_root, args.dataset or args.default_dataset)   # a typo: not other data
    out = check_out_arg(args.out)    # a file there fails now, not after the training (the model was lost)
    check_out_paths(out, "gmpq train-fp", files=(FP_WEIGHTS, FP_RESULT))
    _train_config(args)                          # the recipe's and the device's errors before any notice
    resolve_precision(args.precision, resolve_device(args.device))
    _check_no_finetune_here(out)
    check_earlier_fp(out, _asked(args))          # another model or dataset: refused before the data is loaded
    data = load_data(args, train_size=args.proxy_size, input_size=args.input_size)
    opts = resolve_model_options(args, dataset_info=data[0])
    replaces = check_earlier_fp(out, {**opts.to_dict(), "dataset": data[0].name}, opts)    # before the training
    if replaces:
        print(f"gmpq train-fp: {replaces}", file=sys.stderr)
    state["marks"] = file_marks(out, (FP_WEIGHTS, FP_RESULT))     # what a stop finds replaced: this training's
    _, summary = train_fp_stage(args, out=out, opts=opts, data=data, epochs=args.epochs, lr=args.lr,
                                weight_decay=args.weight_decay, max_steps_per_epoch=args.max_steps_per_epoch)
    capped = (f", at most {args.max_steps_per_epoch} batch{'' if args.max_steps_per_epoch == 1 else 'es'} of "
              f"{args.batch_size} per epoch"
              if args.max_steps_per_epoch else "")
    epochs = summary["epochs_run"]
    print(f"FP {opts.model} on {summary['dataset']} ({summary['train_size']} training images{capped}, "
          f"{epochs} epoch{'' if epochs == 1 else 's'}, {summary['seconds']:.0f} s): "
          f"test top-1 {summary['top1']:.2f}%, "
          f"top-5 {summary['top5']:.2f}%")
    print(f"wrote {out / FP_WEIGHTS} and {out / FP_RESULT}", file=sys.stderr)
    return 0
