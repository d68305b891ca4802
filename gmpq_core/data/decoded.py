"""Decoded copies of gzip-compressed dataset files, kept on the local disk (``~/.cache/gmpq/data/*.npy``).

Decompressing Fashion-MNIST's training images takes ~0.25 s on one core, and every process that loads
the dataset paid it: each sweep trial's worker, each Ray Train worker of the final stage, each
``gmpq search``. ``cached_array(source, decode)`` decodes a file once and keeps the array as ``.npy``;
later loads read it back in ~10-30 ms. The folder is ``$GMPQ_DATA_CACHE_DIR`` when set (empty or ``off``:
no copies), else ``~/.cache/gmpq/data`` on each machine, also when ``$GMPQ_CACHE_DIR`` moves the model
cache (often to shared storage on a cluster, where reading 55 MB may cost more than decompressing). A
copy's name hashes the source's absolute path, and its size, modification time and inode, so a changed
or replaced source is decoded again, and writing its copy removes the copies of that file's older
versions. The copies are an optimisation only: a damaged one is decoded again and rewritten, and a
folder that cannot be written (read-only or missing home, full disk) is skipped with a debug log line.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..fileio import atomic_write

__all__ = ["cached_array", "decoded_path", "data_cache_dir"]

log = logging.getLogger(__name__)

_VERSION = 1      # bump when a reader's output for the same file changes


def data_cache_dir() -> Path | None:
    """The folder of the decoded copies (see the module doc); None when they are switched off."""
    env = os.environ.get("GMPQ_DATA_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "false", "no") else Path(env).expanduser()
    return Path("~/.cache/gmpq/data").expanduser()


def decoded_path(source: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Where the decoded copy of ``source`` lives in ``cache_dir``: ``<name>-<path hash>-<state hash>.npy``."""
    source = Path(source).resolve()
    st = source.stat()
    where = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    state = hashlib.sha256(f"{_VERSION}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{source.name.removesuffix('.gz')}-{where}-{state}.npy"


def cached_array(source: str | os.PathLike, decode: Callable[[Path], np.ndarray], *,
                 cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """``decode(source)``, read from its decoded copy when there is a valid one, else decoded and saved
    (``cache_dir``: default ``data_cache_dir()``)."""
    source = Path(source)
    try:
        folder = Path(cache_dir) if cache_dir is not None else data_cache_dir()
        path = None if folder is None else decoded_path(source, folder)
    except (OSError, RuntimeError) as e:      # no home directory (RuntimeError), a source we cannot stat
        log.debug("no decoded copy for %s (%s)", source, e)
        path = None
    if path is None:
        return decode(source)
    damaged = False
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, EOFError) as e:     # truncated or foreign file: decode again, overwrite it
        log.debug("decoded copy %s unreadable (%s); decoding %s again", path, e, source)
        damaged = True
    array = decode(source)
    if not damaged and path.exists():                # another process wrote it meanwhile
        return array
    try:
        atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
        for old in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.npy"):   # this file's older versions
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as e:
        log.debug("could not keep a decoded copy of %s in %s (%s)", source, path.parent, e)
    return array
