"""Quantization-aware fine-tuning of a policy-quantized model from FP weights (METHOD.md section 6).

Recipe: copy the FP model, apply the bit policy (fixed per-layer PACT/symmetric quantizers),
calibrate the activation clips on one batch, then train with SGD (momentum 0.9) and a per-step
cosine schedule, ``lr_t = lr * (1 + cos(pi * t / T)) / 2``. Optional knowledge distillation from the
FP model (kept in eval mode, no gradients):
``L = alpha * T^2 * KL(softmax(z_fp / T) || softmax(z_q / T)) + (1 - alpha) * CE(z_q, y)``.

With ``checkpoint_dir`` the state after each epoch is written atomically to
``checkpoint_dir/last.pt`` (tensors and plain containers only, read back with
``torch.load(weights_only=True)``); a later call with the same arguments resumes from it. The recipe, the
bit policy, the precision, the caller's ``run_info`` (e.g. the dataset and the model options) and the FP model
it started from (``state_digest`` of its weights, and the caller's ``fp_source``) are saved with it: a later call
with other ones is refused (CheckpointError), not resumed. ``epochs`` is the exception: a total above the epochs
the checkpoint has completed continues it, the cosine schedule rebuilt for the new total ``T`` (longer or shorter
than the checkpoint's run) and entered at the steps done (``lr_t`` above with the new ``T``, as the Ray Train final
stage does); a total the checkpoint has already completed is refused (a fine-tune cannot go back), except the
same total of a finished fine-tune (nothing is trained).
"""
from __future__ import annotations

import copy
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .bitops import BitOpsReport, count_bitops
from .bn_fold import frozen_teacher_
from .errors import CheckpointError, ConfigError
from .fileio import load_checkpoint, save_checkpoint
from .finetune_policy import policy_difference, policy_layers, recorded_policy_source
from .policy import BitPolicy, QuantSpec
from .precision import resolve_precision
from .qmodules import apply_policy_, calibrate_, quantized_layers
from .reporting import NullReporter, Reporter
from .train import (Progress, evaluate, load_optimizer_state, make_cosine_scheduler, make_optimizer, run_epochs,
                    seeded, set_cosine_position_, steps_per_epoch, training_layout_, validate_sgd_fields)

__all__ = ["FinetuneConfig", "FinetuneResult", "prepare_quantized", "finetune", "effective_policy",
           "run_info_changes", "state_digest", "recorded_fp", "fp_name", "check_resume_state", "resume_epochs",
           "epochs_left_ok", "policy_layers", "recorded_policy_source", "policy_difference", "CHECKPOINT_NAME"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
# Fields that must match between a checkpoint and the run resuming from it (they shape the schedule); ``epochs``
# may change while epochs are left to train (the run continues on the new total's schedule): _check_epochs.
_RESUME_KEYS = ("lr", "momentum", "weight_decay", "batch_size", "seed", "max_steps_per_epoch",
                "distill", "distill_alpha", "distill_temperature", "include_stem", "include_classifier", "nesterov")
_BEFORE_THE_KEY = {"nesterov": True}   # what a checkpoint from before a key existed was written with


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """QAT recipe (official: SGD momentum 0.9, lr 0.01 cosine, wd 4e-5; distillation is our switch, and so
    is ``nesterov``).

    ``batch_size`` is for the caller that builds the loaders; ``include_stem`` /
    ``include_classifier`` quantize those layers too, at 8 bits unless the policy names them.
    """
    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 4e-5
    batch_size: int = 128
    distill: bool = False
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    seed: int = 0
    max_steps_per_epoch: int | None = None
    include_stem: bool = False
    include_classifier: bool = False
    nesterov: bool = False

    def __post_init__(self) -> None:
        validate_sgd_fields(self)
        for name in ("distill", "include_stem", "include_classifier"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, but got {name}={getattr(self, name)!r}.")
        if isinstance(self.distill_alpha, bool) or not isinstance(self.distill_alpha, (int, float)) \
                or not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f"distill_alpha must be in [0, 1], but got distill_alpha={self.distill_alpha!r}. "
                              "Use e.g. 0.5 (half soft targets, half labels).")
        if isinstance(self.distill_temperature, bool) or not isinstance(self.distill_temperature, (int, float)) \
                or not self.distill_temperature > 0:
            raise ConfigError("distill_temperature must be > 0, but got "
                              f"distill_temperature={self.distill_temperature!r}. Use e.g. 4.0.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned quantized model, its test metrics (%), BitOPs, epochs run, seconds, history."""
    model: nn.Module
    top1: float
    top5: float
    bitops: BitOpsReport
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0     # epochs restored from checkpoint_dir (0: a fresh start)


def prepare_quantized(fp_model: nn.Module, policy: BitPolicy, calib_batch: Tensor, *, include_stem: bool = False,
                      include_classifier: bool = False) -> nn.Module:
    """A deep copy of ``fp_model`` with ``policy`` applied and clips calibrated on ``calib_batch``.

    ``calib_batch`` is an input batch ``[B, C, H, W]`` (moved to the model's device). The FP model is
    not modified. A policy that does not fit raises PolicyMismatchError. A policy searched with a
    quantized stem / classifier (its meta's ``include_stem`` / ``include_classifier`` and ``stem_bits``)
    is deployed the same way, whatever the arguments say.
    """
    scope = policy.quant_scope()
    model = copy.deepcopy(fp_model)
    apply_policy_(model, policy, include_stem=include_stem or scope["include_stem"],
                  include_classifier=include_classifier or scope["include_classifier"], stem_bits=scope["stem_bits"])
    p = next(model.parameters())
    calibrate_(model, calib_batch.to(device=p.device, dtype=p.dtype))
    return model


def effective_policy(model: nn.Module, policy: BitPolicy) -> BitPolicy:
    """The bits actually in ``model`` (the policy plus any quantized stem/classifier), for BitOPs."""
    layers = {n: QuantSpec(w_bits=m.w_bits, a_bits=m.a_bits) for n, m in quantized_layers(model).items()}
    return BitPolicy(layers=layers, fingerprint=policy.fingerprint, meta=policy.meta)


def _first_batch(loader: Any) -> Tensor:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    for x, _ in loader:
        return x
    raise ConfigError("The training loader is empty; fine-tuning needs at least one batch to calibrate the "
                      "activation clips (check batch_size and the training split's size).")


def run_info_changes(old: Any, new: Mapping[str, Any] | None) -> list[str]:
    """The keys of ``new`` (a fine-tune's ``run_info``) whose value differs from ``old``'s (a checkpoint's
    ``"run"`` entry). A checkpoint from before the entry (not a dict), or without a key, matches any value."""
    if not isinstance(old, dict) or not new:
        return []
    return [k for k in new if k in old and old[k] != new[k]]


def state_digest(state: nn.Module | Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a model's state dict (or of the dict itself): every entry's name, dtype, shape and values,
    in name order. It names the weights, not a file: the same for a copy, a move or a re-save of them, and for the
    model on any device or in any memory layout; one pass over the weights, already in memory."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, Tensor):
            h.update(f"{name}|{t!r}\n".encode())
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def recorded_fp(ckpt: Any) -> dict | None:
    """The FP model a fine-tune checkpoint records it started from (``{"sha256": ..., "source": path or None}``),
    or None for a checkpoint written before that record (which resumes from any FP model)."""
    fp = ckpt.get("fp") if isinstance(ckpt, dict) else None
    return fp if isinstance(fp, dict) and isinstance(fp.get("sha256"), str) else None


def fp_name(fp: Mapping[str, Any]) -> str:
    """A recorded FP model (``recorded_fp``) in words: its path and the start of its weights' sha256."""
    source = fp.get("source")
    return f"{f'the FP model {source!r}' if source else 'an FP model'} (weights sha256 {fp['sha256'][:12]})"


def _load_resume(path: Path, config: FinetuneConfig, policy: BitPolicy, precision: str,
                 run_info: Mapping[str, Any] | None = None, *, fp: Mapping[str, Any] | None = None,
                 state: Any = None) -> dict | None:
    """The checkpoint at ``path`` (``state`` when the caller has read it already), checked against this run;
    None when there is none."""
    if state is None:
        if not path.is_file():
            return None
        state = load_checkpoint(path)
    check_resume_state(path, state, config=config, policy=policy, precision=precision, run_info=run_info, fp=fp)
    return state


def check_resume_state(path: str | Path, ckpt: Any, *, config: FinetuneConfig | None = None,
                       policy: BitPolicy | None = None, precision: str | None = None,
                       run_info: Mapping[str, Any] | None = None, fp: Mapping[str, Any] | None = None) -> None:
    """Refuse (CheckpointError) the fine-tune checkpoint ``ckpt`` (read from ``path``) for a run that differs from it
    in what is given: ``run_info``, the FP model ``fp`` (``{"sha256": ...}``), the recipe ``config`` (``epochs`` above
    those it completed continue it, as many keep it as it is, fewer are refused), the resolved
    ``precision``, the ``policy``. Parts left None are not checked, so that a caller can check what it knows before
    a long step (``finetune`` checks them all)."""
    path = Path(path)
    if not isinstance(ckpt, dict) or not {"epoch", "model", "optimizer", "scheduler", "history"} <= set(ckpt):
        raise CheckpointError(f"Checkpoint '{path}' lacks the fine-tune state (epoch, model, optimizer, "
                              "scheduler, history); delete it to start the fine-tune afresh.")
    changed = run_info_changes(ckpt.get("run"), run_info)   # first: another dataset or model explains the rest
    if changed:
        was = ", ".join(f"{k}={ckpt['run'][k]!r}" for k in changed)
        now = ", ".join(f"{k}={run_info[k]!r}" for k in changed)
        raise CheckpointError(f"Checkpoint '{path}' was written by a fine-tune with {was}, but this run has {now}; "
                              "resume with the same settings, or use another checkpoint folder (or delete this one) "
                              "to start afresh.")
    old_fp = recorded_fp(ckpt)      # None: written before the record, resumed from any FP model
    if fp is not None and old_fp is not None and old_fp["sha256"] != fp["sha256"]:
        raise CheckpointError(f"Checkpoint '{path}' was written by a fine-tune started from {fp_name(old_fp)}, but "
                              f"this run starts from {fp_name(fp)}: the quantized model's start and the "
                              "distillation teacher would come from two FP models. Resume with the FP model it started "
                              "from, or use another checkpoint folder (or delete this one) to start afresh.")
    if config is not None:
        old_cfg = {**_BEFORE_THE_KEY, **ckpt.get("config", {})} if ckpt.get("config") else {}
        diff = [k for k in _RESUME_KEYS if k in old_cfg and old_cfg[k] != getattr(config, k)]
        if diff:
            k = diff[0]
            raise CheckpointError(f"Checkpoint '{path}' was written with {k}={old_cfg[k]!r} but this run has "
                                  f"{k}={getattr(config, k)!r}; resume with the same settings or delete the "
                                  "checkpoint folder to start afresh.")
        _check_epochs(path, ckpt, config.epochs)
    old_precision = ckpt.get("precision")     # None: written before the key (fp32, or bf16 on a GPU under auto)
    if precision is not None and old_precision is not None and old_precision != precision:
        raise CheckpointError(f"Checkpoint '{path}' was written by a fine-tune in precision {old_precision!r} but "
                              f"this run trains in {precision!r}; resume with --precision {old_precision} (the "
                              "`precision:` setting), or delete the checkpoint folder to start afresh.")
    old_layers = ckpt.get("policy_layers")
    now = policy_layers(policy) if policy is not None else None
    if now is not None and isinstance(old_layers, dict) and old_layers != now:
        source = recorded_policy_source(ckpt)
        named = f" ({source})" if source else ""
        raise CheckpointError(f"Checkpoint '{path}' belongs to a different bit policy{named} than this run's: "
                              f"{policy_difference(old_layers, now)}; use the policy it was written with, another "
                              "checkpoint folder, or delete this one to start afresh.")


def resume_epochs(ckpt: Mapping[str, Any]) -> tuple[int, int]:
    """(epochs completed, epochs of the run that wrote it) of a fine-tune checkpoint; the second is at least the
    first (a checkpoint without the recorded config: the epochs it completed)."""
    done = int(ckpt["epoch"])
    old = (ckpt.get("config") or {}).get("epochs")
    return done, max(done, old) if isinstance(old, int) and not isinstance(old, bool) else done


def epochs_left_ok(done: int, epochs: int) -> bool:
    """Whether a checkpoint with ``done`` epochs completed (``resume_epochs``) may run with ``epochs``: it continues
    when fewer than ``epochs`` are done, and is kept as it is (nothing left to train) when exactly ``epochs`` are,
    whether it finished its own run or was interrupted in a longer one (as the Ray Train final stage does); more
    done than ``epochs`` cannot go back."""
    return done <= epochs


def _check_epochs(path: Path, ckpt: Mapping[str, Any], epochs: int) -> None:
    """A checkpoint that has completed fewer than ``epochs`` epochs is continued (its cosine schedule set for the
    new total, longer or shorter than its own run's, as the Ray Train final stage does); one that has completed
    exactly ``epochs`` is kept as it is (nothing is left to train; an interrupted longer run's weights are those of
    its own schedule at that epoch, as in the Ray Train final stage); one that has completed more is refused: a
    fine-tune cannot go back."""
    done, need = resume_epochs(ckpt)
    if epochs_left_ok(done, epochs):
        return
    fix = (f"epochs={done} (or more, to continue it)" if done == need else
           f"epochs={done} to keep it as it is, epochs={done + 1} or more to continue it (epochs={need} finishes it "
           "as started)")
    raise CheckpointError(f"Checkpoint '{path}' holds a fine-tune of epochs={need!r} ({done} done), but this run has "
                          f"epochs={epochs!r}: it has already completed more epochs, and a fine-tune continues from "
                          f"its checkpoint and cannot go back. Resume with {fix}, or delete the checkpoint folder to "
                          "start afresh.")


def _recorded_total_steps(state: Mapping[str, Any]) -> int | None:
    """The schedule length ``T`` (optimizer steps) a checkpoint was trained under: its ``total_steps``, or for one
    written before that key, its cosine scheduler's ``T_max``."""
    total = state.get("total_steps")
    if total is None and isinstance(state.get("scheduler"), Mapping):
        total = state["scheduler"].get("T_max")
    return int(total) if isinstance(total, int) and not isinstance(total, bool) else None


def finetune(fp_model: nn.Module, policy: BitPolicy, train_loader: Any, test_loader: Any, *,
             config: FinetuneConfig, input_size: int, in_channels: int, reporter: Reporter | None = None,
             device: str | torch.device = "cpu", checkpoint_dir: str | Path | None = None,
             progress: Progress | None = None, precision: str = "auto",
             run_info: Mapping[str, Any] | None = None, fp_source: str | None = None,
             resume_state: Mapping[str, Any] | None = None, fp_digest: str | None = None,
             policy_source: str | None = None) -> FinetuneResult:
    """QAT of ``policy`` applied to a copy of ``fp_model``; ``fp_model`` itself is left unchanged.

    Reports ``{"top1","top5","loss","train_loss","train_top1","lr"}`` per epoch and honours
    ``should_stop()`` between epochs. ``epochs_run`` counts epochs completed in total, including
    those restored from ``checkpoint_dir``. BitOPs are counted at ``input_size`` px with
    ``in_channels`` input channels. ``precision``: precision.py (``auto``: bf16 autocast on a GPU with
    bfloat16, float32 elsewhere; the quantizers' grids and clips stay float32). ``run_info``: what else the
    checkpoint's state depends on, as plain values (e.g. ``{"dataset": "digits", "model": "resnet20",
    "input_size": 8}``); saved in the checkpoint, and a resume with another value of a key is refused (a
    checkpoint written without the key, or without ``run_info``, resumes). The checkpoint also records the FP
    model it started from: ``state_digest(fp_model)`` and ``fp_source`` (where ``fp_model`` came from, e.g. its
    file, named in a refusal); a resume from an FP model with other weights is refused, one with the same weights
    from elsewhere resumes (a checkpoint without the record resumes from any). ``resume_state``: the content of
    ``checkpoint_dir/last.pt`` (``load_checkpoint``) when the caller has read it already, checked and resumed from
    without reading the file again; ``fp_digest``: ``state_digest(fp_model)`` when the caller has it (not hashed
    again); ``policy_source``: where ``policy`` came from (its file, or "uniform W4A4"), recorded in the checkpoint
    and named when another policy's run is refused. A checkpoint that has completed fewer epochs than
    ``config.epochs`` is continued (its cosine schedule set for the new total, longer or shorter than its own:
    ``set_cosine_position_``); one that has completed as many is kept as it is (nothing trained, ``epochs_run ==
    resumed_from_epoch``: the result is the model evaluated again on ``test_loader``, which may hold other test
    images than the run that trained it; the history keeps the epochs' own figures); one that has completed more is
    refused (CheckpointError).
    """
    resolved = resolve_precision(precision, device)      # a bad value fails before any work
    if resume_state is not None and checkpoint_dir is None:
        raise ConfigError("resume_state is the content of checkpoint_dir/last.pt, but got checkpoint_dir=None. Pass "
                          "the checkpoint_dir it was read from, or leave out resume_state.")
    reporter = reporter or NullReporter()
    t0 = time.perf_counter()
    with seeded(config.seed, device):
        calib = _first_batch(train_loader)
    model = prepare_quantized(fp_model, policy, calib, include_stem=config.include_stem,
                              include_classifier=config.include_classifier)
    model = training_layout_(model.to(device), device, precision)
    teacher = None
    if config.distill:
        teacher = training_layout_(frozen_teacher_(copy.deepcopy(fp_model).to(device)), device, precision)
    optimizer = make_optimizer(model, config)
    steps = steps_per_epoch(train_loader, config.max_steps_per_epoch)
    total_steps = config.epochs * steps
    scheduler = make_cosine_scheduler(optimizer, total_steps)
    history: list[dict] = []
    start = 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    fp = {"sha256": fp_digest or state_digest(fp_model), "source": fp_source} if ckpt_path is not None else None
    if ckpt_path is not None:
        state = _load_resume(ckpt_path, config, policy, resolved, run_info, fp=fp, state=resume_state)
        if state is not None:
            model.load_state_dict(state["model"])
            load_optimizer_state(optimizer, state["optimizer"])
            history = [dict(h) for h in state["history"]]
            start = int(state["epoch"])
            if start >= config.epochs:
                log.info("the fine-tune in '%s' has completed %d epochs: nothing left to train", ckpt_path, start)
            elif _recorded_total_steps(state) == total_steps:
                scheduler.load_state_dict(state["scheduler"])
                log.info("resuming the fine-tune from '%s' after epoch %d", ckpt_path, start)
            else:           # another total: the schedule of the new total, entered at the steps done
                set_cosine_position_(optimizer, scheduler, start * steps, total_steps)
                log.info("continuing the fine-tune from '%s' after epoch %d to %d epochs (cosine schedule over "
                         "%d steps)", ckpt_path, start, config.epochs, total_steps)

    def save(epoch: int) -> None:
        if ckpt_path is None:
            return
        save_checkpoint(ckpt_path, {
            "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "history": history, "config": config.to_dict(),
            "precision": resolved, "policy_layers": policy_layers(policy),
            "run": dict(run_info or {}), "fp": fp, "total_steps": total_steps,
            **({"policy_source": policy_source} if policy_source else {})})

    metrics, done = run_epochs(model, train_loader, test_loader, optimizer=optimizer, scheduler=scheduler,
                               epochs=config.epochs, start_epoch=start, seed=config.seed,
                               max_steps=config.max_steps_per_epoch, reporter=reporter, device=device,
                               progress=progress, history=history, teacher=teacher,
                               distill_alpha=config.distill_alpha if config.distill else 0.0,
                               distill_temperature=config.distill_temperature, precision=precision,
                               after_epoch=save)
    if done == start and start > 0 and test_loader is not None:
        # nothing left to train: the result is this run's measurement on its own test images (the checkpoint's last
        # epoch was measured on the test images of the run that trained it, maybe another subset); the history
        # keeps the epochs' own figures
        metrics = evaluate(model, test_loader, device=device, precision=precision)
    report = count_bitops(model, effective_policy(model, policy), input_size, in_channels)
    return FinetuneResult(model=model, top1=metrics["top1"], top5=metrics["top5"], bitops=report,
                          epochs_run=done, seconds=time.perf_counter() - t0, history=history,
                          resumed_from_epoch=start)
