"""The bit-policy options the commands share (moved here from ``common_args``, which imports them): ``--w-bits`` /
``--a-bits`` / ``--uniform W A`` checked (``check_bits``, ``check_uniform_bits``), a uniform policy built
(``uniform_policy``), ``--policy FILE`` loaded (``load_policy_arg``), whether a policy fits the model built and which
typed model flags its meta contradicts (``check_policy_fits``, ``contradicted_meta``), and the model options a
policy's meta records (``policy_meta``, ``META_KEYS``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from gmpq_core.errors import ConfigError, PolicyMismatchError

if TYPE_CHECKING:       # torch and what imports it load where they are used: the parsers (the help) stay quick
    from torch import nn

    from gmpq_core.policy import BitPolicy

    from .common_args import ModelOptions

META_KEYS = ("model", "dataset", "target_dataset", "in_channels", "num_classes", "small_input", "input_size")


def check_bits(flag: str, value: int) -> int:
    from gmpq_core.policy import MAX_BITS, MIN_BITS

    if not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(f"{flag} must be in {MIN_BITS}..{MAX_BITS}, but got {flag} {value}. Give a bitwidth "
                          f"between {MIN_BITS} and {MAX_BITS} (e.g. {flag} 4); 32-bit layers are the FP ones "
                          "outside the policy.")
    return value


def check_uniform_bits(w_bits: int, a_bits: int) -> None:
    """``--uniform W A`` (``gmpq finetune``): both bitwidths in the policy's range, else ConfigError echoing the flag
    as typed."""
    from gmpq_core.policy import MAX_BITS, MIN_BITS

    for what, value in (("W (weight bits)", w_bits), ("A (activation bits)", a_bits)):
        if not MIN_BITS <= value <= MAX_BITS:
            raise ConfigError(f"--uniform W A takes two bitwidths in {MIN_BITS}..{MAX_BITS}, but got --uniform "
                              f"{w_bits} {a_bits}: its {what} {value} is outside. Give e.g. --uniform 4 4; 32-bit "
                              "layers are the FP ones outside the policy.")


def check_policy_fits(policy: BitPolicy, model: nn.Module, opts: ModelOptions, *, flags: bool = True,
                      args: argparse.Namespace | None = None, dataset: Mapping[str, Any] | None = None) -> list[str]:
    """``policy.check_fits(model)``; when it does not fit and the policy's meta names another model, or other input
    channels or classes, than ``opts`` (the model built), the message says which it was searched for and the fix:
    the flags that build that model (``flags=False``: the channels and classes come from the dataset, named
    instead), or a policy searched for the model built. When it fits: the warning lines (``contradicted_meta``)
    for each model flag typed in ``args`` that the policy's meta contradicts, for the caller to print."""
    meta = policy.meta or {}
    warnings = contradicted_meta(meta, opts, args, dataset)
    differ = [k for k in ("model", "in_channels", "num_classes")
              if meta.get(k) is not None and meta.get(k) != getattr(opts, k)]
    if not differ:                      # the model built is the one the meta names (or the flags, without one)
        policy.check_fits(model, fix=None if not flags else (
            f"{opts.model} for {opts.num_classes} classes of {opts.in_channels}-channel images is built here ("
            + ("as the policy's meta names it" if meta.get("model") else "from the flags") + "); a policy gives each "
            "of its searchable layers bits, and no other layer: correct the policy's layers (or its meta), pass the "
            "--model (--in-channels, --num-classes) of the network the policy was searched for, or use a policy "
            f"searched for {opts.model} (gmpq search --model {opts.model})."))
        return warnings

    def described(src: Any) -> str:       # the model, and its classes and channels where those differ
        get = src.get if isinstance(src, Mapping) else lambda k: getattr(src, k)
        shape = [f"{get('num_classes')} classes"] if "num_classes" in differ else []
        shape += [f"{get('in_channels')}-channel images"] if "in_channels" in differ else []
        return str(get("model") or "an unnamed model") + (f" for {' of '.join(shape)}" if shape else "")

    fixes = [f"--model {meta['model']}"] if "model" in differ else []
    shape = [k for k in differ if k != "model"]
    if flags:
        fixes += [f"--{k.replace('_', '-')} {meta[k]}" for k in shape]
    elif shape:
        fixes.append(f"a --dataset of {meta.get('num_classes')} classes of {meta.get('in_channels')}-channel images"
                     + (f" (it was searched on {meta['dataset']})" if meta.get("dataset") else ""))
    try:
        policy.check_fits(model)
    except PolicyMismatchError:
        policy.check_fits(model, fix=f"The policy was searched for {described(meta)} (its meta), but "
                                     f"{described(opts)} is built here: pass {' and '.join(fixes)}, or use a policy "
                                     f"searched for {opts.model} (gmpq search --model {opts.model}).")
    return warnings


def contradicted_meta(meta: Mapping[str, Any], opts: ModelOptions, args: argparse.Namespace | None,
                      dataset: Mapping[str, Any] | None = None) -> list[str]:
    """One warning line per model flag typed in ``args`` (--model, --in-channels, --num-classes, --input-size) whose
    value the policy's ``meta`` records otherwise: both values, and that the network built is the flags' (a policy
    fits a network with other classes, say, and was counted or trained on it without a word). Values that came from
    elsewhere are not flags, and not warned about; nor is a flag that says what ``dataset`` (``dataset_source``: the
    target a policy is deployed on, whose classes may differ from the proxy's) has anyway. Without ``dataset``, a
    policy whose meta names a ``target_dataset`` other than its ``dataset`` is meant for a network of that target's
    shape, which the meta does not record: only --model is compared (``gmpq bitops --in-channels 3 --input-size 32``
    counts a Fashion-MNIST policy on its CIFAR-10 target)."""
    if args is None:
        return []
    out = []
    elsewhere = dataset is None and meta.get("target_dataset") not in (None, meta.get("dataset"))
    for key in ("model",) if elsewhere else ("model", "in_channels", "num_classes", "input_size"):
        flag, value = "--" + key.replace("_", "-"), getattr(opts, key)
        if getattr(args, key, None) is None or meta.get(key) is None or meta[key] == value \
                or (dataset or {}).get(key) == value:
            continue
        searched = "the input size it was searched at" if key == "input_size" else "the network it was searched for"
        out.append(f"{flag} {value} differs from the policy's meta, which records {key} {meta[key]} ({searched}); "
                   f"the network built here is the one the flags describe ({flag} {value}). Pass {flag} {meta[key]}, "
                   "or leave it out, for the network the policy was searched for.")
    return out


def uniform_policy(model: nn.Module, w_bits: int, a_bits: int, flags: tuple[str, str] = ("--w-bits", "--a-bits"),
                   meta: Mapping[str, Any] | None = None) -> BitPolicy:
    from gmpq_core.policy import BitPolicy

    policy = BitPolicy.uniform(model, check_bits(flags[0], w_bits), check_bits(flags[1], a_bits))
    return BitPolicy(layers=policy.layers, fingerprint=policy.fingerprint, meta={**policy.meta, **(meta or {})})


def load_policy_arg(path: str | None) -> BitPolicy | None:
    """Load ``--policy FILE`` (None when not given); unreadable or invalid files raise PolicyMismatchError."""
    from gmpq_core.policy import BitPolicy

    return BitPolicy.load(Path(path)) if path is not None else None


def policy_meta(policy: BitPolicy | None) -> dict:
    return {k: policy.meta[k] for k in META_KEYS if policy is not None and k in policy.meta}
