"""The supernet's composite mixed-precision layers, ``MixedConv2d`` and ``MixedLinear`` (METHOD.md 2, 3; moved here
from ``supernet``, which imports them and whose docstring gives the formula).

Each keeps ONE shared FP weight W, the architecture logits ``alpha_w`` / ``alpha_a`` (pw = softmax(alpha_w / T),
pa = softmax(alpha_a / T)) and one learnable PACT clip per activation candidate, and computes
``y = conv(sum_j pa_j * Qa_j(x), sum_i pw_i * Qw_i(W))`` with the mixtures of ``fused.py`` (``mixture_impl``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import _act_mixture, _mixed_conv2d, _weight_mixture, act_mixture_reference, weight_mixture_reference
from .policy import BitCandidates
from .quantizers import ActQuantizer

__all__ = ["MixedConv2d", "MixedLinear", "MIXED_TYPES", "DEFAULT_CLIP"]

DEFAULT_CLIP = 6.0


class _MixedMixin:
    """State and maths shared by the mixed conv and linear layers (see the module docstring)."""
    weight: Tensor

    def _take_float_(self, src: nn.Module, candidates: BitCandidates, clip_init: float):
        """This layer with ``src``'s weight and bias (a ``skip_init`` one of the same shape) and the mixture's
        parameters (``_init_mixed``); returns it."""
        with torch.no_grad():
            self.weight.copy_(src.weight)
            if src.bias is not None:
                self.bias.copy_(src.bias)
        self._init_mixed(candidates, clip_init)
        return self

    def _init_mixed(self, candidates: BitCandidates, clip_init: float = DEFAULT_CLIP) -> None:
        self.w_candidates = tuple(candidates.w_bits)
        self.a_candidates = tuple(candidates.a_bits)
        dev, dt = self.weight.device, self.weight.dtype
        self.alpha_w = nn.Parameter(torch.zeros(len(self.w_candidates), device=dev, dtype=dt))
        self.alpha_a = nn.Parameter(torch.zeros(len(self.a_candidates), device=dev, dtype=dt))
        self.clips = nn.Parameter(torch.full((len(self.a_candidates),), float(clip_init), device=dev, dtype=dt))
        self.signed = False          # PACT variant: True where the input can be negative
        self.temperature = 1.0       # softmax temperature (1.0 = the official plain softmax)
        self._calibrating = False
        self._calib_clips = True
        self._wcache: tuple[tuple, Tensor] | None = None
        self.mixture_impl = "fused"  # see set_mixture_impl_
        self.conv_node = False       # MixedConv2d: mixtures + conv as one node (recomputes the operands)
        self.keep_operands = None    # that node keeps the operands (True) or not (False); None: fused.keeps_operands

    # -- architecture distributions ------------------------------------------------------------
    def _softmax(self, alpha: Tensor) -> Tensor:
        # alpha / 1.0 is alpha exactly (value and gradient): skip that op at the default T = 1
        return torch.softmax(alpha if self.temperature == 1.0 else alpha / self.temperature, dim=0)

    def probs_w(self) -> Tensor:
        """pw = softmax(alpha_w / T), shape [n_w]."""
        return self._softmax(self.alpha_w)

    def probs_a(self) -> Tensor:
        """pa = softmax(alpha_a / T), shape [n_a]."""
        return self._softmax(self.alpha_a)

    def _bits_vector(self, which: str, like: Tensor) -> Tensor:
        """The candidate bit-widths as a tensor like ``like``, cached (no host-to-device copy per step)."""
        key = (which, like.device, like.dtype)
        cache = self.__dict__.setdefault("_bits_vectors", {})  # also for layers unpickled from older code
        vec = cache.get(key)
        if vec is None:
            vec = cache[key] = like.new_tensor(getattr(self, which))
        return vec

    def expected_w_bits(self) -> Tensor:
        """E[b_w] = sum_i pw_i b_i (0-d, differentiable; float32 under autocast: a product and a sum, not a matmul,
        which autocast would run in bf16 with 8 significant bits)."""
        return (self.probs_w() * self._bits_vector("w_candidates", self.alpha_w)).sum()

    def expected_a_bits(self) -> Tensor:
        """E[b_a] = sum_j pa_j b_j (0-d, differentiable; float32 under autocast, as ``expected_w_bits``)."""
        return (self.probs_a() * self._bits_vector("a_candidates", self.alpha_a)).sum()

    # -- mixtures ------------------------------------------------------------------------------
    def mixed_weight(self) -> Tensor:
        """sum_i pw_i Qw_i(W), same shape as W.

        Value and gradients equal the explicit sum of ``quantize_weight(W, b_i)``: d/dpw_i = Qw_i(W)
        and d/dW = sum_i pw_i (the STE passes 1 inside [-t, t], and t = max|W| covers all of W).
        """
        cache = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if cache:
            key = (self.weight._version, self.alpha_w._version, self.temperature, self.weight.data_ptr(),
                   self.mixture_impl)
            if self._wcache is not None and self._wcache[0] == key:
                return self._wcache[1]
        if self.mixture_impl == "reference":
            mix = weight_mixture_reference(self.weight, self.probs_w(), self.w_candidates)
        else:
            mix = _weight_mixture(self.weight, self.probs_w(), self.w_candidates, self.mixture_impl)
        self._wcache = (key, mix.detach()) if cache else None
        return mix

    def mixed_input(self, x: Tensor) -> Tensor:
        """sum_j pa_j Qa_j(x) with Qa_j = PACT at a-candidate j and clip ``clips[j]``."""
        if self._calibrating:
            self._calibrate(x)
        if self.mixture_impl == "reference":
            return act_mixture_reference(x, self.probs_a(), self.clips, self.a_candidates, self.signed)
        return _act_mixture(x, self.probs_a(), self.clips, self.a_candidates, bool(self.signed), self.mixture_impl)

    @torch.no_grad()
    def _calibrate(self, x: Tensor) -> None:
        tmp = ActQuantizer(self.a_candidates[0])
        tmp.calibrate(x)
        self.signed = bool(tmp.signed)
        if self._calib_clips:
            self.clips.fill_(float(tmp.clip))

    # -- state dict: the python-side flags travel with the weights --------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"signed": self.signed, "temperature": self.temperature,
                "w_candidates": list(self.w_candidates), "a_candidates": list(self.a_candidates)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.signed = bool(state.get("signed", False))
        self.temperature = float(state.get("temperature", 1.0))

    def _mixed_repr(self) -> str:
        return f"w_candidates={self.w_candidates}, a_candidates={self.a_candidates}, signed={self.signed}"


class MixedConv2d(_MixedMixin, nn.Conv2d):
    """Conv2d computing the composite mixed-precision layer (one convolution)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, candidates: BitCandidates, clip_init: float = DEFAULT_CLIP) -> "MixedConv2d":
        m = nn.utils.skip_init(cls, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                               padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                               bias=conv.bias is not None, padding_mode=conv.padding_mode,
                               device=conv.weight.device, dtype=conv.weight.dtype)  # no global-RNG init
        return m._take_float_(conv, candidates, clip_init)

    def forward(self, x: Tensor) -> Tensor:
        if (not self.conv_node or self.mixture_impl == "reference" or self._calibrating or not torch.is_grad_enabled()
                or self.padding_mode != "zeros" or isinstance(self.padding, str)):
            return self._conv_forward(self.mixed_input(x), self.mixed_weight(), self.bias)
        # training: one node for mixtures + conv, which recomputes the mixed operands in backward
        return _mixed_conv2d(x, self.weight, self.bias, self.probs_a(), self.clips, self.a_candidates,
                             bool(self.signed), self.probs_w(), self.w_candidates, list(self.stride),
                             list(self.padding), list(self.dilation), self.groups, self.mixture_impl,
                             self.keep_operands)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._mixed_repr()


class MixedLinear(_MixedMixin, nn.Linear):
    """Linear layer computing the composite mixed-precision layer (one matmul)."""

    @classmethod
    def from_float(cls, lin: nn.Linear, candidates: BitCandidates, clip_init: float = DEFAULT_CLIP) -> "MixedLinear":
        m = nn.utils.skip_init(cls, lin.in_features, lin.out_features, bias=lin.bias is not None,
                               device=lin.weight.device, dtype=lin.weight.dtype)  # no global-RNG init
        return m._take_float_(lin, candidates, clip_init)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.mixed_input(x), self.mixed_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._mixed_repr()


MIXED_TYPES = (MixedConv2d, MixedLinear)
