"""The GMPQ supernet: composite mixed-precision layers with architecture logits (METHOD.md 2, 3).

Every searchable Conv2d/Linear becomes a ``MixedConv2d`` / ``MixedLinear`` (subclasses of
nn.Conv2d / nn.Linear, same FQNs and weight shapes) computing the composite layer

    y = conv( sum_j pa_j * Qa_j(x),  sum_i pw_i * Qw_i(W) ),   pw = softmax(alpha_w / T),
                                                              pa = softmax(alpha_a / T),

with ONE shared FP weight W and ONE convolution per layer (exact because conv is bilinear). Qw_i is
the symmetric weight quantizer at w-candidate i, Qa_j the PACT activation quantizer at a-candidate
j with its own learnable clip (one clip per activation candidate, as the official code), signed
where the layer's input can be negative (detected by ``calibrate_supernet_``).

Both mixtures dispatch on the layer's ``mixture_impl`` (``set_mixture_impl_``): ``"reference"`` is
the straightforward autograd formula (one full tensor per candidate); ``"fused"`` (the default),
``"compiled"`` and ``"triton"`` are the one-node, recompute-in-backward versions of ``fused.py``,
which match it in values and gradients. The weight mixture is cached while autograd is off
(evaluation).
The layers themselves live in ``supernet_layers`` (importable from here too).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import Tensor, nn

from .errors import ConfigError, PolicyMismatchError
from .fused import IMPLS
from .layers import searchable_layers, stem_and_classifier, swap_module
from .policy import BitCandidates, BitPolicy, QuantSpec
from .qmodules import QuantConv2d, QuantLinear, quantized_layers
from .qmodules import _calibrating as _calibrating_fixed
from .supernet_layers import DEFAULT_CLIP, MIXED_TYPES, MixedConv2d, MixedLinear, _MixedMixin

__all__ = ["MixedConv2d", "MixedLinear", "MIXED_TYPES", "build_supernet", "mixed_layers", "arch_parameters",
           "weight_parameters", "expected_bits", "arch_probs", "set_temperature_", "calibrate_supernet_",
           "discretize", "set_mixture_impl_", "DEFAULT_CLIP"]


@torch.no_grad()
def _reinit_(model: nn.Module, generator: torch.Generator) -> None:
    """Random init drawn from ``generator`` only (global RNG untouched): Kaiming-normal convs and
    linears (fan_out), zero biases, BN weight 1 / bias 0 / fresh running statistics."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):   # drawn in NCHW order: the same values in any memory format
            w = torch.empty(m.weight.shape, dtype=m.weight.dtype, device=m.weight.device)
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=generator)
            with torch.no_grad():
                m.weight.copy_(w)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            m.reset_parameters()


def build_supernet(model: nn.Module, candidates: BitCandidates | None = None, *, init_from_fp: bool = True,
                   seed: int = 0, clip_init: float = DEFAULT_CLIP) -> nn.Module:
    """A copy of ``model`` whose searchable layers are composite mixed layers (``model`` is untouched).

    init_from_fp=True (ours) keeps the FP weights and BN statistics of ``model``; False (official)
    re-initialises every parameter from ``torch.Generator().manual_seed(seed)``. Architecture
    logits start at zero (uniform softmax), clips at ``clip_init`` (see ``calibrate_supernet_``).
    """
    candidates = BitCandidates() if candidates is None else BitCandidates.from_any(candidates)
    net = copy.deepcopy(model)
    if not init_from_fp:
        _reinit_(net, torch.Generator().manual_seed(int(seed)))
    for name, mod in searchable_layers(net).items():
        if isinstance(mod, MIXED_TYPES):
            continue
        cls = MixedConv2d if isinstance(mod, nn.Conv2d) else MixedLinear
        swap_module(net, name, cls.from_float(mod, candidates, clip_init))
    return net


def mixed_layers(model: nn.Module) -> dict[str, _MixedMixin]:
    """Mixed layers keyed by FQN, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MIXED_TYPES)}


def arch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The architecture logits (alpha_w, alpha_a of every mixed layer)."""
    return [p for n, p in model.named_parameters() if n.rpartition(".")[2] in ("alpha_w", "alpha_a")]


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Everything else: shared weights, biases, BN affine parameters and PACT clips."""
    arch = {id(p) for p in arch_parameters(model)}
    return [p for p in model.parameters() if id(p) not in arch]


def expected_bits(model: nn.Module) -> tuple[list[str], Tensor, Tensor]:
    """(names, E[b_w] [L], E[b_a] [L]) under the current softmax, differentiable w.r.t. the logits."""
    layers = mixed_layers(model)
    if not layers:
        raise ValueError("the model has no mixed layers; build it with build_supernet first.")
    ew = torch.stack([m.expected_w_bits() for m in layers.values()])
    ea = torch.stack([m.expected_a_bits() for m in layers.values()])
    return list(layers), ew, ea


@torch.no_grad()
def arch_probs(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """Per layer {"w": pw, "a": pa, "w_bits": candidates, "a_bits": candidates} as plain lists."""
    return {n: {"w": [float(v) for v in m.probs_w()], "a": [float(v) for v in m.probs_a()],
                "w_bits": list(m.w_candidates), "a_bits": list(m.a_candidates)}
            for n, m in mixed_layers(model).items()}


def set_temperature_(model: nn.Module, temperature: float) -> nn.Module:
    """Set the softmax temperature T of every mixed layer (T=1 is the official plain softmax)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, but got temperature={temperature!r}.")
    for m in mixed_layers(model).values():
        m.temperature = float(temperature)
    return model


def set_mixture_impl_(model: nn.Module, impl: str, *, conv_node: bool | None = None,
                      keep_operands: bool | None = None) -> nn.Module:
    """Set how every mixed layer computes its mixtures (values and gradients match, fused.py):
    "reference" (plain autograd), "fused" (recompute-in-backward nodes, eager kernels; the
    default), "compiled" (the same, TorchInductor kernels) or "triton" (CUDA Triton kernels for the
    activations); ``fused.resolve_mixture_impl`` maps "auto" to one of them for a device.

    ``conv_node``: a MixedConv2d in training runs mixtures + convolution as ONE node that keeps only
    its inputs (the mixed operands are recomputed in backward: about one activation-sized and one
    weight-sized tensor less per layer; "fused" on a CPU and "triton" on CUDA keep them, fused.keeps_operands). Default: on for
    "compiled" and "triton" (one-pass kernels make the recompute cheap), off for "fused" (eager recompute
    costs CPU time). ``keep_operands``: True makes that node keep the mixed operands instead (eager
    kernels; more memory, no recompute), False makes it recompute them; None: ``fused.keeps_operands``.
    """
    if impl not in IMPLS:
        raise ConfigError(f"mixture impl must be one of {', '.join(map(repr, IMPLS))}, but got impl={impl!r}.")
    for m in mixed_layers(model).values():
        m.mixture_impl = impl
        m.conv_node = impl in ("compiled", "triton") if conv_node is None else bool(conv_node)
        m.keep_operands = keep_operands
        m._wcache = None
    for q in quantized_layers(model).values():   # a fixed stem / classifier: the same kernels
        q.quant_impl = impl
    return model


@contextlib.contextmanager
def _calibrating(model: nn.Module, clips: bool) -> Iterator[None]:
    layers = mixed_layers(model).values()
    for m in layers:
        m._calibrating, m._calib_clips = True, clips
    try:
        yield
    finally:
        for m in layers:
            m._calibrating = False


@torch.no_grad()
def calibrate_supernet_(model: nn.Module, x: Tensor, *, clips: bool = True) -> nn.Module:
    """From one batch ``x``: set each layer's signed flag (its input has negative values) and, if
    ``clips``, every candidate's clip to the 99.9th percentile of |input|.

    The forward pass runs in training mode, as the search does: BatchNorm normalises with the batch's
    statistics, so the clips fit the inputs the search will quantize even when the running statistics
    say nothing yet (``init_from_fp=False``: mean 0, variance 1, which gave clips 2-3x too small). The
    running statistics are left as they were."""
    was_training = model.training
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    fixed = quantized_layers(model)                      # a quantized stem / classifier (include_stem, ...)
    fixed_clips = {n: m.act.clip.detach().clone() for n, m in fixed.items()}
    model.train()
    try:
        with _calibrating(model, clips), _calibrating_fixed(model):
            model(x)
    finally:
        if not clips:
            for n, m in fixed.items():
                m.act.clip.copy_(fixed_clips[n])
        for m, buffers in zip(norms, saved):
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
        model.train(was_training)
    return model


def quantize_stem_and_classifier_(net: nn.Module, *, include_stem: bool, include_classifier: bool,
                                  bits: int) -> dict[str, QuantSpec]:
    """Swap the stem and / or classifier of ``net`` (full precision in a supernet) for fixed ``bits``-bit
    quantized layers, in place (METHOD.md 2's switch); returns their specs by name."""
    stem, classifier = stem_and_classifier(net)
    spec = QuantSpec(w_bits=bits, a_bits=bits)
    names = [n for n, flag in ((stem, include_stem), (classifier, include_classifier)) if flag and n is not None]
    for name in names:
        mod = net.get_submodule(name)
        swap_module(net, name, (QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear).from_float(mod, spec))
    return {n: spec for n in names}


@torch.no_grad()
def discretize(supernet: nn.Module, policy: BitPolicy) -> nn.Module:
    """A copy of ``supernet`` with each mixed layer fixed to the policy's bits: a QuantConv2d /
    QuantLinear with the shared weight and the clip of the chosen activation candidate."""
    policy.check_fits(supernet)
    net = copy.deepcopy(supernet)
    with torch.random.fork_rng(devices=[]):  # module constructors draw a throw-away init
        _fix_layers_(net, policy)
    return net


def _fix_layers_(net: nn.Module, policy: BitPolicy) -> None:
    for name, m in mixed_layers(net).items():
        spec = policy.layers[name]
        base = (nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                          dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                          padding_mode=m.padding_mode) if isinstance(m, nn.Conv2d)
                else nn.Linear(m.in_features, m.out_features, bias=m.bias is not None))
        base = base.to(device=m.weight.device, dtype=m.weight.dtype)
        base.weight.copy_(m.weight)
        if m.bias is not None:
            base.bias.copy_(m.bias)
        q = (QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear).from_float(base, spec)
        if spec.a_bits not in m.a_candidates:   # no clip was learnt for it
            raise PolicyMismatchError(
                f"The policy gives layer '{name}' a_bits={spec.a_bits}, which is not one of its activation "
                f"candidates {list(m.a_candidates)}: the supernet learnt no clip for it. Discretize only a policy "
                "over the search's candidates (derive_policy gives one), or fine-tune it with gmpq finetune.")
        j = m.a_candidates.index(spec.a_bits)
        q.act.clip.copy_(m.clips[j].abs())
        q.act.set_signed(m.signed)
        q.quant_impl = m.mixture_impl
        swap_module(net, name, q)
