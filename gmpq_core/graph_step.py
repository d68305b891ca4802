"""The search step replayed from a CUDA graph (``SearchConfig.cuda_graph``).

On a GPU the eager search step is bound by the host: two Grad-CAM passes, a second-order backward
and a few autograd nodes per mixed layer cost more Python and dispatch time per step than the
device needs for the kernels (benchmarks/RESULTS.md: ~40 ms of kernels in a ~77 ms step on an
H100; replayed, the ResNet-18 step went from 3.96x to 1.90x an FP training step on an H200, the
kernels' own ratio). ``GraphedSearchStep`` captures the device part of the step (``search.step_scalars``: forward
passes, losses, backward) once and replays it for every batch of the same shape; the host part
(one read of the scalars, the NaN check, ``optimizer.step()``) stays eager, so the learning-rate
schedule and the error on a NaN loss are unchanged.

How (the pattern of PyTorch's CUDA-graph notes): the first ``warmup`` steps of a shape run eagerly on
a side stream (Triton compiles and cuDNN picks its algorithms there), then the next batch is copied
into static input tensors and the step is captured with the gradients unset, so the captured
backward owns the ``.grad`` tensors and every replay rewrites them. A batch of another shape (the
last, smaller batch of an epoch) or an epoch with ``inject_nan_at_epoch`` runs eagerly, and its
gradients are copied back into the captured ones; a shape that stays (``warmup`` eager steps in a
row) is captured anew. Autocast's cast cache is off inside the capture (the casts are replayed).
Results match the eager step up to the order of floating-point additions.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .search import StepStats, finish_step, step_scalars
from .search_config import SearchConfig

log = logging.getLogger(__name__)

# A failed capture can leave the CUDA caching allocator believing a capture is still under way (PyTorch
# ends its pool routing only after cudaStreamEndCapture succeeds), so a later capture in the same process
# (a reused Ray Tune actor's next trial) would trip its assertions: after one failure, no more attempts.
_capture_failed_in_process = False


def use_cuda_graph(setting: str, device: str | torch.device) -> bool:
    """Whether a search on ``device`` replays its steps from a CUDA graph: "on" needs a CUDA device
    (ConfigError otherwise), "auto" uses one on CUDA, "off" never."""
    is_cuda = torch.device(device).type == "cuda"
    if setting == "on" and not is_cuda:
        raise ConfigError(f"cuda_graph='on' needs a CUDA device, but the search runs on {str(device)!r}. Use "
                          "cuda_graph='auto' (graphs on CUDA only) or 'off'.")
    return is_cuda and setting in ("on", "auto")


def _autocast_state() -> tuple:
    """(autocast dtype,) when CUDA autocast is on, else ()."""
    return (torch.get_autocast_dtype("cuda"),) if torch.is_autocast_enabled("cuda") else ()


class GraphedSearchStep:
    """``search_step`` for a fixed supernet, teacher, optimizer and config, replayed from a CUDA graph
    (module docstring). Call it like ``search_step`` with the batch; it returns the same StepStats.
    ``strict`` re-raises a failed capture; otherwise the search goes on eagerly and says so once.
    ``teacher_stream``: the teacher's pass on a second stream (``search.step_scalars``), captured as a
    branch of the graph that runs beside the supernet's forward pass."""

    def __init__(self, supernet: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                 cfg: SearchConfig, *, layer: str, macs_vec: Tensor, budget_bitops: int | None, first_macs: int,
                 mode: str, warmup: int = 3, strict: bool = False, teacher_stream: bool = False) -> None:
        self._args = (supernet, teacher)
        self._kw: dict[str, Any] = dict(layer=layer, macs_vec=macs_vec, budget_bitops=budget_bitops,
                                        first_macs=first_macs, mode=mode, teacher_stream=teacher_stream)
        self.optimizer, self.cfg, self.warmup, self.strict = optimizer, cfg, max(int(warmup), 1), strict
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self._pending: tuple | None = None
        self._streak = 0
        self._sides: dict[torch.device, torch.cuda.Stream] = {}          # warm-up and capture stream per device
        self._static: tuple[Tensor, Tensor, Tensor] | None = None      # x, y, scalars
        self._grads: list[tuple[Tensor, Tensor]] = []                    # (parameter, its captured .grad)
        self._no_grad: list[Tensor] = []                                 # parameters without one at capture
        self.counts = {"captures": 0, "replays": 0, "eager": 0}

    def _key(self, x: Tensor, y: Tensor, epoch: int) -> tuple | None:
        if _capture_failed_in_process or x.device.type != "cuda" or self.cfg.inject_nan_at_epoch == epoch:
            return None
        supernet, teacher = self._args
        return (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.dtype, x.device, supernet.training,
                teacher.training, _autocast_state())

    def __call__(self, x: Tensor, y: Tensor, *, epoch: int = 1, step: int = 1) -> StepStats:
        key = self._key(x, y, epoch)
        if key is not None and key == self.key:
            self._pending, self._streak = None, 0   # "in a row": the last smaller batch of each epoch stays eager
            return self._replay(x, y, epoch, step)
        self._streak = self._streak + 1 if key is not None and key == self._pending else 1
        self._pending = key
        if key is not None and self._streak > self.warmup and self._capture(x, y, key):
            return self._replay(x, y, epoch, step)
        return self._eager(x, y, epoch, step, side=key is not None)

    def _eager(self, x: Tensor, y: Tensor, epoch: int, step: int, *, side: bool) -> StepStats:
        self.counts["eager"] += 1
        if not side:
            return self._eager_step(x, y, epoch, step)
        with torch.cuda.device(x.device):           # warm-up on a side stream, as capture wants
            current, stream = torch.cuda.current_stream(), self._side(x.device)
            stream.wait_stream(current)
            try:
                with torch.cuda.stream(stream):
                    return self._eager_step(x, y, epoch, step)
            finally:
                current.wait_stream(stream)

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._sides:
            self._sides[device] = torch.cuda.Stream(device=device)
        return self._sides[device]

    def _eager_step(self, x: Tensor, y: Tensor, epoch: int, step: int) -> StepStats:
        scalars = step_scalars(*self._args, x, y, self.optimizer, self.cfg, **self._kw,
                               inject_nan=self.cfg.inject_nan_at_epoch == epoch)
        values = scalars.tolist()
        self._keep_captured_grads(copy=True)
        return finish_step(values, self.optimizer, n=int(y.numel()), epoch=epoch, step=step)

    def _keep_captured_grads(self, *, copy: bool) -> None:
        """Point every parameter's .grad back at the tensor the graph writes (an eager step or a caller's
        ``zero_grad(set_to_none=True)`` replaced it); ``copy`` carries an eager step's gradients over (a
        parameter the eager step left without one keeps None for this update). After a replay, parameters
        that had no gradient at capture get none (an eager step's must not be applied again)."""
        for p, g in self._grads:
            if p.grad is not g:
                if copy:
                    if p.grad is None:
                        continue
                    g.copy_(p.grad)
                p.grad = g
        if not copy:
            for p in self._no_grad:
                p.grad = None

    def _capture(self, x: Tensor, y: Tensor, key: tuple) -> bool:
        global _capture_failed_in_process
        self.graph, self._static, self._grads, self._no_grad, self.key = None, None, [], [], None  # free the old
        sx, sy = x.clone(), y.clone()
        self.optimizer.zero_grad(set_to_none=True)
        cast = (torch.autocast("cuda", dtype=key[-1][0], cache_enabled=False) if key[-1] else nullcontext())
        with torch.cuda.device(x.device):
            current = torch.cuda.current_stream()
            graph = torch.cuda.CUDAGraph()
            try:
                torch.cuda.synchronize()
                # thread_local: a data loader's pin-memory thread may call CUDA while the capture runs
                with cast, torch.cuda.graph(graph, stream=self._side(x.device), capture_error_mode="thread_local"):
                    scalars = step_scalars(*self._args, sx, sy, self.optimizer, self.cfg, **self._kw)
            except Exception as exc:  # noqa: BLE001 - anything that cannot be captured: go on eagerly
                _capture_failed_in_process = True
                torch.cuda.set_stream(current)     # a failed capture_end leaves the capture stream current
                self.optimizer.zero_grad(set_to_none=True)
                if self.strict:
                    raise
                root = exc.__cause__ or exc.__context__
                log.warning("the search step could not be captured in a CUDA graph (%s: %s%s); this search and "
                            "later ones in this process go on without graphs (cuda_graph='off' skips the attempt).",
                            type(exc).__name__, exc,
                            f"; first: {type(root).__name__}: {root}" if root is not None else "")
                return False
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._grads = [(p, p.grad) for p in params if p.grad is not None]
        self._no_grad = [p for p in params if p.grad is None]
        self.graph, self._static, self.key = graph, (sx, sy, scalars), key
        self.counts["captures"] += 1
        log.debug("search step captured in a CUDA graph for batches of shape %s", key[0])
        return True

    def _replay(self, x: Tensor, y: Tensor, epoch: int, step: int) -> StepStats:
        sx, sy, scalars = self._static
        with torch.cuda.device(x.device):
            sx.copy_(x)
            sy.copy_(y)
            self.graph.replay()
        self.counts["replays"] += 1
        self._keep_captured_grads(copy=False)
        return finish_step(scalars.tolist(), self.optimizer, n=int(y.numel()), epoch=epoch, step=step)
