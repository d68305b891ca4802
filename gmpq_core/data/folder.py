"""``imagefolder:PATH`` datasets: ImageNet-style trees ``PATH/train/<class>/*.png`` and
``PATH/val/<class>/...`` (or ``PATH/test/...``), read lazily with torchvision's ``ImageFolder``.

Augmentation follows the usual ImageNet recipe: ``RandomResizedCrop(S)`` + horizontal flip for
training; ``Resize(S * 256 / 224)`` + ``CenterCrop(S)`` for evaluation; ImageNet mean/std.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DataError
from .info import DatasetInfo, FolderSplit

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "read_imagefolder", "folder_transform", "FolderView"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _scan(path: Path, dataset: str, split: str) -> FolderSplit:
    import torchvision  # noqa: PLC0415

    try:
        folder = torchvision.datasets.ImageFolder(str(path))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"Cannot read the image folder {path}: {exc}. Each class needs its own "
                        f"subfolder holding .png/.jpg images.") from exc
    return FolderSplit(folder, dataset=dataset, split=split)


def read_imagefolder(path: str, *, image_size: int | None = None) -> tuple[DatasetInfo, FolderSplit, FolderSplit]:
    """Scan ``path/train`` and ``path/val`` (or ``path/test``) and describe the dataset.

    Both splits must list the same class folders (the label of a class is its rank in sorted order).
    """
    root = Path(path).expanduser()
    name = f"imagefolder:{path}"
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"{name} needs the subfolders train/ and val/ (or test/) under {root}, each with one "
                        f"folder per class; found {sorted(p.name for p in root.iterdir()) if root.is_dir() else 'no such folder'}.")
    train = _scan(train_dir, name, "train")
    test = _scan(test_dir, name, "test")
    if list(train.classes) != list(test.classes):
        raise DataError(f"{name}: the class folders differ between {train_dir} ({list(train.classes)}) and "
                        f"{test_dir} ({list(test.classes)}); they must match so that labels agree.")
    info = DatasetInfo(name=name, num_classes=len(train.classes), in_channels=3, image_size=image_size or 224,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, flip=True, crop_padding=0)
    return info, train, test


def folder_transform(info: DatasetInfo, *, augment: bool) -> Callable[[Any], torch.Tensor]:
    """PIL image -> normalised float tensor ``[3, S, S]`` (S = info.image_size)."""
    from torchvision import transforms as T  # noqa: PLC0415, N812

    size = info.image_size
    if augment:
        steps: list[Any] = [T.RandomResizedCrop(size)]
        if info.flip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps = [T.Resize(max(size, round(size * 256 / 224))), T.CenterCrop(size)]
    steps += [T.ToTensor(), T.Normalize(info.mean, info.std)]
    return T.Compose(steps)


class FolderView(torch.utils.data.Dataset):
    """The samples of a ``FolderSplit`` with a transform, for ``torch.utils.data.DataLoader``.

    Random transforms draw from torch's global generator; each sample runs under
    ``torch.random.fork_rng`` seeded by ``(epoch_seed, index)``, so augmentation is deterministic in
    (seed, epoch) whatever the number of workers, and the caller's global RNG is left untouched.
    """

    def __init__(self, split: FolderSplit, transform: Callable[[Any], torch.Tensor], *, randomized: bool) -> None:
        self.split = split
        self.transform = transform
        self.randomized = randomized
        self.epoch_seed = 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.split.indices[i])
        path, label = self.split.folder.samples[j]
        image = self.split.folder.loader(path)
        if not self.randomized:
            return self.transform(image), int(label)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.epoch_seed * 1_000_003 + j) % (2**63))
            return self.transform(image), int(label)
