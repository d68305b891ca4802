"""Atomic writes (temp file in the same folder + rename), safe checkpoint loading, the cache folder."""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:   # torch is imported where a checkpoint is read or written: folder readers start without it
    import torch

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "read_json", "save_checkpoint",
           "load_checkpoint", "check_writable_dir", "default_cache_dir", "absolute_path"]


def absolute_path(path: str | os.PathLike | None) -> str | None:
    """``~`` expanded and made absolute against the working directory, symlinks kept (None stays None)."""
    return os.path.abspath(os.path.expanduser(path)) if path else None


def default_cache_dir() -> str:
    """Where trained FP teachers and target models are kept between runs: ``$GMPQ_CACHE_DIR``, else
    ``~/.cache/gmpq`` (unexpanded; every file's name hashes what its weights depend on)."""
    return os.environ.get("GMPQ_CACHE_DIR") or "~/.cache/gmpq"


_UMASK_LOCK = threading.Lock()
_umask_seen: list[int] = []


def _umask() -> int:
    """The process umask: read from /proc where the system has it (Linux, no side effect), else set and
    restored once, under a lock, and remembered (another thread's write meanwhile could see a wrong mask)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        if not _umask_seen:
            mask = os.umask(0o077)
            os.umask(mask)
            _umask_seen.append(mask)
        return _umask_seen[0]


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = True) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync it, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never half of one. The file gets the
    permissions a plain ``open`` would give it (0666 less the umask), not the temp file's private 0600, so
    teammates, ``mlflow ui`` or Ray workers running as another user can read a shared sweep folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        except (AttributeError, OSError):    # no fchmod here, or a mount that refuses it: keep mkstemp's 0600
            pass
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or corrupted file raises CheckpointError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"File not found: '{path}'. Check the path.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{path}' is not valid JSON ({e}); the file is truncated or corrupted: "
                              "delete it or restore it from the run that wrote it.") from None


def save_checkpoint(path: str | os.PathLike, obj: Any) -> Path:
    """torch.save ``obj`` (state dicts, tensors, plain containers) atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with ``weights_only=True``; a missing/truncated/corrupted file raises CheckpointError."""
    import torch

    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.pt"))[:5]
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file: give the .pt file itself"
                              f"{' (it holds ' + ', '.join(found) + ')' if found else ''}.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: '{path}'. Check the path or rerun the stage that writes it.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for damaged zip/pickle data
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
        if head[:1] in (b"{", b"[") or path.suffix.lower() in (".json", ".yaml", ".yml", ".txt", ".csv"):
            raise CheckpointError(f"'{path}' is a text file, not a PyTorch checkpoint: give the .pt file (e.g. the fp.pt "
                                  "that 'gmpq train-fp' writes beside its fp_result.json).") from None
        reason = str(e).split("\n", 1)[0][:200]
        if "weights_only" in reason:         # torch's advice (load with weights_only=False) would mislead here
            reason = "torch.load with weights_only=True cannot unpickle it"
        raise CheckpointError(f"Checkpoint '{path}' cannot be read ({type(e).__name__}: {reason}). It is not a "
                              "checkpoint gmpq wrote, or it is truncated or corrupted: check the path; if it is one of "
                              "gmpq's own files, delete it and rerun the stage that writes it.") from None


def check_writable_dir(path: str | os.PathLike, *, what: str = "output folder", hint: str = "") -> Path:
    """Raise ConfigError unless ``path`` is a folder this process can write, or can be created as one.

    Creates nothing (a probe file in the nearest existing folder is made and removed at once), so
    commands call it before any compute: a bad ``--out`` fails in a second, not after the work.
    """
    path = Path(path).expanduser().absolute()
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    fix = hint or "pass a folder you can write"
    if not probe_dir.is_dir():
        raise ConfigError(f"The {what} '{path}' cannot be written: '{probe_dir}' is a file, not a folder; {fix}.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".gmpq_write_probe.", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"The {what} '{path}' cannot be written ({e.strerror} in '{probe_dir}'); {fix}.") from None
    return path
