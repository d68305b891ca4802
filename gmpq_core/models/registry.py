"""Registry of model builders (STYLE.md: registries instead of if/elif chains).

Every builder takes ``num_classes``, ``in_channels`` and ``small_input``: the small-input variant
replaces the stem by a 3x3 stride-1 conv and drops the max-pool (for 28-32 px images). A name
``MODULE:FUNCTION`` or ``PATH.py:FUNCTION`` names a user's own builder (``imported.py``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError, GMPQError
from .imported import canonical_model_name, import_builder, is_import_spec
from .resnet_cifar import ResNetCifar

__all__ = ["ModelSpec", "MODELS", "register_model", "build_model", "list_models", "gradcam_layer_name", "check_model",
           "check_model_output", "small_input_variant"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    gradcam_layer: str          # FQN of the last convolutional stage (Grad-CAM feature map)
    description: str
    small_input_variant: bool | None = True     # whether small_input changes the network (None: a user's, unknown)


log = logging.getLogger(__name__)

MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, gradcam_layer: str, description: str, *, small_input_variant: bool = True):
    """``small_input_variant=False``: the builder has one stem whatever ``small_input`` says (resnet20's 3x3 stride-1
    stem is the small-input one)."""
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = ModelSpec(name, fn, gradcam_layer, description, small_input_variant)
        return fn
    return deco


def small_input_variant(name: str) -> bool | None:
    """Whether ``small_input`` changes the network ``name`` builds: False for a model with one stem (resnet20, whose
    stem is the small-input one), None for a user's builder (its own business)."""
    return _get(name).small_input_variant


def list_models() -> list[str]:
    return sorted(MODELS)


def _get(name: str) -> ModelSpec:
    if name in MODELS:
        return MODELS[name]
    if is_import_spec(name):
        fn = import_builder(name)
        doc = (getattr(fn, "__doc__", None) or "").strip()
        return ModelSpec(canonical_model_name(name), fn, str(getattr(fn, "gradcam_layer", "") or ""),
                         doc.splitlines()[0] if doc else f"{name} (your own builder)", None)
    raise ConfigError(f"Unknown model '{name}'. Available models: {', '.join(list_models())}; or one of your own, "
                      "named MODULE:FUNCTION or PATH.py:FUNCTION (e.g. './my_cnn.py:build').")


def check_model(name: object, what: str = "model") -> str:
    """``name`` as saved in configs (a file path made absolute) once it names a registered model or an
    importable builder of the user's; ConfigError naming ``what`` (e.g. ``--model``) otherwise."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} must be a model name ({', '.join(list_models())}, or MODULE:FUNCTION / "
                          f"PATH.py:FUNCTION for one of your own), but got {what}={name!r}.")
    _get(name)
    return canonical_model_name(name)


def build_model(name: str, *, num_classes: int = 10, in_channels: int = 3, small_input: bool = False,
                input_size: int | None = None, **kwargs) -> nn.Module:
    """Build a registered model with a fresh random init (seed torch beforehand for reproducibility).

    A user's builder (``MODULE:FUNCTION``) is checked to give ``num_classes`` logits (``check_model_output``) on
    an image of ``input_size`` pixels (not passed to the builder); without one, on the first of a few common
    sizes that its network runs at."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, but got num_classes={num_classes!r}.")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer, but got in_channels={in_channels!r}.")
    spec = _get(name)
    try:
        model = spec.builder(num_classes=num_classes, in_channels=in_channels, small_input=small_input, **kwargs)
    except Exception as e:                      # noqa: BLE001 - a user's builder: any error, named with the builder
        if not is_import_spec(name) or isinstance(e, GMPQError):
            raise                               # a registered model's error is a bug of gmpq: its traceback stays
        log.debug("the model builder %s raised", spec.name, exc_info=True)      # the traceback, with gmpq -v
        raise ConfigError(f"The model builder '{spec.name}' raised {type(e).__name__}: {e} (called as "
                          f"{spec.name.rpartition(':')[2]}(num_classes={num_classes}, in_channels={in_channels}, "
                          f"small_input={small_input})). This is the builder's own error, not gmpq's: fix the "
                          "builder ('gmpq -v' with the same command shows its traceback).") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"The model builder '{name}' returned {type(model).__name__}, not a torch.nn.Module; "
                          "return the network itself.")
    if is_import_spec(name):
        check_model_output(model, spec.name, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    return model


# image sides tried, in this order, when no input size is given (the first a user's network runs at is checked)
PROBE_SIZES = (32, 28, 224, 64, 96, 128, 256, 299)


def _probe(model: nn.Module, in_channels: int, size: int) -> object:
    """``model``'s output for one zero image of ``size`` pixels, on its own device (eval mode for the call, no
    gradients); ``model``'s mode and the random state are left as they were."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            p = next(iter([*model.parameters(), *model.buffers()]), None)
            dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
            return model(torch.zeros(1, in_channels, size, size, device=p.device if p is not None else "cpu",
                                     dtype=dtype))
    finally:
        model.train(was_training)


def check_model_output(model: nn.Module, name: str, *, num_classes: int, in_channels: int,
                       input_size: int | None = None) -> None:
    """ConfigError unless ``model`` (built by ``name``'s builder with ``num_classes``) gives ``num_classes`` logits
    for a ``[1, in_channels, input_size, input_size]`` input (a builder that ignores ``num_classes`` used to fail the
    first training step with "IndexError: Target 7 is out of bounds"). Without ``input_size``, the first of
    ``PROBE_SIZES`` the network runs at is used; one that runs at none (or on the meta device) is not checked here."""
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        return                                  # shapes-only builds (fileio): nothing to run
    sizes = (input_size,) if input_size is not None else PROBE_SIZES
    for size in sizes:
        try:
            out = _probe(model, in_channels, int(size))
        except Exception:                       # noqa: BLE001 - not at this size; an exact size's error is the run's
            continue
        if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[0] == 1 and out.shape[1] != num_classes:
            shape = list(out.shape)
            raise ConfigError(
                f"The model builder '{name}' returned a network with {shape[1]} outputs (logits) per image (output "
                f"shape {shape} for a [1, {in_channels}, {size}, {size}] input), but it was called with "
                f"num_classes={num_classes}, the number of classes of the data: its classifier must give one logit "
                f"per class. Use the builder's num_classes argument for its last layer (e.g. "
                f"nn.Linear(features, num_classes)) instead of a fixed count.")
        return


def gradcam_layer_name(name: str) -> str:
    """The Grad-CAM layer of ``name`` ("" for a user's builder without a ``gradcam_layer`` attribute: then it is
    found by a forward pass, ``attribution.find_feature_layer``)."""
    return _get(name).gradcam_layer


def _torchvision_models():
    """``torchvision.models``, imported on first use: the import takes 1-2 s (it pulls in torch._dynamo),
    paid otherwise by every process that builds only resnet20 (CLI, Ray trial actors, Ray Train workers)."""
    import torchvision.models  # noqa: PLC0415

    return torchvision.models


def _resnet_stem(model: nn.Module, in_channels: int, small_input: bool) -> nn.Module:
    if small_input:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


@register_model("resnet18", "layer4", "torchvision ResNet-18 (19 searchable layers)")
def resnet18(*, num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
    return _resnet_stem(_torchvision_models().resnet18(num_classes=num_classes), in_channels, small_input)


@register_model("resnet50", "layer4", "torchvision ResNet-50 (52 searchable layers)")
def resnet50(*, num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
    return _resnet_stem(_torchvision_models().resnet50(num_classes=num_classes), in_channels, small_input)


@register_model("mobilenet_v2", "features.18", "torchvision MobileNetV2 (51 searchable layers)")
def mobilenet_v2(*, num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
    model = _torchvision_models().mobilenet_v2(num_classes=num_classes)
    old = model.features[0][0]
    if small_input or in_channels != 3:
        model.features[0][0] = nn.Conv2d(in_channels, old.out_channels, 3, 1 if small_input else 2, 1, bias=False)
    return model


@register_model("resnet20", "layer3", "CIFAR-style ResNet-20 (20 searchable layers), fast on CPU",
                small_input_variant=False)
def resnet20(*, num_classes: int, in_channels: int, small_input: bool = True, width: int = 16) -> nn.Module:
    return ResNetCifar(20, num_classes=num_classes, in_channels=in_channels, width=width)
