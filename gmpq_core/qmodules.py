"""Fixed-policy quantized layers and ``apply_policy_`` (METHOD.md 3, 6).

``QuantConv2d`` / ``QuantLinear`` subclass nn.Conv2d / nn.Linear (same weights, same FQNs), so
MAC counting, fingerprints and state dicts keep working after a policy is applied.

A fixed layer is the one-candidate case of the search's mixtures (probability 1), so its forward and
backward run on the same fused kernels (fused.py: one node per layer that saves only x and W and
recomputes the quantized operands in backward; Triton on CUDA) instead of ~8 autograd nodes per
quantizer: the QAT step on the CPU went from 2.07x to 1.51x an FP step (ResNet-20, 28 px,
benchmarks/bench_qat_step.py). Same values and gradients as ``quantizers.quantize_activation`` /
``quantize_weight`` up to float rounding (at an exact tie x == clip the reference splits the gradient
in halves between x and the clip; here the clip takes it all). ``set_quant_impl_(model, "reference")``
switches a model back to the plain autograd formulas.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .fused import IMPLS, _act_mixture, _mixed_conv2d, _weight_mixture, resolve_mixture_impl
from .layers import searchable_layers, swap_module
from .policy import BitPolicy, QuantSpec
from .quantizers import ActQuantizer, quantize_weight

log = logging.getLogger(__name__)

__all__ = ["QuantConv2d", "QuantLinear", "apply_policy_", "calibrate_", "quantized_layers", "set_quant_impl_",
           "QUANT_IMPLS"]

QUANT_IMPLS = ("auto", *IMPLS)
_ONES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _one(device: torch.device, dtype: torch.dtype) -> Tensor:
    """The constant probability vector [1.] of a one-candidate mixture, one per device and dtype (the
    weight's: a double backward's reference formulas multiply it with the weight). Made outside inference
    mode: an inference tensor cached by a first forward under ``torch.inference_mode`` could never be
    saved for a later training step's backward."""
    key = (device, dtype)
    t = _ONES.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = _ONES[key] = torch.ones(1, device=device, dtype=dtype)
    return t


class _QuantMixin:
    w_bits: int
    act: ActQuantizer
    quant_impl: str = "auto"     # how forward/backward run: QUANT_IMPLS ("auto": Triton on CUDA, else fused)

    def _init_quant(self, spec: QuantSpec) -> None:
        self.w_bits = spec.w_bits
        self.act = ActQuantizer(spec.a_bits)
        self._calibrating = False

    @property
    def a_bits(self) -> int:
        return self.act.bits

    def _qin(self, x: Tensor) -> Tensor:
        if self._calibrating:
            self.act.calibrate(x)
        return self.act(x)

    def _fused_impl(self, x: Tensor) -> str | None:
        """The mixture implementation for this call, or None for the reference formulas (asked for, while
        calibrating, or a bitwidth of 32 = not quantized)."""
        impl = self.quant_impl
        if impl == "reference" or self._calibrating or max(self.w_bits, self.act.bits) >= 32:
            return None
        return resolve_mixture_impl("auto", x.device) if impl == "auto" else impl   # triton on a CPU tensor: fused


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """Conv2d whose input is PACT-quantized to ``a_bits`` and weight to ``w_bits`` (STE)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: QuantSpec) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        q.load_state_dict(conv.state_dict())
        q._init_quant(spec)
        return q.to(conv.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        impl = self._fused_impl(x)
        if impl is None or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return self._conv_forward(self._qin(x), quantize_weight(self.weight, self.w_bits), self.bias)
        one = _one(x.device, self.weight.dtype)
        return _mixed_conv2d(x, self.weight, self.bias, one, self.act.clip.view(1), (self.act.bits,),
                             self.act._signed, one, (self.w_bits,), list(self.stride), list(self.padding),
                             list(self.dilation), self.groups, impl)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}"


class QuantLinear(_QuantMixin, nn.Linear):
    """Linear layer with PACT-quantized input and symmetric quantized weight (STE)."""

    @classmethod
    def from_float(cls, lin: nn.Linear, spec: QuantSpec) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                device=lin.weight.device, dtype=lin.weight.dtype)
        q.load_state_dict(lin.state_dict())
        q._init_quant(spec)
        return q.to(lin.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        impl = self._fused_impl(x)
        if impl is None:
            return F.linear(self._qin(x), quantize_weight(self.weight, self.w_bits), self.bias)
        one = _one(x.device, self.weight.dtype)
        xq = _act_mixture(x, one, self.act.clip.view(1), (self.act.bits,), self.act._signed, impl)
        return F.linear(xq, _weight_mixture(self.weight, one, (self.w_bits,), impl).to(xq.dtype), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}"


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def set_quant_impl_(model: nn.Module, impl: str) -> nn.Module:
    """How every quantized layer of ``model`` runs (``QUANT_IMPLS``; default ``"auto"``); returns the model."""
    if impl not in QUANT_IMPLS:
        raise ConfigError(f"quant_impl must be one of {', '.join(map(repr, QUANT_IMPLS))}, but got {impl!r}; "
                          "'auto' (the default) uses the fused kernels, 'reference' the plain autograd formulas.")
    for m in quantized_layers(model).values():
        m.quant_impl = impl
    return model


def apply_policy_(model: nn.Module, policy: BitPolicy, *, include_stem: bool = False,
                  include_classifier: bool = False, stem_bits: int = 8) -> nn.Module:
    """Swap every searchable Conv2d/Linear of ``model`` for its quantized version, in place.

    The policy must fit the model (same searchable layer names and weight shapes), else
    PolicyMismatchError names the offending layers. With ``include_stem`` / ``include_classifier``
    the stem and classifier are quantized at ``stem_bits`` (weights and input) unless the policy
    names them. Returns the model.
    """
    policy.check_fits(model)
    targets = dict(policy.layers)
    extra = searchable_layers(model, include_stem=include_stem, include_classifier=include_classifier)
    for name in extra:
        targets.setdefault(name, QuantSpec(w_bits=stem_bits, a_bits=stem_bits))
    for name, spec in targets.items():
        mod = model.get_submodule(name)
        if isinstance(mod, (QuantConv2d, QuantLinear)):
            mod.w_bits, mod.act.bits = spec.w_bits, spec.a_bits
        elif isinstance(mod, nn.Conv2d):
            swap_module(model, name, QuantConv2d.from_float(mod, spec))
        elif isinstance(mod, nn.Linear):
            swap_module(model, name, QuantLinear.from_float(mod, spec))
    return model


@contextlib.contextmanager
def _calibrating(model: nn.Module) -> Iterator[None]:
    layers = quantized_layers(model)
    for m in layers.values():
        m._calibrating = True
    try:
        yield
    finally:
        for m in layers.values():
            m._calibrating = False


@torch.no_grad()
def calibrate_(model: nn.Module, x: Tensor) -> nn.Module:
    """Set every quantized layer's activation clip and sign from one batch ``x`` (eval-mode forward). A layer given
    1-bit activations that calibrates as signed gets a warning: its grid is {-a, 0, a}, three levels, where BitOPs
    counts one bit (the search warns likewise for its candidates)."""
    was_training = model.training
    model.eval()
    try:
        with _calibrating(model):
            model(x)
    finally:
        model.train(was_training)
    ternary = [n for n, m in model.named_modules() if isinstance(m, _QuantMixin) and m.act.bits == 1 and m.act._signed]
    if ternary:
        log.warning("%d layer(s) with signed inputs have 1-bit activations in the policy (%s%s): a signed 1-bit "
                    "activation has 3 levels {-a, 0, a} but counts as 1 bit in BitOPs. Give these layers 2 or more "
                    "activation bits to keep the costs exact.", len(ternary), ", ".join(ternary[:3]),
                    ", ..." if len(ternary) > 3 else "")
    return model
