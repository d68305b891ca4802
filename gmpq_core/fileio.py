"""Atomic writes (temp file in the same folder + rename), safe checkpoint loading, loading a state dict into a
model with a one-paragraph error when it belongs to another model, the cache folder."""
from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .errors import CheckpointError, ConfigError
from .temp_files import TEMP_SUFFIX, fsync_dir, remove_stale_temps, temp_prefix

if TYPE_CHECKING:   # torch is imported where a checkpoint is read or written: folder readers start without it
    import torch
    from torch import nn

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "read_json", "save_checkpoint",
           "load_checkpoint", "load_model_state", "check_writable_dir", "default_cache_dir", "absolute_path",
           "INT_SUFFIX", "integer_path", "drop_integer_file", "FP_CHECKPOINT_HINT", "QUANTIZED_MODEL_HINT"]

INT_SUFFIX = ".int.pt"       # gmpq export's integer file beside a model file


def integer_path(path: str | os.PathLike) -> Path:
    """Where ``gmpq export`` writes the integer file of the model file ``path``: beside it, ``<name>.int.pt``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".pt") + INT_SUFFIX)


def drop_integer_file(path: str | os.PathLike) -> Path | None:
    """Remove ``gmpq export``'s integer file beside the model file ``path`` (it holds the model that a rewrite of
    ``path`` with new weights replaced); returns its path, None when there was none."""
    stale = integer_path(path)
    if not stale.is_file():
        return None
    stale.unlink()
    return stale


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
    teammates, ``mlflow ui`` or Ray workers running as another user can read a shared sweep folder. The temp file
    names its writer (``temp_files``): one a killed writer left is removed by the next write of ``path``; the
    folder is fsynced after the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
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
    fsync_dir(path.parent)                   # the rename itself survives a power loss
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


FP_CHECKPOINT_HINT = "give the .pt file (e.g. the fp.pt that 'gmpq train-fp' writes beside its fp_result.json)"
QUANTIZED_MODEL_HINT = ("give a quantized model file: DIR/models/<trial_id>.pt of a sweep after 'gmpq finetune "
                        "--sweep DIR', or the quantized.pt in the folder of 'gmpq finetune --policy FILE --out "
                        "DIR' (a policy JSON becomes one through that fine-tune)")


_OTHER_FORMATS = ((b"PAR1", "a Parquet table"), (b"\x89PNG", "a PNG image"), (b"SQLite format 3", "an SQLite database"),
                  (b"\x1f\x8b", "a gzip file"))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, mmap: bool = False,
                    text_hint: str = FP_CHECKPOINT_HINT) -> Any:
    """torch.load with ``weights_only=True``; a missing/truncated/corrupted file raises CheckpointError. ``mmap``:
    the tensors are mapped from the file, read only when used (a caller after one small field). ``text_hint``: the
    fix named when ``path`` is a text file (a JSON policy, a YAML config), worded for the file the caller wants."""
    import torch

    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.pt"))[:5]
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file: give the .pt file itself"
                              f"{' (it holds ' + ', '.join(found) + ')' if found else ''}.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: '{path}'. Check the path or rerun the stage that writes it.")
    if not mmap:                             # torch.load checks no checksum: changed bytes load as other weights
        _check_crc(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for damaged zip/pickle data
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
        if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
            raise CheckpointError(f"Checkpoint '{path}' is truncated or corrupted: its end (the zip directory) is "
                                  f"missing, as after a copy, download or write that did not finish. "
                                  f"{_damaged_fix(path)}") \
                from None
        if head[:1] in (b"{", b"[") or path.suffix.lower() in (".json", ".yaml", ".yml", ".txt", ".csv"):
            raise CheckpointError(f"'{path}' is a text file, not a PyTorch checkpoint: {text_hint}.") from None
        kind = next((k for magic, k in _OTHER_FORMATS if head.startswith(magic)), None)
        if kind is not None:                 # another tool's file: no advice to delete it (a sweep's trials.parquet)
            raise CheckpointError(f"'{path}' is {kind}, not a PyTorch checkpoint (no file torch.save wrote): "
                                  f"{text_hint}.") from None
        reason = str(e).split("\n", 1)[0][:200]
        if "weights_only" in reason:         # torch's advice (load with weights_only=False) would mislead here
            reason = "torch.load with weights_only=True cannot unpickle it"
        raise CheckpointError(f"Checkpoint '{path}' cannot be read ({type(e).__name__}: {reason}). It is not a "
                              "checkpoint gmpq wrote, or it is truncated or corrupted: check the path; if it is one of "
                              "gmpq's own files, delete it and rerun the stage that writes it.") from None


def _damaged_fix(path: Path) -> str:
    """The way back from a damaged file: a model file's own command where the name tells which it is."""
    how = ("Copy it again from where it came from; if gmpq wrote it, delete it and rerun the stage that writes it")
    if path.name.endswith(INT_SUFFIX):
        return how + " ('gmpq export' on its float model file)."
    if path.parent.name == "models":
        return how + (" (a sweep's models/<trial_id>.pt: 'gmpq finetune --sweep DIR' writes it again from its "
                      "fine-tune checkpoint, training nothing).")
    return how + "."


def _part_reads(z: Any, info: Any) -> bool:
    """Whether the part ``info`` of the open zip ``z`` reads to its end with the CRC-32 recorded for it (zipfile
    checks it at the end; what ``ZipFile.testzip`` does for each part)."""
    try:
        with z.open(info) as f:
            while f.read(1 << 20):
                pass
    except zipfile.BadZipFile:
        return False
    return True


def _check_crc(path: Path) -> None:
    """CheckpointError when a zip-format checkpoint (torch.save's) has a part whose bytes no longer match the
    CRC-32 written with them (a flipped or overwritten byte on disk or in transfer): torch.load would read it
    without a word, and the model would predict from damaged weights. A part recorded with CRC 0 is not checked:
    torch.save writes 0 for every part when its checksums are off (``torch.serialization.set_crc32_options(False)``),
    and such a file is as torch wrote it."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = next((i.filename for i in z.infolist() if i.CRC and not _part_reads(z, i)), None)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return                               # not a zip checkpoint (or cut short): torch.load's error says more
    if bad is not None:
        raise CheckpointError(f"Checkpoint '{path}' is corrupted: its part {bad!r} no longer matches the checksum "
                              "written with it (bytes changed after torch.save wrote the file: a disk, copy or "
                              f"transfer error); nothing was loaded from it. {_damaged_fix(path)}")


_SHOWN = 3      # example keys per list in a mismatch message


def load_model_state(model: nn.Module, state: Any, path: str | os.PathLike, *, what: str = "checkpoint",
                     expected: str | None = None, fix: str | None = None) -> None:
    """``model.load_state_dict(state)`` (strict) for a ``state`` read from the file ``path``.

    A ``state`` that is not a state dict, or one of another model, raises CheckpointError: one paragraph naming
    the file (as ``what``), the model it seems to hold (a registered model with its in_channels / num_classes /
    small_input, read from the tensors' names and shapes), the model ``expected`` here (default: the same reading
    of ``model``), a few of the missing, unexpected and mis-shaped keys with their counts, and ``fix`` (default:
    give a checkpoint of this model or retrain it), instead of PyTorch's list of every key. As with PyTorch's
    strict load, a failed load may have copied the matching tensors already: discard ``model`` then.
    """
    import torch

    fix = fix or "Give a checkpoint of this model, build the model the checkpoint was trained for, or retrain it."
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"The {what} '{path}' does not hold a model's state dict (parameter names -> tensors): "
                              f"it holds {_kind(state)}. Give the file of the model's weights themselves, as "
                              "torch.save(model.state_dict(), path) writes it.")
    try:
        model.load_state_dict(state)
        return
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:300]       # shown only if the comparison below finds no difference
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    reshaped = [f"{k} {list(state[k].shape)} in the file vs {list(own[k].shape)} here"       # classifier first
                for k in sorted(reshaped, key=lambda k: own[k].ndim != 2)]
    held, built = _registered_model_of(state), expected or _registered_model_of(own)
    if held:
        head = f"The {what} '{path}' holds {held}, but {built or 'another model'} is built here"
    else:
        head = f"The {what} '{path}' ({len(state)} tensors) does not fit the model built here"
        head += f", {built}" if built else ""
    parts = [f"{name} keys {_examples(keys)}" for name, keys in (("missing", missing), ("unexpected", unexpected))
             if keys]
    if reshaped:
        more = f" (and {len(reshaped) - 2} more)" if len(reshaped) > 2 else ""
        parts.append(f"other shapes: {'; '.join(reshaped[:2])}{more}")
    detail = ", ".join(parts) or f"PyTorch says: {reason}"
    prefixed = unexpected and all(k.startswith("module.") for k in unexpected) and \
        {k[len("module."):] for k in unexpected} >= set(missing)
    hint = (" Its keys carry the 'module.' prefix of a DistributedDataParallel wrapper: save "
            "model.module.state_dict() instead." if prefixed else "")
    raise CheckpointError(f"{head}: {detail}.{hint} {fix}") from None


def _examples(keys: list[str]) -> str:
    """``['a', 'b', 'c', ...] (62 in all)``: the first few keys and the count."""
    more = f", ...] ({len(keys)} in all)" if len(keys) > _SHOWN else "]"
    return "[" + ", ".join(repr(k) for k in keys[:_SHOWN]) + more


def _kind(obj: Any) -> str:
    """What a loaded object is, in a few words (for a file that is not a state dict)."""
    if isinstance(obj, Mapping):
        if not obj:
            return "an empty dict"
        keys = ", ".join(repr(str(k)) for k in list(obj)[:4]) + (", ..." if len(obj) > 4 else "")
        kind = f"a '{obj['format']}' file: " if isinstance(obj.get("format"), str) else ""   # e.g. a quantized model
        return f"{kind}a dict of {len(obj)} entries ({keys}), not tensors"
    return f"a {type(obj).__name__}"


def _registered_model_of(state: Mapping[str, Any]) -> str | None:
    """The registered model whose parameter names ``state`` has, with the options its shapes imply:
    "a resnet20 (in_channels=1, num_classes=10)"; None when no registered model has these names.

    Built on the meta device (shapes only, nothing allocated). ``small_input`` is named where the shapes tell it
    (the stem's kernel of the torchvision ResNets); "other layer widths" where no variant has these shapes."""
    import torch

    from .models import build_model, list_models

    names = set(state)
    for name in list_models():
        if _state_names(name) != names:
            continue
        with torch.device("meta"):
            ref = build_model(name).state_dict()
        convs = [k for k, v in ref.items() if v.ndim == 4]
        linears = [k for k, v in ref.items() if v.ndim == 2]
        if not convs or not linears:
            return f"a {name}"
        if state[convs[0]].ndim != 4 or state[linears[-1]].ndim != 2:
            return f"a {name} (other layer shapes than gmpq builds)"
        in_ch, classes = int(state[convs[0]].shape[1]), int(state[linears[-1]].shape[0])
        fits = []
        for small in (True, False):
            try:
                with torch.device("meta"):
                    variant = build_model(name, num_classes=classes, in_channels=in_ch, small_input=small).state_dict()
            except Exception:       # noqa: BLE001 (shapes no builder takes, e.g. 0 classes: nothing to name)
                continue
            if all(tuple(variant[k].shape) == tuple(state[k].shape) for k in variant):
                fits.append(small)
        opts = f"in_channels={in_ch}, num_classes={classes}" + (f", small_input={fits[0]}" if len(fits) == 1 else "")
        return f"a {name} ({opts}{'' if fits else '; other layer widths than gmpq builds'})"
    return None


@functools.lru_cache(maxsize=None)
def _state_names(name: str) -> frozenset[str]:
    """The state-dict keys of the registered model ``name`` (the same for every num_classes / in_channels)."""
    import torch

    from .models import build_model

    with torch.device("meta"):
        return frozenset(build_model(name).state_dict())


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
