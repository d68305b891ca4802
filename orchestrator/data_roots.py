"""A data root typed on the command line (``--data-root DIR`` of ``gmpq train-fp``, ``gmpq search``, ``gmpq
finetune``) that does not exist: refused, unless the dataset downloads into it.

Loading Fashion-MNIST from a root without its files falls back to another copy (the Debian package's folder,
``./data/FashionMNIST/raw``) with a warning (``gmpq_core.data.sources.find_fashion_mnist``): that keeps a moved
sweep's recorded root working, but a typo on the command line (``--data-root /typo``) would train on other data
than the folder named. ``check_given_data_root`` refuses such a root in one paragraph before any work. A dataset
that downloads into its root (CIFAR-10; Fashion-MNIST where no copy exists elsewhere) takes a new folder, as
before; one that reads no data root (digits, mnist5k, imagefolder:PATH) is not checked. A new local sweep's
``data_root`` is typed too (``sweep.check_sweep``); a recorded root (a resumed sweep's ``data_root``, a policy's)
is not checked: its fallback and warning stay.
(``gmpq evaluate`` only reads, and refuses any root that does not exist: ``common_args.ExistingDataRootArg``.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gmpq_core.errors import ConfigError

__all__ = ["check_given_data_root", "check_sweep_data_root", "downloads_into_root", "READS_ROOT"]

FLAG = "--data-root"
READS_ROOT = ("fashion_mnist", "cifar10")      # the datasets whose files a data root holds (the others ignore it)


def _fashion_elsewhere() -> Path | None:
    """The folder of a Fashion-MNIST copy found without a root (the Debian package's, ./data), or None."""
    from gmpq_core.data.sources import find_fashion_mnist

    files = find_fashion_mnist(None)
    return None if files is None else files["train_images"].parent


def downloads_into_root(dataset: str) -> bool:
    """Whether loading ``dataset`` with a root that does not exist downloads its files into that root
    (torchvision): CIFAR-10 always; Fashion-MNIST only when no copy is found elsewhere (else that copy is read)."""
    name = str(dataset).partition(":")[0]
    if name == "cifar10":
        return True
    if name == "fashion_mnist":
        return _fashion_elsewhere() is None
    return False


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def check_given_data_root(root: Any, dataset: str, flag: str = FLAG) -> None:
    """ConfigError when ``root``, given as ``flag`` on the command line (or a config key, e.g. a new sweep's
    ``data_root``: the fix is worded for it), is not an existing folder that ``dataset`` reads (``READS_ROOT``) and
    does not download into (``downloads_into_root``): one paragraph with the value, what exists (the nearest folder
    above it; where the dataset would be read from instead) and the fix. Nothing is read or written. A dataset that
    reads no data root (digits, mnist5k, imagefolder:PATH) is not checked: the root holds none of its data, and is
    another dataset's (a sweep's CIFAR-10 target downloads into it); nor is a name that is no dataset (its own
    refusal, listing the datasets, comes where it is loaded)."""
    if root is None or str(dataset).partition(":")[0] not in READS_ROOT:
        return
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    if path.is_dir() or downloads_into_root(dataset):
        return
    elsewhere = _fashion_elsewhere()         # (Fashion-MNIST: downloads_into_root is False when a copy is elsewhere)
    give, drop = (f"Pass {flag}", f"drop {flag}") if flag.startswith("--") else (f"Set {flag} to", "leave it out")
    raise ConfigError(f"{flag} '{root}': no such folder ({path}; the nearest folder that exists is "
                      f"{_nearest_existing(path)}). '{dataset}' would be read from {elsewhere} instead, which is other "
                      f"data than a folder you named. {give} the folder that holds its files (check the spelling), or "
                      f"{drop} to read it from {elsewhere}.")


def check_sweep_data_root(root: Any, datasets: Any, flag: str = "data_root in the sweep config") -> None:
    """``check_given_data_root`` for each of a new sweep's datasets (its proxy and target), unless one of them
    downloads into ``root``: a new folder for a CIFAR-10 target is no typo, and a Fashion-MNIST proxy then reads
    its copy elsewhere (warned), as before."""
    datasets = list(dict.fromkeys(datasets))
    if root is None or any(downloads_into_root(d) for d in datasets):
        return
    for dataset in datasets:
        check_given_data_root(root, dataset, flag)
