"""The sweep's "transfer check": a short, fixed QAT fine-tune of a searched policy on the TARGET data.

Every trial of a sweep runs the identical check so that its ``transfer_top1`` numbers compare:
the same FP target model (trained once per sweep, ``prepare_target_model``), the same stratified
slices of the target train and test splits (``target_slices``, seeded), the same recipe
(``TransferCheck``). The searched policy (keyed by FQN) is applied to a copy of the FP target
model, the activation clips are calibrated on the first training batch, then ``epochs`` of QAT on
``train_size`` images and one evaluation on ``test_size`` images (gmpq_core.finetune, METHOD.md 6).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import DatasetInfo, canonical_data_source, load_dataset, make_loader, proxy
from .errors import CheckpointError, ConfigError, did_you_mean
from .fileio import atomic_write_json, load_checkpoint, load_model_state, read_json, save_checkpoint
from .finetune import FinetuneConfig, finetune
from .models import build_model, model_source_key
from .policy import BitPolicy
from .precision import resolve_precision
from .train import TrainConfig, evaluate, seeded, train_fp

__all__ = ["TransferCheck", "TargetModel", "target_slices", "prepare_target_model", "target_model_cached", "load_target_model",
           "run_transfer_check", "fp_reference_top1"]

log = logging.getLogger(__name__)
TARGET_CACHE_VERSION = 1    # bump when the FP target recipe changes: old cache files are then ignored
                            # (version 1 is not written into the key, so files made before it stay valid)


def _opt_count(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"transfer.{name} must be a positive integer or null (whole split), but got {name}={value!r}.")


def _pos(name: str, value: Any, *, integer: bool) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not value > 0:
        raise ConfigError(f"transfer.{name} must be > 0, but got {name}={value!r}.")


@dataclass(frozen=True, kw_only=True)
class TransferCheck:
    """Recipe of the transfer check and of the FP target model it starts from.

    ``train_size``/``test_size``: images in the fixed stratified target slices (None = whole split).
    ``epochs``/``lr``/``batch_size``/``max_steps_per_epoch``: the QAT fine-tune of each trial.
    ``fp_*``: the FP target model trained once per sweep (``fp_train_size`` None = whole train split).
    """
    train_size: int | None = 5000
    test_size: int | None = 2000
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.01
    max_steps_per_epoch: int | None = None
    seed: int = 0
    fp_epochs: int = 3
    fp_lr: float = 0.1
    fp_batch_size: int = 128
    fp_train_size: int | None = None
    fp_max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        for name in ("train_size", "test_size", "fp_train_size", "max_steps_per_epoch", "fp_max_steps_per_epoch"):
            _opt_count(name, getattr(self, name))
        for name in ("epochs", "batch_size", "fp_epochs", "fp_batch_size"):
            _pos(name, getattr(self, name), integer=True)
        for name in ("lr", "fp_lr"):
            _pos(name, getattr(self, name), integer=False)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"transfer.seed must be an integer, but got seed={self.seed!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TransferCheck":
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown transfer setting(s) {unknown}.{did_you_mean(unknown, known)} Known: {sorted(known)}.")
        return cls(**d)

    def finetune_config(self) -> FinetuneConfig:
        return FinetuneConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                              max_steps_per_epoch=self.max_steps_per_epoch)


@dataclass(frozen=True)
class TargetModel:
    """Where the FP target model lives, how it scores on the test slice (%), and how it was built."""
    path: Path
    top1: float
    seconds: float
    cached: bool
    meta: dict


def target_slices(bundle: Any, check: TransferCheck) -> tuple[Any, Any]:
    """The fixed (train, test) slices of a target DataBundle: stratified, seeded by ``check.seed``."""
    return proxy(bundle.train, check.train_size, seed=check.seed), proxy(bundle.test, check.test_size, seed=check.seed)


def _target_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]


def _target_meta(*, model: str, dataset: str, check: TransferCheck, data_root: str | None, image_size: int | None,
                 small_input: bool, legacy: bool = False) -> dict[str, Any]:
    """The FP target model's recipe and data (its cache key; paths made absolute). Not the device or the
    precision: they change its rounding, not its recipe (the precision is recorded beside it). Nor the test slice
    (``test_size``): it only measures the model (each slice's top-1 is kept beside it); ``legacy``: the key of files
    written before 2026-11-29, which held it (still read, so a warm cache stays warm)."""
    dataset, data_root = canonical_data_source(dataset, data_root)
    meta = {"model": model, "dataset": dataset, "data_root": data_root, "image_size": image_size,
            "small_input": bool(small_input), "fp_epochs": check.fp_epochs, "fp_lr": check.fp_lr,
            "fp_batch_size": check.fp_batch_size, "fp_train_size": check.fp_train_size,
            "fp_max_steps_per_epoch": check.fp_max_steps_per_epoch,
            **({"test_size": check.test_size} if legacy else {}), "seed": check.seed, **model_source_key(model)}
    if TARGET_CACHE_VERSION > 1:
        meta["version"] = TARGET_CACHE_VERSION
    return meta


def _target_file(*, cache_dir: str | Path, **key: Any) -> tuple[dict[str, Any], Path]:
    """The FP target model's cache key (``_target_meta`` of ``key``) and its file in ``cache_dir``: the file under the
    current key, else one an earlier version wrote for the same test slice, else (neither exists) the current one."""
    meta = _target_meta(**key)
    path = Path(cache_dir).expanduser() / f"target_fp_{_target_key(meta)}.pt"
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        old = Path(cache_dir).expanduser() / f"target_fp_{_target_key(_target_meta(**key, legacy=True))}.pt"
        if old.is_file() and old.with_suffix(".json").is_file():
            return meta, old
    return meta, path


def _slice_key(check: TransferCheck) -> str:
    return str(check.test_size)          # "None": the whole test split


def _slice_top1(info: dict[str, Any]) -> dict[str, float]:
    """Top-1 by test slice recorded in a cache file's JSON (files of earlier versions: the one they were keyed by)."""
    by = dict(info.get("top1_by_test_size") or {})
    if not by and "top1" in info:
        by[str((info.get("meta") or {}).get("test_size"))] = float(info["top1"])
    return by


def target_model_cached(*, model: str, dataset: str, check: TransferCheck, cache_dir: str | Path,
                        data_root: str | None = None, image_size: int | None = None,
                        small_input: bool = True) -> bool:
    """Whether ``prepare_target_model`` with these arguments would only read its cache (no training)."""
    _, path = _target_file(model=model, dataset=dataset, check=check, cache_dir=cache_dir, data_root=data_root,
                           image_size=image_size, small_input=small_input)
    return path.is_file() and path.with_suffix(".json").is_file()


def prepare_target_model(*, model: str, dataset: str, check: TransferCheck, cache_dir: str | Path,
                         data_root: str | None = None, image_size: int | None = None, small_input: bool = True,
                         device: str | torch.device = "cpu", progress: Any = None,
                         precision: str = "auto") -> TargetModel:
    """Train the FP target model once (SGD + cosine, ``fp_*`` recipe) and cache it in ``cache_dir``.

    The file name hashes everything that shapes the weights, so a second call (another trial, a
    resumed sweep) only reads the cache. Writes ``target_fp_<hash>.pt`` (state dict) and a
    ``.json`` beside it (the meta below plus the test-slice top-1 in %).
    """
    meta, path = _target_file(model=model, dataset=dataset, check=check, cache_dir=cache_dir, data_root=data_root,
                              image_size=image_size, small_input=small_input)
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        info = read_json(info_path)
        by_slice = _slice_top1(info)
        if _slice_key(check) not in by_slice:          # another test slice: measured once, kept beside the others
            net, _ = load_target_model(path, device)
            bundle = load_dataset(dataset, root=data_root, image_size=image_size)
            _, test = target_slices(bundle, check)
            by_slice[_slice_key(check)] = fp_reference_top1(net, test, bundle.info, device=device, precision=precision)
            atomic_write_json(info_path, {**info, "top1_by_test_size": by_slice})
        return TargetModel(path=path, top1=by_slice[_slice_key(check)], seconds=float(info.get("seconds") or 0.0),
                           cached=True, meta=info["meta"])
    bundle = load_dataset(dataset, root=data_root, image_size=image_size)
    info = bundle.info
    with seeded(check.seed):
        net = build_model(model, num_classes=info.num_classes, in_channels=info.in_channels, small_input=small_input,
                          input_size=info.image_size)
    train = proxy(bundle.train, check.fp_train_size, seed=check.seed)
    _, test = target_slices(bundle, check)
    cfg = TrainConfig(epochs=check.fp_epochs, lr=check.fp_lr, batch_size=check.fp_batch_size, seed=check.seed,
                      max_steps_per_epoch=check.fp_max_steps_per_epoch)
    train_loader = make_loader(train, info, batch_size=cfg.batch_size, train=True, seed=check.seed, device=device)
    test_loader = make_loader(test, info, batch_size=256, train=False, device=device)
    result = train_fp(net, train_loader, test_loader, config=cfg, device=device, progress=progress,
                      precision=precision)
    full_meta = {**meta, "num_classes": info.num_classes, "in_channels": info.in_channels,
                 "input_size": info.image_size}
    save_checkpoint(path, net.to("cpu").state_dict())
    atomic_write_json(info_path, {"meta": full_meta, "top1": result.top1, "seconds": result.seconds,
                                  "precision": resolve_precision(precision, device),
                                  "top1_by_test_size": {_slice_key(check): result.top1}})
    log.info("FP target model %s: top1 %.2f%% in %.1fs", path.name, result.top1, result.seconds)
    return TargetModel(path=path, top1=result.top1, seconds=result.seconds, cached=False, meta=full_meta)


def load_target_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the FP target model saved by ``prepare_target_model``; returns (model in eval mode, meta)."""
    path = Path(path)
    info_path = path.with_suffix(".json")
    if not info_path.is_file():
        raise CheckpointError(f"'{info_path}' is missing: the FP target model at '{path}' cannot be rebuilt. "
                              "Delete the cache folder entry and rerun the sweep to retrain it.")
    meta = read_json(info_path)["meta"]
    net = build_model(meta["model"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                      small_input=meta["small_input"], input_size=meta.get("input_size"))
    load_model_state(net, load_checkpoint(path), path, what="FP target model",
                     fix=f"'{info_path}' describes another model than the weights beside it: delete both files "
                         "and rerun the sweep to retrain the FP target model.")
    return net.to(device).eval(), meta


def run_transfer_check(fp_target_model: nn.Module, policy: BitPolicy, train_split: Any, test_split: Any,
                       info: DatasetInfo, *, check: TransferCheck, device: str | torch.device = "cpu",
                       progress: Any = None, precision: str = "auto") -> dict[str, Any]:
    """QAT-fine-tune ``policy`` on the fixed target train slice, evaluate on the fixed test slice.

    ``fp_target_model`` is not modified. Returns ``{"transfer_top1", "transfer_top5" (%),
    "transfer_seconds" (wall s), "transfer_epochs", "bitops_report"}``; the last is the
    ``BitOpsReport`` of the quantized target model at the target resolution.
    """
    t0 = time.perf_counter()
    cfg = check.finetune_config()
    train_loader = make_loader(train_split, info, batch_size=cfg.batch_size, train=True, seed=check.seed,
                               device=device)
    test_loader = make_loader(test_split, info, batch_size=256, train=False, device=device)
    result = finetune(fp_target_model, policy, train_loader, test_loader, config=cfg, input_size=info.image_size,
                      in_channels=info.in_channels, device=device, progress=progress, precision=precision)
    return {"transfer_top1": float(result.top1), "transfer_top5": float(result.top5),
            "transfer_seconds": time.perf_counter() - t0, "transfer_epochs": int(result.epochs_run),
            "bitops_report": result.bitops}


def fp_reference_top1(fp_target_model: nn.Module, test_split: Any, info: DatasetInfo, *,
                      device: str | torch.device = "cpu", precision: str = "auto") -> float:
    """Top-1 (%) of the FP target model on the fixed test slice (the ceiling of the transfer check)."""
    loader = make_loader(test_split, info, batch_size=256, train=False, device=device)
    return float(evaluate(fp_target_model, loader, device=device, precision=precision)["top1"])
