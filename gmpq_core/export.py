"""A fine-tuned quantized model as one self-contained file, and the one call that rebuilds it.

``save_quantized_model(path, model, policy, arch=...)`` writes, atomically and loadable with
``torch.load(weights_only=True)``::

    {"format": "gmpq-quantized-model/1", "arch": {"model", "num_classes", "in_channels", "small_input"},
     "policy_json": the searched policy (with its meta), "quantized": {layer: [w_bits, a_bits]} (every
     quantized layer, a quantized stem / classifier included), "state_dict": weights, clips and signed
     flags, "preprocess": {"dataset", "image_size", "mean", "std"} of the data it was trained on,
     "results": "top1"/"top5" and more (BitOPs, provenance)}

``load_quantized_model(path)`` rebuilds the architecture from the registry, swaps in the quantized
layers, loads the weights (strict) and returns a ``QuantizedModel`` whose ``model`` is ready for
inference (eval mode): the fake-quantized network the fine-tune trained and evaluated. It expects inputs
normalised as in training: ``QuantizedModel.normalize(x)`` maps images in [0, 1] (torchvision ``ToTensor``)
at ``preprocess["image_size"]`` pixels to them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .fileio import QUANTIZED_MODEL_HINT, load_checkpoint, load_model_state, save_checkpoint
from .layers import swap_module
from .models import build_model
from .policy import BitPolicy, QuantSpec
from .qmodules import QuantConv2d, QuantLinear, quantized_layers

__all__ = ["FORMAT", "ARCH_KEYS", "QuantizedModel", "arch_from_meta", "preprocess_of", "save_quantized_model",
           "save_quantized_state", "load_quantized_model"]

FORMAT = "gmpq-quantized-model/1"
INT_FORMAT_FAMILY = "gmpq-integer-model/"    # integer_model's files (read here too): INT_FORMAT_FAMILY + version
ARCH_KEYS = ("model", "num_classes", "in_channels", "small_input")


@dataclass(frozen=True)
class QuantizedModel:
    """A loaded quantized model: ``model`` (eval mode), the ``policy`` it was fine-tuned with, its ``arch``,
    ``quantized`` ({layer: QuantSpec}, a fixed-bit stem / classifier included) and ``results``."""
    model: nn.Module
    policy: BitPolicy
    arch: dict
    quantized: dict[str, QuantSpec]
    results: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - mean) / std`` per channel, as the training data loader did; ``images`` in [0, 1]
        (e.g. torchvision ``ToTensor``), shape [N, C, H, W] or [C, H, W]."""
        if not self.preprocess:
            raise ConfigError("this model file records no input normalisation (written before it was kept); "
                              "normalise with the dataset's mean and std (gmpq_core.data.load_dataset(name).info).")
        p = next(self.model.parameters())
        shape = (-1, 1, 1)
        mean = torch.tensor(self.preprocess["mean"], device=p.device).view(shape)
        std = torch.tensor(self.preprocess["std"], device=p.device).view(shape)
        return (images.to(p.device, torch.float32) - mean) / std


def arch_from_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``{model, num_classes, in_channels, small_input}`` (and ``input_size`` when known) from a policy's or an
    FP model's meta."""
    missing = [k for k in ARCH_KEYS if k not in meta]
    if missing:
        raise ConfigError(f"cannot tell which network to rebuild: the meta lacks {missing} (it has "
                          f"{sorted(meta)}). Pass arch={{'model': ..., 'num_classes': ..., 'in_channels': ..., "
                          "'small_input': ...}.")
    arch = {"model": str(meta["model"]), "num_classes": int(meta["num_classes"]),
            "in_channels": int(meta["in_channels"]), "small_input": bool(meta["small_input"])}
    if meta.get("input_size") is not None:
        arch["input_size"] = int(meta["input_size"])
    return arch


def preprocess_of(info: Any) -> dict[str, Any]:
    """The input pipeline of a ``DatasetInfo``: ``{"dataset", "image_size", "mean", "std"}`` (0..1 scale)."""
    return {"dataset": str(info.name), "image_size": int(info.image_size),
            "mean": [float(m) for m in info.mean], "std": [float(s) for s in info.std]}


def save_quantized_model(path: str | os.PathLike, model: nn.Module, policy: BitPolicy, *,
                         arch: Mapping[str, Any], results: Mapping[str, Any] | None = None,
                         preprocess: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (a quantized network, e.g. ``FinetuneResult.model``; DDP's ``.module`` is taken) with
    what rebuilds it; returns the path. ``results``: plain numbers and strings kept beside the weights."""
    net = getattr(model, "module", model)
    layers = quantized_layers(net)
    if not layers:
        raise ConfigError("save_quantized_model got a network without quantized layers; apply the policy first "
                          "(gmpq_core.finetune.prepare_quantized).")
    return save_quantized_state(path, net.state_dict(), policy, arch=arch,
                                quantized={n: QuantSpec(w_bits=int(m.w_bits), a_bits=int(m.act.bits))
                                           for n, m in layers.items()}, results=results, preprocess=preprocess)


def save_quantized_state(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], policy: BitPolicy, *,
                         arch: Mapping[str, Any], quantized: Mapping[str, QuantSpec] | None = None,
                         results: Mapping[str, Any] | None = None, preprocess: Mapping[str, Any] | None = None) -> Path:
    """``save_quantized_model`` from a state dict (a training checkpoint's); ``quantized`` defaults to the
    policy's layers plus a stem / classifier quantized at ``stem_bits`` as its meta says."""
    arch = arch_from_meta(arch)
    if quantized is None:
        quantized = _layers_of(policy, arch)
    return save_checkpoint(path, {"format": FORMAT, "arch": arch, "policy_json": policy.to_json(),
                                  "quantized": {n: [int(s.w_bits), int(s.a_bits)] for n, s in quantized.items()},
                                  "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
                                  "results": _plain(results), "preprocess": dict(preprocess or {})})


def _build(arch: Mapping[str, Any]) -> nn.Module:
    return build_model(arch["model"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                       small_input=arch["small_input"])


def _layers_of(policy: BitPolicy, arch: Mapping[str, Any]) -> dict[str, QuantSpec]:
    from .qmodules import apply_policy_

    net = _build(arch)
    apply_policy_(net, policy, **policy.quant_scope())
    return {n: QuantSpec(w_bits=int(m.w_bits), a_bits=int(m.act.bits)) for n, m in quantized_layers(net).items()}


def _plain(results: Mapping[str, Any] | None) -> dict[str, Any]:
    """``results`` as plain Python values (numpy / 0-d torch scalars unwrapped), which torch.load(weights_only=True)
    reads back; anything else is refused here, not when the file is loaded."""
    out: dict[str, Any] = {}
    for k, v in (results or {}).items():
        if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):       # numpy or torch scalar
            v = v.item()
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise ConfigError(f"results[{k!r}] must be a number, a string, a bool or None, but got "
                              f"{type(v).__name__}; convert it before saving the model.")
        out[str(k)] = v
    return out


def load_quantized_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                         blob: Mapping[str, Any] | None = None) -> QuantizedModel:
    """Rebuild a model written by ``save_quantized_model`` (or, the same model, by ``integer_model.save_integer_model``);
    CheckpointError names a file of another kind. ``blob``: the file's content already read, ``path`` naming it."""
    path = Path(path)
    if blob is None:
        if path.is_dir():
            raise CheckpointError(f"'{path}' is a folder; pass a model file: DIR/models/<trial_id>.pt of a sweep, or "
                                  "DIR/quantized.pt of 'gmpq finetune --policy'.")
        blob = load_checkpoint(path, text_hint=QUANTIZED_MODEL_HINT)
    if isinstance(blob, dict) and str(blob.get("format", "")).startswith(INT_FORMAT_FAMILY):
        from .integer_model import load_integer_model
        return load_integer_model(path, device=device, blob=blob)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"'{path}' is not a gmpq quantized model (format {found!r}, expected {FORMAT!r}). "
                              "Final models are DIR/models/<trial_id>.pt of a sweep after 'gmpq finetune --sweep', "
                              "or DIR/quantized.pt of 'gmpq finetune --policy'.")
    arch = arch_from_meta(blob["arch"])
    net = _build(arch)
    quantized = {n: QuantSpec(w_bits=int(w), a_bits=int(a)) for n, (w, a) in blob["quantized"].items()}
    for name, spec in quantized.items():
        try:
            mod = net.get_submodule(name)
        except AttributeError:
            mod = None
        kind = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear if isinstance(mod, nn.Linear) else None
        if kind is None:
            raise CheckpointError(f"'{path}' quantizes layer {name!r}, which {arch['model']} as built by this gmpq has "
                                  f"{'not' if mod is None else 'as a ' + type(mod).__name__}: the file was written for "
                                  "another version of the model. Load it with the gmpq version that wrote it.")
        swap_module(net, name, kind.from_float(mod, spec))
    load_model_state(net, blob["state_dict"], path, what="quantized model", expected=f"a quantized {arch['model']}",
                     fix="It was written for another version of the model or edited by hand; load it with the gmpq "
                         "version that wrote it.")
    return QuantizedModel(model=net.to(device).eval(), policy=BitPolicy.from_json(blob["policy_json"]), arch=arch,
                          quantized=quantized, results=dict(blob.get("results") or {}),
                          preprocess=dict(blob.get("preprocess") or {}))
