"""Capacity-aware attribution imitation and the attribution rank distance (METHOD.md 4.3).

Per image, over the H*W pixels of the Grad-CAM maps:

    A_q_hat  = A_q / ||A_q||_2,     A_fp_hat = A_fp^p / ||A_fp^p||_2
    L_gen    = mean over batch and pixels of (A_q_hat - A_fp_hat)^2

Raising to p > 0 keeps the FP pixel ranking and concentrates the target on its top pixels. The
capacity-aware exponent (ours, the paper's claim) is p = kappa * mean_l 1 / (E[b_w,l] E[b_a,l]),
kappa = 24 (all 2-bit -> 6, all 4-bit -> 1.5, uniform over {2,3,4,6} -> 1.707); the official
released default is a fixed p = 3.

ARD (attribution rank distance, the paper's diagnostic) = mean over images of 1 - Spearman rank
correlation between the flattened maps (ties get their average rank).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import ConfigError

__all__ = ["P_MODES", "normalize_maps", "sharpen", "generalization_loss", "capacity_p", "choose_p", "average_ranks",
           "spearman", "rank_distance"]

P_MODES = ("capacity", "fixed")
_EPS = 1e-12


def normalize_maps(maps: Tensor, eps: float = _EPS) -> Tensor:
    """Flatten [B, H, W] (or [B, N]) to [B, N] and divide each row by its L2 norm (zero rows stay 0)."""
    flat = maps.flatten(1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(eps)


def generalization_loss(student_maps: Tensor, teacher_maps: Tensor, p: float | Tensor) -> Tensor:
    """L_gen (0-d): mean squared difference of the L2-normalised student map and the L2-normalised
    teacher map raised to ``p``. The teacher side is detached."""
    if student_maps.shape != teacher_maps.shape:
        raise ValueError(f"student and teacher maps must have the same shape, but got "
                         f"{tuple(student_maps.shape)} and {tuple(teacher_maps.shape)}.")
    target = normalize_maps(sharpen(teacher_maps.detach(), p))
    return (normalize_maps(student_maps) - target).pow(2).mean()


def sharpen(maps: Tensor, p: float | Tensor) -> Tensor:
    """``maps.clamp_min(0) ** p`` per image, up to a positive factor per image (which the L2 normalisation
    after it cancels): each map is divided by its own maximum first, so a large p (24 for all-1-bit
    candidates) neither underflows small maps to all-zero nor overflows large ones to inf."""
    flat = maps.clamp_min(0).flatten(1)
    peak = flat.amax(dim=1, keepdim=True)
    return ((flat / peak.clamp_min(torch.finfo(flat.dtype).tiny)) ** p).view_as(maps)


def capacity_p(exp_w_bits: Tensor, exp_a_bits: Tensor, kappa: float = 24.0, *,
               as_tensor: bool = False) -> float | Tensor:
    """p = kappa * mean_l 1 / (E[b_w,l] * E[b_a,l]) (detached): a float, or with ``as_tensor`` the 0-d
    tensor on the bits' device (no device-to-host copy: the search step reads it with its other scalars)."""
    with torch.no_grad():
        p = kappa * (1.0 / (exp_w_bits.detach() * exp_a_bits.detach())).mean()
    return p if as_tensor else float(p)


def choose_p(mode: str, exp_w_bits: Tensor, exp_a_bits: Tensor, *, kappa: float = 24.0,
             p_fixed: float = 3.0, as_tensor: bool = False) -> float | Tensor:
    """The exponent for this step: capacity-aware (``mode="capacity"``; a 0-d tensor with ``as_tensor``)
    or ``p_fixed`` (a float)."""
    if mode == "capacity":
        return capacity_p(exp_w_bits, exp_a_bits, kappa, as_tensor=as_tensor)
    if mode == "fixed":
        return float(p_fixed)
    raise ConfigError(f"p_mode must be one of {P_MODES}, but got p_mode={mode!r}.")


def average_ranks(x: Tensor) -> Tensor:
    """Row-wise ranks 0..N-1 of ``x`` [B, N] (float), tied values sharing their average rank."""
    x = x.detach().flatten(1)
    b, n = x.shape
    sorted_vals, order = torch.sort(x, dim=1, stable=True)
    new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
    new_group[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    gid = new_group.long().cumsum(dim=1) - 1                              # [B, N] group of each sorted slot
    pos = torch.arange(n, device=x.device, dtype=torch.float64).expand(b, n)
    sums = torch.zeros(b, n, device=x.device, dtype=torch.float64).scatter_add_(1, gid, pos)
    counts = torch.zeros(b, n, device=x.device, dtype=torch.float64).scatter_add_(1, gid, torch.ones_like(pos))
    mean_rank = (sums / counts.clamp_min(1)).gather(1, gid)               # average rank per sorted slot
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per row of a, b [B, ...] -> [B] (float64). Rows where both maps are
    constant count as perfectly correlated (1); rows where only one is constant as 0."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    na, nb = ra.norm(dim=1), rb.norm(dim=1)
    rho = (ra * rb).sum(dim=1) / (na * nb).clamp_min(_EPS)
    both_const = (na == 0) & (nb == 0)
    return torch.where(both_const, torch.ones_like(rho), rho)


def rank_distance(student_maps: Tensor, teacher_maps: Tensor, *, as_tensor: bool = False) -> float | Tensor:
    """ARD = mean over images of 1 - Spearman(student map, teacher map), in [0, 2] (a float, or with
    ``as_tensor`` the 0-d float64 tensor on the maps' device)."""
    ard = (1.0 - spearman(student_maps, teacher_maps)).mean()
    return ard if as_tensor else float(ard)
