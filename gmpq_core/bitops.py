"""MACs and BitOPs counting (METHOD.md 4.1).

MACs of a conv = C_in / groups * k_h * k_w * C_out * H_out * W_out (per image); of a linear =
in_features * out_features (times any extra leading dims). BitOPs = MACs * b_w * b_a.

Two conventions are reported, always named:
- ``bitops_quantized``: searchable (quantized) layers only, MACs * w_bits * a_bits (GMPQ/EdMIPS);
- ``bitops_total``: the whole network, layers outside the policy counted at 32 x 32 (HAWQ/OMPQ).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .layers import quantizable_layers
from .policy import BitPolicy

__all__ = ["LayerCost", "BitOpsReport", "layer_macs", "count_bitops", "FP_BITS"]

FP_BITS = 32


@dataclass(frozen=True, kw_only=True)
class LayerCost:
    name: str
    macs: int
    w_bits: int
    a_bits: int
    quantized: bool

    @property
    def bitops(self) -> int:
        return self.macs * self.w_bits * self.a_bits


@dataclass(frozen=True, kw_only=True)
class BitOpsReport:
    macs: int                 # all conv + linear MACs per image
    bitops_quantized: int     # policy layers only
    bitops_total: int         # whole network, non-policy layers at 32x32
    layers: tuple[LayerCost, ...]

    def to_dict(self) -> dict:
        return {"macs": self.macs, "bitops_quantized": self.bitops_quantized, "bitops_total": self.bitops_total,
                "gbitops_quantized": self.bitops_quantized / 1e9, "gbitops_total": self.bitops_total / 1e9,
                "layers": [{"name": c.name, "macs": c.macs, "w_bits": c.w_bits, "a_bits": c.a_bits,
                            "quantized": c.quantized, "bitops": c.bitops} for c in self.layers]}


def _input_shape(input_size: int | Sequence[int], in_channels: int) -> tuple[int, ...]:
    if isinstance(input_size, int):
        return (1, in_channels, input_size, input_size)
    size = tuple(int(s) for s in input_size)
    return (1, in_channels, *size) if len(size) == 2 else (1, *size)


@contextlib.contextmanager
def _mac_hooks(model: nn.Module, out: dict[str, int]) -> Iterator[None]:
    handles = []

    def make_hook(name: str):
        def hook(mod: nn.Module, inp, output) -> None:
            if isinstance(mod, nn.Conv2d):
                per_out = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                out[name] = out.get(name, 0) + per_out * output[0].numel()  # C_out*H_out*W_out of image 0
            else:
                out[name] = out.get(name, 0) + mod.in_features * output[0].numel()
        return hook

    for name, mod in quantizable_layers(model).items():
        handles.append(mod.register_forward_hook(make_hook(name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def layer_macs(model: nn.Module, input_size: int | Sequence[int], in_channels: int = 3) -> dict[str, int]:
    """MACs per image of every Conv2d/Linear (FQN -> MACs), from one batch-1 forward in eval mode."""
    p = next(model.parameters())
    x = torch.zeros(_input_shape(input_size, in_channels), device=p.device, dtype=p.dtype)
    macs: dict[str, int] = {}
    was_training = model.training
    model.eval()
    try:
        with _mac_hooks(model, macs):
            model(x)
    finally:
        model.train(was_training)
    return macs


def count_bitops(model: nn.Module, policy: BitPolicy | None, input_size: int | Sequence[int],
                 in_channels: int = 3, *, macs: dict[str, int] | None = None) -> BitOpsReport:
    """Per-layer MACs and BitOPs of ``model`` under ``policy`` (None: everything FP at 32x32). A stem / classifier
    the policy's meta quantizes (``include_stem`` / ``include_classifier`` at ``stem_bits``: ``BitPolicy.quant_scope``)
    counts at those bits, as the search, the fine-tune and the export quantize it."""
    macs = layer_macs(model, input_size, in_channels) if macs is None else macs
    layers = policy.quantized_specs(model) if policy is not None else {}
    costs = []
    for name, m in macs.items():
        spec = layers.get(name)
        costs.append(LayerCost(name=name, macs=int(m), w_bits=spec.w_bits if spec else FP_BITS,
                               a_bits=spec.a_bits if spec else FP_BITS, quantized=spec is not None))
    return BitOpsReport(macs=sum(c.macs for c in costs),
                        bitops_quantized=sum(c.bitops for c in costs if c.quantized),
                        bitops_total=sum(c.bitops for c in costs), layers=tuple(costs))
