"""The frozen teacher's pass of a search step, split at its Grad-CAM layer (same maps, less device time).

The search runs the FP teacher on every batch for its Grad-CAM map (METHOD.md 4.2, ``attribution.py``
in ``"detached"`` mode: no graph below the feature map F). ``TeacherPass`` holds the frozen teacher as
two parts read from its data flow (a torch.fx trace): the *trunk* (input -> F) and the *head*
(F -> logits). The trunk runs without autograd, the head on F as a leaf, and the maps come from
``gradcam_from``: the values of ``gradcam(teacher, ..., mode="detached")``. Two options on top:

- ``compile_trunk``: the trunk compiled by TorchInductor (fused ReLU / residual adds, a max pool
  without indices). It is the forward pass of a frozen network only. The first call compiles for its
  input shape, dtype and autocast state (12-14 s for ResNet-18 on an H200, ~2 s from Inductor's cache);
  inputs that would need another compile (the last, smaller batch of an epoch, the float32 evaluation)
  run the eager trunk instead. A failed compile falls back to the eager trunk with one warning.
- ``unfold_stem``: a convolution of the trunk with few input channels (an RGB stem, <= 4 channels) as
  im2col + one matrix product inside the compile (``UnfoldConv2d``, in chunks of the batch; the eager
  trunk keeps the convolution). Only compiled is it faster:
  cuDNN takes 2.3 ms for ResNet-18's 224 px stem (3 input channels, batch 256, H200), eager im2col
  4.7 ms, and the compiled trunk with it makes the search step 1.58 -> 1.54x an FP step.

``SearchConfig.teacher_compile`` (``use_compiled_teacher``): "auto" compiles (with the im2col stem) on
CUDA for inputs of at least 112 px and searches of at least 2,000 steps, where the gain pays for the
compile: ResNet-18 at 224 px, batch 256, on an H200 (with the teacher's own stream, which is always on
on CUDA) went from 1.75x to 1.51-1.55x an FP training step, ~4 ms a step (benchmarks/RESULTS.md,
session 19); at 28 px nothing is gained. "on" always, "off" never.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attribution import gradcam, gradcam_from
from .errors import ConfigError
from .search_config import TEACHER_COMPILE_MODES

log = logging.getLogger(__name__)

__all__ = ["TeacherPass", "UnfoldConv2d", "split_teacher", "teacher_gradcam", "use_compiled_teacher",
           "TEACHER_COMPILE_MODES"]

AUTO_MIN_SIZE = 112         # px: below it the teacher's pass is bound by the host (ResNet-20 28 px: no gain)
AUTO_MIN_STEPS = 2000       # a compile costs 2-14 s; ResNet-18 at 224 px gains ~3.5 ms a step

_UNFOLD_MAX_IN = 4          # convolutions with at most this many input channels go through im2col
_UNFOLD_CHUNK_BYTES = 256 * 2**20   # the im2col buffer per chunk of the batch


class UnfoldConv2d(nn.Module):
    """A frozen ``nn.Conv2d`` (groups 1) that, inside a TorchInductor compile, runs as im2col (``F.unfold``) and
    one matrix product per chunk of the batch (``im2col``; channels_last output, the same values up to the
    order of the additions); eagerly it is the convolution itself (cuDNN's kernel is faster uncompiled)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return self.im2col(x) if torch.compiler.is_compiling() else self.conv(x)

    def im2col(self, x: Tensor) -> Tensor:
        c = self.conv
        if torch.is_autocast_enabled(x.device.type):      # im2col in the product's dtype, not float32
            x = x.to(torch.get_autocast_dtype(x.device.type))
        w = c.weight.reshape(c.out_channels, -1).t().to(x.dtype)          # [C k k, O]
        n, _, h, wd = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = c.kernel_size, c.stride, c.padding, c.dilation
        oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        out = x.new_empty((n, oh * ow, c.out_channels))
        step = max(1, _UNFOLD_CHUNK_BYTES // max(w.shape[0] * oh * ow * x.element_size(), 1))
        for i in range(0, n, step):
            cols = F.unfold(x[i:i + step], c.kernel_size, dilation=c.dilation, padding=c.padding,
                            stride=c.stride)                        # [b, C k k, L]
            torch.matmul(cols.transpose(1, 2), w, out=out[i:i + step])
        if c.bias is not None:
            out.add_(c.bias.to(x.dtype))
        return out.view(n, oh, ow, c.out_channels).permute(0, 3, 1, 2)


def unfold_stems_(model: nn.Module) -> int:
    """Wrap every ``nn.Conv2d`` of ``model`` with at most 4 input channels (groups 1) in ``UnfoldConv2d``, in
    place; returns how many. For a frozen teacher's compiled trunk."""
    swaps = [(name, m) for name, m in model.named_modules()
             if type(m) is nn.Conv2d and m.groups == 1 and m.in_channels <= _UNFOLD_MAX_IN
             and m.padding_mode == "zeros" and not isinstance(m.padding, str)]
    for name, conv in swaps:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, UnfoldConv2d(conv))
    return len(swaps)


def _split_graphs(model: nn.Module, layer: str) -> tuple[Any, Any] | None:
    """(trunk, head) GraphModules of ``model`` split after the module ``layer`` (module docstring), or None."""
    import torch.fx as fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname == layer or isinstance(m, UnfoldConv2d) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - a model fx cannot trace keeps the hooked pass
        log.debug("teacher not split: %s cannot be traced (%s: %s)", type(model).__name__, type(exc).__name__, exc)
        return None
    nodes = list(graph.nodes)
    at = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == layer]
    if len(at) != 1:
        return None
    cut = nodes[at[0]]
    trunk_g, head_g = fx.Graph(), fx.Graph()
    env: dict = {}
    for n in nodes[:at[0] + 1]:
        env[n] = trunk_g.node_copy(n, lambda a: env[a])
    trunk_g.output(env[cut])
    henv: dict = {cut: head_g.placeholder("features")}
    try:
        for n in nodes[at[0] + 1:]:
            if n.op == "placeholder":
                return None
            henv[n] = head_g.node_copy(n, lambda a: henv[a])   # KeyError: the head reads the trunk's inside
    except KeyError:
        return None
    trunk = fx.GraphModule(model, trunk_g)
    trunk.graph.eliminate_dead_code()
    trunk.recompile()
    return trunk, fx.GraphModule(model, head_g)


class TeacherPass(nn.Module):
    """A frozen teacher as trunk and head (module docstring). ``forward`` gives the logits; ``gradcam``
    gives what ``gradcam(teacher, x, layer, mode="detached")`` does: (detached logits, maps)."""

    def __init__(self, trunk: nn.Module, head: nn.Module, layer: str, *, compile_trunk: bool = False,
                 compile_options: dict | None = None) -> None:
        super().__init__()
        self.trunk, self.head, self.layer = trunk, head, layer
        fast = torch.compile(trunk, dynamic=False, options=compile_options) if compile_trunk else None
        # not submodules: the compiled trunk, whether it has compiled, its options (for a copy)
        self._fast: dict[str, Any] = {"trunk": fast, "ready": False, "options": compile_options}

    def __deepcopy__(self, memo: dict) -> "TeacherPass":
        twin = TeacherPass(copy.deepcopy(self.trunk, memo), copy.deepcopy(self.head, memo), self.layer,
                           compile_trunk=self.compiled, compile_options=self._fast["options"])
        return twin.train(self.training)

    @property
    def compiled(self) -> bool:
        return self._fast["trunk"] is not None

    def drop_compiled(self) -> None:
        """Run the eager trunk from now on (frees the compiled code's references)."""
        self._fast.update(trunk=None, ready=False)

    def features(self, x: Tensor) -> Tensor:
        """The feature map of ``x``: the compiled trunk where it has compiled for this kind of input (the
        first call compiles; a later call whose input would need another compile runs the eager trunk:
        ``eager_on_recompile``), else the eager trunk. Under autocast the compiled trunk runs with the
        cast cache off, as inside a CUDA-graph capture (graph_step.py), so the capture finds it compiled."""
        fast = self._fast["trunk"]
        if fast is None:
            return self.trunk(x)
        dev = x.device.type
        cast = (torch.autocast(dev, dtype=torch.get_autocast_dtype(dev), cache_enabled=False)
                if torch.is_autocast_enabled(dev) else contextlib.nullcontext())
        stance = torch.compiler.set_stance("eager_on_recompile") if self._fast["ready"] else contextlib.nullcontext()
        try:
            with cast, stance:
                out = fast(x)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - compiling is an optimisation: go on eagerly
            log.warning("the teacher's forward pass could not be compiled (%s: %s); it runs eagerly from now on "
                        "(teacher_compile: off skips the attempt).", type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            self.drop_compiled()
            return self.trunk(x)
        self._fast["ready"] = True
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def gradcam(self, x: Tensor, *, target: str = "pred", labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            feats = self.features(x)
        if not isinstance(feats, Tensor) or feats.dim() != 4:
            raise ConfigError(f"gradcam_layer '{self.layer}' must output a 4-D feature map [B, C, H, W], but its "
                              f"output is {getattr(feats, 'shape', type(feats).__name__)}.")
        feats = feats.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.head(feats)
            maps = gradcam_from(logits, feats, target=target, labels=labels, mode="detached")
        return logits.detach(), maps


def split_teacher(teacher: nn.Module, layer: str, *, compile_trunk: bool = False, unfold_stem: bool = False,
                  compile_options: dict | None = None) -> TeacherPass | None:
    """``teacher`` (frozen, eval mode, BatchNorms folded: ``bn_fold.frozen_teacher_``) as a ``TeacherPass``
    sharing its weights, or None where it cannot be split (module docstring). ``unfold_stem`` swaps the
    trunk's few-channel convolutions (``teacher`` itself keeps its modules); ``compile_options``: TorchInductor
    settings of the compile (``torch.compile(options=)``)."""
    parts = _split_graphs(teacher, layer)
    if parts is None:
        return None
    trunk, head = parts
    if unfold_stem:                       # on a copy: the trunk may hold the teacher's own modules
        trunk = copy.deepcopy(trunk)
        unfold_stems_(trunk)
    return TeacherPass(trunk, head, layer, compile_trunk=compile_trunk,
                       compile_options=compile_options).eval().requires_grad_(False)


def use_compiled_teacher(setting: str, device: str | torch.device, *, input_size: int, steps: int) -> bool:
    """Whether a search compiles its teacher's trunk (``SearchConfig.teacher_compile``, module docstring):
    "on", "off", or "auto" = CUDA, ``input_size`` >= 112 px and ``steps`` (epochs x batches) >= 2,000."""
    if setting not in TEACHER_COMPILE_MODES:
        raise ConfigError(f"teacher_compile must be one of {TEACHER_COMPILE_MODES}, but got {setting!r}.")
    if setting != "auto":
        return setting == "on"
    return torch.device(device).type == "cuda" and input_size >= AUTO_MIN_SIZE and steps >= AUTO_MIN_STEPS


def teacher_gradcam(teacher: nn.Module, x: Tensor, layer: str, *, target: str = "pred",
                    labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The teacher's (logits, maps), detached: its own split pass for a ``TeacherPass``, else the hooked one."""
    if isinstance(teacher, TeacherPass):
        if teacher.layer != layer:
            raise ConfigError(f"This teacher was split at its layer '{teacher.layer}', but its Grad-CAM maps were "
                              f"asked for at '{layer}'; split it at '{layer}' (split_teacher) or ask for "
                              f"'{teacher.layer}'.")
        return teacher.gradcam(x, target=target, labels=labels)
    return gradcam(teacher, x, layer, target=target, labels=labels, mode="detached")
