"""Users' own models: a model name ``MODULE:FUNCTION`` or ``PATH/FILE.py:FUNCTION`` names a builder outside the
registry, imported on first use (``pkg.nets:small_cnn``, ``./my_cnn.py:build``).

The builder is called as the registry's are, ``fn(num_classes=..., in_channels=..., small_input=...)``, and must
return an ``nn.Module`` whose quantizable layers are ``nn.Conv2d`` / ``nn.Linear``. Its Grad-CAM layer is the
builder's ``gradcam_layer`` attribute when it has one (the fully qualified name of the last convolutional stage),
else found by a forward pass (``attribution.find_feature_layer``).

A file path is made absolute (``canonical_model_name``) before it is saved in a sweep config or a checkpoint, so
Ray workers, resumes and model files find the same file; on a cluster it must lie on storage every node reads
(like the data). A module is imported by name: it must be installed, or on ``PYTHONPATH``, where every
worker runs. The model cache keys of such models include a digest of the builder's source file
(``model_source_digest``), so editing the file retrains their FP models instead of loading stale ones.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError

__all__ = ["is_import_spec", "canonical_model_name", "import_builder", "model_source_digest", "model_source_key",
           "model_file_tag", "BUILDER_ARGS"]

BUILDER_ARGS = ("num_classes", "in_channels", "small_input")
_LOADED: dict[str, Callable[..., nn.Module]] = {}
_HOW = ("A model of your own is named MODULE:FUNCTION (an importable module, e.g. 'mypkg.nets:small_cnn') or "
        "PATH.py:FUNCTION (a Python file, e.g. './my_cnn.py:build'); the function takes num_classes, in_channels "
        "and small_input as keyword arguments and returns an nn.Module.")


def is_import_spec(name: Any) -> bool:
    """Whether ``name`` names a builder outside the registry (it has a ``:``)."""
    return isinstance(name, str) and ":" in name


def _split(spec: str) -> tuple[str, str, bool]:
    """(module or file, function, is_file) of ``spec``; ConfigError when it is not MODULE:FUNCTION / FILE.py:FUNCTION."""
    where, _, attr = spec.rpartition(":")
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    ok_module = is_file or all(part.isidentifier() for part in where.split("."))
    if not where or not attr.isidentifier() or not ok_module:
        raise ConfigError(f"The model '{spec}' is neither a registered model nor a MODULE:FUNCTION / PATH.py:FUNCTION "
                          f"name of one of your own. {_HOW}")
    return where, attr, is_file


def canonical_model_name(name: str) -> str:
    """``name`` as saved in configs and checkpoints: a file path made absolute (``./my_cnn.py:build`` ->
    ``/home/me/my_cnn.py:build``); registered names and module names unchanged."""
    if not is_import_spec(name):
        return name
    where, attr, is_file = _split(name)
    return f"{Path(where).expanduser().absolute()}:{attr}" if is_file else name


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        py = path.with_name(path.name + ".py")
        if path.suffix != ".py" and py.is_file():
            attr = spec.rpartition(":")[2]
            raise ConfigError(f"The model '{spec}' names the file {path}, which does not exist, but {py} does: did "
                              f"you mean '{py}:{attr}'? A model file is named with its '.py' (PATH.py:FUNCTION).")
        kind = "is a folder, not a Python file" if path.is_dir() else "does not exist"
        raise ConfigError(f"The model '{spec}' names the file {path}, which {kind}. Give the path of the "
                          f"Python file that defines the builder (on a cluster, one every node can read). {_HOW}")
    key = f"gmpq_user_model_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    if key in sys.modules:
        return sys.modules[key]
    module_spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[key] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:                      # noqa: BLE001 - the user's code: any error, named with its file
        del sys.modules[key]
        raise ConfigError(f"Running the model file {path} (for the model '{spec}') failed: {type(e).__name__}: {e}. "
                          "Fix the file (run 'python " f"{path}' to see the traceback).") from e
    return module


def _import_module(where: str, spec: str) -> Any:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        local = Path(*where.split(".")).with_suffix(".py")
        hint = (f" There is a file {local} here: to use it, name it as a file, './{local.as_posix()}:"
                f"{spec.rpartition(':')[2]}'." if local.is_file() else "")
        raise ConfigError(f"The model '{spec}' names the module '{where}', which cannot be imported ({e}). Install "
                          "its package, or put its folder on PYTHONPATH (every Ray worker must import it too), or "
                          f"name the file instead (PATH.py:FUNCTION).{hint}") from None
    except Exception as e:                      # noqa: BLE001 - the user's code
        raise ConfigError(f"Importing the module '{where}' (for the model '{spec}') failed: {type(e).__name__}: "
                          f"{e}. Fix the module (run 'python -c \"import {where}\"' to see the traceback).") from e


def import_builder(spec: str) -> Callable[..., nn.Module]:
    """The builder ``spec`` names, imported once per process; ConfigError naming what is wrong and the fix."""
    spec = canonical_model_name(spec)
    if spec in _LOADED:
        return _LOADED[spec]
    where, attr, is_file = _split(spec)
    module = _import_file(Path(where), spec) if is_file else _import_module(where, spec)
    fn = getattr(module, attr, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise ConfigError(f"The model '{spec}': {where} has no function '{attr}'"
                          f"{' (its functions: ' + ', '.join(found) + ')' if found else ''}. {_HOW}")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):             # a builtin or C callable: take it on trust
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        missing = [a for a in BUILDER_ARGS if a not in params]
        if missing:
            raise ConfigError(f"The model builder '{spec}' does not take {', '.join(missing)}; gmpq calls it as "
                              f"{attr}(num_classes=..., in_channels=..., small_input=...) (add the arguments, or "
                              "**kwargs for those it ignores).")
    _LOADED[spec] = fn
    return fn


def model_source_digest(name: str) -> str | None:
    """A digest of the file that defines ``name``'s builder (None for a registered model, or when the source
    file cannot be read): part of the model cache keys, so editing the builder retrains its FP models."""
    if not is_import_spec(name):
        return None
    try:
        source = inspect.getsourcefile(import_builder(name))
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16] if source else None
    except (OSError, TypeError):
        return None


def model_source_key(name: str) -> dict[str, str]:
    """What a model cache key adds for ``name``: ``{"model_source": digest}`` for a user's builder (editing its
    file retrains the cached models), ``{}`` for a registered model (its keys stay as they were)."""
    digest = model_source_digest(name)
    return {"model_source": digest} if digest else {}


def model_file_tag(name: str) -> str:
    """A short, file-name-safe form of a model name (``/home/me/my_cnn.py:build`` -> ``build``)."""
    tag = name.rpartition(":")[2] if is_import_spec(name) else name
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in tag)[:40] or "model"
