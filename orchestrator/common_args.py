"""Argparse helpers shared by the subcommands: model, data and run options, and their resolution.

Model options (``model``, ``in_channels``, ``num_classes``, ``small_input``, ``input_size``) resolve from
the command line first, then from the sources a command passes, in its order, then built-in defaults.
``gmpq finetune`` passes what it will load before what the policy remembers: the FP result file written
beside an FP checkpoint (the weights must fit it), the dataset it loaded, then the policy's ``meta``;
``gmpq bitops`` passes the policy's ``meta``.
The policy options (``--policy``, ``--uniform``, bit checks, whether a policy fits) live in ``policy_args``, the
rewording of a config error to name the flags typed in ``flag_names``; both are importable from here too.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from gmpq_core.errors import ConfigError
from gmpq_core.fileio import check_writable_dir
from gmpq_core.names import BUILTIN_MODELS
from orchestrator.commands import add_precision_arg, at_least, refuse_empty
from orchestrator.flag_names import flag_text, naming_flags, naming_section
from orchestrator.policy_args import (META_KEYS, check_bits, check_policy_fits, check_uniform_bits, contradicted_meta,
                                      load_policy_arg, policy_meta, uniform_policy)

if TYPE_CHECKING:       # torch and what imports it load where they are used: the parsers (the help) stay quick
    from torch import nn

__all__ = ["add_model_args", "add_data_args", "model_help", "dataset_help", "DataRootArg", "ExistingDataRootArg",
           "add_run_args", "add_policy_args", "ModelOptions", "resolve_model_options", "build_seeded_model",
           "resolve_device", "load_policy_arg", "uniform_policy", "check_uniform_bits", "check_policy_fits",
           "contradicted_meta",
           "policy_meta", "dataset_source", "check_bits", "check_out_arg", "check_input_size_arg", "flag_text",
           "naming_flags", "naming_section", "SMALL_INPUT_MAX_PX", "META_KEYS"]

log = logging.getLogger(__name__)

SMALL_INPUT_MAX_PX = 64  # images up to this side default to the small-input stem (3x3 stride 1, no max-pool)


def model_help(default_model: str | None = None) -> str:
    """The ``--model`` help every command shares: the registered models, your own, the default."""
    return (f"model name ({', '.join(BUILTIN_MODELS)}), or your own as MODULE:FUNCTION or PATH.py:FUNCTION (README: "
            "'Your own model')" + (f"; default {default_model}" if default_model else ""))


def dataset_help(default_dataset: str | None = None, what: str = "dataset name") -> str:
    """The ``--dataset`` help every command shares: the dataset names (``what`` names the role), the default."""
    return (f"{what} (fashion_mnist, mnist5k, digits, cifar10, imagefolder:PATH)"
            + (f"; default {default_dataset}" if default_dataset else ""))


def add_model_args(p: argparse.ArgumentParser, *, default_model: str | None = None) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="NAME", help=model_help(default_model))
    g.add_argument("--input-size", type=int, default=None, metavar="PX", help="input image side in pixels")
    g.add_argument("--in-channels", type=int, default=None, metavar="C", help="input channels")
    g.add_argument("--num-classes", type=int, default=None, metavar="K", help="number of classes")
    g.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 stem without max-pool (default: on for images up to "
                        f"{SMALL_INPUT_MAX_PX} px)")
    p.set_defaults(default_model=default_model)


class DataRootArg(argparse.Action):
    """``--data-root DIR``, checked as it is parsed: empty (an unset shell variable?), or a file, or under one, is
    a ConfigError naming the flag, before any work (a file was passed over with a warning, or blamed on the
    network once the CIFAR-10 download into it failed)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        from gmpq_core.paths import check_data_root       # torch-free: parsing imports no torch

        flag = option_string or "--data-root"
        refuse_empty(flag, values, f"give the folder that holds the dataset files, or drop {flag}.")
        setattr(namespace, self.dest, check_data_root(values, flag))


class ExistingDataRootArg(DataRootArg):
    """``DataRootArg`` of a command that only reads a dataset (``gmpq evaluate``): a folder that does not exist is
    refused too, naming it (the dataset was found elsewhere and the flag passed over with a warning); the commands
    that train keep a new folder as the place a download goes."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        flag = option_string or "--data-root"
        path = Path(values).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{flag} '{values}': no such folder ({path.absolute()}). Pass {flag} the folder that "
                              f"holds the dataset files, or drop {flag} to use the dataset's default location.")


def add_data_args(p: argparse.ArgumentParser, *, default_dataset: str = "fashion_mnist", or_else: str = "") -> None:
    """``or_else`` follows the defaults of ``--test-size`` and ``--batch-size`` (gmpq finetune: where ``--sweep``
    takes them from)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, metavar="NAME", help=dataset_help(default_dataset))
    g.add_argument("--data-root", default=None, metavar="DIR", action=DataRootArg,
                   help="where the dataset files are (default: the dataset's own location; for finetune --policy "
                        "of a sweep's policy, the data root the sweep recorded)")
    g.add_argument("--test-size", type=int, action=at_least(1), default=None, metavar="N",
                   help=f"evaluate on a stratified subset of N test images (default: the whole test split{or_else})")
    g.add_argument("--batch-size", type=int, action=at_least(1), default=128, metavar="B",
                   help=f"batch size (default 128{or_else})")
    p.set_defaults(default_dataset=default_dataset)


def add_run_args(p: argparse.ArgumentParser, *, default_out: str, or_else: str = "") -> None:
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default cpu)")
    add_precision_arg(g, or_else=or_else)
    g.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and augmentation")
    g.add_argument("--out", default=default_out, metavar="DIR", help=f"output folder (default {default_out})")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bit policy (one of)")
    g.add_argument("--policy", default=None, metavar="FILE", help="bit policy JSON (e.g. from 'gmpq search')")
    g.add_argument("--uniform", nargs=2, type=int, default=None, metavar=("W", "A"),
                   help="the same W-bit weights and A-bit activations in every searchable layer")


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    model: str
    input_size: int
    in_channels: int
    num_classes: int
    small_input: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _pick(key: str, cli: Any, sources: Sequence[Mapping[str, Any]], default: Any) -> Any:
    if cli is not None:
        return cli
    for src in sources:
        if src and src.get(key) is not None:
            return src[key]
    return default


def _positive_int(name: str, flag: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, but got {flag} {value!r}. Pass {flag} 1 or more, or "
                          "leave it out for its default (the dataset's).")
    return value


def check_input_size_arg(value: Any, flag: str = "--input-size") -> int:
    """``value`` if it is a positive image side of at most ``MAX_IMAGE_SIZE`` px, else ConfigError naming ``flag``
    (a larger model input asks for hundreds of GB, or TB, of activations and fails with a traceback)."""
    from gmpq_core.data.registry import MAX_IMAGE_SIZE, check_image_size

    value = _positive_int("the input size", flag, value)
    if value > MAX_IMAGE_SIZE:
        check_image_size(value, flag)      # its message: the bound, the value and the fix
    return value


def check_out_arg(out: str, *, flag: str = "--out") -> Path:
    """The ``--out`` folder as an absolute path, checked before any work: an empty value (an unset shell
    variable?) or a path that is, or lies under, a file is a ConfigError."""
    refuse_empty(flag, out, f"give the output folder, or drop {flag} to use the default.")
    return check_writable_dir(out, hint=f"pass {flag} a folder you can write")


def _check_fits_dataset(opts: "ModelOptions", info: Any, args: argparse.Namespace) -> None:
    """The model's input channels must be the dataset's, and its classes cover the dataset's labels."""
    name = getattr(info, "name", "the dataset")

    def mismatch(key: str, what: str, has: str, other: str) -> ConfigError:
        flag, value = "--" + key.replace("_", "-"), getattr(opts, key)
        if getattr(args, key, None) is not None:
            return ConfigError(f"{what} ({flag} {value}), but {name} has {has}. Drop {flag} (it defaults to the "
                               f"dataset's), pass {flag} {getattr(info, key)}, or pick a dataset with {other} with "
                               "--dataset.")
        return ConfigError(f"{what} ({key}={value}, from the FP result it builds on), but {name} has {has}. "
                           f"Pass --dataset with the dataset that model was trained on, or an FP checkpoint of {name}.")

    if opts.in_channels != info.in_channels:
        raise mismatch("in_channels", f"The model takes {opts.in_channels} input channel(s)",
                       f"{info.in_channels}-channel images", f"{opts.in_channels}-channel images")
    if opts.num_classes < info.num_classes:
        raise mismatch("num_classes", f"The model has {opts.num_classes} output classes",
                       f"{info.num_classes} classes (labels 0..{info.num_classes - 1})",
                       f"at most {opts.num_classes} classes")


def dataset_source(info: Any) -> dict:
    """The model options a dataset implies (input channels, classes, image side)."""
    return {"in_channels": info.in_channels, "num_classes": info.num_classes, "input_size": info.image_size,
            "dataset": info.name}


def resolve_model_options(args: argparse.Namespace, *, sources: Sequence[Mapping[str, Any]] = (),
                          dataset_info: Any = None) -> ModelOptions:
    """Model options from ``args``, then each of ``sources`` in order (e.g. an FP result, the policy's
    meta), then ``dataset_info``; ``small_input`` defaults to on for datasets of small images. With
    ``dataset_info`` the model must take the dataset's channels and cover its classes (ConfigError)."""
    from gmpq_core.models import check_model, list_models

    data = dataset_source(dataset_info) if dataset_info is not None else {}
    model = _pick("model", args.model, sources, getattr(args, "default_model", None))
    if model is None:
        raise ConfigError(f"No model given. Pass --model NAME (one of: {', '.join(list_models())}).")
    model = check_model(model, "--model" if args.model is not None else "model")
    input_size = _pick("input_size", args.input_size, [*sources, data], None)
    if input_size is None:
        raise ConfigError("No input size given. Pass --input-size PX (e.g. 224 for ImageNet-sized images; "
                          "for Fashion-MNIST, --input-size 28 --in-channels 1, as inputs have 3 channels unless "
                          "told otherwise).")
    input_size = check_input_size_arg(input_size, "--input-size" if args.input_size is not None else "input_size")
    in_channels = _positive_int("the number of input channels", "--in-channels",
                                _pick("in_channels", args.in_channels, [*sources, data], 3))
    num_classes = _positive_int("the number of classes", "--num-classes",
                                _pick("num_classes", args.num_classes, [*sources, data], 10))
    small = _pick("small_input", args.small_input, sources, None)
    if small is None:
        small = input_size <= SMALL_INPUT_MAX_PX if dataset_info is not None else False
    opts = ModelOptions(model=model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                        small_input=bool(small))
    if dataset_info is not None:      # a mismatch fails here, not as a conv or loss traceback after loading
        _check_fits_dataset(opts, dataset_info, args)
    return opts


def build_seeded_model(opts: ModelOptions, seed: int) -> nn.Module:
    """A freshly initialised model for ``opts``; the init depends on ``seed`` only (global RNG untouched)."""
    from gmpq_core.models import build_model
    from gmpq_core.train import seeded

    with seeded(seed):
        return build_model(opts.model, num_classes=opts.num_classes, in_channels=opts.in_channels,
                           small_input=opts.small_input, input_size=opts.input_size)


def resolve_device(name: str) -> str:
    """Check a torch device string; asking for CUDA on a machine without it raises ConfigError."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"Unknown device {name!r}; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asks for CUDA, but this machine has no usable GPU; use --device cpu.")
    return str(dev)
