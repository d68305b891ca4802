"""The host part of one search step: ``StepStats`` (the step's metrics) and ``finish_step``, which checks the
scalars read from the device in the step's one host synchronisation (a NaN/inf loss raises NonFiniteLossError before
any update), then applies the optimiser's update. Shared by the eager step (``search.search_step``) and the step
replayed from a CUDA graph (``graph_step``); ``gmpq_core.search`` re-exports both."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import NonFiniteLossError

__all__ = ["StepStats", "finish_step"]


@dataclass(frozen=True)
class StepStats:
    """Metrics of one search step on one batch: batch means (``ce``, ``l_gen``, ``penalty``,
    ``loss`` in nats / loss units; ``ard`` in [0, 2]), the exponent ``p``, and ``correct`` of ``n``
    images classified right by the supernet (before the update)."""
    loss: float
    ce: float
    l_gen: float
    penalty: float
    p: float
    ard: float
    correct: int
    n: int


def finish_step(values: list[float], optimizer: torch.optim.Optimizer, *, n: int, epoch: int, step: int) -> StepStats:
    """The host part of ``search_step``: check the read scalars (a NaN/inf loss raises NonFiniteLossError
    naming ``epoch`` and ``step``, before any update), then ``optimizer.step()``."""
    loss_v, ce_v, l_gen_v, pen_v, correct_v, ard_v, p_v = values
    if not math.isfinite(loss_v):
        parts = f"ce={ce_v:.4g}, l_gen={l_gen_v:.4g}, penalty={pen_v:.4g}"
        raise NonFiniteLossError(
            f"The search loss became {loss_v} at epoch {epoch}, step {step} ({parts}, "
            f"lr={optimizer.param_groups[0]['lr']:.3g}). Lower lr / lr_arch or eta, or check the proxy data "
            "for NaN/inf values.")
    optimizer.step()
    return StepStats(loss=loss_v, ce=ce_v, l_gen=l_gen_v, penalty=pen_v, p=p_v, ard=ard_v, correct=int(correct_v), n=n)
