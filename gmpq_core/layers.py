"""Which layers are searchable, and the one helper that swaps modules by fully qualified name.

Rule (METHOD.md 2): every Conv2d and Linear is searchable except the stem (the first Conv2d in
registration order) and the classifier (the last Linear; in a network without one, such as SqueezeNet's
1x1-convolution classifier, the last Conv2d). ``include_stem`` /
``include_classifier`` make those quantizable too, at a fixed bitwidth (``SearchConfig`` in the search,
``FinetuneConfig`` or the policy's meta in the fine-tune).
Quantized and mixed modules subclass nn.Conv2d / nn.Linear, so this works on converted models too.
"""
from __future__ import annotations

import hashlib

from torch import nn

__all__ = ["quantizable_layers", "searchable_layers", "stem_and_classifier", "swap_module", "fingerprint"]


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All Conv2d and Linear modules, in registration order, keyed by fully qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def stem_and_classifier(model: nn.Module) -> tuple[str | None, str | None]:
    """FQNs of the stem (first Conv2d) and the classifier (last Linear; without one, the last Conv2d other than the
    stem: a convolutional classifier), None where absent."""
    layers = quantizable_layers(model)
    convs = [n for n, m in layers.items() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    classifier = linears[-1] if linears else (convs[-1] if len(convs) > 1 else None)
    return (convs[0] if convs else None), classifier


def searchable_layers(model: nn.Module, *, include_stem: bool = False,
                      include_classifier: bool = False) -> dict[str, nn.Module]:
    """Searchable Conv2d/Linear modules keyed by FQN (stem and classifier excluded unless asked)."""
    stem, classifier = stem_and_classifier(model)
    skip = set()
    if not include_stem and stem is not None:
        skip.add(stem)
    if not include_classifier and classifier is not None:
        skip.add(classifier)
    return {n: m for n, m in quantizable_layers(model).items() if n not in skip}


def swap_module(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at ``fqn`` by ``new`` in place; returns the old module."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def fingerprint(model: nn.Module, *, include_stem: bool = False, include_classifier: bool = False) -> str:
    """Short hash of the searchable layers' names and weight shapes: ties a policy to an architecture."""
    lines = [f"{n}:{tuple(m.weight.shape)}" for n, m in
             searchable_layers(model, include_stem=include_stem, include_classifier=include_classifier).items()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
