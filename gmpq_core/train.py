"""Full-precision training and evaluation loops (the FP teacher on a proxy, the FP model on the target).

Shapes: loaders yield ``(x, y)`` with x float32 ``[B, C, H, W]`` and y int64 ``[B]``. Accuracies
are percentages in 0..100 (``top1``, ``top5``); losses are mean cross-entropy per image (nats).

The optimiser is SGD with Nesterov momentum and a cosine learning-rate schedule stepped once per
batch, ``lr_t = lr * (1 + cos(pi * t / T)) / 2`` over ``T = epochs * steps_per_epoch`` steps.
Optional knowledge distillation (Hinton et al. 2015) mixes the soft and hard losses,
``L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)``.

Loops never print: they report once per epoch through a ``Reporter`` and call an optional
``progress(done_batches, total_batches)`` per batch (the CLI draws a bar with it).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, NonFiniteLossError
from .precision import at_least_float32, autocast, resolve_precision
from .reporting import NullReporter, Reporter

__all__ = ["TrainConfig", "TrainResult", "training_layout_", "standard_layout_", "evaluate", "train_one_epoch",
           "train_fp", "distillation_loss", "make_optimizer", "make_cosine_scheduler", "steps_per_epoch", "seeded",
           "run_epochs", "Progress", "sgd", "load_optimizer_state", "set_cosine_position_"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def _check_positive(name: str, value: Any, *, integer: bool, allow_zero: bool = False, hint: str = "") -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (value >= 0 if allow_zero else value > 0) \
            or (not integer and not math.isfinite(value)):
        kind = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite {kind} {bound}, but got {name}={value!r}.{hint}")


def validate_sgd_fields(cfg: Any) -> None:
    """Shared checks of the optimiser fields of TrainConfig / FinetuneConfig."""
    _check_positive("epochs", cfg.epochs, integer=True, hint=" Use e.g. epochs=2.")
    _check_positive("lr", cfg.lr, integer=False, hint=" Use e.g. lr=0.1.")
    _check_positive("batch_size", cfg.batch_size, integer=True, hint=" Use e.g. batch_size=128.")
    _check_positive("weight_decay", cfg.weight_decay, integer=False, allow_zero=True)
    if isinstance(cfg.momentum, bool) or not isinstance(cfg.momentum, (int, float)) or not 0 <= cfg.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), but got momentum={cfg.momentum!r}. Use e.g. momentum=0.9.")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, but got seed={cfg.seed!r}.")
    if cfg.max_steps_per_epoch is not None:
        _check_positive("max_steps_per_epoch", cfg.max_steps_per_epoch, integer=True,
                        hint=" Use None for whole epochs.")
    if not isinstance(cfg.nesterov, bool):
        raise ConfigError(f"nesterov must be True or False, but got nesterov={cfg.nesterov!r}.")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """FP training recipe (ours: METHOD.md leaves it open): SGD with Nesterov momentum + per-step cosine
    schedule from ``lr`` to 0.

    ``batch_size`` is for the caller that builds the loaders (the loops take loaders as given);
    ``max_steps_per_epoch`` caps every epoch at that many batches (quick runs, tests).
    """
    epochs: int = 2
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    seed: int = 0
    max_steps_per_epoch: int | None = None
    nesterov: bool = True

    def __post_init__(self) -> None:
        validate_sgd_fields(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """Final test metrics (percentages / nats), epochs actually run, wall seconds, per-epoch history."""
    top1: float
    top5: float
    loss: float
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)


# -- helpers shared with finetune ---------------------------------------------------------------
@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run the body with ``torch.manual_seed(seed)`` and restore the caller's RNG state afterwards."""
    dev = torch.device(device)
    cuda = [dev.index or 0] if dev.type == "cuda" and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def steps_per_epoch(loader: Any, max_steps: int | None) -> int:
    n = len(loader)
    return n if max_steps is None else min(n, max_steps)


def training_layout_(model: nn.Module, device: str | torch.device, precision: str = "auto") -> nn.Module:
    """``model`` in the memory format that trains fastest on ``device``, in place: channels_last on the CPU
    (oneDNN's convolutions skip their layout conversions; the demo's ResNet-20 trains 1.2x faster, its
    quantized fine-tune 1.18x, ResNet-18 at 32 px 1.13x and 1.10x, MobileNetV2 1.3-1.6x (a scratch run):
    benchmarks/bench_qat_step.py --layouts) and on a GPU in bf16 (``precision``, precision.py: the
    tensor cores' layout, as the GPU benchmarks run), unchanged on a GPU in float32 (not measured).
    Values are the same; inputs may stay NCHW (a channels_last weight makes the convolution's output
    channels_last). Returns the model. ``standard_layout_`` undoes it."""
    dev = torch.device(device)
    if dev.type == "cpu" or (dev.type == "cuda" and resolve_precision(precision, dev) == "bf16"):
        model.to(memory_format=torch.channels_last)
    return model


def standard_layout_(model: nn.Module) -> nn.Module:
    """``model`` back in the standard (NCHW) memory format, in place; returns it."""
    return model.to(memory_format=torch.contiguous_format)


FUSED_SGD_DEVICES = ("cpu", "cuda")    # where torch has a fused SGD kernel (see sgd)


def sgd(params: Iterable, **kwargs: Any) -> torch.optim.SGD:
    """``torch.optim.SGD(params, **kwargs)`` with torch's fused kernel (one pass over each parameter, its
    gradient and momentum buffer) when every parameter is a floating-point tensor on a CPU or CUDA device,
    else torch's default implementation. Same update up to float rounding. Inside FP training on the 2-core
    CPU the optimizer step is 1.4-1.5x faster and ResNet-18's whole step (32 px, batch 64) 1.05x; ResNet-20's
    is unchanged (benchmarks/bench_optimizer.py). Every optimizer of the product's loops is made here."""
    groups = list(params)
    if groups and isinstance(groups[0], dict):       # parameter groups: params as lists (a generator reads once)
        groups = [{**g, "params": list(g["params"])} for g in groups]
        tensors = [t for g in groups for t in g["params"]]
    else:
        tensors = groups
    fused = bool(tensors) and all(isinstance(t, Tensor) and t.device.type in FUSED_SGD_DEVICES
                                  and t.is_floating_point() for t in tensors)
    return torch.optim.SGD(groups, fused=True if fused else None, **kwargs)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` keeping the optimizer's own implementation flags (``fused``,
    ``foreach``): a checkpoint written by another implementation (before ``sgd`` chose the fused one, or on
    another device) would otherwise bring its flags along."""
    impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for g, flags in zip(optimizer.param_groups, impl):
        g.update(flags)


def make_optimizer(model: nn.Module, cfg: Any) -> torch.optim.SGD:
    return sgd([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=cfg.momentum,
               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)


def make_cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay to 0 over ``total_steps`` optimiser steps (stepped per batch)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(total_steps), 1), eta_min=0.0)


def set_cosine_position_(optimizer: torch.optim.Optimizer, scheduler: Any, done_steps: int, total_steps: int) -> None:
    """Put a fresh ``make_cosine_scheduler(optimizer, total_steps)`` at step ``done_steps``:
    ``lr_t = lr * (1 + cos(pi * t / T)) / 2`` with ``t = min(done_steps, T)``. A fine-tune continued to more epochs
    enters the new total's schedule where it stands (``gmpq_core.finetune`` and the Ray Train final stage)."""
    t = min(int(done_steps), int(total_steps))
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * (1 + math.cos(math.pi * t / max(int(total_steps), 1))) / 2
    scheduler.last_epoch = t
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _batches(loader: Iterable, limit: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            return
        yield batch


def _correct_topk(logits: Tensor, y: Tensor) -> tuple[int, int]:
    """Number of images whose label is the top-1 / within the top-5 (top-k with k = min(5, classes))."""
    k = min(5, logits.shape[1])
    top = at_least_float32(logits).topk(k, dim=1).indices   # bf16 logits (autocast) would tie more often
    hit = top.eq(y.unsqueeze(1))
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: str | torch.device = "cpu",
             max_batches: int | None = None, precision: str = "auto") -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` in eval mode over ``loader``
    (forward passes under ``precision``'s autocast, precision.py).

    The model's train/eval mode is restored afterwards. An empty loader raises ConfigError.
    """
    cast = autocast(precision, device)
    was_training = model.training
    model.eval()
    n = c1 = c5 = 0
    loss_sum = 0.0
    try:
        for x, y in _batches(loader, max_batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with cast:
                logits = model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            a, b = _correct_topk(logits, y)
            c1, c5, n = c1 + a, c5 + b, n + y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError("evaluate() got an empty loader (0 images); give a test split with at least one batch.")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n}


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, y: Tensor, *, alpha: float,
                      temperature: float) -> Tensor:
    """``alpha * T^2 * KL(p_T || p_S) + (1 - alpha) * CE(z_S, y)`` with softened ``p = softmax(z / T)``."""
    ce = F.cross_entropy(student_logits, y)
    if alpha <= 0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits.detach() / t, dim=1),
                  reduction="batchmean", log_target=True)
    return alpha * kl * (t * t) + (1.0 - alpha) * ce


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                    scheduler: Any = None, teacher: nn.Module | None = None, distill_alpha: float = 0.0,
                    distill_temperature: float = 4.0, device: str | torch.device = "cpu",
                    max_steps: int | None = None, progress: Progress | None = None,
                    epoch: int | None = None, precision: str = "auto") -> dict:
    """One pass of SGD over ``loader`` (at most ``max_steps`` batches); returns ``{"loss","top1","top5"}``.

    ``loss`` is the mean training loss per image (the distillation mix when a teacher is given),
    accuracies the running training accuracy in %. ``scheduler`` is stepped after every batch. The
    teacher runs in eval mode without gradients. Forward passes and losses run under ``precision``'s
    autocast (precision.py), the backward pass and the update outside it. A NaN/inf loss raises
    NonFiniteLossError naming the step (and ``epoch``, 1-based, when given) before any update is applied.
    """
    if not 0.0 <= distill_alpha <= 1.0:
        raise ConfigError(f"distill_alpha must be in [0, 1], but got distill_alpha={distill_alpha!r}.")
    if distill_temperature <= 0:
        raise ConfigError(f"distill_temperature must be > 0, but got distill_temperature={distill_temperature!r}.")
    use_teacher = teacher is not None and distill_alpha > 0
    if use_teacher:
        teacher.eval()
    model.train()
    cast = autocast(precision, device)
    total = steps_per_epoch(loader, max_steps)
    n = c1 = c5 = 0
    loss_sum = 0.0
    for step, (x, y) in enumerate(_batches(loader, max_steps), start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with cast:
            logits = at_least_float32(model(x))             # losses in float32 under bf16 autocast too
            if use_teacher:
                with torch.no_grad():
                    t_logits = at_least_float32(teacher(x))
                loss = distillation_loss(logits, t_logits, y, alpha=distill_alpha, temperature=distill_temperature)
            else:
                loss = F.cross_entropy(logits, y)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            where = f"epoch {epoch}, step {step}" if epoch is not None else f"step {step}"
            lr = optimizer.param_groups[0]["lr"]
            raise NonFiniteLossError(
                f"The training loss became {loss_value} at {where} (lr={lr:.3g}). Lower the learning rate, "
                "check the input data for NaN/inf values, or raise the bitwidths.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        a, b = _correct_topk(logits.detach(), y)
        c1, c5, n = c1 + a, c5 + b, n + y.numel()
        loss_sum += loss_value * y.numel()
        if progress is not None:
            progress(step, total)
    if n == 0:
        raise ConfigError("train_one_epoch() got an empty loader (0 images); give a training split with "
                          "at least one batch (check batch_size and drop_last).")
    return {"loss": loss_sum / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def run_epochs(model: nn.Module, train_loader: Any, test_loader: Any, *, optimizer: torch.optim.Optimizer,
               scheduler: Any, epochs: int, start_epoch: int, seed: int, max_steps: int | None,
               reporter: Reporter, device: str | torch.device, progress: Progress | None,
               history: list[dict], teacher: nn.Module | None = None, distill_alpha: float = 0.0,
               distill_temperature: float = 4.0, precision: str = "auto",
               after_epoch: Callable[[int], None] | None = None) -> tuple[dict, int]:
    """The epoch loop shared by ``train_fp`` and ``finetune``; returns (last metrics, epochs completed).

    Epoch ``e`` (1-based) runs under ``torch.manual_seed(seed + e)`` inside a forked RNG, and the
    loader's ``set_epoch(e - 1)`` fixes its order, so a run resumed after epoch k repeats an
    uninterrupted one. ``should_stop`` is checked between epochs (after reporting).
    """
    metrics: dict = dict(history[-1]) if history else {}
    done = start_epoch
    for epoch in range(start_epoch + 1, epochs + 1):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch - 1)
        with seeded(seed + epoch, device):
            tr = train_one_epoch(model, train_loader, optimizer, scheduler=scheduler, teacher=teacher,
                                 distill_alpha=distill_alpha, distill_temperature=distill_temperature,
                                 device=device, max_steps=max_steps, progress=progress, epoch=epoch,
                                 precision=precision)
        ev = evaluate(model, test_loader, device=device, precision=precision) if test_loader is not None else \
            {"top1": tr["top1"], "top5": tr["top5"], "loss": tr["loss"]}
        metrics = {"epoch": epoch, **ev, "train_loss": tr["loss"], "train_top1": tr["top1"],
                   "lr": float(optimizer.param_groups[0]["lr"])}
        history.append(metrics)
        done = epoch
        if after_epoch is not None:
            after_epoch(epoch)
        reporter.report(epoch, metrics)
        log.debug("epoch %d: %s", epoch, metrics)
        if epoch < epochs and reporter.should_stop():
            log.info("stopping after epoch %d of %d (reporter asked)", epoch, epochs)
            break
    return metrics, done


def train_fp(model: nn.Module, train_loader: Any, test_loader: Any = None, *, config: TrainConfig,
             reporter: Reporter | None = None, device: str | torch.device = "cpu",
             progress: Progress | None = None, precision: str = "auto") -> TrainResult:
    """Train ``model`` in place (moved to ``device``; trained in ``training_layout_`` and handed back in the
    standard layout, as a model loaded from a file is) with SGD + cosine; evaluate after every epoch.

    Reports ``{"top1","top5","loss","train_loss","train_top1","lr"}`` per epoch (test metrics; the
    training ones when ``test_loader`` is None). Deterministic for ``config.seed`` and the loader's
    seed; the caller's global RNG state is left untouched. ``precision``: precision.py (``auto``: bf16
    autocast on a GPU with bfloat16, float32 elsewhere).
    """
    resolve_precision(precision, device)                 # a bad value fails before the model moves
    reporter = reporter or NullReporter()
    t0 = time.perf_counter()
    training_layout_(model.to(device), device, precision)
    total_steps = config.epochs * steps_per_epoch(train_loader, config.max_steps_per_epoch)
    optimizer = make_optimizer(model, config)
    scheduler = make_cosine_scheduler(optimizer, total_steps)
    history: list[dict] = []
    metrics, done = run_epochs(model, train_loader, test_loader, optimizer=optimizer, scheduler=scheduler,
                               epochs=config.epochs, start_epoch=0, seed=config.seed,
                               max_steps=config.max_steps_per_epoch, reporter=reporter, device=device,
                               progress=progress, history=history, precision=precision)
    standard_layout_(model)
    return TrainResult(top1=metrics["top1"], top5=metrics["top5"], loss=metrics["loss"], epochs_run=done,
                       seconds=time.perf_counter() - t0, history=history)
