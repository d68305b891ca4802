"""The setup of ``bench_search_step.py`` (also used by ``bench_host_overhead.py``): ``Bench``, everything one
model's measurements need, and ``build_bench``, which builds it once on ONE seeded batch: the FP model and its
optimiser, the FP teacher (BatchNorms folded, as ``search_policy`` runs it, and a copy with them for "+bnteacher"),
and one calibrated supernet with its optimiser per variant (variant names: bench_variants.py). Run from the
benchmarks folder (its modules import each other by name); ``bench_search_step`` re-exports both."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from gmpq_core.attribution import find_feature_layer
from gmpq_core.bitops import layer_macs
from gmpq_core.bn_fold import fold_batchnorm_
from gmpq_core.complexity import Budget
from gmpq_core.graph_step import GraphedSearchStep
from gmpq_core.layers import searchable_layers
from gmpq_core.models import build_model
from gmpq_core.search import _make_optimizer  # the optimiser search_policy builds
from gmpq_core.search_config import SearchConfig
from gmpq_core.teacher_pass import split_teacher
from gmpq_core.supernet import build_supernet, calibrate_supernet_, mixed_layers, set_mixture_impl_
from gmpq_core.train import sgd

from bench_variants import Variant  # same folder (run as a script)

__all__ = ["Bench", "build_bench"]


@dataclass
class Bench:
    """Everything one model's measurements need (built once, same batch for every variant)."""
    name: str
    size: int
    x: torch.Tensor
    y: torch.Tensor
    fp: nn.Module
    fp_opt: torch.optim.Optimizer
    teacher: nn.Module            # BatchNorms folded, as search_policy runs it
    teacher_bn: nn.Module         # the same teacher with its BatchNorms ("+bnteacher")
    cfg: SearchConfig
    layer: str
    macs_vec: torch.Tensor
    budget_bitops: int
    first_macs: int
    supernets: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = field(default_factory=dict)
    bn_teacher_kinds: set[str] = field(default_factory=set)       # the "+bnteacher" variants
    stream_kinds: set[str] = field(default_factory=set)           # the "+tstream" variants
    teachers: dict[str, nn.Module] = field(default_factory=dict)  # "+tsplit/+tcompile/+tunfold": a TeacherPass
    tweight_kinds: set[str] = field(default_factory=set)          # "+tweights": Triton weight-mixture kernels
    graphs: dict[str, GraphedSearchStep | None] = field(default_factory=dict)

    def teacher_of(self, kind: str) -> nn.Module:
        if kind in self.teachers:
            return self.teachers[kind]
        return self.teacher_bn if kind in self.bn_teacher_kinds else self.teacher

    def graphed(self, kind: str, warmup: int = 3) -> GraphedSearchStep:
        """A CUDA-graph runner of variant ``kind``'s supernet (strict: a failed capture raises)."""
        net, opt = self.supernets[kind]
        return GraphedSearchStep(net, self.teacher_of(kind), opt, self.cfg, layer=self.layer, macs_vec=self.macs_vec,
                                 budget_bitops=self.budget_bitops, first_macs=self.first_macs, mode="second_order",
                                 warmup=warmup, strict=True, teacher_stream=kind in self.stream_kinds)


def build_bench(name: str, size: int, in_ch: int, batch: int, device: str, variants: list[str],
                channels_last: bool, seed: int = 0) -> Bench:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(name, num_classes=10, in_channels=in_ch, small_input=False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    x = torch.randn(batch, in_ch, size, size, generator=gen).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    teacher = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # BatchNorm statistics of a "trained" teacher, from a few batches
        teacher.train()
        for _ in range(3):
            teacher(x)
    teacher.eval()
    fp = copy.deepcopy(teacher).requires_grad_(True).train()
    teacher_bn = copy.deepcopy(teacher)
    fold_batchnorm_(teacher)
    fp_opt = sgd(fp.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)   # as train_fp
    cfg = SearchConfig(budget=Budget(avg_bits=4.0), batch_size=batch)
    all_macs = layer_macs(teacher, size, in_ch)
    macs = {n: all_macs[n] for n in searchable_layers(teacher)}
    bench = Bench(name=name, size=size, x=x, y=y, fp=fp, fp_opt=fp_opt, teacher=teacher, teacher_bn=teacher_bn, cfg=cfg,
                  layer=find_feature_layer(teacher, model_name=name),
                  macs_vec=torch.tensor([float(v) for v in macs.values()], device=device),
                  budget_bitops=cfg.budget.to_bitops(macs), first_macs=next(iter(macs.values())))
    for v in variants:
        net = build_supernet(teacher_bn, cfg.candidates).to(device, memory_format=fmt).requires_grad_(True)
        calibrate_supernet_(net, x)
        spec = Variant.parse(v)
        if spec.bn_teacher:
            bench.bn_teacher_kinds.add(v)
        if spec.teacher_stream:
            bench.stream_kinds.add(v)
        if "+tweights" in v:
            bench.tweight_kinds.add(v)
        if spec.teacher_pass:
            split = split_teacher(copy.deepcopy(teacher), bench.layer,
                                  compile_trunk=bool({"tcompile", "tfreeze"} & spec.teacher_pass),
                                  unfold_stem="tunfold" in spec.teacher_pass,
                                  compile_options={"freezing": True} if "tfreeze" in spec.teacher_pass else None)
            if split is None:
                raise RuntimeError(f"variant {v}: the teacher of {name} cannot be split at {bench.layer}")
            bench.teachers[v] = split
        set_mixture_impl_(net, spec.impl, conv_node=spec.conv_node, keep_operands=spec.keep)
        if list(mixed_layers(net)) != list(macs):
            raise RuntimeError("supernet layers differ from the teacher's searchable layers")
        bench.supernets[v] = (net.train(), _make_optimizer(net, cfg))
        if spec.graph:
            bench.graphs[v] = bench.graphed(v, warmup=2)   # captured in the untimed warm-up steps
    return bench
