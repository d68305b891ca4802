"""Decoded copies of gzip-compressed dataset files, kept in the model cache (``<cache>/data/*.npy``).

Decompressing Fashion-MNIST's training images takes ~0.25 s on one core, and every process that loads
the dataset paid it: each sweep trial's worker, each Ray Train worker of the final stage, each
``gmpq search``. ``cached_array(source, decode)`` decodes a file once and keeps the array as ``.npy``
beside the cached teachers (``$GMPQ_CACHE_DIR/data``, else ``~/.cache/gmpq/data``; ``$GMPQ_DATA_CACHE_DIR``
names another folder: the tests share one across their per-test model caches); later loads read it back in
~10 ms. The file's name hashes the source's absolute path, size and modification time, so a changed or
replaced source is decoded again. The cache is an optimisation only: a damaged copy is decoded again
and rewritten, and a cache folder that cannot be written (read-only home, full disk) is skipped with a
debug log line.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..fileio import atomic_write, default_cache_dir

__all__ = ["cached_array", "decoded_path"]

log = logging.getLogger(__name__)

_VERSION = 1      # bump when a reader's output for the same file changes


def decoded_path(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the decoded copy of ``source`` lives: ``<cache_dir>/<name>-<hash>.npy`` (default folder: above)."""
    source = Path(source).resolve()
    st = source.stat()
    key = f"{_VERSION}|{source}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = source.name.removesuffix(".gz")
    if cache_dir is None:
        cache_dir = os.environ.get("GMPQ_DATA_CACHE_DIR") or Path(default_cache_dir()) / "data"
    return Path(cache_dir).expanduser() / f"{stem}-{digest}.npy"


def cached_array(source: str | os.PathLike, decode: Callable[[Path], np.ndarray], *,
                 cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """``decode(source)``, read from its decoded copy when there is a valid one, else decoded and saved."""
    source = Path(source)
    path = decoded_path(source, cache_dir)
    try:
        array = np.load(path, allow_pickle=False)
        if isinstance(array, np.ndarray):
            return array
    except FileNotFoundError:
        pass
    except (OSError, ValueError, EOFError) as e:     # truncated or foreign file: decode again, overwrite it
        log.debug("decoded copy %s unreadable (%s); decoding %s again", path, e, source)
    array = decode(source)
    try:
        atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
    except OSError as e:
        log.debug("could not keep a decoded copy of %s in %s (%s)", source, path.parent, e)
    return array
