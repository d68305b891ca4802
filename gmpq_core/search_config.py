"""``SearchConfig`` and ``SearchResult``: what a GMPQ search is asked and what it returns.

Defaults are the official recipe (METHOD.md 5) with our decisions (capacity-aware p, hinge budget
penalty, FP-initialised supernet, eval-mode teacher); each official behaviour is one switch away:
``p_mode="fixed"`` (p_fixed=3), ``penalty="official"``, ``init_from_fp=False``,
``teacher_bn_train=True``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .complexity import PENALTIES, Budget, check_avg_bits
from .errors import ConfigError, did_you_mean
from .losses import P_MODES
from .policy import BitCandidates, BitPolicy

__all__ = ["SearchConfig", "SearchResult", "TARGET_CLASSES", "MIXTURE_IMPLS", "CUDA_GRAPH_MODES",
           "TEACHER_COMPILE_MODES"]

TARGET_CLASSES = ("pred", "label")
MIXTURE_IMPLS = ("auto", "reference", "fused", "compiled", "triton")
CUDA_GRAPH_MODES = ("auto", "on", "off")
TEACHER_COMPILE_MODES = ("auto", "on", "off")     # teacher_pass.py


def _positive(name: str, value: Any, *, integer: bool = False, zero_ok: bool = False, hint: str = "") -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and (integer or math.isfinite(value))
    if not ok or not (value >= 0 if zero_ok else value > 0):
        kind = "integer" if integer else "number"
        raise ConfigError(f"{name} must be a{'n' if integer else ''} {kind} {'>= 0' if zero_ok else '> 0'}, "
                          f"but got {name}={value!r}.{hint}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, but got {name}={value!r}.")


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """One GMPQ search. Loss per step: CE + eta * L_gen + lam * L_comp (METHOD.md 4).

    Optimisation: single-level SGD; weights/BN/clips at ``lr`` (momentum, weight_decay), the
    architecture logits at ``lr_arch`` (momentum, arch_weight_decay); both x0.1 every
    ``lr_step_epochs`` epochs. ``lam`` is in the official penalty's units in both penalty modes
    (see complexity.py). Extensions beyond the contract: ``temperature`` (softmax T of the
    architecture distributions), ``calibrate_clips`` (clips from the first batch instead of 6.0),
    ``recalibrate_bn_batches`` (BN statistics re-estimated for the derived policy's evaluation),
    ``fill_budget`` (after the argmax and repair, raise bits while the policy still fits),
    ``mixture_impl`` (how the quantizer mixtures run, fused.py: "auto" = "triton" on CUDA when
    Triton imports, else "fused"; "reference", "fused", "compiled" (TorchInductor) or "triton";
    all give the same values and gradients). ``cuda_graph`` (graph_step.py): "auto" (the default) replays each
    search step's forward and backward passes from a CUDA graph on CUDA (the host no longer bounds a GPU
    step: 2.1x faster for ResNet-18 at 224 px on an H200) and goes on eagerly if a capture fails, "on"
    insists (CUDA only, a failed capture raises), "off" never; the results match the eager step.
    ``teacher_compile`` (teacher_pass.py): the frozen teacher's pass (its Grad-CAM maps) split at the Grad-CAM
    layer and its trunk compiled by TorchInductor, its RGB stem as im2col: "auto" (the default) on CUDA for
    inputs of 112 px or more and searches of 2,000 steps or more (a compile costs 2-14 s), "on" always (a
    failed compile goes on eagerly), "off" never; the same maps up to float rounding. Not with
    ``teacher_bn_train``. On CUDA the teacher's pass runs on a second stream beside the supernet's.
    ``include_stem`` / ``include_classifier`` (METHOD.md 2's switch): the stem / classifier, full precision
    by default, are quantized at ``stem_bits`` (weights and input) throughout the search; the budget still
    covers the searched layers only, the reported BitOPs include them, and the policy's meta carries the
    switch so the fine-tune quantizes them the same way.
    ``inject_nan_at_epoch`` (1-based) is a testing switch that makes that epoch's loss NaN.
    """
    candidates: BitCandidates = field(default_factory=BitCandidates)
    budget: Budget | None = None
    epochs: int = 25
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_arch: float = 0.01
    arch_weight_decay: float = 1e-4
    lr_step_epochs: int = 10
    eta: float = 40.0
    lam: float = 3e-4
    penalty: str = "hinge"
    p_mode: str = "capacity"
    kappa: float = 24.0
    p_fixed: float = 3.0
    second_order: bool = True
    target_class: str = "pred"
    teacher_bn_train: bool = False
    init_from_fp: bool = True
    gradcam_layer: str | None = None
    seed: int = 0
    max_steps_per_epoch: int | None = None
    inject_nan_at_epoch: int | None = field(default=None, metadata={"testing": True})
    temperature: float = 1.0
    calibrate_clips: bool = True
    recalibrate_bn_batches: int = 20
    fill_budget: bool = False
    mixture_impl: str = "auto"
    cuda_graph: str = "auto"
    teacher_compile: str = "auto"
    include_stem: bool = False
    include_classifier: bool = False
    stem_bits: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", BitCandidates.from_any(self.candidates))
        object.__setattr__(self, "budget", Budget.from_any(self.budget))
        if self.budget is not None and self.budget.avg_bits is not None:    # what the candidates can meet, any model
            check_avg_bits(self.budget.avg_bits, self.candidates)
        _positive("epochs", self.epochs, integer=True, hint=" Use e.g. epochs=25.")
        _positive("batch_size", self.batch_size, integer=True, hint=" Use e.g. batch_size=256.")
        _positive("lr", self.lr, hint=" Use e.g. lr=0.1.")
        _positive("lr_arch", self.lr_arch, hint=" Use e.g. lr_arch=0.01.")
        _positive("lr_step_epochs", self.lr_step_epochs, integer=True, hint=" Use e.g. lr_step_epochs=10.")
        for name in ("weight_decay", "arch_weight_decay", "eta", "lam"):
            _positive(name, getattr(self, name), zero_ok=True)
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), but got momentum={self.momentum!r}.")
        _choice("penalty", self.penalty, PENALTIES)
        _choice("p_mode", self.p_mode, P_MODES)
        _choice("target_class", self.target_class, TARGET_CLASSES)
        _choice("mixture_impl", self.mixture_impl, MIXTURE_IMPLS)
        _choice("cuda_graph", self.cuda_graph, CUDA_GRAPH_MODES)
        _choice("teacher_compile", self.teacher_compile, TEACHER_COMPILE_MODES)
        if self.teacher_compile == "on" and self.teacher_bn_train is True:
            raise ConfigError("teacher_compile='on' compiles a frozen teacher, but teacher_bn_train=true runs the "
                              "teacher's BatchNorms on each batch's statistics. Set teacher_compile to 'auto' or "
                              "'off', or teacher_bn_train to false.")
        _positive("kappa", self.kappa)
        _positive("p_fixed", self.p_fixed)
        _positive("temperature", self.temperature, hint=" Use 1.0 for the official plain softmax.")
        if isinstance(self.stem_bits, bool) or not isinstance(self.stem_bits, int) or not 1 <= self.stem_bits <= 8:
            raise ConfigError(f"stem_bits must be a whole number of bits in 1..8, but got stem_bits={self.stem_bits!r}.")
        for name in ("second_order", "teacher_bn_train", "init_from_fp", "calibrate_clips", "fill_budget",
                     "include_stem", "include_classifier"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, but got {name}={getattr(self, name)!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, but got seed={self.seed!r}.")
        if self.max_steps_per_epoch is not None:
            _positive("max_steps_per_epoch", self.max_steps_per_epoch, integer=True, hint=" Use None for whole epochs.")
        if self.inject_nan_at_epoch is not None:
            _positive("inject_nan_at_epoch", self.inject_nan_at_epoch, integer=True, hint=" Epochs count from 1.")
        _positive("recalibrate_bn_batches", self.recalibrate_bn_batches, integer=True, zero_ok=True)
        if self.gradcam_layer is not None and (not isinstance(self.gradcam_layer, str) or not self.gradcam_layer):
            raise ConfigError(f"gradcam_layer must be a module name like 'layer4' or None, but got "
                              f"gradcam_layer={self.gradcam_layer!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-able dict; ``from_dict`` inverts it."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["candidates"] = {"w_bits": list(self.candidates.w_bits), "a_bits": list(self.candidates.a_bits)}
        out["budget"] = self.budget.to_dict() if self.budget is not None else None
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"a search config must be a mapping of its fields, but got {type(d).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            shown = sorted(f.name for f in fields(cls) if not f.metadata.get("testing"))   # settings only
            raise ConfigError(f"Unknown search config keys {unknown}.{did_you_mean(unknown, shown)} "
                              f"Valid keys: {', '.join(shown)}.")
        return cls(**dict(d))


@dataclass(frozen=True)
class SearchResult:
    """A finished search. BitOPs per image: ``bitops_quantized`` over the policy's layers (GMPQ/
    EdMIPS convention), ``bitops_total`` over the whole network with FP layers at 32x32.

    ``proxy_top1`` (%) and ``ard`` are measured on the derived discrete policy (supernet weights,
    the chosen bits, BN statistics re-estimated) against the FP teacher on the evaluation data;
    ``p`` is the exponent used in the last epoch (mean). ``history`` holds the per-epoch supernet
    metrics; ``arch_probs`` the final softmax per layer {"w": [...], "a": [...]}.
    """
    policy: BitPolicy
    bitops_quantized: int
    bitops_total: int
    budget_bitops: int | None
    proxy_top1: float
    ard: float
    p: float
    epochs_run: int
    search_seconds: float
    history: list[dict]
    arch_probs: dict[str, dict]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no tensors)."""
        return {"proxy_top1": self.proxy_top1, "ard": self.ard, "p": self.p,
                "bitops_quantized": self.bitops_quantized, "bitops_total": self.bitops_total,
                "gbitops_quantized": self.bitops_quantized / 1e9, "gbitops_total": self.bitops_total / 1e9,
                "budget_bitops": self.budget_bitops,
                "budget_gbitops": None if self.budget_bitops is None else self.budget_bitops / 1e9,
                "epochs_run": self.epochs_run, "search_seconds": self.search_seconds,
                "average_bits": dict(zip(("w_bits", "a_bits"), self.policy.average_bits())),
                "policy": self.policy.to_dict(), "history": list(self.history), "arch_probs": dict(self.arch_probs)}
