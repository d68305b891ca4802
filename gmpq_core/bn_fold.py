"""Folding an eval-mode BatchNorm into the convolution that feeds it (the frozen FP teachers of the
search and of a distilling fine-tune).

A frozen network in eval mode computes ``BN(conv(x)) = conv'(x)`` with ``W' = W * s`` and
``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)`` per output channel, so the teacher's
forward pass, which the search runs on every batch for its Grad-CAM map (a fine-tune with ``distill``
for its soft targets), needs no BatchNorm pass:
one read and one write of every activation less per convolution. Values are the same up to float
rounding. Which BatchNorm follows which convolution is read from the data flow (a torch.fx trace), not
from module names: a pair is folded only where the convolution's output feeds that BatchNorm and
nothing else, each module runs once per forward under one name, no code reads their parameters
directly and no hook watches them. A model torch.fx cannot trace is left as it is.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

log = logging.getLogger(__name__)

__all__ = ["fold_batchnorm_", "frozen_teacher_"]


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _kept(conv: str, bn: str, keep: frozenset[str]) -> bool:
    """Whether folding ``bn`` into ``conv`` would change the output of a module named in ``keep``: the conv is
    that module or inside it, and the BatchNorm is not (a container ending in the conv, its BatchNorm after)."""
    return any(conv == k or (conv.startswith(k + ".") and not bn.startswith(k + ".")) for k in keep)


def _foldable_pairs(model: nn.Module, keep: frozenset[str]) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs whose data flow allows folding (module docstring). Skipped too: a
    pair that would change a ``keep`` module's output (``_kept``), a module registered under two names, a
    module whose parameters the forward reads directly (``self.conv.weight``), and a module with forward
    hooks (they would see other values)."""
    import torch.fx as fx

    try:
        graph = fx.Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any model fx cannot trace keeps its BatchNorms
        log.debug("BatchNorm not folded: %s cannot be traced (%s: %s)", type(model).__name__, type(exc).__name__, exc)
        return []
    modules = dict(model.named_modules())
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    read = {n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}   # owners of attributes read
    calls = [n for n in graph.nodes if n.op == "call_module"]
    runs = Counter(n.target for n in calls)

    def alone(name: str) -> bool:      # called once, one name, no direct reads, no hooks
        m = modules[name]
        return runs[name] == 1 and names[id(m)] == 1 and name not in read and not _hooked(m)

    pairs = []
    for node in calls:
        bn = modules[node.target]
        if not isinstance(bn, nn.BatchNorm2d) or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = modules[src.target]
        if (type(conv) is nn.Conv2d and not _kept(src.target, node.target, keep)
                and conv.out_channels == bn.num_features
                and bn.running_mean is not None and bn.running_var is not None   # not batch statistics
                and alone(src.target) and alone(node.target)):
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm_(model: nn.Module, *, keep: Iterable[str] = ()) -> int:
    """Fold every foldable BatchNorm2d of ``model`` into the ``nn.Conv2d`` before it, in place: the conv
    gets the folded weight and bias (same dtype, device and requires_grad), the BatchNorm becomes
    ``nn.Identity``. Only for a model whose BatchNorms use their running statistics: ``model`` must be in
    eval mode (a ValueError otherwise). Module names stay (hooks on other modules, e.g. Grad-CAM's on
    ``layer4``, keep working). ``keep``: names of modules whose output must stay what it was (the Grad-CAM
    layer): a pair is not folded where that would move the module's output to after a BatchNorm (the module
    is the conv, or contains it but not its BatchNorm).
    Returns the number of BatchNorms folded."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if any(m.training for m in bns):
        raise ValueError("fold_batchnorm_ needs a model in eval mode (its BatchNorms use running statistics); "
                         "call model.eval() first, or leave the BatchNorms unfolded for training-mode statistics.")
    n = 0
    for conv_name, bn_name in _foldable_pairs(model, frozenset(keep)):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        grad = conv.weight.requires_grad
        fmt = (torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last)
               and not conv.weight.is_contiguous() else torch.contiguous_format)
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                    bn.bias)
        conv.weight = nn.Parameter(w.detach().contiguous(memory_format=fmt), requires_grad=grad)
        conv.bias = nn.Parameter(b.detach(), requires_grad=grad)
        model.set_submodule(bn_name, nn.Identity())
        n += 1
    return n


def frozen_teacher_(model: nn.Module, *, keep: Iterable[str] = ()) -> nn.Module:
    """``model`` as a frozen teacher, in place: eval mode, no gradients, BatchNorms folded (``keep``: see
    ``fold_batchnorm_``). Returns it."""
    model.eval().requires_grad_(False)
    log.debug("teacher: %d BatchNorm(s) folded into their convolutions", fold_batchnorm_(model, keep=keep))
    return model
