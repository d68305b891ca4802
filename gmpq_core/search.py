"""The GMPQ search loop: ``search_policy`` (METHOD.md 4, 5).

Per batch (single-level: one backward updates weights and architecture together):

    teacher:  z_t, A_fp = Grad-CAM of the FP teacher (eval mode, detached; its BatchNorms folded into
              its convolutions, bn_fold.py, unless ``teacher_bn_train``)
    student:  z_q, A_q  = Grad-CAM of the supernet (create_graph=True: second order)
    E         = sum_l MACs_l E[b_w,l] E[b_a,l]                       (expected BitOPs)
    p         = kappa * mean_l 1 / (E[b_w,l] E[b_a,l])  (detached)  or p_fixed
    L         = CE(z_q, y) + eta * L_gen(A_q, A_fp; p) + lam * L_comp(E)

After the last epoch: ``derive_policy`` (argmax + budget repair), then the derived policy is
evaluated (top-1 and ARD against the teacher) on the evaluation data. The epoch loop's parts are in
``search_epoch``; the step's host part (``StepStats``, ``finish_step``) in ``step_stats``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attribution import find_feature_layer, gradcam
from .bn_fold import frozen_teacher_
from .bitops import count_bitops, layer_macs
from .complexity import Budget, check_budget, complexity_penalty
from .derive import derive_policy
from .errors import ConfigError
from .fused import resolve_mixture_impl
from .losses import choose_p, generalization_loss, rank_distance
from .policy import BitPolicy
from .reporting import NullReporter, Reporter
from .search_config import SearchConfig, SearchResult
from .search_epoch import Progress, _batches, _make_optimizer, _recalibrate_bn, _run_epoch, _steps
from .step_stats import StepStats, finish_step   # (graph_step and tests import them here)
from .teacher_pass import TeacherPass, split_teacher, teacher_gradcam, use_compiled_teacher
from .supernet import (arch_probs, build_supernet, calibrate_supernet_, discretize, expected_bits, mixed_layers,
                       quantize_stem_and_classifier_, set_mixture_impl_, set_temperature_)
from .precision import at_least_float32, resolve_precision
from .train import evaluate, seeded, training_layout_

__all__ = ["SearchConfig", "SearchResult", "Budget", "search_policy", "build_supernet", "derive_policy",
           "evaluate_policy", "search_step", "StepStats"]

log = logging.getLogger(__name__)


def _teacher_mode_(teacher: nn.Module, bn_train: bool) -> nn.Module:
    """Eval mode; with ``bn_train`` (the official code's behaviour) BatchNorm in training mode."""
    teacher.eval()
    if bn_train:
        for m in teacher.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    return teacher


def evaluate_policy(supernet: nn.Module, policy: BitPolicy, teacher: nn.Module, loader: Iterable, *, layer: str,
                    device: str | torch.device = "cpu", max_batches: int | None = None,
                    bn_loader: Iterable | None = None, bn_batches: int = 20,
                    target_class: str = "pred") -> dict[str, float]:
    """Top-1 (%) and ARD of the supernet fixed to ``policy`` against ``teacher`` on ``loader``.

    The discrete network (``discretize``) has its BN statistics re-estimated on ``bn_loader`` first.
    ``target_class``: whose class the Grad-CAM maps are for, as in the search (``SearchConfig.target_class``).
    """
    net = discretize(supernet, policy).to(device)
    _recalibrate_bn(net, bn_loader if bn_loader is not None else loader, bn_batches, device)
    net.eval()
    correct = n = 0
    ard_sum = 0.0
    for x, y in _batches(loader, max_batches):
        x, y = x.to(device), y.to(device)
        logits, maps = gradcam(net, x, layer, target=target_class, labels=y, mode="detached")
        _, t_maps = teacher_gradcam(teacher, x, layer, target=target_class, labels=y)
        correct += int((logits.argmax(1) == y).sum())
        ard_sum += rank_distance(maps, t_maps) * y.numel()
        n += y.numel()
    if n == 0:
        raise ConfigError("evaluate_policy got an empty loader (0 images).")
    return {"top1": 100.0 * correct / n, "ard": ard_sum / n}


def search_policy(teacher: nn.Module, train_loader: Any, *, config: SearchConfig, input_size: int,
                  in_channels: int, eval_loader: Any = None, reporter: Reporter | None = None,
                  device: str | torch.device = "cpu", model_name: str | None = None,
                  progress: Progress | None = None, precision: str = "auto") -> SearchResult:
    """Search a mixed-precision policy for ``teacher``'s architecture on the proxy ``train_loader``.

    ``teacher`` is the trained FP network (left untouched). Reports once per epoch (1-based)
    ``{"proxy_top1","ce","l_gen","expected_gbitops","p","ard","lr", ...}``; ``proxy_top1`` is the
    supernet's top-1 on ``eval_loader`` (the running training top-1 when None). ``should_stop()``
    is checked between epochs. Deterministic for ``config.seed`` and the loaders' seeds; the global
    RNG state is left untouched. A NaN/inf loss raises NonFiniteLossError within its epoch.
    ``precision`` (precision.py; ``auto``: bf16 autocast on a GPU with bfloat16, float32 elsewhere) sets
    the autocast of the search steps and the per-epoch evaluation; the calibration, the final policy's
    evaluation (proxy top-1, ARD) and the architecture logits stay float32.
    """
    if not isinstance(config, SearchConfig):
        raise ConfigError(f"config must be a SearchConfig, but got {type(config).__name__}.")
    resolve_precision(precision, device)                 # a bad value fails before any work
    reporter = reporter or NullReporter()
    t0 = time.perf_counter()
    cfg = config
    with seeded(cfg.seed, device):
        teacher_s = copy.deepcopy(teacher).to(device).requires_grad_(False).eval()  # caller's model untouched
        supernet = build_supernet(teacher_s, cfg.candidates, init_from_fp=cfg.init_from_fp, seed=cfg.seed)
        training_layout_(teacher_s, device, precision)
        supernet.requires_grad_(True)
        set_temperature_(supernet, cfg.temperature)
        fixed = quantize_stem_and_classifier_(supernet, include_stem=cfg.include_stem,
                                              include_classifier=cfg.include_classifier, bits=cfg.stem_bits)
        training_layout_(supernet, device, precision)         # after the fixed stem / classifier are swapped in
        set_mixture_impl_(supernet, resolve_mixture_impl(cfg.mixture_impl, device))
        all_macs = layer_macs(teacher_s, input_size, in_channels)
        names = list(mixed_layers(supernet))
        macs = {n: all_macs[n] for n in names}
        budget_bitops = cfg.budget.to_bitops(macs) if cfg.budget is not None else None
        if budget_bitops is None and cfg.penalty == "hinge" and cfg.lam > 0:
            log.warning("no budget: the hinge penalty has no target, so lam=%g has no effect and nothing pushes the "
                        "bits down (the policy is the per-layer argmax). Give a budget, or penalty='official' for "
                        "the official unconstrained trade-off.", cfg.lam)
        if budget_bitops is not None:
            check_budget(budget_bitops, macs, cfg.candidates, model_name=model_name, input_size=input_size)
        layer = find_feature_layer(teacher_s, model_name=model_name, override=cfg.gradcam_layer,
                                   input_size=input_size, in_channels=in_channels)
        first_macs = macs[names[0]]
        macs_vec = torch.tensor([float(macs[n]) for n in names], device=device)
        mode = "second_order" if cfg.second_order else "first_order"
        x0 = next(iter(train_loader))[0].to(device)
        calibrate_supernet_(supernet, x0, clips=cfg.calibrate_clips)
        ternary = [n for n, m in mixed_layers(supernet).items() if m.signed and 1 in m.a_candidates]
        if ternary:
            log.warning("%d layer(s) with signed inputs have 1 among their activation candidates (%s%s): a signed "
                        "1-bit activation here has 3 levels {-a, 0, a} but counts as 1 bit in BitOPs. Leave 1 out "
                        "of a_bits for this model to keep the costs exact.", len(ternary), ", ".join(ternary[:3]),
                        ", ..." if len(ternary) > 3 else "")
        optimizer = _make_optimizer(supernet, cfg)
        if not cfg.teacher_bn_train:          # a frozen eval-mode teacher runs its BatchNorms inside its convs
            frozen_teacher_(teacher_s, keep=(layer,))   # a conv named as the Grad-CAM layer keeps its output
        _teacher_mode_(teacher_s, cfg.teacher_bn_train)
        steps = cfg.epochs * _steps(train_loader, cfg.max_steps_per_epoch)
        if not cfg.teacher_bn_train and use_compiled_teacher(cfg.teacher_compile, device, input_size=input_size,
                                                             steps=steps):
            split = split_teacher(teacher_s, layer, compile_trunk=True, unfold_stem=True)
            if split is None:
                (log.warning if cfg.teacher_compile == "on" else log.info)(
                    "teacher_compile=%s: the teacher cannot be split at its Grad-CAM layer '%s' (torch.fx cannot trace "
                    "it, or its head reads more than that layer's output); its pass runs eagerly.",
                    cfg.teacher_compile, layer)
            teacher_s = split or teacher_s
        step_fn = _step_function(supernet, teacher_s, optimizer, cfg, layer=layer, macs_vec=macs_vec,
                                 budget_bitops=budget_bitops, first_macs=first_macs, mode=mode, device=device,
                                 teacher_stream=torch.device(device).type == "cuda")
        history: list[dict] = []
        p_used = float("nan")
        epochs_run = 0
        for epoch in range(1, cfg.epochs + 1):
            factor = 0.1 ** ((epoch - 1) // cfg.lr_step_epochs)
            for g, base in zip(optimizer.param_groups, (cfg.lr, cfg.lr_arch)):
                g["lr"] = base * factor
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch - 1)
            stats = _run_epoch(supernet, train_loader, step_fn, cfg, epoch=epoch, device=device, progress=progress,
                               precision=precision)
            with torch.no_grad():
                _, ew, ea = expected_bits(supernet)
                exp = float((macs_vec * ew * ea).sum())
            proxy_top1 = (evaluate(supernet, eval_loader, device=device, precision=precision)["top1"]
                          if eval_loader is not None
                          else stats["train_top1"])
            p_used = stats["p"]
            metrics = {"epoch": epoch, "proxy_top1": proxy_top1, **stats, "expected_gbitops": exp / 1e9,
                       "expected_avg_bits": math.sqrt(exp / float(macs_vec.sum())),
                       "lr": optimizer.param_groups[0]["lr"], "lr_arch": optimizer.param_groups[1]["lr"],
                       "seconds": time.perf_counter() - t0}
            history.append(metrics)
            epochs_run = epoch
            reporter.report(epoch, metrics)
            log.debug("search epoch %d: %s", epoch, metrics)
            if epoch < cfg.epochs and reporter.should_stop():
                log.info("search stopped after epoch %d of %d (reporter asked)", epoch, cfg.epochs)
                break
        if hasattr(step_fn, "counts"):                   # a CUDA graph's memory is not needed any more
            log.debug("search steps on CUDA graphs: %s", step_fn.counts)
            optimizer.zero_grad(set_to_none=True)        # the .grad tensors live in the graph's pool
        step_fn = None
        if isinstance(teacher_s, TeacherPass):           # the evaluation's float32 batches run it eagerly anyway
            teacher_s.drop_compiled()
        teacher_s.eval()
        policy = derive_policy(supernet, budget_bitops, macs, fill=cfg.fill_budget)
        report = count_bitops(supernet, BitPolicy(layers={**policy.layers, **fixed}), input_size, in_channels,
                              macs=all_macs)             # the fixed stem / classifier count as quantized
        final = evaluate_policy(supernet, policy, teacher_s, eval_loader if eval_loader is not None else train_loader,
                                layer=layer, device=device,
                                max_batches=None if eval_loader is not None else cfg.max_steps_per_epoch,
                                bn_loader=train_loader, bn_batches=cfg.recalibrate_bn_batches,
                                target_class=cfg.target_class)
    policy_meta = {**policy.meta, "p_mode": cfg.p_mode, "eta": cfg.eta, "lam": cfg.lam,
                   "budget": cfg.budget.to_dict() if cfg.budget is not None else None}
    if fixed:                                            # the fine-tune quantizes them the same way
        policy_meta.update(include_stem=cfg.include_stem, include_classifier=cfg.include_classifier,
                           stem_bits=cfg.stem_bits)
    policy = BitPolicy(layers=policy.layers, fingerprint=policy.fingerprint, meta=policy_meta)
    return SearchResult(policy=policy, bitops_quantized=report.bitops_quantized, bitops_total=report.bitops_total,
                        budget_bitops=budget_bitops, proxy_top1=final["top1"], ard=final["ard"], p=p_used,
                        epochs_run=epochs_run, search_seconds=time.perf_counter() - t0, history=history,
                        arch_probs=arch_probs(supernet))


def search_step(supernet: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer,
                cfg: SearchConfig, *, layer: str, macs_vec: Tensor, budget_bitops: int | None, first_macs: int,
                mode: str | None = None, epoch: int = 1, step: int = 1, teacher_stream: bool = False) -> StepStats:
    """One GMPQ update on the batch (x [B, C, H, W], y [B]) already on the device (module docstring).

    ``teacher`` in its search mode (eval), ``supernet`` in training mode; ``mode`` defaults to
    ``cfg.second_order``. One host synchronisation per step, after the backward pass is queued and
    before the update, reads every scalar at once (loss parts, p, ARD, correct) and checks them: a
    NaN/inf loss raises NonFiniteLossError naming ``epoch`` and ``step``, and the weights are not
    updated. Until then nothing waits for the device (on a GPU the host queues the forward and backward
    passes while the device runs them). ``teacher_stream`` (CUDA): the teacher's pass runs on a second
    stream beside the supernet's forward pass (``step_scalars``).
    """
    mode = mode or ("second_order" if cfg.second_order else "first_order")
    scalars = step_scalars(supernet, teacher, x, y, optimizer, cfg, layer=layer, macs_vec=macs_vec,
                           budget_bitops=budget_bitops, first_macs=first_macs, mode=mode,
                           inject_nan=cfg.inject_nan_at_epoch == epoch, teacher_stream=teacher_stream)
    return finish_step(scalars.tolist(), optimizer, n=int(y.numel()), epoch=epoch, step=step)   # the one sync


def step_scalars(supernet: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer,
                 cfg: SearchConfig, *, layer: str, macs_vec: Tensor, budget_bitops: int | None, first_macs: int,
                 mode: str, inject_nan: bool = False, teacher_stream: bool = False) -> Tensor:
    """The device part of ``search_step``: forward passes, losses and the backward pass (gradients set,
    weights not updated). Returns the float64 vector [loss, ce, l_gen, penalty, correct, ard, p] without
    reading it: nothing here waits for the device, so it can be captured in a CUDA graph (graph_step.py).
    ``teacher_stream`` on a CUDA batch: the teacher's Grad-CAM runs on a second stream, concurrently with
    the supernet's forward pass, joined before the loss that reads its maps (the same values)."""
    side = _teacher_stream(x.device) if teacher_stream else None
    if side is not None:
        main = torch.cuda.current_stream(x.device)
        side.wait_stream(main)          # x and the teacher's weights are ready
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        _, t_maps = teacher_gradcam(teacher, x, layer, target=cfg.target_class, labels=y)
    logits, s_maps = gradcam(supernet, x, layer, target=cfg.target_class, labels=y, mode=mode)
    if side is not None:
        main.wait_stream(side)          # the maps are written before anything on this stream reads them
    _, ew, ea = expected_bits(supernet)
    expected = (macs_vec * ew * ea).sum()
    p = choose_p(cfg.p_mode, ew, ea, kappa=cfg.kappa, p_fixed=cfg.p_fixed, as_tensor=True)
    ce = F.cross_entropy(at_least_float32(logits), y)
    l_gen = generalization_loss(s_maps, t_maps, p)
    pen = complexity_penalty(expected, mode=cfg.penalty, budget_bitops=budget_bitops, first_layer_macs=first_macs)
    loss = ce + cfg.eta * l_gen + cfg.lam * pen
    if inject_nan:
        loss = loss * float("nan")
    correct = (logits.detach().argmax(1) == y).sum()
    ard = rank_distance(s_maps.detach(), t_maps, as_tensor=True)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    p_t = p.detach() if torch.is_tensor(p) else ce.detach().new_full((), p, dtype=torch.float64)  # p_fixed: no copy
    return torch.stack([t.detach().to(torch.float64) for t in (loss, ce, l_gen, pen, correct, ard, p_t)])


_TEACHER_STREAMS: dict[torch.device, Any] = {}


def _teacher_stream(device: torch.device) -> Any:
    """The second CUDA stream of ``device`` that the teacher's pass runs on (one per device and process;
    None off CUDA). Blocks the teacher frees return to this stream's pool, so no later allocation of the
    supernet's stream reuses them while the teacher may still run. The maps, allocated here and read on the
    supernet's stream, need no ``record_stream``: this stream's next work waits on that stream first
    (``side.wait_stream(main)``). That holds for one search at a time per device and process (Ray runs one
    trial per worker process); two searches in threads of one process would need ``record_stream``."""
    if device.type != "cuda":
        return None
    if device not in _TEACHER_STREAMS:
        _TEACHER_STREAMS[device] = torch.cuda.Stream(device=device)
    return _TEACHER_STREAMS[device]


def _step_function(supernet: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, cfg: SearchConfig, *,
                   device: str | torch.device, **kw: Any) -> Callable[..., StepStats]:
    """``step(x, y, epoch=, step=)``: ``search_step`` for this search, replayed from a CUDA graph where
    ``cfg.cuda_graph`` says so (graph_step.py)."""
    from .graph_step import GraphedSearchStep, use_cuda_graph     # graph_step imports this module
    if use_cuda_graph(cfg.cuda_graph, device):
        return GraphedSearchStep(supernet, teacher, optimizer, cfg, strict=cfg.cuda_graph == "on", **kw)
    return functools.partial(search_step, supernet, teacher, optimizer=optimizer, cfg=cfg, **kw)
