"""A fine-tuned quantized model as one self-contained file, and the one call that rebuilds it.

``save_quantized_model(path, model, policy, arch=...)`` writes, atomically and loadable with
``torch.load(weights_only=True)``::

    {"format": "gmpq-quantized-model/1", "arch": {"model", "num_classes", "in_channels", "small_input"},
     "policy_json": the searched policy (with its meta), "quantized": {layer: [w_bits, a_bits]} (every
     quantized layer, a quantized stem / classifier included), "state_dict": weights, clips and signed
     flags, "preprocess": {"dataset", "image_size", "mean", "std"} of the data it was trained on,
     "results": "top1"/"top5" and more (BitOPs, provenance),
     "model_source": a digest of the builder's file, for a model of the user's own (PATH.py:FUNCTION) only}

``load_quantized_model(path)`` rebuilds the architecture from the registry (a model of the user's own: with its
builder, whose file must still be where it was; a warning says when that file changed since the model was saved),
swaps in the quantized layers, loads the weights (strict) and returns a ``QuantizedModel`` whose ``model`` is ready for
inference (eval mode): the fake-quantized network the fine-tune trained and evaluated. It expects inputs
normalised as in training: ``QuantizedModel.normalize(x)`` maps images in [0, 1] (torchvision ``ToTensor``)
at ``preprocess["image_size"]`` pixels to them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .fileio import QUANTIZED_MODEL_HINT, load_checkpoint, load_model_state, save_checkpoint
from .layers import swap_module
from .models import build_model, is_import_spec, model_source_digest
from .policy import BitPolicy, QuantSpec
from .qmodules import QuantConv2d, QuantLinear, quantized_layers

__all__ = ["FORMAT", "ARCH_KEYS", "QuantizedModel", "arch_from_meta", "preprocess_of", "save_quantized_model",
           "save_quantized_state", "load_quantized_model", "source_entry"]

FORMAT = "gmpq-quantized-model/1"
INT_FORMAT_FAMILY = "gmpq-integer-model/"    # integer_model's files (read here too): INT_FORMAT_FAMILY + version
ARCH_KEYS = ("model", "num_classes", "in_channels", "small_input")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedModel:
    """A loaded quantized model: ``model`` (eval mode), the ``policy`` it was fine-tuned with, its ``arch``,
    ``quantized`` ({layer: QuantSpec}, a fixed-bit stem / classifier included) and ``results``; ``model_source``:
    the digest of the builder's file it was saved with (a model of the user's own; None otherwise)."""
    model: nn.Module
    policy: BitPolicy
    arch: dict
    quantized: dict[str, QuantSpec]
    results: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)
    model_source: str | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - mean) / std`` per channel, as the training data loader did, ready for ``model``: ``images``
        float in [0, 1] (e.g. torchvision ``ToTensor``), shape [N, C, H, W] or [C, H, W] (one image, returned as one
        image: stack several, or ``unsqueeze(0)`` one, before ``model``). Integer images (uint8 0..255) are refused: convert them with ``images.float() / 255`` first.
        Images of another size than ``preprocess["image_size"]`` are refused too: the model was trained at that
        size, and most networks (global pooling) would run at another and give worse predictions without an error."""
        if not self.preprocess:
            raise ConfigError("this model file records no input normalisation (written before it was kept); "
                              "normalise with the dataset's mean and std (gmpq_core.data.load_dataset(name).info).")
        if not isinstance(images, torch.Tensor):
            raise ConfigError(f"normalize takes a torch.Tensor of images, but got {type(images).__name__}; convert "
                              "them with torchvision.transforms.ToTensor() (or torch.as_tensor(...).float() / 255).")
        if not images.is_floating_point():
            raise ConfigError(f"normalize takes float images in [0, 1], but got {images.dtype} (0..255 pixel values "
                              "would be normalised as if they were 0..1: confident wrong predictions); convert them "
                              "first with images.float() / 255, or load them with torchvision.transforms.ToTensor().")
        channels = len(self.preprocess["mean"])
        size = self.preprocess.get("image_size")
        if images.dim() not in (3, 4) or images.shape[-3] != channels:
            raise ConfigError(f"normalize takes images of shape [N, {channels}, H, W] or [{channels}, H, W] "
                              f"({channels}-channel images, as the model was trained on), but got shape "
                              f"{list(images.shape)}.")
        if size and tuple(images.shape[-2:]) != (int(size), int(size)):
            raise ConfigError(f"the model was trained on {size}x{size} images, but these are "
                              f"{images.shape[-2]}x{images.shape[-1]}; resize them first (e.g. torch.nn.functional."
                              f"interpolate(images, size=({size}, {size}), mode='bilinear', antialias=True), or "
                              f"torchvision.transforms.Resize(({size}, {size})) before ToTensor).")
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
                                  "results": _plain(results), "preprocess": dict(preprocess or {}),
                                  **source_entry(arch["model"])})


def source_entry(model: str) -> dict[str, str]:
    """``{"model_source": digest}`` of a user's builder file as it is now, ``{}`` for a registered model (or a
    builder whose file cannot be read): kept in model files, so that loading one with an edited builder warns."""
    digest = model_source_digest(model)
    return {"model_source": str(digest)} if digest else {}


def _builder_changed(model: str, recorded: Any) -> bool:
    """Whether the builder file of ``model`` (a user's) differs from the one a model file was saved with
    (``recorded``, its ``model_source``: None in files written before it was kept, which are not checked)."""
    if not recorded or not is_import_spec(model):
        return False
    now = model_source_digest(model)
    return now is not None and now != str(recorded)


def _builder_file(model: str) -> str:
    return model.rpartition(":")[0]


def _check_device(device: str | torch.device) -> None:
    """ConfigError for a CUDA device on a machine without one (torch's own error names a driver, not the fix)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"Unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} asks for CUDA, but this machine has no usable GPU; load the model "
                          "with device='cpu' (the default).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={str(device)!r} names GPU {dev.index}, but this machine has "
                          f"{torch.cuda.device_count()} (cuda:0..cuda:{torch.cuda.device_count() - 1}).")


def _build(arch: Mapping[str, Any], input_size: int | None = None) -> nn.Module:
    return build_model(arch["model"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                       small_input=arch["small_input"], input_size=input_size or arch.get("input_size"))


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
    _check_device(device)
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
        state_dict = isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values())
        if state_dict and found is None:               # e.g. fp.pt of 'gmpq train-fp'
            raise CheckpointError(f"'{path}' is not a gmpq quantized model: it is a full-precision model's state "
                                  "dict (as 'gmpq train-fp' writes to fp.pt). To get one: 'gmpq search --out S' finds "
                                  f"a bit policy, then 'gmpq finetune --policy S/policy.json --fp-checkpoint {path} "
                                  "--out Q' writes Q/quantized.pt; pass that.")
        raise CheckpointError(f"'{path}' is not a gmpq quantized model (format {found!r}, expected {FORMAT!r}). "
                              "Final models are DIR/models/<trial_id>.pt of a sweep after 'gmpq finetune --sweep', "
                              "or DIR/quantized.pt of 'gmpq finetune --policy'.")
    arch = arch_from_meta(blob["arch"])
    try:
        net = _build(arch, (blob.get("preprocess") or {}).get("image_size"))
    except ConfigError as e:
        if not is_import_spec(arch["model"]):
            raise
        raise ConfigError(f"Loading '{path}', a model of your own builder (a model file keeps the builder's "
                          "path, not its code: the builder must still be there, as it was when the model was "
                          f"saved): {e}") from None
    changed = _builder_changed(arch["model"], blob.get("model_source"))
    if changed:
        log.warning("'%s' was saved with another version of its builder's file %s (the file changed since, its digest "
                    "%s is now %s): the network built now may differ from the one trained (other layers, "
                    "activations or forward), and so may its predictions. Restore the builder file as it was when "
                    "the model was fine-tuned, or fine-tune again with the edited one.", path,
                    _builder_file(arch["model"]), blob.get("model_source"), model_source_digest(arch["model"]))
    other = (f"the builder {_builder_file(arch['model'])} changed since the model was saved; restore it as it "
             "was when the model was fine-tuned, or fine-tune again with the edited one"
             if is_import_spec(arch["model"]) else None)
    quantized = {n: QuantSpec(w_bits=int(w), a_bits=int(a)) for n, (w, a) in blob["quantized"].items()}
    for name, spec in quantized.items():
        try:
            mod = net.get_submodule(name)
        except AttributeError:
            mod = None
        kind = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear if isinstance(mod, nn.Linear) else None
        if kind is None:
            built = "as built by its builder now" if other else "as built by this gmpq"
            raise CheckpointError(f"'{path}' quantizes layer {name!r}, which {arch['model']} {built} has "
                                  f"{'not' if mod is None else 'as a ' + type(mod).__name__}: "
                                  + (f"{other}." if other else "the file was written for another version of the "
                                     "model. Load it with the gmpq version that wrote it."))
        swap_module(net, name, kind.from_float(mod, spec))
    load_model_state(net, blob["state_dict"], path, what="quantized model", expected=f"a quantized {arch['model']}",
                     fix=(f"The weights no longer fit the network: {other}." if other else
                          "It was written for another version of the model or edited by hand; load it with the gmpq "
                          "version that wrote it."))
    return QuantizedModel(model=net.to(device).eval(), policy=BitPolicy.from_json(blob["policy_json"]), arch=arch,
                          quantized=quantized, results=dict(blob.get("results") or {}),
                          preprocess=dict(blob.get("preprocess") or {}),
                          model_source=str(blob["model_source"]) if blob.get("model_source") else None)
