"""Training precision: ``auto`` (bf16 autocast on a GPU that has bfloat16, float32 elsewhere), ``fp32``, ``bf16``.

Every training and evaluation loop (the FP teachers and target model, the search, the transfer check, the
fine-tunes) runs its forward passes under ``autocast(precision, device)``: with ``bf16`` the convolutions
and matmuls run in bfloat16 while the weights, the optimiser, the Grad-CAM maps and the losses stay float32
(no loss scaling is needed: bfloat16 has float32's exponent range). Clip calibration, BitOPs counting and a
search's final policy evaluation run in float32. This is the setting the GPU benchmarks measure
(``benchmarks/bench_search_step.py``, ``bench_qat_step.py``: bf16 + channels_last on CUDA).

Model caches (FP teachers, FP target models) are keyed by recipe and data, not by precision or device:
those change rounding, not the recipe, so a teacher trained in float32 serves a bf16 search and the other
way round; each entry records the precision it was trained in. A sweep or study saved before this setting
existed ran float32 everywhere and resumes in float32.

``auto`` picks ``bf16`` on a CUDA device whose GPU supports it (Ampere or newer) and ``fp32`` everywhere
else: a CPU's bfloat16 speed depends on the chip (with AMX / AVX512-BF16 the demo's ResNet-20 trains 1.78x
faster, its quantized fine-tune 1.24x, the demo sweep 1.13-1.17x, benchmarks/RESULTS.md "Session 13";
without them bfloat16 is slower), so the CPU keeps float32 unless asked.
Results in ``bf16`` differ from ``fp32`` ones at the level of a different seed, not systematically.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ContextManager

from .errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "check_precision", "resolve_precision", "autocast", "at_least_float32"]

PRECISIONS = ("auto", "fp32", "bf16")


def check_precision(precision: object, where: str = "precision") -> str:
    """``precision`` if it is one of ``PRECISIONS``, else a ConfigError naming the value and the choices."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        hint = did_you_mean([precision], PRECISIONS) if isinstance(precision, str) else ""
        raise ConfigError(f"{where} must be one of {', '.join(PRECISIONS)}, but got {where}={precision!r}.{hint} "
                          "Use 'auto' (bf16 autocast on a GPU with bfloat16, float32 elsewhere), 'fp32' or 'bf16'.")
    return precision


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``fp32`` or ``bf16``: what ``precision`` means on ``device`` (module docstring).

    ``bf16`` on a CUDA device without bfloat16 raises ConfigError (use ``fp32``)."""
    import torch                      # here: the CLI reads PRECISIONS for its help without importing torch

    check_precision(precision)
    dev = torch.device(device)
    if precision == "auto":
        return "bf16" if dev.type == "cuda" and _cuda_bf16(dev) else "fp32"
    if precision == "bf16" and dev.type == "cuda" and not _cuda_bf16(dev):
        what = f"{dev} ({torch.cuda.get_device_name(dev)}) has none" if torch.cuda.is_available() else \
            "this machine has no usable GPU"
        raise ConfigError(f"precision='bf16' on {dev} needs a GPU with bfloat16 (Ampere or newer), but {what}; "
                          "use precision='fp32' (or 'auto').")
    if precision == "bf16" and dev.type not in ("cuda", "cpu"):
        raise ConfigError(f"precision='bf16' runs on 'cpu' or 'cuda' devices, but got device={str(dev)!r}; "
                          "use precision='fp32' there.")
    return precision


def autocast(precision: str, device: str | torch.device) -> ContextManager:
    """The context the forward passes run in: ``torch.autocast`` to bfloat16 when ``precision`` resolves to
    ``bf16`` on ``device``, else nothing."""
    import torch

    dev = torch.device(device)
    if resolve_precision(precision, dev) == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when autocast made it bfloat16 / float16; float32 and float64 tensors unchanged."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def _cuda_bf16(dev: torch.device) -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(dev)
    return major >= 8
