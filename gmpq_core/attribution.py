"""Grad-CAM attribution maps for the FP teacher and the quantized student (METHOD.md 4.2).

For an image with logits z and feature map F [C, H, W] (output of the last convolutional stage):

    g_k = mean_{h,w} dz_c / dF_k          (channel weights; the mean's scale cancels later)
    A   = ReLU( sum_k g_k * F_k )          [H, W]

with c the network's own predicted class (``target="pred"``, official) or the label
(``target="label"``). Three modes:

- ``"detached"`` (teacher, evaluation): no graph below F (the hook swaps F for a detached leaf),
  maps returned detached;
- ``"second_order"`` (student, default): ``torch.autograd.grad(..., create_graph=True)``, so a loss
  on A is differentiated through g (second order) as well as through F;
- ``"first_order"`` (speed switch): g treated as a constant, gradients flow through F only.

Hooks are registered inside ``capture_features``, which always removes them.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from .errors import ConfigError, did_you_mean
from .precision import at_least_float32

__all__ = ["MODES", "TARGETS", "capture_features", "find_feature_layer", "check_gradcam_layer", "gradcam_from",
           "gradcam"]

MODES = ("second_order", "first_order", "detached")
TARGETS = ("pred", "label")
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class FeatureStore:
    """What ``capture_features`` fills in: ``features`` (the hooked module's last output)."""

    def __init__(self) -> None:
        self.features: Tensor | None = None


@contextlib.contextmanager
def capture_features(model: nn.Module, layer_name: str, *, detach: bool = False) -> Iterator[FeatureStore]:
    """Record the output of ``model.<layer_name>`` during forwards inside the block.

    ``detach=True`` replaces that output by a detached leaf that requires grad, so gradients of the
    logits w.r.t. F can be taken without building the graph below F (teacher / evaluation). The
    hook is removed on exit, also when the block raises.
    """
    try:
        module = model.get_submodule(layer_name)
    except AttributeError:
        raise ConfigError(f"gradcam_layer '{layer_name}' is not a module of {type(model).__name__}; give the "
                          "fully qualified name of the last convolutional stage (e.g. 'layer4').") from None
    store = FeatureStore()

    def hook(mod: nn.Module, inp: tuple, out: Tensor) -> Tensor | None:
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise ConfigError(f"gradcam_layer '{layer_name}' must output a 4-D feature map [B, C, H, W], but "
                              f"its output is {getattr(out, 'shape', type(out).__name__)}.")
        if detach:
            out = out.detach().requires_grad_(True)
            store.features = out
            return out
        store.features = out
        return None

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _is_map(t: object) -> bool:
    return isinstance(t, Tensor) and t.dim() == 4


@torch.no_grad()
def _autodetect(model: nn.Module, input_size: int, in_channels: int) -> str:
    """The Grad-CAM layer read from one forward pass of a zero image (``find_feature_layer``)."""
    order: list[tuple[str, nn.Module, object]] = []          # (name, module, output) in completion order
    pool_calls: list[tuple[int, object]] = []                 # (modules finished before it, its input)
    handles = []
    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(lambda m, i, o, name=name: order.append((name, m, o))))
            if isinstance(mod, _GLOBAL_POOLS):
                handles.append(mod.register_forward_pre_hook(
                    lambda m, i: pool_calls.append((len(order), i[0] if i else None))))
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, in_channels, input_size, input_size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if pool_calls:
        done, fed = pool_calls[-1]
        # the classifier's pooling if no spatial map is made after it (a squeeze-and-excitation block's pooling
        # is followed by its block's full-size output): the layer is the last module whose output it pools
        later_maps = any(_is_map(o) and o.shape[2] * o.shape[3] > 1 for _, m, o in order[done:]
                         if not isinstance(m, _GLOBAL_POOLS))
        if not later_maps:
            fed_by = [name for name, _, o in order[:done] if o is fed]
            if fed_by:
                return fed_by[-1]
    # pooling done by a function (or fed by one): the last module to finish with a map
    maps = [name for name, m, o in order if _is_map(o) and not isinstance(m, _GLOBAL_POOLS)]
    best = maps[-1] if maps else None
    if best is None:
        raise ConfigError(f"Cannot find a 4-D feature map before global pooling in {type(model).__name__}; "
                          "set gradcam_layer to the fully qualified name of its last convolutional stage.")
    return best


def find_feature_layer(model: nn.Module, *, model_name: str | None = None, override: str | None = None,
                       input_size: int = 32, in_channels: int = 3) -> str:
    """FQN of the Grad-CAM feature layer: ``override`` if given, else the registry's choice for
    ``model_name`` (a user's builder: its ``gradcam_layer`` attribute), else read from one forward pass: the
    outermost module whose output the classifier's global pooling module receives (the last pooling module
    run, unless a map larger than 1x1 is made after it, as after a squeeze-and-excitation block's pooling);
    without such a module (pooling by a function), the last module to finish with a 4-D output."""
    if override:
        try:
            model.get_submodule(override)
        except AttributeError:
            raise ConfigError(f"gradcam_layer '{override}' is not a module of {type(model).__name__}; give the "
                              "fully qualified name of the last convolutional stage (e.g. 'layer4').") from None
        return override
    if model_name is not None:
        from .models import MODELS, gradcam_layer_name, is_import_spec
        layer = gradcam_layer_name(model_name) if model_name in MODELS or is_import_spec(model_name) else ""
        if layer:
            return find_feature_layer(model, override=layer)     # a user's gradcam_layer: checked it exists
    return _autodetect(model, input_size, in_channels)


def check_gradcam_layer(net: nn.Module, *, model_name: str, override: str | None, input_size: int, in_channels: int,
                        override_where: str) -> str:
    """The Grad-CAM layer a search of ``net`` (a fresh model ``model_name``) will use, resolved now by the function
    the search uses (``find_feature_layer``): ``override`` (a search's ``gradcam_layer``, set where
    ``override_where`` says, e.g. "search.gradcam_layer of the sweep config"), else the model's (a user's builder's
    ``gradcam_layer`` attribute), else found by a forward pass. A preflight, run before any training: a bad layer is
    one ConfigError naming it, a close module name, where it was set, and that nothing has been trained yet (it used
    to fail the search after its FP teacher had trained). A named layer must output a 4-D map on the way to the
    logits."""
    from .models import gradcam_layer_name, is_import_spec

    own = gradcam_layer_name(model_name)
    try:
        layer = find_feature_layer(net, model_name=model_name, override=override, input_size=input_size,
                                   in_channels=in_channels)
        if override or own:     # a named layer; one found by a forward pass outputs 4-D
            was_training = net.training
            net.eval()
            try:                # its output must be a 4-D feature map on the way to the logits, as in the search
                with torch.no_grad(), capture_features(net, layer) as store:
                    net(torch.zeros(1, in_channels, input_size, input_size))
            finally:
                net.train(was_training)
            if store.features is None:
                raise ConfigError(f"gradcam_layer '{layer}' did not run in the forward pass; choose a module on the "
                                  "path from the input to the logits.")
    except ConfigError as e:
        model_s = f", '{own}'" if own and own != override else ""
        where = (f"It is {override_where} (leave it out to use the model's{model_s})." if override
                 else f"It is the 'gradcam_layer' attribute of the model builder {model_name}."
                 if own and is_import_spec(model_name) else "")
        modules = {n for n, _ in net.named_modules() if n}
        name = override or own
        hint = did_you_mean([name], modules) if name and name not in modules else ""
        raise ConfigError(" ".join(p for p in (str(e), hint.strip(), where, "Nothing has been trained yet.")
                                   if p)) from None
    return layer


def _targets(logits: Tensor, target: str, labels: Tensor | None) -> Tensor:
    if target == "pred":
        return logits.detach().argmax(dim=1)
    if target == "label":
        if labels is None:
            raise ConfigError("target_class='label' needs the labels of the batch.")
        return labels
    raise ConfigError(f"target_class must be one of {TARGETS}, but got target_class={target!r}.")


def gradcam_from(logits: Tensor, features: Tensor, *, target: str = "pred", labels: Tensor | None = None,
                 mode: str = "second_order") -> Tensor:
    """Grad-CAM maps [B, H, W] from logits [B, K] and the feature map [B, C, H, W] they came from."""
    if mode not in MODES:
        raise ConfigError(f"Grad-CAM mode must be one of {MODES}, but got mode={mode!r}.")
    cls = _targets(logits, target, labels)
    score = logits.gather(1, cls[:, None]).sum()
    (grad,) = torch.autograd.grad(score, features, create_graph=(mode == "second_order"), retain_graph=True)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    if mode == "first_order":
        weights = weights.detach()
    maps = torch.relu((at_least_float32(weights) * at_least_float32(features)).sum(dim=1))  # float32 under autocast
    return maps.detach() if mode == "detached" else maps


def gradcam(model: nn.Module, x: Tensor, layer_name: str, *, target: str = "pred", labels: Tensor | None = None,
            mode: str = "second_order") -> tuple[Tensor, Tensor]:
    """One forward of ``model`` on ``x`` and its Grad-CAM maps: (logits [B, K], maps [B, H, W]).

    The model's train/eval mode is left as the caller set it. In ``"detached"`` mode the logits are
    detached too and no graph is kept.
    """
    detached = mode == "detached"
    with torch.enable_grad(), capture_features(model, layer_name, detach=detached) as store:
        logits = model(x)
    if store.features is None:
        raise ConfigError(f"gradcam_layer '{layer_name}' did not run in the forward pass; choose a module "
                          "on the path from the input to the logits.")
    with torch.enable_grad():
        maps = gradcam_from(logits, store.features, target=target, labels=labels, mode=mode)
    if detached:
        return logits.detach(), maps
    return logits, maps
