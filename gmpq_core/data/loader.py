"""Batch loaders: a fast in-memory loader for ``TensorSplit`` and a DataLoader wrapper for ``FolderSplit``.

Both yield ``(x, y)`` with ``x`` float32 normalised ``[B, C, S, S]`` on ``device`` and ``y`` int64
``[B]``; ``len(loader)`` is the number of batches; shuffling and augmentation are deterministic in
``(seed, epoch)`` (call ``set_epoch`` before each epoch).

In-memory augmentation (training): random crop with zero padding ``p`` plus a horizontal flip when
``info.flip``, done for the whole batch with one gather: pad the uint8 batch once to
``[B, C, H+2p, W+2p]``, draw offsets ``(dy, dx)`` in ``[0, 2p]`` per image, and index rows
``dy + [0..H)`` and columns ``dx + [0..W)`` (reversed for flipped images). Normalisation is
``x = (pixel / 255 - mean) / std``, fused into one multiply-add.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Iterator

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .folder import FolderView, folder_transform
from .info import DatasetInfo, FolderSplit, TensorSplit

__all__ = ["Loader", "TensorLoader", "FolderLoader", "make_loader", "default_num_workers", "epoch_seed"]


def default_num_workers() -> int:
    """DataLoader workers for this machine: one core stays with the main process, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed mixing ``(seed, epoch)`` (blake2b, stable across runs and platforms)."""
    digest = hashlib.blake2b(f"gmpq-data/{int(seed)}/{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Loader:
    """Common part of the loaders: batch counting and the (seed, epoch) state."""

    def __init__(self, *, info: DatasetInfo, dataset_size: int, batch_size: int, train: bool, augment: bool,
                 seed: int, drop_last: bool, device: torch.device, max_batches: int | None) -> None:
        self.info = info
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.train = train
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.device = device
        self.max_batches = max_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling / augmentation stream of ``epoch`` for the next iteration."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be an integer >= 0, but got epoch={epoch!r}.")
        self.epoch = epoch

    def __len__(self) -> int:
        full = self.dataset_size // self.batch_size if self.drop_last else math.ceil(self.dataset_size / self.batch_size)
        return full if self.max_batches is None else min(full, self.max_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError


class TensorLoader(Loader):
    """In-memory loader over a uint8 ``TensorSplit`` (the images move to ``device`` once)."""

    def __init__(self, split: TensorSplit, **kwargs) -> None:
        super().__init__(dataset_size=len(split), **kwargs)
        info: DatasetInfo = kwargs["info"]
        if split.images.shape[1] != info.in_channels:
            raise ConfigError(f"The split has {split.images.shape[1]} channels but info.in_channels="
                              f"{info.in_channels}; pass the DatasetInfo of the same dataset.")
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        mean = torch.tensor(info.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(info.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std)        # x = pixel * scale + shift = (pixel/255 - mean) / std
        self._shift = -mean / std

    def _normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self._shift, batch.to(torch.float32), self._scale)

    def _augment(self, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random zero-padded crop + optional horizontal flip of a uint8 batch [B, C, H, W] (one gather)."""
        b, c, h, w = batch.shape
        pad = self.info.crop_padding
        offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
        flip = torch.rand(b, generator=gen) < 0.5 if self.info.flip else torch.zeros(b, dtype=torch.bool)
        if pad == 0 and not self.info.flip:
            return batch
        rows = offsets[:, :1] + torch.arange(h)                        # [B, H]
        cols = torch.arange(w).expand(b, w)
        cols = offsets[:, 1:] + torch.where(flip[:, None], w - 1 - cols, cols)  # [B, W]
        padded = F.pad(batch, (pad, pad, pad, pad)) if pad else batch  # zeros = black border
        wp = w + 2 * pad
        flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        out = padded.reshape(b, c, -1).gather(2, flat.to(batch.device))
        return out.view(b, c, h, w)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, bs, nb = self.dataset_size, self.batch_size, len(self)
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=gen) if self.train else None
        for i in range(nb):
            lo, hi = i * bs, min(n, (i + 1) * bs)
            if order is None:
                xb, yb = self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = order[lo:hi].to(self.device)
                xb, yb = self.images[idx], self.labels[idx]
            if self.augment:
                xb = self._augment(xb, gen)
            yield self._normalize(xb), yb


class FolderLoader(Loader):
    """``torch.utils.data.DataLoader`` over a ``FolderSplit`` with the ImageNet-style transforms."""

    def __init__(self, split: FolderSplit, *, num_workers: int, **kwargs) -> None:
        super().__init__(dataset_size=len(split), **kwargs)
        self.num_workers = num_workers
        self.view = FolderView(split, folder_transform(self.info, augment=self.augment), randomized=self.augment)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = epoch_seed(self.seed, self.epoch)
        self.view.epoch_seed = seed
        loader = torch.utils.data.DataLoader(
            self.view, batch_size=self.batch_size, shuffle=self.train, drop_last=self.drop_last,
            num_workers=self.num_workers, generator=torch.Generator().manual_seed(seed),
            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for i, (xb, yb) in enumerate(loader):
            if i >= len(self):
                break
            non_blocking = self.device.type == "cuda"
            yield xb.to(self.device, non_blocking=non_blocking), yb.to(self.device, non_blocking=non_blocking)


def _check_count(name: str, value: object, minimum: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, "
                          f"but got {name}={value!r}.")


def make_loader(split: TensorSplit | FolderSplit, info: DatasetInfo, *, batch_size: int, train: bool, seed: int = 0,
                augment: bool | None = None, drop_last: bool = False, device: str | torch.device = "cpu",
                max_batches: int | None = None, num_workers: int | None = None) -> Loader:
    """A loader over ``split``. ``train=True`` shuffles (and augments unless ``augment=False``);
    ``train=False`` keeps the order and never augments unless ``augment=True``. ``max_batches`` caps
    ``len(loader)``. ``num_workers`` (FolderSplit only) defaults to ``default_num_workers()``."""
    _check_count("batch_size", batch_size, 1)
    _check_count("max_batches", max_batches, 1, optional=True)
    _check_count("num_workers", num_workers, 0, optional=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, but got seed={seed!r}.")
    if not isinstance(info, DatasetInfo):
        raise ConfigError(f"info must be a DatasetInfo (bundle.info), but got {type(info).__name__}.")
    if drop_last and len(split) < batch_size:
        raise ConfigError(f"batch_size={batch_size} is larger than {getattr(split, 'description', 'the split')} "
                          f"({len(split)} images) with drop_last=True, so no batch would be produced; lower "
                          f"batch_size or set drop_last=False.")
    common = dict(info=info, batch_size=batch_size, train=bool(train), seed=seed, drop_last=bool(drop_last),
                  augment=bool(train) if augment is None else bool(augment), device=torch.device(device),
                  max_batches=max_batches)
    if isinstance(split, TensorSplit):
        return TensorLoader(split, **common)
    if isinstance(split, FolderSplit):
        return FolderLoader(split, num_workers=default_num_workers() if num_workers is None else num_workers,
                            **common)
    raise ConfigError(f"make_loader takes a TensorSplit or FolderSplit (bundle.train / bundle.test), "
                      f"but got {type(split).__name__}.")
