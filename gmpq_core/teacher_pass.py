"""The frozen teacher's pass of a search step, split at its Grad-CAM layer (same maps, less device time).

The search runs the FP teacher on every batch for its Grad-CAM map (METHOD.md 4.2, ``attribution.py``
in ``"detached"`` mode: no graph below the feature map F). ``TeacherPass`` holds the frozen teacher as
two parts read from its data flow (a torch.fx trace): the *trunk* (input -> F) and the *head*
(F -> logits). The trunk runs without autograd, the head on F as a leaf, and the maps come from
``gradcam_from``: the values of ``gradcam(teacher, ..., mode="detached")``. Two options on top:

- ``compile_trunk``: the trunk compiled by TorchInductor (fused ReLU / residual adds, a max pool
  without indices). It is the forward pass of a frozen network only. The first call compiles for its
  input shape, dtype and autocast state (12-14 s for ResNet-18 on an H200, ~2 s from Inductor's cache);
  inputs of any other kind (the last, smaller batch of an epoch, the float32 evaluation) run the eager
  trunk rather than compile again. A failed compile falls back to the eager trunk with one warning.
- ``unfold_stem``: a convolution of the trunk with few input channels (an RGB stem, <= 4 channels) as
  im2col + one matrix product (``UnfoldConv2d``, in chunks of the batch). Only compiled is it faster:
  cuDNN takes 2.3 ms for ResNet-18's 224 px stem (3 input channels, batch 256, H200), eager im2col
  4.7 ms, and the compiled trunk with it makes the search step 1.58 -> 1.54x an FP step.

``SearchConfig.teacher_compile`` (``use_compiled_teacher``): "auto" compiles (with the im2col stem) on
CUDA for inputs of at least 112 px and searches of at least 2,000 steps, where the gain pays for the
compile: ResNet-18 at 224 px, batch 256, on an H200 (with the teacher's own stream, which is always on
on CUDA) went from 1.75x to 1.51-1.55x an FP training step, ~4 ms a step (benchmarks/RESULTS.md,
session 19); at 28 px nothing is gained. "on" always, "off" never.
"""
from __future__ import annotations

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
    """A frozen ``nn.Conv2d`` (groups 1) computed as im2col (``F.unfold``) and one matrix product per chunk of
    the batch; the output is channels_last. Same values up to the order of the additions."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.out_channels = conv.out_channels
        self.register_buffer("weight_t", conv.weight.detach().reshape(conv.out_channels, -1).t().contiguous())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):      # im2col in the product's dtype, not float32
            x = x.to(torch.get_autocast_dtype(x.device.type))
        w = self.weight_t.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        n, _, h, wd = x.shape
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (wd + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        out = x.new_empty((n, oh * ow, self.out_channels))
        per_image = w.shape[0] * oh * ow * x.element_size()
        step = max(1, _UNFOLD_CHUNK_BYTES // max(per_image, 1))
        for i in range(0, n, step):
            cols = F.unfold(x[i:i + step], self.kernel_size, dilation=self.dilation, padding=self.padding,
                            stride=self.stride)                     # [b, C k k, L]
            torch.matmul(cols.transpose(1, 2), w, out=out[i:i + step])
        if b is not None:
            out.add_(b)
        return out.view(n, oh, ow, self.out_channels).permute(0, 3, 1, 2)


def unfold_stems_(model: nn.Module) -> int:
    """Swap every ``nn.Conv2d`` of ``model`` with at most 4 input channels (groups 1) for ``UnfoldConv2d``, in
    place; returns how many. For a frozen teacher only (the swapped layers have no parameters)."""
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
        self._fast: dict[str, Any] = {"trunk": fast, "key": None}   # not submodules: the compiled trunk, its input

    @property
    def compiled(self) -> bool:
        return self._fast["trunk"] is not None

    def drop_compiled(self) -> None:
        """Run the eager trunk from now on (frees the compiled code's references)."""
        self._fast.update(trunk=None, key=None)

    def features(self, x: Tensor) -> Tensor:
        fast = self._fast["trunk"]
        if fast is not None:
            dev = x.device.type
            key = (tuple(x.shape), x.stride(), x.dtype, x.device, torch.is_grad_enabled(),
                   torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
            if self._fast["key"] is None:
                self._fast["key"] = key
            if key == self._fast["key"]:
                try:
                    return fast(x)
                except Exception as exc:  # noqa: BLE001 - compiling is an optimisation: go on eagerly
                    log.warning("the teacher's forward pass could not be compiled (%s: %s); it runs eagerly.",
                                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                    self.drop_compiled()
        return self.trunk(x)

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
    if unfold_stem:
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
        return teacher.gradcam(x, target=target, labels=labels)
    return gradcam(teacher, x, layer, target=target, labels=labels, mode="detached")
