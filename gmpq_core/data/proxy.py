"""Deterministic stratified proxy subsets (the proxy-dataset size is a sweep dimension).

Construction (one seeded global order, then a prefix): every image gets a random rank inside its
class, and the classes get a random priority. Sorting all images by ``(rank, class priority)`` deals
them out round-robin over the classes; a proxy of ``size`` images is the first ``size`` of that order.
Hence, for one seed:
  * class counts differ by at most 1 (the remainder goes to the highest-priority classes), except
    that a class with too few images gives all it has and the others share the rest;
  * subsets are nested: the 500-image proxy lies inside the 2,000-image proxy;
  * the cost is a few vectorised numpy sorts, O(N log N), no Python loop over images.
"""
from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from ..errors import ConfigError, DataError

__all__ = ["proxy_indices", "proxy", "class_counts", "check_subset_size"]

SplitT = TypeVar("SplitT")


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, but got {name}={value!r}.")
    return int(value)


def _labels_numpy(labels: object) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().to("cpu").numpy()
    else:
        arr = np.asarray(labels)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"labels must be a 1-D integer tensor, but got shape {arr.shape} and dtype {arr.dtype}.")
    return arr.astype(np.int64, copy=False)


def proxy_indices(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of a stratified subset of ``size`` images, sorted ascending (int64 ``[size]``).

    Deterministic in ``(labels, size, seed)``; nested in ``size`` for a fixed seed; per-class counts
    differ by at most one whenever every class has at least ``ceil(size / num_classes)`` images.
    """
    size = _check_int("size", size)
    seed = _check_int("seed", seed)
    y = _labels_numpy(labels)
    n = y.shape[0]
    if size < 0:
        raise ConfigError(f"proxy size must be >= 0, but got size={size}.")
    if size > n:
        raise DataError(f"proxy size {size} is larger than the number of labels ({n}); use at most {n}.")
    if size == n:
        return torch.arange(n, dtype=torch.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, 0x9A7]))
    classes, cls = np.unique(y, return_inverse=True)             # cls: class index per image, 0..K-1
    k = classes.shape[0]
    shuffled = rng.permutation(n)                                  # random order of all images
    grouped = shuffled[np.argsort(cls[shuffled], kind="stable")]   # grouped by class, random inside
    starts = np.searchsorted(cls[grouped], np.arange(k))           # first position of each class
    rank = np.empty(n, dtype=np.int64)
    rank[grouped] = np.arange(n) - starts[cls[grouped]]            # rank of each image in its class
    priority = rng.permutation(k)                                  # who receives the remainder first
    order = np.argsort(rank * k + priority[cls], kind="stable")    # round-robin over classes
    return torch.from_numpy(np.sort(order[:size]).astype(np.int64))


def class_counts(labels: torch.Tensor) -> dict[int, int]:
    """``{label: count}`` for a label tensor (a convenience for reports and tests)."""
    values, counts = np.unique(_labels_numpy(labels), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def check_subset_size(size: int | None, n: int, num_classes: int | None, what: str, dataset: str, split: str, *,
                      role: str = "") -> None:
    """ConfigError when a subset ``size`` of a dataset split is larger than the split (``n`` images) or smaller
    than the dataset's ``num_classes`` (not checked when None); ``size=None`` (the whole split) passes. ``what``
    names the key (``proxy_size``), ``split`` the split's images (``training``/``test``), ``role`` the dataset's
    (``proxy``/``target``). The one check of ``gmpq sweep`` and ``gmpq study`` before anything starts."""
    if size is None:
        return
    if size > n:
        raise ConfigError(f"{what} {size} is larger than the {role + ' ' if role else ''}dataset '{dataset}' ({n} "
                          f"{split} images); use at most {n}, or null for all of them.")
    if num_classes is not None and size < num_classes:
        raise ConfigError(f"{what} {size} is smaller than the {num_classes} classes of '{dataset}'; use at least "
                          f"{num_classes}.")


def proxy(split: SplitT, size: int | None, seed: int = 0, *, what: str = "proxy size") -> SplitT:
    """A stratified proxy subset of ``split`` (TensorSplit or FolderSplit) with ``size`` images.

    ``size=None`` or ``size == len(split)`` returns ``split`` itself. A size larger than the split
    raises ``DataError``; one smaller than the number of classes raises ``ConfigError`` (some class
    would be missing). Both messages name the two numbers, and the size as ``what`` (a CLI passes
    the flag the user typed, e.g. ``what="--test-size"``).
    """
    n = len(split)  # type: ignore[arg-type]
    if size is None:
        return split
    size = _check_int(what, size)
    describe = getattr(split, "description", "the split")
    if size > n:
        raise DataError(f"{what} {size} is larger than {describe} ({n} images); use at most {n}.")
    if size == n:
        return split
    num_classes = len(np.unique(_labels_numpy(split.labels)))  # type: ignore[attr-defined]
    if size < num_classes:
        raise ConfigError(f"{what} {size} is smaller than the number of classes in {describe} "
                          f"({num_classes}); use at least {num_classes} so that every class appears.")
    return split.subset(proxy_indices(split.labels, size, seed))  # type: ignore[attr-defined]
