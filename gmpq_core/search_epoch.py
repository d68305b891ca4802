"""The search's epochs (``search.search_policy``'s loop parts): batches of a loader up to a step limit
(``_batches``, ``_steps``), the single-level optimiser of weights and architecture (``_make_optimizer``; METHOD.md 5),
one pass over the proxy data (``_run_epoch``), and the re-estimation of a discrete network's BatchNorm statistics
before it is evaluated (``_recalibrate_bn``). ``gmpq_core.search`` re-exports them."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from .errors import ConfigError
from .precision import autocast
from .search_config import SearchConfig
from .step_stats import StepStats
from .supernet import arch_parameters, weight_parameters
from .train import sgd

Progress = Callable[[int, int], None]


def _batches(loader: Iterable, limit: int | None):
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            return
        yield batch


def _steps(loader: Any, limit: int | None) -> int:
    n = len(loader)
    return n if limit is None else min(n, limit)


def _make_optimizer(supernet: nn.Module, cfg: SearchConfig) -> torch.optim.SGD:
    return sgd([
        {"params": weight_parameters(supernet), "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "weights"},
        {"params": arch_parameters(supernet), "lr": cfg.lr_arch, "weight_decay": cfg.arch_weight_decay,
         "name": "arch"}], lr=cfg.lr, momentum=cfg.momentum)


@torch.no_grad()
def _recalibrate_bn(model: nn.Module, loader: Iterable, n_batches: int, device: str | torch.device) -> None:
    """Re-estimate BatchNorm running statistics with a cumulative average over ``n_batches``."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or n_batches <= 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    try:
        for x, _ in _batches(loader, n_batches):
            model(x.to(device))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)


def _run_epoch(supernet: nn.Module, loader: Any, step_fn: Callable[..., StepStats], cfg: SearchConfig, *,
               epoch: int, device: str | torch.device, progress: Progress | None,
               precision: str = "auto") -> dict[str, float]:
    """One pass over the proxy (``step_fn``: ``search_step`` per batch, under ``precision``'s autocast: a
    CUDA graph captures the autocast it is called in); returns per-image means of the epoch."""
    supernet.train()
    cast = autocast(precision, device)
    total = _steps(loader, cfg.max_steps_per_epoch)
    sums = {"ce": 0.0, "l_gen": 0.0, "penalty": 0.0, "p": 0.0, "ard": 0.0, "loss": 0.0}
    correct = n = 0
    for step, (x, y) in enumerate(_batches(loader, cfg.max_steps_per_epoch), start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with cast:
            st = step_fn(x, y, epoch=epoch, step=step)
        for k in sums:
            sums[k] += getattr(st, k) * st.n
        correct += st.correct
        n += st.n
        if progress is not None:
            progress(step, total)
    if n == 0:
        raise ConfigError("the search got an empty training loader (0 images); check the proxy size and batch size.")
    out = {k: v / n for k, v in sums.items()}
    out["train_top1"] = 100.0 * correct / n
    return out
