"""Dataset value types: ``DatasetInfo``, the two kinds of split, and the ``DataBundle`` holding them.

``TensorSplit`` keeps a whole split in memory as uint8 images ``[N, C, H, W]`` (0..255) and int64
labels ``[N]``; ``FolderSplit`` points at an ImageNet-style folder tree read lazily through
torchvision's ``ImageFolder``. Both have ``len()``, ``labels`` and ``subset(indices)`` so that
``proxy`` and ``make_loader`` treat them alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError

__all__ = ["DatasetInfo", "TensorSplit", "FolderSplit", "DataBundle", "as_index_tensor", "crop_padding_for"]


def crop_padding_for(image_size: int) -> int:
    """Zero padding (pixels per side) of the random-crop augmentation for a given image side.

    8 px -> 1, 28 px -> 2, 32 px -> 4, 64 px -> 8 (the CIFAR convention of 1/8 of the side, with the
    MNIST-family convention of 2 px for 16..31 px images).
    """
    if image_size < 16:
        return 1
    if image_size < 32:
        return 2
    return image_size // 8


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a loader need to know about a dataset.

    ``mean``/``std`` are per channel on the 0..1 scale (pixel / 255) and are applied as
    ``x = (pixel / 255 - mean) / std``. ``flip`` says whether horizontal flips preserve the label
    (False for digits). ``crop_padding`` is the zero padding of the random crop, in pixels per side.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    crop_padding: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"DatasetInfo.name must be a non-empty string, but got name={self.name!r}.")
        for attr in ("num_classes", "in_channels", "image_size"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"DatasetInfo.{attr} must be a positive integer, but got {attr}={value!r}.")
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ConfigError(f"DatasetInfo.crop_padding must be an integer >= 0, but got "
                              f"crop_padding={self.crop_padding!r}.")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ConfigError(f"DatasetInfo needs one mean and one std per channel (in_channels={self.in_channels}), "
                              f"but got mean={self.mean} and std={self.std}.")
        if any(not s > 0 for s in self.std):
            raise ConfigError(f"DatasetInfo.std must be positive in every channel, but got std={self.std}.")


def as_index_tensor(indices: Any, length: int) -> torch.Tensor:
    """Turn a list / numpy array / tensor of indices into an int64 tensor, checking the range [0, length)."""
    if isinstance(indices, torch.Tensor):
        idx = indices.detach().to("cpu")
    else:
        idx = torch.as_tensor(np.asarray(indices))
    if idx.dtype == torch.bool:
        raise ConfigError("subset() takes integer indices, but got a boolean mask; use mask.nonzero().flatten().")
    if idx.dim() != 1 or (idx.numel() and idx.is_floating_point()):
        raise ConfigError(f"subset() takes a 1-D sequence of integer indices, but got shape {tuple(idx.shape)} "
                          f"and dtype {idx.dtype}.")
    idx = idx.to(torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= length):
        raise ConfigError(f"subset() indices must lie in [0, {length}), but got the range "
                          f"[{int(idx.min())}, {int(idx.max())}].")
    return idx


def _describe(dataset: str, split: str) -> str:
    kind = {"train": "training", "test": "test"}.get(split, split or "a")
    return f"the {kind} split of {dataset or 'the dataset'}"


@dataclass(frozen=True, eq=False)
class TensorSplit:
    """An in-memory split: ``images`` uint8 ``[N, C, H, W]`` (0..255), ``labels`` int64 ``[N]``.

    ``dataset`` and ``split`` ("train" / "test") only name the split in error messages.
    """

    images: torch.Tensor
    labels: torch.Tensor
    dataset: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"TensorSplit.images must be a uint8 tensor [N, C, H, W], but got "
                            f"{type(self.images).__name__} {getattr(self.images, 'dtype', '')} "
                            f"{tuple(getattr(self.images, 'shape', ()))}.")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(f"TensorSplit.labels must be an int64 tensor [N], but got "
                            f"{getattr(self.labels, 'dtype', type(self.labels).__name__)} "
                            f"{tuple(getattr(self.labels, 'shape', ()))}.")
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(f"TensorSplit has {self.images.shape[0]} images but {self.labels.shape[0]} labels.")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def description(self) -> str:
        return _describe(self.dataset, self.split)

    def subset(self, indices: Any) -> "TensorSplit":
        """A new split holding the rows ``indices`` (copied), in the given order."""
        idx = as_index_tensor(indices, len(self))
        return TensorSplit(images=self.images[idx], labels=self.labels[idx], dataset=self.dataset, split=self.split)


class FolderSplit:
    """A split read from an ImageNet-style tree (``class_name/*.png|jpg``) through ``ImageFolder``.

    Images are decoded lazily by the loader's workers. ``indices`` selects a subset of the
    folder's samples (all of them when None).
    """

    def __init__(self, folder: Any, *, dataset: str = "", split: str = "",
                 indices: torch.Tensor | None = None) -> None:
        self.folder = folder                      # torchvision.datasets.ImageFolder, transform=None
        self.dataset = dataset
        self.split = split
        all_labels = torch.as_tensor(np.asarray(folder.targets, dtype=np.int64))
        self.indices = torch.arange(len(all_labels)) if indices is None else indices
        self.labels = all_labels[self.indices]

    @property
    def root(self) -> str:
        return str(self.folder.root)

    @property
    def classes(self) -> Sequence[str]:
        return self.folder.classes

    @property
    def description(self) -> str:
        return _describe(self.dataset, self.split)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __repr__(self) -> str:
        return f"FolderSplit(root={self.root!r}, split={self.split!r}, images={len(self)})"

    def subset(self, indices: Any) -> "FolderSplit":
        idx = as_index_tensor(indices, len(self))
        return FolderSplit(self.folder, dataset=self.dataset, split=self.split, indices=self.indices[idx])


@dataclass
class DataBundle:
    """A loaded dataset: its ``info`` and its ``train`` and ``test`` splits."""

    info: DatasetInfo
    train: TensorSplit | FolderSplit
    test: TensorSplit | FolderSplit
    source: str = field(default="", compare=False)   # where the files were read from (for logs)
